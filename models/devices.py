"""Device and dtype selection: CUDA with fp16 when present, CPU fp32 otherwise."""

from __future__ import annotations

import os

import torch

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks the first CUDA device when one is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp16 on CUDA and fp32 on CPU (CPU half-precision kernels are slow or missing)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def configure_threads(threads: int | None) -> None:
    """Bound intra-op threads so replicas sharing a node do not oversubscribe its cores."""
    if threads:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
