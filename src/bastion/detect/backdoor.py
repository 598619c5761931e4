"""Model-level backdoor checks: STRIP at inference, and a Neural-Cleanse-style scan.

- :class:`StripDetector` (Gao et al. 2019): superimpose an input on ``n_overlays``
  random clean images and average the entropy of the model's predictions. A clean
  input's prediction is easily disturbed (high entropy); a triggered input keeps the
  backdoor's target class whatever is overlaid (low entropy). Score = minus the mean
  entropy (higher = more suspicious); ``calibrate`` on clean inputs sets the threshold
  for a chosen false-positive rate. Needs only ``predict_proba``: works on a black box.
- :class:`NeuralCleanse` (Wang et al. 2019): for every class ``t``, optimise a mask ``m``
  and pattern ``p`` so that ``(1 - m) * x + m * p`` is classified ``t`` for clean ``x``,
  with an L1 penalty on ``m`` (its weight adapted to keep the attack success near the
  goal, as in the paper). A backdoor target needs an abnormally *small* mask: the MAD
  anomaly index ``|L1_t - median| / (1.4826 * MAD)`` above 2 on the small side points
  at the suspected target class. Needs gradients: white-box only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bastion.errors import BastionError, DataError, ModelError


def _entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=1)


class StripDetector:
    """STRIP: entropy of predictions on superimposed inputs; see the module docs.

    Args:
        model: any model with ``predict_proba`` and ``bounds``.
        n_overlays: clean images superimposed on each input (queries per input).
        mode: ``"add"`` (sum, clipped to bounds, as the paper's image addition) or
            ``"blend"`` (``alpha * x + (1 - alpha) * overlay``).
        alpha: blend weight of the input in ``"blend"`` mode.
        seed: random seed for the choice of overlays.
    """

    name = "strip"

    def __init__(self, *, model: Any, n_overlays: int = 20, mode: str = "add",
                 alpha: float = 0.5, seed: int = 0) -> None:
        if int(n_overlays) < 1:
            raise BastionError(f"n_overlays must be at least 1, got {n_overlays}")
        if mode not in ("add", "blend"):
            raise BastionError(f"unknown STRIP mode {mode!r}", hint="use add or blend")
        self.model = model
        self.n_overlays = int(n_overlays)
        self.mode = mode
        self.alpha = float(alpha)
        self.seed = int(seed)
        self.threshold_: float | None = None

    def fit(self, x_reference: np.ndarray) -> StripDetector:
        """Keep held-out clean inputs to superimpose."""
        x = np.asarray(x_reference, dtype=np.float32)
        if len(x) < 2:
            raise DataError("STRIP needs at least two clean reference inputs to overlay")
        self.pool_ = x
        return self

    def entropy(self, x: np.ndarray) -> np.ndarray:
        """Mean prediction entropy of each input over its overlays."""
        if not hasattr(self, "pool_"):
            raise BastionError("STRIP: call fit(x_clean) before scoring")
        x = np.asarray(x, dtype=np.float32)
        lo, hi = self.model.bounds
        rng = np.random.default_rng(self.seed)
        k = self.n_overlays
        # the same overlays as drawing them one input at a time, in one (n, k) draw
        picks = rng.integers(0, len(self.pool_), size=(len(x), k))
        out = np.zeros(len(x))
        step = max(1, 2048 // k)  # inputs per batch: about 2k model queries at a time
        for s in range(0, len(x), step):
            xb, ov = x[s : s + step, None], self.pool_[picks[s : s + step]]
            if self.mode == "add":
                mixed = np.clip(xb + ov, lo, hi)
            else:
                mixed = self.alpha * xb + (1 - self.alpha) * ov
            p = np.asarray(self.model.predict_proba(mixed.reshape(-1, *x.shape[1:])))
            out[s : s + step] = _entropy(p).reshape(len(xb), k).mean(1)
        return out

    def score(self, x: np.ndarray) -> np.ndarray:
        """Minus the mean entropy: higher = more likely triggered."""
        return -self.entropy(x)

    def calibrate(self, x_clean: np.ndarray, *, fpr: float = 0.01) -> float:
        """Set ``threshold_`` so that a share ``fpr`` of clean inputs is flagged."""
        if not 0.0 < fpr < 1.0:
            raise BastionError(f"fpr must be in (0, 1), got {fpr}")
        self.threshold_ = float(np.quantile(self.score(x_clean), 1.0 - fpr))
        return self.threshold_

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.threshold_ is None:
            raise BastionError("STRIP: call calibrate() before predict()")
        return self.score(x) > self.threshold_


@dataclass
class NeuralCleanseResult:
    """Per-class reverse-engineered triggers and the anomaly analysis."""

    mask_l1: list[float]
    attack_success: list[float]
    anomaly_index: list[float]
    flagged: list[int]
    suspected_target: int | None
    masks: np.ndarray
    patterns: np.ndarray
    time_s: float
    params: dict[str, object] = field(default_factory=dict)


def mad_anomaly_index(values: np.ndarray) -> np.ndarray:
    """``|v - median| / (1.4826 * MAD)``, the consistency-scaled MAD anomaly index."""
    v = np.asarray(values, dtype=np.float64)
    med = np.median(v)
    mad = 1.4826 * np.median(np.abs(v - med))
    return np.abs(v - med) / max(mad, 1e-12)


class NeuralCleanse:
    """Trigger reverse-engineering in the spirit of Neural Cleanse; see the module docs.

    Args:
        steps: optimisation steps per class.
        lr: Adam learning rate on the mask/pattern parameters.
        init_cost: initial weight of the mask's L1 norm.
        target_success: the attack success the cost schedule aims for (0.99 in the paper).
        batch_size: clean images per step.
        anomaly_threshold: anomaly index above which a (small-mask) class is flagged.
        seed: random seed.
    """

    name = "neural-cleanse"

    def __init__(self, *, steps: int = 300, lr: float = 0.1, init_cost: float = 1e-3,
                 target_success: float = 0.99, batch_size: int = 128,
                 anomaly_threshold: float = 2.0, seed: int = 0) -> None:
        if int(steps) < 1:
            raise BastionError(f"steps must be at least 1, got {steps}")
        self.steps = int(steps)
        self.lr = float(lr)
        self.init_cost = float(init_cost)
        self.target_success = float(target_success)
        self.batch_size = int(batch_size)
        self.anomaly_threshold = float(anomaly_threshold)
        self.seed = int(seed)

    def _reverse(self, model: Any, xt: torch.Tensor, target: int, g: torch.Generator
                 ) -> tuple[np.ndarray, np.ndarray, float, float]:
        lo, hi = model.bounds
        shape = tuple(xt.shape[1:])
        # images: one mask over pixels shared by the channels; tables: one per feature
        m_raw = torch.zeros((1, *shape[1:])) if len(shape) == 3 else torch.zeros(shape)
        m_raw.requires_grad_(True)
        p_raw = torch.zeros(shape, requires_grad=True)
        with torch.no_grad():
            m_raw.normal_(0.0, 0.1, generator=g)
            p_raw.normal_(0.0, 0.1, generator=g)
        opt = torch.optim.Adam([m_raw, p_raw], lr=self.lr, betas=(0.5, 0.9))
        cost = self.init_cost
        best_l1, best = float("inf"), None
        yt = torch.full((min(self.batch_size, len(xt)),), int(target), dtype=torch.long)
        succ_hist: list[float] = []
        for step in range(self.steps):
            idx = torch.randint(0, len(xt), (len(yt),), generator=g)
            mask = torch.sigmoid(m_raw)
            pattern = lo + (hi - lo) * torch.sigmoid(p_raw)
            xs = (1 - mask) * xt[idx] + mask * pattern
            z = model.logits(xs)
            ce = torch.nn.functional.cross_entropy(z, yt)
            l1 = mask.abs().sum()
            loss = ce + cost * l1
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                succ = float((z.argmax(1) == target).float().mean())
            succ_hist.append(succ)
            if succ >= self.target_success and float(l1.detach()) < best_l1:
                best_l1 = float(l1.detach())
                best = (mask.detach().clone(), pattern.detach().clone())
            if (step + 1) % 10 == 0:  # the paper's cost schedule, simplified
                recent = float(np.mean(succ_hist[-10:]))
                cost = cost * 1.5 if recent >= self.target_success else cost / 1.5
                cost = max(cost, 1e-6)
        if best is None:  # never reached the goal: report the last mask
            best = (torch.sigmoid(m_raw).detach(),
                    (lo + (hi - lo) * torch.sigmoid(p_raw)).detach())
            best_l1 = float(best[0].abs().sum())
        # final success of the kept trigger on all the clean inputs
        with torch.no_grad():
            mask, pattern = best
            xs = (1 - mask) * xt + mask * pattern
            fin = float((model.logits(xs).argmax(1) == target).float().mean())
        return mask.numpy(), pattern.numpy(), best_l1, fin

    def run(self, model: Any, x_clean: np.ndarray, *, classes: list[int] | None = None
            ) -> NeuralCleanseResult:
        """Reverse-engineer a trigger for every class from clean inputs ``x_clean``."""
        if not callable(getattr(model, "logits", None)):
            raise ModelError(
                "Neural Cleanse needs a white-box model (differentiable logits); "
                f"{type(model).__name__} is a black box",
                hint="on a black box use STRIP (needs only predict_proba) and the data "
                "checks (confident learning, kNN label agreement)",
            )
        x = np.asarray(x_clean, dtype=np.float32)
        if len(x) == 0:
            raise DataError("Neural Cleanse needs clean inputs")
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(self.seed)
        xt = torch.from_numpy(x)
        classes = list(range(model.n_classes)) if classes is None else classes
        masks, patterns, l1s, succ = [], [], [], []
        module = getattr(model, "module", None)
        req = []
        if module is not None:  # freeze the model's weights during the search
            req = [p.requires_grad for p in module.parameters()]
            for p in module.parameters():
                p.requires_grad_(False)
        try:
            for t in classes:
                m, p, l1, s = self._reverse(model, xt, int(t), g)
                masks.append(m)
                patterns.append(p)
                l1s.append(l1)
                succ.append(s)
        finally:
            if module is not None:
                for p, r in zip(module.parameters(), req, strict=True):
                    p.requires_grad_(r)
        l1a = np.asarray(l1s)
        idx = mad_anomaly_index(l1a)
        med = np.median(l1a)
        flagged = [int(classes[i]) for i in range(len(classes))
                   if idx[i] > self.anomaly_threshold and l1a[i] < med]
        suspected = None
        if flagged:
            suspected = max(flagged, key=lambda c: idx[classes.index(c)])
        return NeuralCleanseResult(
            mask_l1=[float(v) for v in l1a], attack_success=[float(s) for s in succ],
            anomaly_index=[float(v) for v in idx], flagged=flagged,
            suspected_target=suspected, masks=np.stack(masks), patterns=np.stack(patterns),
            time_s=time.perf_counter() - t0,
            params={"steps": self.steps, "lr": self.lr, "init_cost": self.init_cost,
                    "anomaly_threshold": self.anomaly_threshold, "seed": self.seed},
        )
