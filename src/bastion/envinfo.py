"""What the machine a run happened on looks like: CPU model and vector flags, core count,
torch and NumPy versions, thread counts. Floating-point results (and so training runs)
change with these, so every report that records a measured number should carry them.

Low layer: only the standard library, NumPy and torch.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# CPU flags that change which kernels torch/oneDNN pick (and so the floating-point order)
_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
          "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_info(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """``{"model": ..., "flags": [...]}`` from ``/proc/cpuinfo`` (the first processor);
    ``platform.processor()`` and no flags where that file cannot be read."""
    model = platform.processor() or platform.machine() or "unknown"
    flags: list[str] = []
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return {"model": model, "flags": flags}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key == "flags" and not flags:
            have = set(value.split())
            flags = [f for f in _FLAGS if f in have]
        if key == "" and flags:  # end of the first processor's block
            break
    return {"model": model, "flags": flags}


def environment() -> dict[str, Any]:
    """The facts that change a numeric run: CPU, cores, thread counts and versions."""
    import numpy as np
    import torch

    cpu = cpu_info()
    return {
        "cpu_model": cpu["model"],
        "cpu_flags": cpu["flags"],
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "numpy_version": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def environment_line(env: dict[str, Any]) -> str:
    """One human line: ``CPU (flags), N cores, torch V, T threads``."""
    flags = ", ".join(env.get("cpu_flags") or []) or "no vector flags read"
    return (f"{env.get('cpu_model')} ({flags}); {env.get('cpu_count')} cores; torch "
            f"{env.get('torch_version')}, {env.get('torch_threads')} threads")
