"""Model sources, one per URI scheme: ``file``, ``s3`` and ``hf``. Adding a store is one class and one row.

A source pins a reference to an immutable revision, reads its manifest, fetches files and publishes new
versions. Credentials and endpoints come from each client library's own environment variables (boto3:
``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID`` / web identity; huggingface_hub: ``HF_ENDPOINT``,
``HF_TOKEN``, ``HF_HUB_OFFLINE``), so workload identity and private endpoints need no sdserve settings.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from models.registry.errors import NotFoundError, RegistryError
from models.registry.manifest import MANIFEST_NAME, FileEntry, Manifest, content_id, write_manifest
from models.registry.refs import ModelRef

logger = logging.getLogger(__name__)

Progress = Callable[[int], None]  # called with bytes just received
_CHUNK = 1 << 20


class ModelSource(ABC):
    """How one kind of store serves model versions."""

    scheme: ClassVar[str]
    in_place: ClassVar[bool] = False  # True: files are read where they are, never copied into the cache

    def __init__(self, attempts: int = 3) -> None:
        self.attempts = attempts

    @abstractmethod
    def pin(self, ref: ModelRef) -> ModelRef:
        """The same reference with an immutable version (a hub branch becomes its commit)."""

    @abstractmethod
    def read_manifest(self, ref: ModelRef) -> bytes:
        """The raw bytes of the version's manifest (NotFoundError when there is none)."""

    @abstractmethod
    def fetch(self, ref: ModelRef, entries: list[FileEntry], dest: Path, progress: Progress) -> None:
        """Write each entry to ``dest / entry.path``; the caller verifies sizes and hashes."""

    @abstractmethod
    def push(self, directory: Path, ref: ModelRef) -> ModelRef:
        """Publish a local model folder (with its manifest) as a new version; return the pinned reference."""

    @abstractmethod
    def versions(self, ref: ModelRef) -> list[str]:
        """Versions published under the reference's location."""

    def local_dir(self, ref: ModelRef) -> Path:
        raise RegistryError(f"{self.scheme}:// models are fetched into the cache, not read in place", str(ref))


class FileSource(ModelSource):
    """A folder on a local or mounted filesystem, read in place."""

    scheme = "file"
    in_place = True

    def pin(self, ref: ModelRef) -> ModelRef:
        if not Path(ref.location).is_dir():
            raise NotFoundError("no such folder", str(ref))
        return ref

    def read_manifest(self, ref: ModelRef) -> bytes:
        path = Path(ref.location) / MANIFEST_NAME
        if not path.is_file():
            raise NotFoundError(f"no {MANIFEST_NAME}", str(ref))
        return path.read_bytes()

    def fetch(self, ref: ModelRef, entries: list[FileEntry], dest: Path, progress: Progress) -> None:
        for entry in entries:
            target = dest / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(ref.location) / entry.path, target)
            progress(entry.size)

    def push(self, directory: Path, ref: ModelRef) -> ModelRef:
        target = Path(ref.location)
        if (target / MANIFEST_NAME).exists():
            raise RegistryError("a version is already published there; versions are immutable", str(ref))
        shutil.copytree(directory, target, dirs_exist_ok=True)
        return ref

    def versions(self, ref: ModelRef) -> list[str]:
        return [str(ref)] if (Path(ref.location) / MANIFEST_NAME).is_file() else []

    def local_dir(self, ref: ModelRef) -> Path:
        return Path(ref.location)


