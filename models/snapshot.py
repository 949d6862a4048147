"""Local model snapshots in the diffusers layout, the families we can serve, and what each stage reads.

A snapshot is a folder with ``model_index.json`` and one subfolder per component. Each stage reads only the
subfolders it needs (the stage table, ``serving/stages.py``, says which), so a text-encoder replica never opens
UNet weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

# Pickle-based weight files can execute code when loaded; only safetensors are read.
UNSAFE_WEIGHT_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


@dataclass(frozen=True)
class ModelFamily:
    """A pipeline family the stages know how to run."""

    name: str
    pipeline_classes: tuple[str, ...]
    latent_channels: int = 4
    vae_scale_factor: int = 8


# Keyed by family name; a snapshot's ``model_index.json`` ``_class_name`` selects the row.
MODEL_FAMILIES: dict[str, ModelFamily] = {
    "sd1": ModelFamily("sd1", ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline")),
}


class SnapshotError(ValueError):
    """The folder is not a model snapshot we can serve."""


@dataclass(frozen=True)
class ModelSnapshot:
    """A model folder on local disk, identified by a version string."""

    path: Path
    version: str
    family: ModelFamily
    allow_pickle: bool = False  # the registry's unsafe option was set for this model

    @property
    def use_safetensors(self) -> bool | None:
        """What to pass to diffusers / transformers loaders: safetensors only unless pickle was allowed."""
        return None if self.allow_pickle else True

    def component_dir(self, component: str) -> Path:
        return self.path / component

    def stage_files(self, components: tuple[str, ...]) -> list[Path]:
        """Every file of the given components, model_index.json included."""
        files = [self.path / "model_index.json"]
        for component in components:
            files.extend(sorted(p for p in self.component_dir(component).rglob("*") if p.is_file()))
        return files


@dataclass(frozen=True)
class ArtifactSnapshot:
    """A registry artifact that is not a pipeline (an upscaler, a safety checker) on local disk.

    Its folder holds the artifact's files as published (safetensors weights, JSON configs); the stage that
    loads it reads every file (``stage_files`` ignores its argument, kept for symmetry with ``ModelSnapshot``).
    """

    path: Path
    version: str
    kind: str
    allow_pickle: bool = False

    @property
    def use_safetensors(self) -> bool | None:
        return None if self.allow_pickle else True

    def stage_files(self, components: tuple[str, ...] = ()) -> list[Path]:
        return sorted(p for p in self.path.rglob("*") if p.is_file() and not p.name.startswith("."))


def family_for(class_name: str) -> ModelFamily:
    for family in MODEL_FAMILIES.values():
        if class_name in family.pipeline_classes:
            return family
    raise SnapshotError(f"unsupported pipeline class {class_name!r}; supported: {sorted(MODEL_FAMILIES)}")


def local_path(source: str) -> Path:
    """Turn a ``file://`` URI or a plain path into a local path."""
    if "://" in source:
        parsed = urlparse(source)
        if parsed.scheme != "file":
            raise SnapshotError(f"unsupported model source scheme {parsed.scheme!r} in {source!r}")
        return Path(parsed.path)
    return Path(source).expanduser()


def snapshot_version(path: Path) -> str:
    """A short identifier that changes whenever any file of the snapshot changes.

    Built from every file's relative path, size and modification time, plus the full text of the JSON
    configs: cheap enough for multi-GB snapshots at replica start.
    """
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        stat = file.stat()
        digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        if file.suffix == ".json":
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def open_snapshot(
    source: str | Path,
    components: tuple[str, ...] = (),
    version: str | None = None,
    allow_pickle: bool = False,
    stage: str = "",
) -> ModelSnapshot:
    """Check that ``source`` is a servable snapshot and return it.

    Args:
        source: a local path or ``file://`` URI.
        components: also check the files of these components (present, safetensors only).
        version: the snapshot's content id when the registry knows it (else one is derived from the files).
        allow_pickle: the registry's unsafe option: pickle-only components are accepted.
        stage: the stage that reads them, for error messages.
    """
    path = local_path(str(source))
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise SnapshotError(f"{path} is not a diffusers model folder (no model_index.json)")
    index = json.loads(index_file.read_text())
    family = family_for(index.get("_class_name", ""))
    snapshot = ModelSnapshot(
        path=path, version=version or snapshot_version(path), family=family, allow_pickle=allow_pickle
    )
    if components:
        for component in components:
            if not snapshot.component_dir(component).is_dir():
                raise SnapshotError(f"{path} has no {component}/ folder, which the {stage or 'stage'} needs")
        unsafe = [p for p in snapshot.stage_files(components) if p.suffix in UNSAFE_WEIGHT_SUFFIXES]
        weights = [p for p in snapshot.stage_files(components) if p.suffix == ".safetensors"]
        if unsafe and not weights and not allow_pickle:
            raise SnapshotError(
                f"{path} holds only pickle-based weights ({unsafe[0].name}); convert them to safetensors"
            )
    return snapshot
