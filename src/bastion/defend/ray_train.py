"""Adversarial training on Ray Train: the same :class:`~bastion.defend.training.
AdversarialTrainer` loop, run data-parallel by ``TorchTrainer`` on CPU workers.

Each worker runs :meth:`AdversarialTrainer.fit` itself, with a ``parallel`` hook
(:class:`_DataParallel`): every worker draws the same permutation each epoch, takes its
rows of each batch, and after each backward pass the gradients are averaged over the
workers with one ``all_reduce`` on the gloo process group Ray Train sets up (what DDP
does; the module is not wrapped in ``DistributedDataParallel`` because the inner attack's
extra forward and backward passes would confuse DDP's reducer). All workers therefore
hold the same weights, and the guard against catastrophic overfitting, the epsilon
warm-up, weight averaging and the checkpoint format are the local trainer's own code.

**Checkpoints** go to shared storage: Ray Train's ``storage_path`` (a folder every node
can reach: a local path on one machine, NFS or object storage on a cluster). Worker 0
reports the trainer's checkpoint (``state.json`` + safetensors, no pickle) after every
epoch; a rerun with the same settings and storage (``bastion harden`` again with the
same ``--out``) resumes from the last one, after a crash, a killed driver or Ctrl-C. The
run's name carries the settings' fingerprint, so other settings start a run of their own
instead of loading weights that do not fit.

The epochs' logs reach ``on_epoch`` when training ends (the workers run elsewhere).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bastion.defend.training import AdversarialTrainer, EpochLog, check_training_data
from bastion.errors import BastionError

log = logging.getLogger("bastion.defend.ray")

RESULT_JSON = "ray-result.json"
SERVED_TENSORS = "served.safetensors"

__all__ = ["RayFit", "train_on_ray"]


class _DataParallel:
    """The ``parallel`` hook of :meth:`AdversarialTrainer.fit` for one worker."""

    def __init__(self, rank: int, world: int, seed: int) -> None:
        self.rank, self.world, self.seed = int(rank), int(world), int(seed)

    def order(self, n: int, epoch: int) -> Any:
        import torch

        from bastion._util import torch_generator

        # the same on every worker (the trainer's own generator also drives each
        # worker's attack noise, so its state differs between workers)
        return torch.randperm(n, generator=torch_generator(self.seed * 100_003 + epoch))

    def rows(self, idx: Any) -> Any:
        if len(idx) < self.world:  # every worker skips a batch too small to share
            return idx[:0]
        return idx[self.rank::self.world]

    def sync_grads(self, module: Any) -> None:
        import torch
        import torch.distributed as dist

        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        k = 0
        for g in grads:
            g.copy_(flat[k:k + g.numel()].view_as(g))
            k += g.numel()

    def totals(self, loss: float, acc: float, seen: int) -> tuple[float, float, int]:
        import torch
        import torch.distributed as dist

        t = torch.tensor([loss, acc, float(seen)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t[0]), float(t[1]), int(t[2])


def _worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the trainer's loop with the data-parallel hook; worker 0
    reports its checkpoint after each epoch and the returned weights at the end."""
    import ray
    import ray.train
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(int(config.get("threads", 1)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    trainer: AdversarialTrainer = copy.copy(config["trainer"])
    base = ray.get(config["model"])
    x, y = ray.get(config["x"]), ray.get(config["y"])
    local = Path(tempfile.mkdtemp(prefix=f"bastion-train-{rank}-"))
    try:
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                for name in os.listdir(d):
                    if name.startswith("state") or name == "state.json":
                        shutil.copy2(Path(d) / name, local / name)
        trainer.checkpoint_dir = local

        def report(extra: dict[str, Any], final: bool = False) -> None:
            from ray.train import Checkpoint

            if rank != 0:
                ray.train.report(extra)
                return
            out = Path(tempfile.mkdtemp(prefix="bastion-report-"))
            for name in os.listdir(local):
                shutil.copy2(local / name, out / name)
            if final:
                save_file({k: v.detach().contiguous() for k, v in
                           served.module.state_dict().items()}, str(out / SERVED_TENSORS))
                (out / RESULT_JSON).write_text(json.dumps({
                    "history": [asdict(h) for h in trainer.history_],
                    "stopped_early": trainer.stopped_early_,
                    "best_epoch": trainer.best_epoch_,
                    "resumed_from": trainer.resumed_from_,
                    "recoveries": list(getattr(trainer, "recoveries_", [])),
                    "ended_on_best": bool(getattr(trainer, "ended_on_best_", False)),
                    "workers": world}))
            ray.train.report(extra, checkpoint=Checkpoint.from_directory(str(out)))
            shutil.rmtree(out, ignore_errors=True)

        def on_epoch(e: EpochLog) -> None:
            report({**asdict(e), "final": False})

        served = trainer.fit(base, (x, y), on_epoch=on_epoch,
                             parallel=_DataParallel(rank, world, trainer.seed))
        report({"epoch": len(trainer.history_), "final": True}, final=True)
    finally:
        shutil.rmtree(local, ignore_errors=True)


class RayFit:
    """``fit(trainer, model, data, on_epoch) -> model`` on Ray Train (the hook of
    :func:`bastion.defend.harden.harden`); see :func:`train_on_ray`."""

    def __init__(self, *, workers: int = 2, address: str | None = None,
                 storage_path: str | Path | None = None) -> None:
        if int(workers) < 1:
            raise BastionError(f"--workers {workers} is not allowed", hint="at least 1")
        self.workers, self.address = int(workers), address
        self.storage_path = storage_path
        #: recorded in the report's settings
        self.settings = {"engine": "ray", "workers": self.workers}

    def __call__(self, trainer: AdversarialTrainer, model: Any, data: Any,
                 on_epoch: Any = None) -> Any:
        return train_on_ray(trainer, model, data, workers=self.workers,
                            address=self.address, storage_path=self.storage_path,
                            on_epoch=on_epoch)


def train_on_ray(trainer: AdversarialTrainer, model: Any, data: Any, *, workers: int = 2,
                 address: str | None = None, storage_path: str | Path | None = None,
                 on_epoch: Any = None) -> Any:
    """Run ``trainer.fit(model, data)`` data-parallel on ``workers`` Ray Train CPU
    workers; return the trained model, with ``trainer``'s fitted attributes
    (``history_``, ``stopped_early_``, ``best_epoch_``, ``resumed_from_``, ``recoveries_``,
    ``ended_on_best_``) set as a local
    :meth:`~AdversarialTrainer.fit` sets them, and ``workers_``.

    ``storage_path``: shared storage for the checkpoints (default: the trainer's
    ``checkpoint_dir``/``ray``); without either, the run cannot resume and a temporary
    folder is used. ``address``: the Ray cluster (``auto``, ``HOST:PORT``,
    ``ray://HOST:PORT``; default ``$BASTION_RAY_ADDRESS``, else ``auto``).

    Raises:
        BastionError: no Ray, an unreachable cluster, a model that is not a torch model,
            bad data, or a training run that failed (its first line).
    """
    from bastion._ray import connect
    from bastion.defend.training import as_torch_model, check_eps, rebuild

    base = as_torch_model(model, purpose=f"{trainer.method} training on Ray")
    x, y = check_training_data(base, data)
    check_eps(trainer.eps, norm=trainer.norm, bounds=base.bounds, input_shape=base.input_shape)
    ray = connect(address)
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    tmp_storage = None
    if storage_path is None and trainer.checkpoint_dir is not None:
        storage_path = Path(trainer.checkpoint_dir) / "ray"
    if storage_path is None:
        tmp_storage = tempfile.mkdtemp(prefix="bastion-ray-train-")
        storage_path = tmp_storage
    storage = Path(storage_path).expanduser().resolve()
    storage.mkdir(parents=True, exist_ok=True)
    spec = copy.copy(trainer)
    spec.checkpoint_dir = None
    config = {"trainer": spec, "model": ray.put(base), "x": ray.put(x), "y": ray.put(y)}
    run = TorchTrainer(
        _worker_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=int(workers), use_gpu=False,
                                     resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name=f"train-{trainer.method}-{trainer._fingerprint()}",
                             storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    try:
        try:
            result = run.fit()
        except Exception as exc:
            raise BastionError(f"training on Ray failed: {_first_line(exc)}",
                               hint="see the worker logs under the cluster's temp dir") \
                from None
        if result.checkpoint is None:
            raise BastionError("training on Ray ended without a checkpoint")
        with result.checkpoint.as_directory() as d:
            done = Path(d)
            if not (done / RESULT_JSON).is_file():
                raise BastionError("training on Ray ended before its final report")
            doc = json.loads((done / RESULT_JSON).read_text())
            from safetensors.torch import load_file

            state = load_file(str(done / SERVED_TENSORS))
        module = copy.deepcopy(base.module)
        module.load_state_dict(state)
        module.eval()
        out = rebuild(base, module, name=f"{base.name}+{trainer.method}")
    finally:
        if tmp_storage is not None:
            shutil.rmtree(tmp_storage, ignore_errors=True)
    trainer.history_ = [EpochLog(**h) for h in doc["history"]]
    trainer.stopped_early_ = bool(doc["stopped_early"])
    trainer.best_epoch_ = int(doc["best_epoch"])
    trainer.resumed_from_ = int(doc["resumed_from"])
    trainer.recoveries_ = list(doc.get("recoveries", []))
    trainer.ended_on_best_ = bool(doc.get("ended_on_best", False))
    setattr(trainer, "workers_", int(doc["workers"]))  # noqa: B010 - a Ray-only attribute
    if on_epoch is not None:
        for h in trainer.history_[trainer.resumed_from_:]:
            on_epoch(h)
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    cause = exc.__cause__ or exc.__context__
    if not text and cause is not None:
        text = str(cause).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
