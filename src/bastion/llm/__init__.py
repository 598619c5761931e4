"""Prompt-injection security for LLM agents: red team, detector, hardening, guard proxy.

Public API (imported lazily, so ``import bastion.llm`` stays light)::

    from bastion.llm import (
        normalize, apply_transform, TRANSFORMS,             # obfuscation and its undoing
        PromptInjectionDetector,                            # fit / score / calibrate / predict
        load_probes, run_redteam, RedteamReport,            # red team an OpenAI-compatible API
        LlmGuard, create_guard_app, LlmEventLog,            # the guard proxy
        harden_detector, make_variants,                     # adversarial training loop
        train_detector, evaluate_on_records,                # JSONL training / evaluation
    )

Heavy dependencies (sentence-transformers, FastAPI, uvicorn, prometheus-client) come with
the ``llm`` extra: ``pip install 'bastion[llm]'``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "normalize": "bastion.llm.normalize",
    "apply_transform": "bastion.llm.transforms",
    "TRANSFORMS": "bastion.llm.transforms",
    "PromptInjectionDetector": "bastion.llm.detector",
    "Embedder": "bastion.llm.embed",
    "EmbeddingCache": "bastion.llm.embed",
    "load_probes": "bastion.llm.probes",
    "Probe": "bastion.llm.probes",
    "run_redteam": "bastion.llm.redteam",
    "RedteamReport": "bastion.llm.reports",
    "ChatClient": "bastion.llm.client",
    "judge": "bastion.llm.judges",
    "LlmGuard": "bastion.llm.guard",
    "create_guard_app": "bastion.llm.proxy",
    "LlmEventLog": "bastion.llm.events",
    "harden_detector": "bastion.llm.harden",
    "make_variants": "bastion.llm.harden",
    "train_detector": "bastion.llm.training",
    "evaluate_on_records": "bastion.llm.training",
    "load_prompt_jsonl": "bastion.llm.datasets",
    "wilson_interval": "bastion.llm.metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'bastion.llm' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)