class S3Source(ModelSource):
    """An S3 bucket (or any S3-compatible store), one prefix per version.

    ``s3://bucket/models/sd15@v3`` is the folder ``s3://bucket/models/sd15/v3/``. A version is published by
    uploading every file and then the manifest, so a reader that finds the manifest finds every file; an
    existing version is never overwritten.
    """

    scheme = "s3"

    def __init__(self, attempts: int = 3) -> None:
        super().__init__(attempts)
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            # Retries for throttling and 5xx; connection drops inside a body are resumed below with Range.
            self._client = boto3.client("s3", config=Config(retries={"max_attempts": 5, "mode": "standard"}))
        return self._client

    @staticmethod
    def _split(ref: ModelRef) -> tuple[str, str]:
        bucket, _, prefix = ref.location.partition("/")
        if not ref.version:
            raise RegistryError("S3 references must name a version: s3://bucket/prefix@<version>", str(ref))
        return bucket, f"{prefix}/{ref.version}/"

    def pin(self, ref: ModelRef) -> ModelRef:
        self._split(ref)  # a version folder is immutable once its manifest exists
        return ref

    def read_manifest(self, ref: ModelRef) -> bytes:
        from botocore.exceptions import ClientError

        bucket, prefix = self._split(ref)
        try:
            body: bytes = self.client.get_object(Bucket=bucket, Key=prefix + MANIFEST_NAME)["Body"].read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "NoSuchBucket", "404"):
                raise NotFoundError(
                    f"no {MANIFEST_NAME} at s3://{bucket}/{prefix} (unknown version?)", str(ref)
                ) from exc
            raise RegistryError(f"S3 error {code}: {exc}", str(ref)) from exc
        return body

    def fetch(self, ref: ModelRef, entries: list[FileEntry], dest: Path, progress: Progress) -> None:
        bucket, prefix = self._split(ref)
        for entry in entries:
            self._download(bucket, prefix + entry.path, dest / entry.path, entry.size, progress, str(ref))

    def _download(self, bucket: str, key: str, target: Path, size: int, progress: Progress, ref: str) -> None:
        """Stream one object to ``target``; a dropped connection resumes from the bytes already written."""
        from botocore.exceptions import BotoCoreError, ClientError

        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        for attempt in range(1, self.attempts + 1):
            have = part.stat().st_size if part.exists() else 0
            if have > size:  # not the object we expected: start over
                part.unlink()
                have = 0
            if have == size:
                break
            try:
                kwargs = {"Range": f"bytes={have}-"} if have else {}
                body = self.client.get_object(Bucket=bucket, Key=key, **kwargs)["Body"]
                with part.open("ab") as f:
                    for chunk in body.iter_chunks(_CHUNK):
                        f.write(chunk)
                        progress(len(chunk))
            except ClientError as exc:
                raise RegistryError(f"cannot read s3://{bucket}/{key}: {exc}", ref) from exc
            except (BotoCoreError, OSError) as exc:
                logger.warning("s3://%s/%s broke (attempt %d/%d): %s", bucket, key, attempt, self.attempts, exc)
        else:
            have = part.stat().st_size if part.exists() else 0
            if have != size:
                raise RegistryError(f"s3://{bucket}/{key}: download failed after {self.attempts} attempts", ref)
        part.replace(target)

    def push(self, directory: Path, ref: ModelRef) -> ModelRef:
        bucket, prefix = self._split(ref)
        try:
            self.read_manifest(ref)
        except NotFoundError:
            pass
        else:
            raise RegistryError("that version is already published; versions are immutable", str(ref))
        manifest = (directory / MANIFEST_NAME).read_text()
        for entry in Manifest.from_bytes(manifest.encode(), str(ref)).files:
            self.client.upload_file(str(directory / entry.path), bucket, prefix + entry.path)
        self.client.put_object(Bucket=bucket, Key=prefix + MANIFEST_NAME, Body=manifest.encode())  # last
        return ref

    def versions(self, ref: ModelRef) -> list[str]:
        bucket, _, prefix = ref.location.partition("/")
        found = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=f"{prefix}/"):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) + 1 :]
                version, _, name = rel.partition("/")
                if name == MANIFEST_NAME:
                    found.append(str(ref.with_version(version)))
        return found


