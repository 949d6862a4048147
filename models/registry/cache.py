"""``SnapshotCache``: pinned references become verified, immutable local folders in the diffusers layout.

Layout under the cache root::

    snapshots/<content id>/            what loaders read; a component folder appears only when complete
        sdserve-manifest.json          written last for the top-level files
        model_index.json
        unet/ ...
    partial/<content id>/<component>/  downloads in progress (resumed by the next attempt, never loaded)
    locks/<content id>.<component>     one downloader per component per node; the others wait, then reuse
    refs/<hash of reference>.json      reference -> pinned reference and content id (for offline starts)

The content id is the sha256 of the manifest, so two references to identical files share one snapshot.
Each stage materializes only its own components (text encoder: tokenizer + text_encoder; denoiser: unet +
scheduler; decoder: vae), and a component is published with one ``rename`` after every file in it matched the
manifest's size and sha256: a partial or tampered file is never visible to a loader.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from models.registry.errors import IntegrityError, NotFoundError, RegistryError
from models.registry.manifest import MANIFEST_NAME, ROOT, FileEntry, Manifest, content_id, sha256_file
from models.registry.refs import ModelRef, parse_ref
from models.registry.sources import ModelSource, Progress, hub_offline, source_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchReport:
    """What one ``materialize`` call did."""

    ref: str  # as configured
    pinned: str  # with the immutable revision that is served
    version: str  # content id
    components: tuple[str, ...]
    files: int
    bytes_fetched: int  # downloaded by this call
    bytes_cached: int  # already on this node
    seconds: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Snapshot:
    path: Path
    manifest: Manifest | None  # None: a local folder without a manifest (development only)
    report: FetchReport


def _noop(_: int) -> None:
    pass


class SnapshotCache:
    """Resolve, fetch and verify model snapshots under one root folder (shared by the replicas of a node)."""

    def __init__(
        self,
        root: str | Path,
        allow_pickle: bool = False,
        attempts: int = 3,
        lock_timeout_s: float = 3600.0,
    ) -> None:
        self.root = Path(root).expanduser()
        self.allow_pickle = allow_pickle
        self.attempts = attempts
        self.lock_timeout_s = lock_timeout_s

    # -- public ---------------------------------------------------------------------------------------------

    def pin(self, ref: str | ModelRef) -> ModelRef:
        """Pin a reference to an immutable revision; offline, fall back to the last pin recorded here."""
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        source = source_for(parsed, self.attempts)
        try:
            return source.pin(parsed)
        except RegistryError:
            recorded = self._read_ref(parsed)
            if recorded is None or not hub_offline():
                raise
            logger.warning("offline: serving %s as last pinned here: %s", parsed, recorded["pinned"])
            return parse_ref(recorded["pinned"])

    def materialize(
        self, ref: str | ModelRef, components: tuple[str, ...] | None = None, progress: Progress | None = None
    ) -> Snapshot:
        """Make the given components (None: every file) of ``ref`` available locally and verified.

        Raises:
            RegistryError: unknown reference or revision, missing manifest, integrity failure, refused
                pickle weights, or a download that kept failing. Nothing partial is left visible.
        """
        started = time.perf_counter()
        configured = str(ref)
        pinned = self.pin(ref)
        source = source_for(pinned, self.attempts)
        if source.in_place:
            return self._in_place(source, configured, pinned, components, started)
        manifest_bytes = self._manifest_bytes(source, pinned)
        manifest = Manifest.from_bytes(manifest_bytes, str(pinned))
        manifest.check_safe(components, self.allow_pickle, str(pinned))
        cid = content_id(manifest_bytes)
        self._write_ref(configured, pinned, cid, manifest_bytes)
        snap = self.root / "snapshots" / cid
        units = [ROOT, *sorted({e.component for e in manifest.entries(components)} - {ROOT})]
        fetched = cached = files = 0
        for unit in units:
            entries = [e for e in manifest.files if e.component == unit]
            files += len(entries)
            size = sum(e.size for e in entries)
            if self._present(snap, unit):
                cached += size
                continue
            with self._lock(f"{cid}.{unit or '_root'}"):
                if self._present(snap, unit):  # another replica published it while we waited
                    cached += size
                    continue
                fetched += self._fetch_unit(source, pinned, cid, unit, entries, manifest_bytes, progress or _noop)
        report = FetchReport(
            ref=configured, pinned=str(pinned), version=cid, components=tuple(u for u in units if u),
            files=files, bytes_fetched=fetched, bytes_cached=cached, seconds=round(time.perf_counter() - started, 3),
        )  # fmt: skip
        logger.info(
            "snapshot %s (%s) components=%s: fetched %d bytes, %d cached, %.1fs",
            pinned, cid, ",".join(report.components), fetched, cached, report.seconds,
        )  # fmt: skip
        return Snapshot(path=snap, manifest=manifest, report=report)

    def verify(self, ref: str | ModelRef) -> list[str]:
        """Re-hash every local file of ``ref`` (cached, or read in place) against its manifest; return the problems.

        Raises:
            NotFoundError: a fetched reference that is not in the cache, or a local folder with no manifest.
        """
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        source = source_for(parsed, self.attempts)
        if source.in_place:
            snap = source.local_dir(parsed)
            manifest = Manifest.from_bytes(source.read_manifest(parsed), str(ref))
        else:
            recorded = self._read_ref(parsed)
            if recorded is None:
                raise NotFoundError("not in the cache; pull it first", str(ref))
            snap = self.root / "snapshots" / recorded["version"]
            manifest = Manifest.from_bytes((snap / MANIFEST_NAME).read_bytes(), str(ref))
        problems = []
        for entry in manifest.files:
            path = snap / entry.path
            if not path.exists():
                if self._present(snap, entry.component):
                    problems.append(f"{entry.path}: missing")
                continue
            if not _matches(path, entry):
                problems.append(f"{entry.path}: size or sha256 differs from the manifest")
        return problems

    def entries(self) -> list[dict[str, object]]:
        """Every reference resolved on this node: pinned ref, content id, components present, bytes."""
        out = []
        for file in sorted((self.root / "refs").glob("*.json")):
            data = json.loads(file.read_text())
            snap = self.root / "snapshots" / data["version"]
            present = sorted(p.name for p in snap.iterdir() if p.is_dir()) if snap.is_dir() else []
            size = sum(p.stat().st_size for p in snap.rglob("*") if p.is_file()) if snap.is_dir() else 0
            out.append({**data, "components": present, "bytes": size})
        return out

    # -- internals ------------------------------------------------------------------------------------------

    def _in_place(
        self, source: ModelSource, configured: str, pinned: ModelRef, components: tuple[str, ...] | None, started: float
    ) -> Snapshot:
        path = source.local_dir(pinned)
        try:
            manifest_bytes = source.read_manifest(pinned)
        except NotFoundError:
            # A local folder without a manifest (e.g. from `sdserve models create-test`): development use.
            report = FetchReport(configured, str(pinned), "", tuple(components or ()), 0, 0, 0, 0.0)
            return Snapshot(path=path, manifest=None, report=report)
        manifest = Manifest.from_bytes(manifest_bytes, str(pinned))
        manifest.check_safe(components, self.allow_pickle, str(pinned))
        entries = manifest.entries(components)
        for entry in entries:
            if not _matches(path / entry.path, entry):
                raise IntegrityError(f"{entry.path} does not match {MANIFEST_NAME}", str(pinned))
        report = FetchReport(
            configured, str(pinned), content_id(manifest_bytes), tuple(components or manifest.components()),
            len(entries), 0, sum(e.size for e in entries), round(time.perf_counter() - started, 3),
        )  # fmt: skip
        return Snapshot(path=path, manifest=manifest, report=report)

    def _manifest_bytes(self, source: ModelSource, pinned: ModelRef) -> bytes:
        try:
            return source.read_manifest(pinned)
        except RegistryError:
            recorded = self._read_ref(pinned)
            if recorded is None or not hub_offline():
                raise
            return (self.root / "snapshots" / recorded["version"] / MANIFEST_NAME).read_bytes()

    @staticmethod
    def _present(snap: Path, unit: str) -> bool:
        return (snap / MANIFEST_NAME).is_file() if unit == ROOT else (snap / unit).is_dir()

    def _fetch_unit(
        self,
        source: ModelSource,
        pinned: ModelRef,
        cid: str,
        unit: str,
        entries: list[FileEntry],
        manifest_bytes: bytes,
        progress: Progress,
    ) -> int:
        """Download one component into its staging folder, verify every file, then publish it atomically."""
        staging = self.root / "partial" / cid / (unit or "_root")
        staging.mkdir(parents=True, exist_ok=True)
        # Files that survived an interrupted attempt and still match are kept (resume at file granularity).
        todo = [e for e in entries if not _matches(staging / e.path, e)]
        for entry in todo:
            (staging / entry.path).unlink(missing_ok=True)
        source.fetch(pinned, todo, staging, progress)
        for entry in entries:
            if not _matches(staging / entry.path, entry):
                (staging / entry.path).unlink(missing_ok=True)
                raise IntegrityError(f"{entry.path} does not match {MANIFEST_NAME} (size or sha256)", str(pinned))
        snap = self.root / "snapshots" / cid
        snap.mkdir(parents=True, exist_ok=True)
        if unit == ROOT:
            for entry in entries:
                os.replace(staging / entry.path, snap / entry.path)
            tmp = snap / f".{MANIFEST_NAME}.tmp"
            tmp.write_bytes(manifest_bytes)
            os.replace(tmp, snap / MANIFEST_NAME)  # last: marks the top level complete
        else:
            os.rename(staging / unit, snap / unit)
        shutil.rmtree(staging, ignore_errors=True)
        return sum(e.size for e in todo)

    @contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        """An exclusive lock across the processes of this node (flock: released if the holder dies)."""
        path = self.root / "locks" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout_s
        with path.open("a") as f:
            while True:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() > deadline:
                        raise RegistryError(f"timed out waiting for another download of {name}") from exc
                    time.sleep(0.1)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _ref_file(self, ref: ModelRef) -> Path:
        return self.root / "refs" / f"{hashlib.sha256(str(ref).encode()).hexdigest()[:32]}.json"

    def _read_ref(self, ref: ModelRef) -> dict[str, str] | None:
        path = self._ref_file(ref)
        data: dict[str, str] | None = json.loads(path.read_text()) if path.is_file() else None
        return data

    def _write_ref(self, configured: str, pinned: ModelRef, cid: str, manifest_bytes: bytes) -> None:
        record = json.dumps({"ref": configured, "pinned": str(pinned), "version": cid})
        for key in {configured, str(pinned)}:
            path = self._ref_file(parse_ref(key))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(record)
            os.replace(tmp, path)


def _matches(path: Path, entry: FileEntry) -> bool:
    return path.is_file() and path.stat().st_size == entry.size and sha256_file(path) == entry.sha256
