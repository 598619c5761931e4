"""Robust training: PGD adversarial training, fast adversarial training, TRADES, Gaussian
noise training, and the plain loop distillation builds on.

One trainer, :class:`AdversarialTrainer`, configured in ``__init__`` and run with
``fit(model, data) -> model`` (the Defense shape). Its batch step reads like the papers:

- ``pgd-at`` (Madry et al. 2018): minimise the loss at the PGD point of each batch;
- ``fast-at`` (Wong, Rice & Kolter 2020): FGSM from a uniform random start with step
  ``1.25 * eps``, a cyclic learning rate, and a guard against *catastrophic overfitting*:
  PGD accuracy on a held-out batch after every epoch; when it collapses (falls more than
  ``guard_drop`` below the best so far) the best weights are restored and training goes
  on with a safer step (``on_collapse="recover"``, the default: learning rate and FGSM
  step scaled down, optionally few-step PGD for the rest of the schedule, at most
  ``max_recoveries`` times), or stops there (``on_collapse="stop"``). With recovery the
  run never ends below its best checkpoint: if the last epoch is worse on the held-out
  batch, the best weights are restored at the end (``ended_on_best_``).
  ``fast_variant="nfgsm"`` is N-FGSM (de Jorge et al. 2022) instead: a random start of
  ``2 * eps`` (``noise_mult``), step ``eps``, and no projection back onto the eps-ball,
  which avoids catastrophic overfitting at the same cost;
- ``trades`` (Zhang et al. 2019): ``CE(f(x), y) + beta * KL(f(x) || f(x'))`` with ``x'``
  maximising the KL term;
- ``noise``: Gaussian data augmentation (the base-classifier training of Cohen et al.
  2019 for randomized smoothing);
- ``clean``: ordinary training (used by distillation, and as a baseline).

``ema_decay`` keeps an exponential moving average of the weights (weight averaging, as
in Gowal et al. 2020 and Rebuffi et al. 2021, where it adds robustness and damps robust
overfitting); the guard then checks, and ``fit`` returns, the averaged model.

``adv_fraction`` mixes clean and adversarial loss (``1.0`` = adversarial only, as in
Madry et al.), ``eps_warmup`` ramps epsilon linearly over that many epochs. Weight decay
and label smoothing are knobs here; dropout belongs to the architecture (pass a
``module_factory`` that builds it, e.g. the zoo with a dropout argument).

With ``checkpoint_dir`` every epoch ends with a checkpoint (see
:mod:`bastion.defend.checkpoint`); calling ``fit`` again with the same settings continues
after the last completed epoch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bastion._util import set_seed, torch_generator
from bastion.attacks.evasion.pgd import pgd_tensor
from bastion.data.dataset import Dataset
from bastion.defend import _inner
from bastion.defend.checkpoint import (
    CheckpointError,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
)
from bastion.errors import BastionError, DataError, ModelError
from bastion.models.torch_model import TorchModel

TRAIN_METHODS: tuple[str, ...] = ("pgd-at", "fast-at", "trades", "noise", "clean")
ADVERSARIAL_METHODS: tuple[str, ...] = ("pgd-at", "fast-at", "trades")
FAST_VARIANTS: tuple[str, ...] = ("rs", "nfgsm")
ON_COLLAPSE: tuple[str, ...] = ("recover", "stop")


@dataclass
class EpochLog:
    """What one epoch did. Accuracies are on the held-out guard batch."""

    epoch: int
    epochs: int
    loss: float
    train_accuracy: float
    clean_accuracy: float
    robust_accuracy: float
    eps: float
    lr: float
    time_s: float
    collapsed: bool = False
    recovered: bool = False


class CatastrophicOverfitting(BastionError):
    """Raised only by callers who ask for it; the trainer itself stops and restores."""


def _reset_parameters(module: nn.Module) -> None:
    for m in module.modules():
        fn = getattr(m, "reset_parameters", None)
        if callable(fn):
            fn()


def as_torch_model(model: Any, *, purpose: str) -> TorchModel:
    """``model`` if it is a trainable :class:`TorchModel`; a clear error otherwise."""
    if isinstance(model, TorchModel) and isinstance(getattr(model, "module", None), nn.Module):
        return model
    raise ModelError(
        f"{purpose} needs a differentiable PyTorch model, got {type(model).__name__}",
        hint="methods that fit a model without gradients: squeeze, smooth (no noise "
        "training); or train a torch model (bastion train --model cnn)",
    )


def rebuild(model: TorchModel, module: nn.Module, *, name: str | None = None) -> TorchModel:
    """A :class:`TorchModel` like ``model`` (classes, shape, bounds, normalisation)
    around another ``module``."""
    return TorchModel(
        module,
        n_classes=model.n_classes,
        input_shape=model.input_shape,
        bounds=model.bounds,
        mean=model.mean,
        std=model.std,
        batch_size=model.batch_size,
        name=name or model.name,
    )


def check_training_data(model: TorchModel, data: Dataset | tuple) -> tuple[np.ndarray, np.ndarray]:
    """Training arrays after the shared checks (shape, NaN, bounds, labels)."""
    from bastion.data.validate import check_inputs, check_labels

    if isinstance(data, Dataset):
        x, y = data.x_train, data.y_train
    else:
        x, y = data
    x = check_inputs(x, input_shape=model.input_shape, bounds=model.bounds,
                     name="training inputs")
    y = check_labels(y, n_classes=model.n_classes, n=len(x))
    if len(x) < 4:
        raise DataError(f"only {len(x)} training points", hint="give at least a few dozen")
    return x, y


def check_eps(eps: float, *, norm: str, bounds: tuple[float, float],
              input_shape: tuple[int, ...]) -> float:
    """Reject an epsilon that is negative or larger than the data range allows."""
    eps = float(eps)
    lo, hi = bounds
    span = hi - lo
    limit = span if norm == "linf" else span * math.sqrt(float(np.prod(input_shape)))
    if not math.isfinite(eps) or eps < 0:
        raise BastionError(f"epsilon must be a finite number >= 0, got {eps}")
    if eps > limit:
        raise BastionError(
            f"epsilon {eps:g} is larger than the data range allows ({norm} budget at most "
            f"{limit:g} for inputs in [{lo:g}, {hi:g}])",
            hint="give epsilon in the units of the inputs, e.g. 0.3 for images in [0, 1]",
        )
    return eps


class AdversarialTrainer:
    """Robust training of a :class:`TorchModel`; see the module docstring.

    Args:
        method: ``pgd-at``, ``fast-at``, ``trades``, ``noise`` or ``clean``.
        eps: perturbation budget in input units (``sigma`` is used for ``noise``).
        norm: ``linf`` or ``l2``.
        epochs: total epochs (a resumed run counts the ones already done).
        batch_size, lr, optimizer (``adam`` or ``sgd``), momentum, weight_decay.
        lr_schedule: ``constant`` or ``cyclic`` (0 -> lr at 40% of training -> 0, as in
            Wong et al.).
        label_smoothing: passed to the cross-entropy.
        steps: PGD steps for ``pgd-at`` and ``trades``.
        step_size: per-step size; default ``2.5 * eps / steps`` (PGD, TRADES) and
            ``1.25 * eps`` (fast AT).
        random_start: random initialisation of the inner attack (fast AT without it is
            plain FGSM training, which overfits catastrophically).
        fast_variant: fast AT's inner step: ``rs`` (Wong et al.: start in the eps-ball,
            step ``1.25 * eps``, project onto the ball) or ``nfgsm`` (de Jorge et al.: start
            in the ``2 * eps`` box, step ``eps``, no projection).
        noise_mult: radius of fast AT's random start as a multiple of eps (default 1 for
            ``rs``, 2 for ``nfgsm``).
        beta: TRADES' weight of the robustness (KL) term.
        adv_fraction: weight of the adversarial loss against the clean loss (not TRADES).
        eps_warmup: epochs over which epsilon ramps linearly from 0.
        ema_decay: weight averaging; ``0`` is off, else each step moves the averaged
            weights ``1 - d`` of the way to the trained ones, with
            ``d = min(ema_decay, (1 + step) / (10 + step))``. The averaged model is the one
            the guard evaluates and ``fit`` returns.
        sigma: noise level for ``noise`` training.
        temperature: train on ``logits / temperature`` (distillation).
        init: ``finetune`` (start from the model's weights) or ``scratch`` (re-initialise,
            or build with ``module_factory``).
        module_factory: builds a fresh module for ``init="scratch"``.
        guard: stop at catastrophic overfitting; default on for ``fast-at`` only. With
            ``on_collapse="recover"`` and ``init="finetune"`` the starting model is
            checkpoint 0 (evaluated once before training, ``guard_eval(0, model)``).
        guard_points: size of the held-out batch the guard attacks (taken from the
            training data and not trained on).
        guard_steps: PGD steps the guard uses.
        guard_drop: a collapse is robust accuracy falling more than this below the best.
        guard_eval: replace the guard's PGD evaluation with ``fn(epoch, model) -> robust
            accuracy`` (for tests and custom checks).
        on_collapse: what the guard does at a collapse: ``recover`` (restore the best
            weights, reset the optimizer state, scale the learning rate by
            ``recovery_lr_factor`` and the inner step by ``recovery_step_factor``, and,
            with ``recovery_pgd_steps > 0``, train fast AT with PGD of that many steps for
            the rest of the schedule) or ``stop`` (restore the best weights and stop).
        max_recoveries: recoveries allowed; a collapse after the last one stops.
        recovery_lr_factor, recovery_step_factor: in (0, 1]; applied at every recovery.
        recovery_pgd_steps: ``0`` keeps fast AT's single step after a recovery.
        checkpoint_dir: folder for resumable checkpoints (none when ``None``).
        seed: one seed, one result.
    """

    def __init__(
        self,
        *,
        method: str = "pgd-at",
        eps: float = 0.1,
        norm: str = "linf",
        epochs: int = 10,
        batch_size: int = 128,
        lr: float = 1e-3,
        optimizer: str = "adam",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        lr_schedule: str = "constant",
        label_smoothing: float = 0.0,
        steps: int = 10,
        step_size: float | None = None,
        random_start: bool = True,
        fast_variant: str = "rs",
        noise_mult: float | None = None,
        beta: float = 6.0,
        adv_fraction: float = 1.0,
        eps_warmup: float = 0.0,
        ema_decay: float = 0.0,
        sigma: float = 0.25,
        temperature: float = 1.0,
        init: str = "finetune",
        module_factory: Callable[[], nn.Module] | None = None,
        guard: bool | None = None,
        guard_points: int = 256,
        guard_steps: int = 10,
        guard_drop: float = 0.2,
        guard_eval: Callable[[int, TorchModel], float] | None = None,
        on_collapse: str = "recover",
        max_recoveries: int = 2,
        recovery_lr_factor: float = 0.5,
        recovery_step_factor: float = 0.8,
        recovery_pgd_steps: int = 0,
        checkpoint_dir: str | Path | None = None,
        seed: int = 0,
    ) -> None:
        if method not in TRAIN_METHODS:
            raise BastionError(f"unknown training method {method!r}",
                               hint=f"use one of {', '.join(TRAIN_METHODS)}")
        if norm not in ("linf", "l2"):
            raise BastionError(f"unknown norm {norm!r}", hint="use linf or l2")
        if optimizer not in ("adam", "sgd"):
            raise BastionError(f"unknown optimizer {optimizer!r}", hint="use adam or sgd")
        if lr_schedule not in ("constant", "cyclic"):
            raise BastionError(f"unknown lr schedule {lr_schedule!r}",
                               hint="use constant or cyclic")
        if fast_variant not in FAST_VARIANTS:
            raise BastionError(f"unknown fast_variant {fast_variant!r}",
                               hint=f"use one of {', '.join(FAST_VARIANTS)}")
        if noise_mult is not None and not (math.isfinite(noise_mult) and noise_mult >= 0):
            raise BastionError(f"noise_mult must be a number >= 0, got {noise_mult}")
        if not (math.isfinite(ema_decay) and 0.0 <= ema_decay < 1.0):
            raise BastionError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if init not in ("finetune", "scratch"):
            raise BastionError(f"unknown init {init!r}", hint="use finetune or scratch")
        if not 0.0 <= adv_fraction <= 1.0:
            raise BastionError(f"adv_fraction must be in [0, 1], got {adv_fraction}")
        for nm, v in (("epochs", epochs), ("batch_size", batch_size)):
            if int(v) < 1:
                raise BastionError(f"{nm} must be at least 1, got {v}")
        if method in ("pgd-at", "trades") and steps < 1:
            raise BastionError(f"steps must be at least 1 for {method}, got {steps}")
        if not (lr > 0 and math.isfinite(lr)):
            raise BastionError(f"lr must be a positive number, got {lr}")
        if temperature <= 0:
            raise BastionError(f"temperature must be positive, got {temperature}")
        if not 0.0 <= label_smoothing < 1.0:
            raise BastionError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if on_collapse not in ON_COLLAPSE:
            raise BastionError(f"unknown on_collapse {on_collapse!r}",
                               hint="use recover (restore the best weights and go on with a "
                               "safer step) or stop")
        if isinstance(max_recoveries, bool) or int(max_recoveries) != max_recoveries \
                or max_recoveries < 0:
            raise BastionError(f"max_recoveries must be a whole number >= 0, got "
                               f"{max_recoveries}")
        for nm, v in (("recovery_lr_factor", recovery_lr_factor),
                      ("recovery_step_factor", recovery_step_factor)):
            if not (math.isfinite(v) and 0.0 < v <= 1.0):
                raise BastionError(f"{nm} must be in (0, 1], got {v}",
                                   hint="e.g. 0.5 halves it at every recovery")
        if int(recovery_pgd_steps) < 0:
            raise BastionError(f"recovery_pgd_steps must be >= 0, got {recovery_pgd_steps}")
        self.method = method
        self.eps = float(eps)
        self.norm = norm
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.optimizer = optimizer
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.lr_schedule = lr_schedule
        self.label_smoothing = float(label_smoothing)
        self.steps = int(steps)
        self.step_size = None if step_size is None else float(step_size)
        self.random_start = bool(random_start)
        self.fast_variant = fast_variant
        self.noise_mult = None if noise_mult is None else float(noise_mult)
        self.beta = float(beta)
        self.adv_fraction = float(adv_fraction)
        self.eps_warmup = float(eps_warmup)
        self.ema_decay = float(ema_decay)
        self.sigma = float(sigma)
        self.temperature = float(temperature)
        self.init = init
        self.module_factory = module_factory
        self.guard = (method == "fast-at") if guard is None else bool(guard)
        self.guard_points = int(guard_points)
        self.guard_steps = int(guard_steps)
        self.guard_drop = float(guard_drop)
        self.guard_eval = guard_eval
        self.on_collapse = on_collapse
        self.max_recoveries = int(max_recoveries)
        self.recovery_lr_factor = float(recovery_lr_factor)
        self.recovery_step_factor = float(recovery_step_factor)
        self.recovery_pgd_steps = int(recovery_pgd_steps)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.seed = int(seed)

    # -- configuration -------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The scalar settings (for reports and the checkpoint fingerprint)."""
        skip = {"module_factory", "guard_eval", "checkpoint_dir"}
        return {k: v for k, v in vars(self).items()
                if not k.endswith("_") and k not in skip}

    def _fingerprint(self) -> str:
        s = {k: v for k, v in self.settings().items() if k != "epochs"}
        if not s.get("ema_decay"):
            s.pop("ema_decay", None)  # checkpoints from before weight averaging still match
        if not s.get("guard"):  # recovery settings do nothing without the guard
            for k in ("on_collapse", "max_recoveries", "recovery_lr_factor",
                      "recovery_step_factor", "recovery_pgd_steps"):
                s.pop(k, None)
        return hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def alpha(self) -> float:
        if self.step_size is not None:
            return self.step_size
        if self.method == "fast-at":
            return (1.0 if self.fast_variant == "nfgsm" else 1.25) * self.eps
        return 2.5 * self.eps / max(1, self.steps)

    def _lr_at(self, t: float) -> float:
        scale = getattr(self, "lr_scale_", 1.0)  # lowered by recoveries
        if self.lr_schedule == "cyclic":
            return scale * float(np.interp(t, [0, self.epochs * 0.4, self.epochs],
                                           [0, self.lr, 0]))
        return scale * self.lr

    def _eps_at(self, t: float) -> float:
        if self.eps_warmup > 0:
            return self.eps * min(1.0, t / self.eps_warmup)
        return self.eps

    # -- the batch step, as in the papers -------------------------------------------
    def _batch_loss(
        self,
        model: TorchModel,
        f: Callable[[torch.Tensor], torch.Tensor],
        xb: torch.Tensor,
        yb: torch.Tensor,
        soft: torch.Tensor | None,
        eps: float,
        bounds: tuple[float, float],
        g: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.temperature

        def ce(z: torch.Tensor) -> torch.Tensor:
            if soft is not None:
                return -(soft * F.log_softmax(z / T, dim=1)).sum(1).mean()
            return F.cross_entropy(z / T, yb, label_smoothing=self.label_smoothing)

        m = self.method
        module = model.module
        if m == "clean" or (m in ADVERSARIAL_METHODS and eps <= 0):
            z = f(xb)
            return ce(z), z
        if m == "noise":
            z = f(xb + self.sigma * torch.randn(xb.shape, generator=g))
            return ce(z), z
        module.eval()  # craft the inner attack with fixed BN/dropout, then train
        alpha = self.alpha * eps / self.eps  # the step follows the epsilon warm-up
        inner_steps = getattr(self, "inner_steps_", 0)  # set by a recovery
        if m == "fast-at" and inner_steps > 0:
            x_adv = pgd_tensor(model, xb, yb, eps=eps, norm=self.norm, steps=inner_steps,
                               step_size=2.5 * eps / inner_steps,
                               random_start=self.random_start, generator=g)
        elif m == "pgd-at":
            x_adv = pgd_tensor(model, xb, yb, eps=eps, norm=self.norm, steps=self.steps,
                               step_size=alpha, random_start=self.random_start, generator=g)
        elif m == "fast-at":
            alpha *= getattr(self, "step_scale_", 1.0)
            mult = self.noise_mult if self.noise_mult is not None else (
                2.0 if self.fast_variant == "nfgsm" else 1.0)
            x_adv = _inner.fgsm_rs(f, xb, yb, eps=eps, norm=self.norm, alpha=alpha,
                                   bounds=bounds, rand_init=self.random_start, generator=g,
                                   noise=mult * eps,
                                   project_ball=self.fast_variant != "nfgsm")
        else:  # trades
            x_adv = _inner.trades_adv(f, xb, eps=eps, norm=self.norm, steps=self.steps,
                                      alpha=alpha, bounds=bounds, generator=g)
        module.train()
        if m == "trades":
            z = f(xb)
            z_adv = f(x_adv)
            kl = F.kl_div(F.log_softmax(z_adv, dim=1), F.softmax(z, dim=1),
                          reduction="batchmean")
            return ce(z) + self.beta * kl, z
        z_adv = f(x_adv)
        if self.adv_fraction >= 1.0:
            return ce(z_adv), z_adv
        z = f(xb)
        return (1 - self.adv_fraction) * ce(z) + self.adv_fraction * ce(z_adv), z

    # -- the guard -------------------------------------------------------------------
    def _evaluate(self, epoch: int, model: TorchModel, xg: torch.Tensor,
                  yg: torch.Tensor) -> tuple[float, float]:
        model.module.eval()
        with torch.no_grad():
            clean = float((model.logits(xg).argmax(1) == yg).float().mean()) if len(xg) else \
                float("nan")
        if self.guard_eval is not None:
            return clean, float(self.guard_eval(epoch, model))
        eps = self.sigma if self.method == "noise" and self.eps <= 0 else self.eps
        if eps <= 0 or len(xg) == 0:
            return clean, clean
        norm = "l2" if self.method == "noise" and self.eps <= 0 else self.norm
        g = torch_generator(self.seed + 7919)
        x_adv = pgd_tensor(model, xg, yg, eps=eps, norm=norm, steps=self.guard_steps,
                           random_start=True, generator=g)
        with torch.no_grad():
            robust = float((model.logits(x_adv).argmax(1) == yg).float().mean())
        return clean, robust

    # -- fit -------------------------------------------------------------------------
    def fit(
        self,
        model: Any,
        data: Dataset | tuple[np.ndarray, np.ndarray],
        *,
        soft_targets: np.ndarray | None = None,
        on_epoch: Callable[[EpochLog], None] | None = None,
        parallel: Any = None,
    ) -> TorchModel:
        """Train a copy of ``model`` on ``data``'s training split; return the new model.

        Fitted attributes: ``history_`` (one :class:`EpochLog` per epoch, including those
        of a resumed run), ``stopped_early_``, ``best_epoch_``, ``resumed_from_``
        (epochs already done when this call started), ``time_s_``, ``recoveries_`` (one
        dict per recovery: epoch, the collapsed and the best held-out robust accuracy,
        the epoch restored, the learning-rate and step scales from then on),
        ``ended_on_best_`` (the last epoch was worse than the best on the held-out batch,
        so the best weights were restored at the end; recovery mode only).

        ``parallel``: this call is one of several data-parallel workers (see
        :mod:`bastion.defend.ray_train`): it gives each epoch's common ``order(n,
        epoch)``, this worker's ``rows(idx)`` of a batch, ``sync_grads(module)`` after
        each backward pass and the epoch's ``totals(loss, acc, seen)`` over workers;
        everything else (the batch step, the guard, checkpoints) is this loop's.
        """
        base = as_torch_model(model, purpose=f"{self.method} training")
        x, y = check_training_data(base, data)
        check_eps(self.eps, norm=self.norm, bounds=base.bounds, input_shape=base.input_shape)
        t_start = time.perf_counter()
        set_seed(self.seed)
        g = torch_generator(self.seed)
        # hold out the guard batch (never trained on)
        perm = torch.randperm(len(x), generator=g).numpy()
        n_guard = min(self.guard_points, len(x) // 5)
        gi, ti = perm[:n_guard], perm[n_guard:]
        xg, yg = torch.from_numpy(x[gi]), torch.from_numpy(y[gi])
        xt, yt = torch.from_numpy(x[ti]), torch.from_numpy(y[ti])
        st = None
        if soft_targets is not None:
            soft_arr = np.asarray(soft_targets, dtype=np.float32)
            if soft_arr.shape != (len(x), base.n_classes):
                raise DataError(f"soft targets have shape {soft_arr.shape}, expected "
                                f"{(len(x), base.n_classes)}")
            st = torch.from_numpy(soft_arr[ti])

        if self.init == "scratch":
            module = self.module_factory() if self.module_factory else \
                copy.deepcopy(base.module)
            if self.module_factory is None:
                _reset_parameters(module)
        else:
            module = copy.deepcopy(base.module)
        work = rebuild(base, module, name=f"{base.name}+{self.method}")
        # ``served`` is what the guard evaluates and fit returns: the trained module, or
        # its weight average
        ema_module = copy.deepcopy(module) if self.ema_decay > 0 else None
        served = work if ema_module is None else rebuild(
            base, ema_module, name=f"{base.name}+{self.method}")
        if ema_module is not None:
            for p in ema_module.parameters():
                p.requires_grad_(False)
        ema_steps = 0
        if self.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(
                module.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.SGD(module.parameters(), lr=self.lr, momentum=self.momentum,
                                  weight_decay=self.weight_decay)

        self.history_: list[EpochLog] = []
        self.stopped_early_ = False
        self.best_epoch_ = 0
        self.resumed_from_ = 0
        self.recoveries_: list[dict[str, Any]] = []
        self.ended_on_best_ = False
        self.lr_scale_, self.step_scale_, self.inner_steps_ = 1.0, 1.0, 0
        best_robust = -1.0
        best_state: dict[str, torch.Tensor] | None = None
        start_epoch = 0
        if self.checkpoint_dir is not None:
            loaded = load_checkpoint(self.checkpoint_dir)
            if loaded is not None:
                meta, tensors = loaded
                if meta.get("fingerprint") != self._fingerprint():
                    raise CheckpointError(
                        f"the checkpoint in {self.checkpoint_dir} was made with other "
                        "training settings",
                        hint="rerun with the same settings to resume, or use another --out",
                    )
                try:
                    module.load_state_dict({k[6:]: v for k, v in tensors.items()
                                            if k.startswith("model.")})
                    if ema_module is not None:
                        ema_module.load_state_dict({k[4:]: v for k, v in tensors.items()
                                                    if k.startswith("ema.")})
                        ema_steps = int(meta["ema_steps"])
                    optimizer_from_flat(opt, tensors, meta["optimizer"])
                    if any(k.startswith("best.") for k in tensors):
                        best_state = {k[5:]: v for k, v in tensors.items()
                                      if k.startswith("best.")}
                    g.set_state(tensors["rng.generator"])
                    torch.set_rng_state(tensors["rng.torch"])
                    self.history_ = [EpochLog(**h) for h in meta["history"]]
                except (KeyError, RuntimeError, TypeError, ValueError) as exc:
                    raise CheckpointError(
                        f"the checkpoint in {self.checkpoint_dir} does not fit this model: "
                        f"{str(exc).splitlines()[0]}",
                        hint=f"delete {self.checkpoint_dir} or use another --out",
                    ) from None
                start_epoch = int(meta["epoch"])
                best_robust = float(meta.get("best_robust", -1.0))
                self.best_epoch_ = int(meta.get("best_epoch", 0))
                self.stopped_early_ = bool(meta.get("stopped_early", False))
                self.resumed_from_ = start_epoch
                rec = meta.get("recovery") or {}
                self.recoveries_ = list(rec.get("recoveries", []))
                self.lr_scale_ = float(rec.get("lr_scale", 1.0))
                self.step_scale_ = float(rec.get("step_scale", 1.0))
                self.inner_steps_ = int(rec.get("inner_steps", 0))

        if (self.guard and self.on_collapse == "recover" and self.init == "finetune"
                and start_epoch == 0 and len(xg)):
            # fine-tuning starts from a model worth keeping: it is checkpoint 0, so a run
            # that ruins it recovers to it rather than to its own first epoch
            _, best_robust = self._evaluate(0, served, xg, yg)
            best_state = {k: v.detach().clone() for k, v in served.module.state_dict().items()}
        n = len(xt)
        nb = max(1, math.ceil(n / self.batch_size))
        epoch = start_epoch
        while epoch < self.epochs and not self.stopped_early_:
            t0 = time.perf_counter()
            module.train()
            order = torch.randperm(n, generator=g)
            if parallel is not None:
                order = parallel.order(n, epoch)
            tot_loss, tot_acc, seen = 0.0, 0.0, 0
            lr = self.lr
            eps_t = self.eps
            for i in range(nb):
                idx = order[i * self.batch_size:(i + 1) * self.batch_size]
                if parallel is not None:
                    idx = parallel.rows(idx)
                if len(idx) == 0:
                    continue
                t = epoch + (i + 1) / nb
                lr = self._lr_at(t)
                eps_t = self._eps_at(t)
                for grp in opt.param_groups:
                    grp["lr"] = lr
                xb, yb = xt[idx], yt[idx]
                sb = st[idx] if st is not None else None
                loss, z = self._batch_loss(work, work.logits, xb, yb, sb, eps_t,
                                           base.bounds, g)
                if not torch.isfinite(loss):
                    raise BastionError(
                        f"training diverged (loss {float(loss)}) in epoch {epoch + 1}",
                        hint="lower the learning rate (--lr)",
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if parallel is not None:
                    parallel.sync_grads(module)
                opt.step()
                if ema_module is not None:
                    ema_steps += 1
                    _ema_update(ema_module, module,
                                min(self.ema_decay, (1 + ema_steps) / (10 + ema_steps)))
                tot_loss += float(loss.detach()) * len(idx)
                tot_acc += float((z.argmax(1) == yb).float().sum())
                seen += len(idx)
            epoch += 1
            if parallel is not None:
                tot_loss, tot_acc, seen = parallel.totals(tot_loss, tot_acc, seen)
            clean, robust = self._evaluate(epoch, served, xg, yg)
            collapsed = recovered = False
            if self.guard and best_state is not None and robust < best_robust - self.guard_drop:
                collapsed = True
                served.module.load_state_dict(best_state)
                if self.on_collapse == "recover" and epoch >= self.epochs:
                    self.ended_on_best_ = True  # the last epoch collapsed: end on the best
                elif self.on_collapse == "recover" and \
                        len(self.recoveries_) < self.max_recoveries:
                    recovered = True
                    self._recover(epoch, robust, best_robust, module, served, ema_module,
                                  best_state, opt)
                else:
                    self.stopped_early_ = True
            elif robust >= best_robust:
                best_robust = robust
                self.best_epoch_ = epoch
                best_state = {k: v.detach().clone()
                              for k, v in served.module.state_dict().items()}
            log = EpochLog(epoch=epoch, epochs=self.epochs, loss=tot_loss / max(1, seen),
                           train_accuracy=tot_acc / max(1, seen), clean_accuracy=clean,
                           robust_accuracy=robust, eps=eps_t, lr=lr,
                           time_s=time.perf_counter() - t0, collapsed=collapsed,
                           recovered=recovered)
            self.history_.append(log)
            if self.checkpoint_dir is not None:
                self._save(epoch, module, opt, best_state, best_robust, g,
                           ema_module, ema_steps)
            if on_epoch is not None:
                on_epoch(log)
        if (self.guard and self.on_collapse == "recover" and best_state is not None
                and not self.stopped_early_ and self.history_
                and self.history_[-1].robust_accuracy < best_robust):
            # never end below the best checkpoint: the last epoch is worse on the held-out
            # batch, so the best weights are what fit returns
            served.module.load_state_dict(best_state)
            self.ended_on_best_ = True
        served.module.eval()
        self.time_s_ = time.perf_counter() - t_start
        return served

    def _recover(self, epoch: int, robust: float, best_robust: float, module: nn.Module,
                 served: TorchModel, ema_module: nn.Module | None,
                 best_state: dict[str, torch.Tensor], opt: torch.optim.Optimizer) -> None:
        """After a collapse: the best weights (already in ``served``) go into the trained
        module too, the optimizer forgets its moments, and the step gets safer."""
        if ema_module is not None:
            module.load_state_dict(best_state)
        opt.state.clear()
        self.lr_scale_ *= self.recovery_lr_factor
        self.step_scale_ *= self.recovery_step_factor
        if self.recovery_pgd_steps > 0 and self.method == "fast-at":
            self.inner_steps_ = self.recovery_pgd_steps
        self.recoveries_.append({
            "epoch": epoch, "robust_accuracy": robust, "best_robust_accuracy": best_robust,
            "restored_epoch": self.best_epoch_, "lr_scale": self.lr_scale_,
            "step_scale": self.step_scale_, "inner_pgd_steps": self.inner_steps_,
        })

    def _save(self, epoch: int, module: nn.Module, opt: torch.optim.Optimizer,
              best_state: dict[str, torch.Tensor] | None, best_robust: float,
              g: torch.Generator, ema_module: nn.Module | None = None,
              ema_steps: int = 0) -> None:
        assert self.checkpoint_dir is not None
        tensors = {f"model.{k}": v for k, v in module.state_dict().items()}
        if ema_module is not None:
            tensors.update({f"ema.{k}": v for k, v in ema_module.state_dict().items()})
        if best_state is not None:
            tensors.update({f"best.{k}": v for k, v in best_state.items()})
        opt_t, opt_meta = optimizer_to_flat(opt)
        tensors.update(opt_t)
        tensors["rng.generator"] = g.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {
            "fingerprint": self._fingerprint(),
            "settings": self.settings(),
            "optimizer": opt_meta,
            "history": [asdict(h) for h in self.history_],
            "best_robust": best_robust,
            "best_epoch": self.best_epoch_,
            "stopped_early": self.stopped_early_,
            "ema_steps": ema_steps,
            "recovery": {"recoveries": self.recoveries_, "lr_scale": self.lr_scale_,
                         "step_scale": self.step_scale_, "inner_steps": self.inner_steps_},
        }
        save_checkpoint(self.checkpoint_dir, epoch=epoch, tensors=tensors, meta=meta)


@torch.no_grad()
def _ema_update(avg: nn.Module, live: nn.Module, decay: float) -> None:
    """Move ``avg``'s parameters ``1 - decay`` of the way to ``live``'s; copy buffers."""
    for pa, pl in zip(avg.parameters(), live.parameters(), strict=True):
        pa.mul_(decay).add_(pl.detach(), alpha=1.0 - decay)
    for ba, bl in zip(avg.buffers(), live.buffers(), strict=True):
        ba.copy_(bl)
