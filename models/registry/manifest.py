"""``sdserve-manifest.json``: every file of a model version with its size and sha256.

Written by ``sdserve models push`` beside the artifacts. The cache verifies every fetched file against it, and
the sha256 of the manifest bytes is the snapshot's content address (its ``version``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.registry.errors import RegistryError, UnsafeWeightsError

MANIFEST_NAME = "sdserve-manifest.json"
MANIFEST_FORMAT = 1
# Pickle-based weights can run arbitrary code when loaded.
UNSAFE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
ROOT = ""  # the component of top-level files (model_index.json)
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, POSIX separators
    size: int
    sha256: str

    @property
    def component(self) -> str:
        head, sep, _ = self.path.partition("/")
        return head if sep else ROOT

    @property
    def unsafe(self) -> bool:
        return self.path.endswith(UNSAFE_SUFFIXES)


@dataclass(frozen=True)
class Manifest:
    family: str
    revision: str
    files: tuple[FileEntry, ...]
    kind: str = "pipeline"
    extra: dict[str, Any] = field(default_factory=dict)

    def entries(self, components: tuple[str, ...] | None = None) -> list[FileEntry]:
        """Files of the given components (None: all), top-level files included."""
        if components is None:
            return list(self.files)
        wanted = {ROOT, *components}
        return [f for f in self.files if f.component in wanted]

    def components(self) -> list[str]:
        return sorted({f.component for f in self.files})

    def check_safe(self, components: tuple[str, ...] | None, allow_pickle: bool, ref: str) -> None:
        """Refuse pickle-based weight files unless the unsafe option is set."""
        unsafe = [f.path for f in self.entries(components) if f.unsafe]
        if unsafe and not allow_pickle:
            raise UnsafeWeightsError(
                f"pickle-based weight files are refused ({', '.join(unsafe[:3])}); convert them to safetensors, "
                "or set registry.unsafe_allow_pickle_weights if you trust the source",
                ref,
            )

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "kind": self.kind,
                "family": self.family,
                "revision": self.revision,
                "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
                **({"extra": self.extra} if self.extra else {}),
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_bytes(cls, data: bytes, ref: str) -> Manifest:
        try:
            raw = json.loads(data)
            if raw.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"unknown manifest format {raw.get('format')!r}")
            files = tuple(FileEntry(f["path"], int(f["size"]), str(f["sha256"])) for f in raw["files"])
        except (ValueError, KeyError, TypeError) as exc:
            raise RegistryError(f"{MANIFEST_NAME} is malformed: {exc}", ref) from exc
        for f in files:
            if f.path.startswith("/") or ".." in f.path.split("/"):
                raise RegistryError(f"{MANIFEST_NAME} names a path outside the model: {f.path!r}", ref)
        return cls(
            family=raw.get("family", ""),
            revision=raw.get("revision", ""),
            files=files,
            kind=raw.get("kind", "pipeline"),
            extra=raw.get("extra", {}),
        )


def content_id(manifest_bytes: bytes) -> str:
    """The snapshot's content address: it changes whenever any file (or the manifest) changes."""
    return hashlib.sha256(manifest_bytes).hexdigest()[:24]


# -- what a folder is -----------------------------------------------------------------------------------------

KindDetector = Callable[[Path, Sequence[FileEntry]], bool]
SAFETY_CHECKER_CLASS = "StableDiffusionSafetyChecker"


def _is_pipeline(directory: Path, files: Sequence[FileEntry]) -> bool:
    return (directory / "model_index.json").is_file()


def _is_safety_checker(directory: Path, files: Sequence[FileEntry]) -> bool:
    """diffusers' safety checker, in the public repo's layout or a pipeline's (safety_checker/ + feature_extractor/)."""
    from models.safety import artifact_dirs
    from models.snapshot import SnapshotError

    try:
        checker_dir, _ = artifact_dirs(directory)
        config = json.loads((checker_dir / "config.json").read_text())
    except (SnapshotError, OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    architectures = config.get("architectures")
    names = [*(architectures if isinstance(architectures, list) else []), config.get("_class_name")]
    return SAFETY_CHECKER_CLASS in names


def _is_upscaler(directory: Path, files: Sequence[FileEntry]) -> bool:
    """One safetensors file whose key names and shapes are a Real-ESRGAN architecture (only the header is read)."""
    weights = [f for f in files if f.path.endswith(".safetensors")]
    if len(weights) != 1:
        return False
    import torch
    from safetensors import SafetensorError, safe_open

    from models.upscaler import detect_upscaler

    try:
        with safe_open(str(directory / weights[0].path), framework="pt") as f:
            names: list[str] = list(f.keys())
            # Meta tensors: the shapes detect_upscaler reads, no tensor data.
            tensors = {name: torch.empty(f.get_slice(name).get_shape(), device="meta") for name in names}
        detect_upscaler(tensors)
    except (SafetensorError, OSError, ValueError):
        return False
    return True


def _is_lora(directory: Path, files: Sequence[FileEntry]) -> bool:
    return any(f.path.endswith(".safetensors") for f in files)  # a single adapter file


# Tried in order: the first match is the folder's kind.
KIND_DETECTORS: tuple[tuple[str, KindDetector], ...] = (
    ("pipeline", _is_pipeline),
    ("safety_checker", _is_safety_checker),
    ("upscaler", _is_upscaler),
    ("lora", _is_lora),
)
KNOWN_KINDS = tuple(kind for kind, _ in KIND_DETECTORS)


def detect_kind(directory: Path, files: Sequence[FileEntry]) -> str | None:
    """The artifact kind of a folder holding ``files``, or None when it is none of ``KNOWN_KINDS``."""
    return next((kind for kind, matches in KIND_DETECTORS if matches(directory, files)), None)


def build_manifest(directory: Path, revision: str, allow_pickle: bool = False, kind: str | None = None) -> Manifest:
    """Hash every file under ``directory`` (the manifest itself and dotfiles excluded).

    ``kind`` (one of ``KNOWN_KINDS``) overrides detection from the folder's contents.
    """
    if kind is not None and kind not in KNOWN_KINDS:
        raise RegistryError(f"unknown artifact kind {kind!r}; choose from {', '.join(KNOWN_KINDS)}", str(directory))
    files = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel == MANIFEST_NAME or any(part.startswith(".") for part in rel.split("/")):
            continue
        files.append(FileEntry(rel, path.stat().st_size, sha256_file(path)))
    if not files:
        raise RegistryError("no files to publish", str(directory))
    if kind is None:
        kind = detect_kind(directory, files)
    if kind is None:
        raise RegistryError(
            "neither a diffusers pipeline (model_index.json), a safety checker, an upscaler nor an adapter",
            str(directory),
        )
    family = ""
    index = directory / "model_index.json"
    if kind == "pipeline" and index.is_file():
        from models.snapshot import family_for

        family = family_for(json.loads(index.read_text()).get("_class_name", "")).name
    if kind == "lora":  # the base family it was trained for, from the file's names and shapes
        from models.adapters.lora import header_family

        family = header_family(directory)
    manifest = Manifest(family=family, revision=revision, files=tuple(files), kind=kind)
    manifest.check_safe(None, allow_pickle, str(directory))
    return manifest


def write_manifest(directory: Path, revision: str, allow_pickle: bool = False, kind: str | None = None) -> Manifest:
    manifest = build_manifest(directory, revision, allow_pickle, kind)
    (directory / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest
