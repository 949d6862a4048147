"""``StageRuntime``: one stage's components, for every model version a replica holds, on one device.

This is what a stage replica holds. It knows torch and diffusers but not Ray; the Serve deployments in
``serving/deployments`` wrap it. Loaded versions are keyed by their pinned reference, so during a rollout the
old and the new version of a model are loaded side by side and each request uses the one it names. Loading is
split in two: ``fetch`` (pin, download and verify through the snapshot cache; no torch, safe on any thread)
and ``build`` (construct the torch modules; call it on the replica's compute thread).

``describe`` reports what is actually in memory, found by looking at the loaded objects rather than trusting a
list, so tests can prove each replica loaded only its own component.
"""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from models.devices import configure_threads, resolve_device, resolve_dtype
from models.errors import UnknownModelError
from models.registry import FetchReport, RegistryError, SnapshotCache
from models.registry.cache import Snapshot
from models.snapshot import ArtifactSnapshot, ModelSnapshot, open_snapshot

logger = logging.getLogger(__name__)

# A stage object (TextEncoderStage, DenoiserStage, UpscalerStage, ...): it has `name`, `version`, `snapshot` and
# `loaded_modules()`; its constructor takes (name, snapshot, device, dtype, **options).
AnyStage = Any


class StageRuntime:
    """The loaded versions of one stage's model (or artifact) for one replica.

    Args:
        kind: the stage's name (for logs and ``describe``).
        build_stage: the stage's compute class, called as ``build_stage(name, snapshot, device, dtype, **options)``.
        cache: the snapshot cache references are fetched through.
        components: snapshot subfolders the stage reads (a pipeline stage).
        artifact: the registry artifact kind it loads instead (an upscaler, a safety checker).
    """

    def __init__(
        self,
        kind: str,
        build_stage: Callable[..., AnyStage],
        cache: SnapshotCache,
        components: tuple[str, ...] = (),
        artifact: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        threads: int | None = None,
        **options: Any,
    ) -> None:
        if bool(components) == bool(artifact):
            raise ValueError(f"stage {kind!r} must load either snapshot components or an artifact kind")
        self.threads = configure_threads(threads)
        self.kind = kind
        self.build_stage = build_stage
        self.components = components
        self.artifact = artifact
        self.cache = cache
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.options = options
        self.loaded: dict[str, AnyStage] = {}  # pinned reference -> stage
        self.fetches: dict[str, FetchReport] = {}  # pinned reference -> what fetching it cost
        self.last_used: dict[str, float] = {}
        self._lock = threading.Lock()

    # -- loading --------------------------------------------------------------------------------------------

    def fetch(self, ref: str) -> tuple[str, Snapshot]:
        """Pin ``ref`` and make this stage's components local and verified; return (pinned ref, snapshot)."""
        snap = self.cache.materialize(ref, self.components or None)
        if self.artifact and snap.manifest is not None and snap.manifest.kind != self.artifact:
            raise RegistryError(f"{ref} is a {snap.manifest.kind}, not a {self.artifact}", ref)
        return snap.report.pinned, snap

    def build(self, name: str, pinned: str, snap: Snapshot) -> AnyStage:
        """Construct the torch modules of a fetched snapshot (on the compute thread) and register them."""
        existing = self.loaded.get(pinned)
        if existing is not None:
            return existing
        snapshot: ModelSnapshot | ArtifactSnapshot
        if self.components:
            snapshot = open_snapshot(
                snap.path,
                self.components,
                version=snap.report.version or None,
                allow_pickle=self.cache.allow_pickle,
                stage=self.kind,
            )
        else:
            assert self.artifact is not None
            snapshot = ArtifactSnapshot(
                snap.path, snap.report.version or snap.path.name, self.artifact, self.cache.allow_pickle
            )
        stage = self.build_stage(name, snapshot, self.device, self.dtype, **self.options)
        with self._lock:
            self.loaded[pinned] = stage
            self.fetches[pinned] = snap.report
            self.last_used[pinned] = time.monotonic()
        logger.info(
            "%s loaded %s version %s (%s): fetched %d bytes, %d cached",
            self.kind, name, snapshot.version, pinned, snap.report.bytes_fetched, snap.report.bytes_cached,
        )  # fmt: skip
        return stage

    # -- use ------------------------------------------------------------------------------------------------

    def get(self, name: str, pinned: str) -> Any:
        """The loaded stage for a pinned reference (the caller made sure it is loaded)."""
        stage = self.loaded.get(pinned)
        if stage is None:
            raise UnknownModelError(f"model {name!r} is not loaded on this replica; see GET /v1/models", "model")
        self.last_used[pinned] = time.monotonic()
        return stage

    def retire(self, keep: Iterable[str], idle_s: float) -> list[str]:
        """Unload versions not in ``keep`` that nothing used for ``idle_s`` seconds; return their refs.

        A request that is still running holds its own reference to the stage object, so it finishes on the
        old version; the memory is freed when the last such request lets go.
        """
        keep = set(keep)
        now = time.monotonic()
        with self._lock:
            gone = [r for r in self.loaded if r not in keep and now - self.last_used.get(r, 0.0) >= idle_s]
            for ref in gone:
                stage = self.loaded.pop(ref)
                self.last_used.pop(ref, None)
                logger.info("%s unloaded %s version %s (%s)", self.kind, stage.name, stage.version, ref)
        if gone and self.device.type == "cuda":
            torch.cuda.empty_cache()
        return gone

    # -- reporting ------------------------------------------------------------------------------------------

    def describe(self, active: dict[str, str] | None = None) -> dict[str, Any]:
        """Device, dtype and, per active model name, its version, files, torch modules and fetch report.

        Args:
            active: model name -> pinned reference served for that name (default: every loaded version).
        """
        with self._lock:  # retire() may drop versions on the compute thread meanwhile
            loaded = dict(self.loaded)
        active = active if active is not None else {stage.name: ref for ref, stage in loaded.items()}
        models = {}
        for name, ref in active.items():
            stage = loaded.get(ref)
            if stage is not None:
                models[name] = self._describe_stage(ref, stage)
        return {
            "stage": self.kind,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "torch_threads": self.threads,
            "pid": os.getpid(),
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "models": models,
            "loaded_versions": {ref: stage.version for ref, stage in loaded.items()},
        }

    def _describe_stage(self, ref: str, stage: AnyStage) -> dict[str, Any]:
        modules = [value for value in vars(stage).values() if isinstance(value, torch.nn.Module)]
        report = self.fetches.get(ref)
        return {
            "ref": ref,
            "version": stage.version,
            "components": stage.loaded_modules(),
            "torch_modules": sorted(type(m).__name__ for m in modules),
            "files": [
                p.relative_to(stage.snapshot.path).as_posix() for p in stage.snapshot.stage_files(self.components)
            ],
            "parameters": sum(p.numel() for m in modules for p in m.parameters()),
            "fetch": report.to_dict() if report else None,
        }
