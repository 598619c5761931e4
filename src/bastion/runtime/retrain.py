"""The retrain pipeline: sanitise feedback, fine-tune adversarially, gate against the
champion.

:meth:`RetrainPipeline.run` takes the champion and recent labelled feedback and returns a
:class:`RetrainResult`; it never touches the registry (the healing controller registers
and promotes a candidate only when ``result.passed``). Steps:

0. **Who says so.** Each feedback row carries its client (the authenticated key's client
   name). Rows of a quarantined client never reach this pipeline (the controller drops
   them, retroactively). Each client has a trust weight (``client_trust``, default
   ``default_client_trust``): a row is repeated ``feedback_weight * trust`` times
   (stochastically rounded; trust 0 drops it). No client may contribute more than
   ``max_client_share`` of the training rows (the trusted reference included): a client
   above its share keeps a random subset of its rows. Anonymous feedback counts as one
   client, ``(anonymous)``.
1. **Screen.** Feedback can be poisoned. A *provisional* model (the champion fine-tuned,
   clean, for ``provisional_epochs`` on the reference plus the feedback) lets the
   screening of :func:`bastion.detect.feedback.screen_feedback` see what the feedback
   would teach: kNN label agreement (reference + feedback, as before, and reference
   only), agreement with the champion, STRIP, spectral signatures and activation
   clustering, per target class. What it removed and why is in the result's ``screen``.
   Under a real drift the drifted inputs' nearest neighbours are other drifted inputs,
   which is why the feedback takes part in the kNN vote; a label the champion agrees
   with is never removed by the model-based tests.
2. **Fine-tune.** Trusted reference data plus the kept feedback (repeated as in 0.),
   with :class:`~bastion.defend.training.AdversarialTrainer` (PGD adversarial training
   mixed with the clean loss, starting from the champion's weights).
3. **Gate** on the trusted holdout and held-out feedback, candidate against champion:
   clean accuracy (no regression beyond ``margin``, and at least
   ``min_clean_accuracy``); robust accuracy under :func:`bastion.evaluate.scan.scan`
   (PGD at ``eps``, no regression beyond ``margin``); accuracy on held-out kept feedback
   (at least the champion's ``+ min_feedback_gain``); and three trigger-agnostic
   backdoor gates (:mod:`bastion.detect.feedback`): ``class_absorption`` (no class
   suddenly absorbs holdout predictions the champion gave elsewhere),
   ``backdoor`` (a Neural-Cleanse trigger search on candidate *and* champion, same seed
   and inputs: no class whose minimal trigger shrank abnormally against the champion's,
   MAD anomaly index of the log ratios above ``backdoor_anomaly`` and ratio below
   ``backdoor_max_ratio``; the champion's search is cached per champion) and
   ``strip`` (STRIP of the candidate calibrated on the holdout: no class with an excess
   of trigger-like, low-entropy inputs among the feedback it trained on); optionally
   (``poison_gate``) poison uptake on the suspicious labels. Every gate records both
   numbers and its evidence.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from bastion.errors import BastionError, DataError


class RetrainConfig(BaseModel):
    """Settings of the retrain pipeline and its gates (see the module docs for each step).

    Feedback set: ``max_client_share`` (most of the training rows one client may supply,
    reference included; 1.0 = no cap), ``client_trust`` (client -> weight in [0, 1]),
    ``default_client_trust``, ``feedback_weight`` (repeats of a fully trusted row).
    Screening: ``sanitize`` (off: nothing is removed), ``provisional_epochs`` /
    ``provisional_lr`` (0 epochs: only the label checks), ``knn_k`` / ``max_disagreement``,
    ``strip_fpr``, ``spectral_z``, ``min_votes``, ``class_min_count`` / ``class_min_share``.
    Backdoor gates: ``absorption_gate`` (``absorption_alpha``, ``absorption_min_count``),
    ``backdoor_gate`` (``backdoor_steps`` per class on ``backdoor_points`` holdout
    inputs, ``backdoor_anomaly``, ``backdoor_max_ratio``), ``strip_gate``
    (``strip_gate_fpr``, ``strip_gate_alpha``, ``strip_gate_min_count``).
    """

    model_config = ConfigDict(extra="forbid")

    sanitize: bool = True
    max_client_share: float = Field(default=0.2, gt=0.0, le=1.0)
    client_trust: dict[str, Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        default_factory=dict)
    default_client_trust: float = Field(default=1.0, ge=0.0, le=1.0)
    provisional_epochs: int = Field(default=3, ge=0)
    provisional_lr: float = Field(default=3e-3, gt=0.0)
    strip_fpr: float = Field(default=0.01, gt=0.0, lt=0.5)
    spectral_z: float = Field(default=3.0, gt=0.0)
    min_votes: int = Field(default=4, ge=1, le=4)
    class_min_count: int = Field(default=5, ge=1)
    class_min_share: float = Field(default=0.1, ge=0.0, le=1.0)
    knn_k: int = Field(default=10, ge=1)
    max_disagreement: float = Field(default=0.5, ge=0.0, le=1.0)
    feedback_weight: int = Field(default=2, ge=1)
    max_reference: int = Field(default=1500, ge=1)
    feedback_holdout: float = Field(default=0.25, ge=0.0, lt=1.0)
    method: str = "pgd-at"
    eps: float = Field(default=0.1, ge=0.0)
    at_steps: int = Field(default=5, ge=1)
    adv_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    epochs: int = Field(default=3, ge=1)
    lr: float = Field(default=1e-3, gt=0.0)
    batch_size: int = Field(default=128, ge=1)
    margin: float = Field(default=0.03, ge=0.0)
    min_clean_accuracy: float = Field(default=0.0, ge=0.0, le=1.0)
    min_feedback_gain: float = 0.0
    robust_gate: bool = True
    robust_points: int = Field(default=100, ge=1)
    robust_steps: int = Field(default=10, ge=1)
    poison_gate: bool = False
    absorption_gate: bool = True
    absorption_alpha: float = Field(default=0.01, gt=0.0, lt=1.0)
    absorption_min_count: int = Field(default=4, ge=1)
    backdoor_gate: bool = True
    backdoor_steps: int = Field(default=100, ge=1)
    backdoor_points: int = Field(default=100, ge=2)
    backdoor_anomaly: float = Field(default=2.0, gt=0.0)
    backdoor_max_ratio: float = Field(default=0.6, gt=0.0, le=1.0)
    strip_gate: bool = True
    strip_gate_fpr: float = Field(default=0.01, gt=0.0, lt=0.5)
    strip_gate_alpha: float = Field(default=0.001, gt=0.0, lt=1.0)
    strip_gate_min_count: int = Field(default=5, ge=1)
    seed: int = 0


class GateResult(BaseModel):
    """One validation gate: both numbers, the rule and the outcome."""

    name: str
    passed: bool
    candidate: float | None = None
    champion: float | None = None
    rule: str
    detail: dict[str, Any] = Field(default_factory=dict)


class RetrainResult(BaseModel):
    """What a retrain did; ``model`` is the candidate (not serialised)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    passed: bool
    gates: list[GateResult]
    n_feedback: int
    n_kept: int
    n_removed: int
    removed: list[int] = Field(default_factory=list)
    suspicion_threshold: float | None = None
    capped: list[int] = Field(default_factory=list)
    screen: dict[str, Any] = Field(default_factory=dict)
    clients: dict[str, dict[str, Any]] = Field(default_factory=dict)
    n_train: int
    time_s: float
    reason: str
    model: Any = Field(default=None, exclude=True)

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (for the audit log)."""
        d = self.model_dump(exclude={"model"})
        d["removed"] = d["removed"][:2000]
        d["n_capped"] = len(d["capped"])
        d["capped"] = d["capped"][:2000]
        return d


Trainer = Callable[[Any, np.ndarray, np.ndarray], Any]


def _acc(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    if len(x) == 0:
        return float("nan")
    return float((np.asarray(model.predict_proba(x)).argmax(1) == y).mean())


class RetrainPipeline:
    """See the module docs.

    Args:
        reference: trusted ``(x, y)`` to train on (never poisoned).
        holdout: trusted ``(x, y)`` the gates evaluate on (never trained on).
        config: :class:`RetrainConfig`.
        trainer: replace the fine-tuning step: ``(champion, x, y) -> candidate``.
    """

    def __init__(self, reference: tuple[np.ndarray, np.ndarray],
                 holdout: tuple[np.ndarray, np.ndarray], *,
                 config: RetrainConfig | None = None, trainer: Trainer | None = None) -> None:
        self.x_ref, self.y_ref = (np.asarray(reference[0], dtype=np.float32),
                                  np.asarray(reference[1]).astype(np.int64))
        self.x_hold, self.y_hold = (np.asarray(holdout[0], dtype=np.float32),
                                    np.asarray(holdout[1]).astype(np.int64))
        if len(self.x_ref) != len(self.y_ref) or len(self.x_hold) != len(self.y_hold):
            raise DataError("reference and holdout need one label per input")
        if len(self.x_ref) < 20 or len(self.x_hold) < 20:
            raise DataError("the retrain pipeline needs at least 20 trusted reference and "
                            "20 holdout examples")
        self.config = config or RetrainConfig()
        self.trainer = trainer
        self._nc_cache: dict[str, Any] = {}

    # -- 1. sanitise ----------------------------------------------------------------
    def suspicion(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per feedback label, the share of its ``k`` nearest neighbours (among the
        trusted reference and the other feedback, itself excluded) whose label disagrees."""
        from bastion.detect.poison import KnnLabelDetector

        ri = np.random.default_rng(self.config.seed).permutation(len(self.x_ref))[
            : self.config.max_reference]
        xa = np.concatenate([self.x_ref[ri], x])
        ya = np.concatenate([self.y_ref[ri], y])
        det = KnnLabelDetector(k=self.config.knn_k).fit(xa, ya)
        return np.asarray(det.scores_[len(ri):], dtype=np.float64)

    # -- 2. fine-tune -----------------------------------------------------------------
    def _train(self, champion: Any, x: np.ndarray, y: np.ndarray) -> Any:
        if self.trainer is not None:
            return self.trainer(champion, x, y)
        from bastion.defend.training import AdversarialTrainer

        c = self.config
        tr = AdversarialTrainer(method=c.method, eps=c.eps, steps=c.at_steps,
                                adv_fraction=c.adv_fraction, epochs=c.epochs, lr=c.lr,
                                batch_size=c.batch_size, init="finetune", guard=False,
                                guard_points=64, guard_steps=5, seed=c.seed)
        return tr.fit(champion, (x, y))

    # -- 3. gates ---------------------------------------------------------------------
    def _robust(self, model: Any) -> float:
        from bastion.evaluate.scan import scan

        c = self.config
        n = min(c.robust_points, len(self.x_hold))
        rep = scan(model, self.x_hold[:n], self.y_hold[:n], epsilons=[c.eps], attacks=["pgd"],
                   seed=c.seed, sanity_checks=False, n_examples=0,
                   attack_options={"pgd": {"steps": c.robust_steps}})
        return float(next(iter(rep.robust_accuracy.values())))

    def _trigger_search(self, model: Any) -> Any:
        """Neural-Cleanse minimal triggers of ``model`` on the first ``backdoor_points``
        holdout inputs (the champion's result is cached by its weights)."""
        import hashlib

        from bastion.detect.backdoor import NeuralCleanse

        c = self.config
        key = None
        module = getattr(model, "module", None)
        if module is not None:
            h = hashlib.sha256()
            for t in module.state_dict().values():
                h.update(t.detach().cpu().numpy().tobytes())
            key = h.hexdigest()
            if key in self._nc_cache:
                return self._nc_cache[key]
        res = NeuralCleanse(steps=c.backdoor_steps, batch_size=32, seed=c.seed,
                            anomaly_threshold=c.backdoor_anomaly).run(
            model, self.x_hold[: c.backdoor_points])
        if key is not None:
            self._nc_cache = {key: res}  # one champion at a time
        return res

    def _backdoor_gates(self, candidate: Any, champion: Any, x_train_fb: np.ndarray
                        ) -> list[GateResult]:
        from bastion.detect.feedback import class_absorption, paired_trigger_anomaly, strip_excess

        c = self.config
        out: list[GateResult] = []
        k = int(getattr(candidate, "n_classes", int(self.y_hold.max()) + 1))
        if c.absorption_gate:
            pa = np.asarray(champion.predict_proba(self.x_hold)).argmax(1)
            pb = np.asarray(candidate.predict_proba(self.x_hold)).argmax(1)
            t = class_absorption(self.y_hold, pa, pb, n_classes=k, alpha=c.absorption_alpha,
                                 min_count=c.absorption_min_count)
            out.append(GateResult(
                name="class_absorption", passed=not t.flagged,
                candidate=float(len(t.flagged)), champion=0.0,
                rule=f"no class absorbs >= {c.absorption_min_count} more wrong holdout answers "
                     f"than it loses (binomial p < {c.absorption_alpha}/{k})",
                detail=t.as_dict()))
        if c.backdoor_gate and callable(getattr(candidate, "logits", None)):
            try:
                rc, rh = self._trigger_search(candidate), self._trigger_search(champion)
                t = paired_trigger_anomaly(np.asarray(rc.mask_l1), np.asarray(rh.mask_l1),
                                           threshold=c.backdoor_anomaly,
                                           max_ratio=c.backdoor_max_ratio)
                out.append(GateResult(
                    name="backdoor", passed=not t.flagged, candidate=float(len(t.flagged)),
                    champion=0.0,
                    rule=f"Neural-Cleanse minimal trigger per class, candidate / champion: no "
                         f"class with anomaly index > {c.backdoor_anomaly} and ratio < "
                         f"{c.backdoor_max_ratio}",
                    detail={**t.as_dict(), "candidate_l1": [round(v, 3) for v in rc.mask_l1],
                            "champion_l1": [round(v, 3) for v in rh.mask_l1],
                            "steps": c.backdoor_steps, "time_s": round(rc.time_s, 2)}))
            except BastionError as exc:
                out.append(GateResult(name="backdoor", passed=True, rule="skipped",
                                      detail={"skipped": str(exc)}))
        if c.strip_gate and len(x_train_fb):
            from bastion.detect.backdoor import StripDetector

            det = StripDetector(model=candidate, n_overlays=16, seed=c.seed).fit(self.x_hold)
            det.calibrate(self.x_hold, fpr=c.strip_gate_fpr)
            flagged = det.predict(x_train_fb)
            pred = np.asarray(candidate.predict_proba(x_train_fb)).argmax(1)
            t = strip_excess(flagged, pred, n_classes=k, fpr=c.strip_gate_fpr,
                             alpha=c.strip_gate_alpha, min_count=c.strip_gate_min_count)
            out.append(GateResult(
                name="strip", passed=not t.flagged, candidate=float(flagged.mean()),
                champion=c.strip_gate_fpr,
                rule=f"STRIP of the candidate (threshold: {c.strip_gate_fpr:.0%} of the holdout)"
                     f" on the {len(x_train_fb)} feedback rows it trained on: no class with "
                     f">= {c.strip_gate_min_count} low-entropy inputs beyond that rate "
                     f"(binomial p < {c.strip_gate_alpha}/{k})",
                detail=t.as_dict()))
        return out

    def gates(self, candidate: Any, champion: Any, *, x_fb: np.ndarray, y_fb: np.ndarray,
              x_sus: np.ndarray, y_sus: np.ndarray,
              x_train_fb: np.ndarray | None = None) -> list[GateResult]:
        """Run every gate; see the module docs."""
        c = self.config
        out: list[GateResult] = []
        a_new, a_old = _acc(candidate, self.x_hold, self.y_hold), _acc(
            champion, self.x_hold, self.y_hold)
        out.append(GateResult(
            name="clean_accuracy", candidate=a_new, champion=a_old,
            passed=a_new >= a_old - c.margin and a_new >= c.min_clean_accuracy,
            rule=f"candidate >= champion - {c.margin} and >= {c.min_clean_accuracy} "
                 f"on {len(self.y_hold)} trusted holdout examples"))
        if c.robust_gate and c.eps > 0 and callable(getattr(candidate, "logits", None)):
            r_new, r_old = self._robust(candidate), self._robust(champion)
            out.append(GateResult(
                name="robust_accuracy", candidate=r_new, champion=r_old,
                passed=r_new >= r_old - c.margin,
                rule=f"PGD(eps={c.eps}, {c.robust_steps} steps) robust accuracy: candidate "
                     f">= champion - {c.margin} on {min(c.robust_points, len(self.y_hold))} "
                     "holdout examples"))
        if len(y_fb):
            f_new, f_old = _acc(candidate, x_fb, y_fb), _acc(champion, x_fb, y_fb)
            out.append(GateResult(
                name="feedback_accuracy", candidate=f_new, champion=f_old,
                passed=f_new >= f_old + c.min_feedback_gain,
                rule=f"on {len(y_fb)} held-out kept feedback labels: candidate >= champion "
                     f"+ {c.min_feedback_gain}"))
        if c.poison_gate and len(y_sus):
            s_new, s_old = _acc(candidate, x_sus, y_sus), _acc(champion, x_sus, y_sus)
            out.append(GateResult(
                name="poison_uptake", candidate=s_new, champion=s_old,
                passed=s_new <= s_old + c.margin,
                rule=f"agreement with {len(y_sus)} suspicious feedback labels: candidate <= "
                     f"champion + {c.margin}"))
        out += self._backdoor_gates(candidate, champion, x_train_fb if x_train_fb is not None
                                    else x_fb[:0])
        return out

    # -- 0. who contributes how much --------------------------------------------------
    def client_weights(self, clients: list[str], n_ref: int, rng: np.random.Generator
                       ) -> tuple[np.ndarray, dict[str, dict[str, Any]]]:
        """Per feedback row, how many times it is repeated in the training set (0 =
        unused): trust weight times ``feedback_weight``, then the per-client cap."""
        c = self.config
        cl = np.asarray(clients, dtype=object)
        trust = np.array([float(c.client_trust.get(k, c.default_client_trust)) for k in cl])
        w = c.feedback_weight * trust
        mult = np.floor(w) + (rng.random(len(w)) < (w - np.floor(w)))
        mult = mult.astype(np.int64)
        names = sorted(set(cl.tolist()))
        tot = {k: int(mult[cl == k].sum()) for k in names}
        # the largest per-client total m with m <= share * (n_ref + sum_k min(tot_k, m))
        share = c.max_client_share
        cap = float("inf")
        if share < 1.0 and tot:
            lo, hi = 0.0, float(max(tot.values()))
            for _ in range(60):
                mid = (lo + hi) / 2
                if mid <= share * (n_ref + sum(min(v, mid) for v in tot.values())):
                    lo = mid
                else:
                    hi = mid
            cap = lo
        info: dict[str, dict[str, Any]] = {}
        for k in names:
            rows = np.flatnonzero(cl == k)
            used = int(tot[k])
            dropped = 0
            if used > cap:  # keep a random subset of the client's rows within its share
                keep_w = 0
                for i in rng.permutation(rows):
                    if keep_w + mult[i] > cap:
                        mult[i], dropped = 0, dropped + 1
                    else:
                        keep_w += int(mult[i])
                used = keep_w
            info[str(k)] = {"rows": len(rows), "trust": float(trust[rows[0]]),
                            "training_rows": used, "capped_rows": dropped}
        total = n_ref + int(mult.sum())
        for v in info.values():
            v["share"] = round(v["training_rows"] / max(total, 1), 4)
        return mult, info

    def _provisional(self, champion: Any, x: np.ndarray, y: np.ndarray) -> Any:
        """The champion fine-tuned (clean, briefly) on ``(x, y)``: what the feedback
        would teach, for the model-based screening."""
        import copy

        from bastion.models.train import train_classifier

        c = self.config
        if c.provisional_epochs < 1 or getattr(champion, "module", None) is None:
            return None
        m = copy.deepcopy(champion)
        train_classifier(m, x, y, epochs=c.provisional_epochs, lr=c.provisional_lr,
                         batch_size=c.batch_size, seed=c.seed)
        return m

    # -- all together -----------------------------------------------------------------
    def run(self, champion: Any, x_feedback: np.ndarray, y_feedback: np.ndarray, *,
            clients: list[str | None] | None = None) -> RetrainResult:
        """Weigh, screen, fine-tune, gate. ``clients``: the client of each feedback row
        (``None``: one anonymous client). Raises only on bad input or a crash of a step."""
        from bastion.detect.feedback import screen_feedback

        t0 = time.perf_counter()
        c = self.config
        xf = np.asarray(x_feedback, dtype=np.float32)
        yf = np.asarray(y_feedback).astype(np.int64)
        if len(xf) != len(yf):
            raise DataError(f"{len(xf)} feedback inputs for {len(yf)} labels")
        if xf.shape[1:] != self.x_ref.shape[1:]:
            raise DataError(f"feedback inputs have shape {xf.shape[1:]}, the reference "
                            f"{self.x_ref.shape[1:]}")
        cl = [ANONYMOUS if k is None else str(k) for k in (clients or [None] * len(yf))]
        if len(cl) != len(yf):
            raise DataError(f"{len(cl)} client ids for {len(yf)} feedback labels")
        rng = np.random.default_rng(c.seed)
        ri = rng.permutation(len(self.x_ref))[: c.max_reference]
        mult, client_info = self.client_weights(cl, len(ri), rng)
        used = mult > 0
        keep = used.copy()
        screen: dict[str, Any] = {}
        suspicious = np.zeros(len(yf), dtype=bool)
        if c.sanitize and used.any():
            ui = np.flatnonzero(used)
            rep_x = np.repeat(xf[ui], mult[ui], axis=0)
            rep_y = np.repeat(yf[ui], mult[ui])
            prov = self._provisional(champion, np.concatenate([self.x_ref[ri], rep_x]),
                                     np.concatenate([self.y_ref[ri], rep_y]))
            rep = screen_feedback(
                champion, xf[ui], yf[ui], x_ref=self.x_ref[ri], y_ref=self.y_ref[ri],
                provisional=prov, knn_k=c.knn_k, max_disagreement=c.max_disagreement,
                strip_fpr=c.strip_fpr, spectral_z=c.spectral_z, min_votes=c.min_votes,
                class_min_count=c.class_min_count, class_min_share=c.class_min_share,
                seed=c.seed)
            suspicious[ui[rep.remove]] = True
            keep &= ~suspicious
            screen = rep.summary(ids=[int(i) for i in ui])
            for k, v in client_info.items():
                v["screened_out"] = int(sum(1 for i in ui[rep.remove] if cl[i] == k))
        kept_idx = np.flatnonzero(keep)
        order = rng.permutation(kept_idx)
        n_hold = int(round(c.feedback_holdout * len(order)))
        fb_hold, fb_train = order[:n_hold], order[n_hold:]
        x_train = np.concatenate([self.x_ref[ri], np.repeat(xf[fb_train], mult[fb_train],
                                                            axis=0)])
        y_train = np.concatenate([self.y_ref[ri], np.repeat(yf[fb_train], mult[fb_train])])
        candidate = self._train(champion, x_train, y_train)
        gates = self.gates(candidate, champion, x_fb=xf[fb_hold], y_fb=yf[fb_hold],
                           x_sus=xf[suspicious], y_sus=yf[suspicious],
                           x_train_fb=xf[fb_train])
        passed = all(g.passed for g in gates)
        reason = "every gate passed" if passed else "failed gates: " + "; ".join(
            _why(g) for g in gates if not g.passed)
        return RetrainResult(
            passed=passed, gates=gates, n_feedback=len(yf), n_kept=int(keep.sum()),
            n_removed=int(suspicious.sum()), removed=[int(i) for i in np.flatnonzero(suspicious)],
            suspicion_threshold=c.max_disagreement if c.sanitize else None,
            capped=[int(i) for i in np.flatnonzero(~used)], screen=screen, clients=client_info,
            n_train=len(y_train), time_s=time.perf_counter() - t0, reason=reason,
            model=candidate)


ANONYMOUS = "(anonymous)"


def _why(g: GateResult) -> str:
    """One failed gate in words, for the audit log and the dashboard timeline."""
    d = g.detail
    if g.name == "class_absorption":
        return (f"class_absorption: backdoor or targeted poisoning suspected, class(es) "
                f"{d.get('flagged')} absorb holdout predictions the champion gave elsewhere")
    if g.name == "backdoor":
        f = d.get("flagged") or []
        ratios = d.get("ratio") or []
        return ("backdoor: trigger search finds class(es) " + ", ".join(
            f"{t} (minimal trigger {ratios[t]:.2f}x the champion's)" for t in f)
            + " abnormally easy to reach")
    if g.name == "strip":
        return (f"strip: backdoor suspected, the candidate keeps class(es) {d.get('flagged')} "
                "under superimposition for too many of the feedback inputs it learned")
    return f"{g.name} (candidate {g.candidate}, champion {g.champion})"