class HubSource(ModelSource):
    """A (private) Hugging Face hub: ``hf://org/name@<branch|tag|commit>``, served by commit."""

    scheme = "hf"

    def pin(self, ref: ModelRef) -> ModelRef:
        if ref.is_commit:
            return ref
        if hub_offline():
            raise RegistryError("HF_HUB_OFFLINE is set and the revision is not a commit; pin the commit", str(ref))
        from huggingface_hub import HfApi

        try:
            info = HfApi().model_info(ref.location, revision=ref.version or "main")
        except Exception as exc:  # the hub answers unknown repos / revisions in several ways
            raise NotFoundError(f"cannot resolve revision {ref.version or 'main'!r}: {_short(exc)}", str(ref)) from exc
        if not info.sha:
            raise NotFoundError("the hub returned no commit for this revision", str(ref))
        return ref.with_version(info.sha)

    def read_manifest(self, ref: ModelRef) -> bytes:
        with tempfile.TemporaryDirectory(prefix="sdserve-manifest-") as tmp:
            self._download([MANIFEST_NAME], ref, Path(tmp))
            return (Path(tmp) / MANIFEST_NAME).read_bytes()

    def fetch(self, ref: ModelRef, entries: list[FileEntry], dest: Path, progress: Progress) -> None:
        if entries:
            self._download([e.path for e in entries], ref, dest)
            for entry in entries:
                progress(entry.size)

    def _download(self, paths: list[str], ref: ModelRef, dest: Path) -> None:
        from huggingface_hub import snapshot_download

        last: Exception | None = None
        for attempt in range(1, self.attempts + 1):
            try:
                # allow_patterns with exact paths: only the files this stage reads are requested.
                snapshot_download(ref.location, revision=ref.version, allow_patterns=paths, local_dir=dest)
            except Exception as exc:
                last = exc
                logger.warning("%s: download broke (attempt %d/%d): %s", ref, attempt, self.attempts, _short(exc))
                continue
            missing = [p for p in paths if not (dest / p).is_file()]
            if missing:
                raise NotFoundError(f"the revision has no {missing[0]}", str(ref))
            return
        raise RegistryError(f"download failed after {self.attempts} attempts: {_short(last)}", str(ref))

    def push(self, directory: Path, ref: ModelRef) -> ModelRef:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(ref.location, private=True, exist_ok=True)
        info = api.upload_folder(
            repo_id=ref.location, folder_path=str(directory), revision=ref.version or "main",
            commit_message="sdserve models push",
        )  # fmt: skip
        return ref.with_version(info.oid)

    def versions(self, ref: ModelRef) -> list[str]:
        from huggingface_hub import HfApi

        refs = HfApi().list_repo_refs(ref.location)
        return [str(ref.with_version(b.target_commit)) + f"  ({b.name})" for b in [*refs.branches, *refs.tags]]


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub read it: no request may reach a hub."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _short(exc: BaseException | None) -> str:
    return str(exc).splitlines()[0][:300] if exc else "unknown error"


# Scheme -> source class. One row per store.
SOURCES: dict[str, type[ModelSource]] = {cls.scheme: cls for cls in (FileSource, S3Source, HubSource)}


def source_for(ref: ModelRef, attempts: int = 3) -> ModelSource:
    cls = SOURCES.get(ref.scheme)
    if cls is None:
        raise RegistryError(f"unknown scheme {ref.scheme!r}; known: {', '.join(sorted(SOURCES))}", str(ref))
    return cls(attempts=attempts)


def publish(
    directory: Path, ref: ModelRef, allow_pickle: bool = False, attempts: int = 3, kind: str | None = None
) -> tuple[ModelRef, str]:
    """Write the manifest into ``directory`` and publish it at ``ref``; return the pinned ref and content id.

    ``kind`` overrides the artifact kind detected from the folder (see ``manifest.KNOWN_KINDS``).
    """
    manifest = write_manifest(directory, revision=ref.version or "", allow_pickle=allow_pickle, kind=kind)
    pinned = source_for(ref, attempts).push(directory, ref)
    return pinned, content_id(manifest.to_json().encode())
