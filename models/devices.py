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


def available_cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op threads when ``threads`` is given; return the count in effect.

    Unset keeps the process default. Inside Ray that is the replica's reserved CPUs (Ray starts workers with
    OMP_NUM_THREADS = num_cpus, at least 1): safe when many replicas share a node, slow for a lone CPU
    replica on a multi-core node (measured here: ~1.5x slower at 1 thread than at 2 on two cores), so CPU
    deployments should set ``torch_threads`` per stage.
    """
    if threads:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    return torch.get_num_threads()
