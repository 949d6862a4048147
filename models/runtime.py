"""``StageRuntime``: one stage's components for every model in the catalog, on one device.

This is what a stage replica holds. It knows torch and diffusers but not Ray; the Serve deployments in
``serving/deployments`` wrap it. It also reports what it actually holds in memory, found by looking at the
loaded objects rather than trusting a list, so tests can prove each replica loaded only its own component.
"""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Callable, Sequence
from typing import Any

import torch

from models.decoder import DecoderStage
from models.denoiser import DenoiserStage
from models.devices import configure_threads, resolve_device, resolve_dtype
from models.errors import UnknownModelError
from models.snapshot import open_snapshot
from models.text_encoder import TextEncoderStage

logger = logging.getLogger(__name__)

AnyStage = TextEncoderStage | DenoiserStage | DecoderStage

# Stage kind -> constructor(name, snapshot, device, dtype, **options). One row per stage kind.
STAGE_KINDS: dict[str, Callable[..., AnyStage]] = {
    "text_encoder": TextEncoderStage,
    "denoiser": DenoiserStage,
    "decoder": DecoderStage,
}


class StageRuntime:
    """Loads the components of one stage kind for each (name, source) model."""

    def __init__(
        self,
        kind: str,
        models: Sequence[tuple[str, str]],
        device: str = "auto",
        dtype: str = "auto",
        threads: int | None = None,
        **options: Any,
    ) -> None:
        if kind not in STAGE_KINDS:
            raise ValueError(f"unknown stage kind {kind!r}")
        self.threads = configure_threads(threads)
        self.kind = kind
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.stages: dict[str, AnyStage] = {}
        for name, source in models:
            snapshot = open_snapshot(source, stage=kind)
            self.stages[name] = STAGE_KINDS[kind](name, snapshot, self.device, self.dtype, **options)
            logger.info("%s loaded model %s version %s from %s", kind, name, snapshot.version, source)

    def get(self, name: str) -> Any:
        stage = self.stages.get(name)
        if stage is None:
            raise UnknownModelError(f"model {name!r} is not served; see GET /v1/models", param="model")
        return stage

    def describe(self) -> dict[str, Any]:
        """What this replica holds: device, dtype, and per model its version, files and torch modules."""
        models = {}
        for name, stage in self.stages.items():
            torch_modules = sorted(
                type(value).__name__ for value in vars(stage).values() if isinstance(value, torch.nn.Module)
            )
            files = [p.relative_to(stage.snapshot.path).as_posix() for p in stage.snapshot.stage_files(self.kind)]
            models[name] = {
                "version": stage.version,
                "components": stage.loaded_modules(),
                "torch_modules": torch_modules,
                "files": files,
                "parameters": sum(
                    p.numel()
                    for value in vars(stage).values()
                    if isinstance(value, torch.nn.Module)
                    for p in value.parameters()
                ),
            }
        return {
            "stage": self.kind,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "torch_threads": self.threads,
            "pid": os.getpid(),
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "models": models,
        }
