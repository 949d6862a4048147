"""Where images returned as ``url`` are kept: a local folder, or an S3 bucket with presigned urls.

The ingress writes each image once and answers with a url. ``OUTPUT_STORES`` maps the scheme of
``outputs.store`` to the class; no ``outputs.store`` means the local folder ``outputs.directory``, served by
``GET /v1/images/{id}``. Each ingress replica runs an ``OutputSweeper``, so images nobody fetches are deleted
too, not only those fetched after they expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from serving import auth

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
MEDIA_TYPES = {ext: media for media, ext in EXTENSIONS.items()}
IMAGE_ID_PATTERN = r"[0-9a-f]{32}\.(?:png|jpg|webp)"  # what new_image_id makes
_ID = re.compile(f"^{IMAGE_ID_PATTERN}$")

logger = logging.getLogger(__name__)


def new_image_id(media_type: str, tenant: str = "") -> str:
    """80 random bits and a 48-bit tag of (tenant, those bits): unguessable, and only its tenant's id."""
    nonce = secrets.token_hex(10)
    return f"{nonce}{_tenant_tag(nonce, tenant)}.{EXTENSIONS[media_type]}"


def _tenant_tag(nonce: str, tenant: str) -> str:
    return hashlib.sha256(f"{tenant}\x00{nonce}".encode()).hexdigest()[:12]


def owned(image_id: str, tenant: str) -> bool:
    """Whether ``image_id`` was made for ``tenant`` (another tenant's id is simply not found)."""
    return _ID.match(image_id) is not None and _tenant_tag(image_id[:20], tenant) == image_id[20:32]


class OutputStore:
    """Images on local disk, named by an unguessable id, removed after ``ttl_s``."""

    def __init__(self, directory: str | Path, ttl_s: float) -> None:
        self.directory = Path(directory)
        self.ttl_s = ttl_s

    def put(self, data: bytes, media_type: str) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        image_id = new_image_id(media_type, auth.current().tenant)
        tmp = self.directory / f".{image_id}.tmp"
        tmp.write_bytes(data)
        tmp.rename(self.directory / image_id)  # atomic: a reader never sees a partial file
        return image_id

    def url(self, image_id: str, base_url: str) -> str:
        """Where a client downloads the image (``base_url``: the service's public base)."""
        return f"{base_url.rstrip('/')}/v1/images/{image_id}"

    def get(self, image_id: str) -> tuple[bytes, str] | None:
        """Return (bytes, media type), or None when unknown, malformed, expired or another tenant's."""
        if not owned(image_id, auth.current().tenant):
            return None
        path = self.directory / image_id
        try:
            if time.time() - path.stat().st_mtime > self.ttl_s:
                path.unlink(missing_ok=True)
                return None
            return path.read_bytes(), MEDIA_TYPES[image_id.rsplit(".", 1)[1]]
        except FileNotFoundError:
            return None

    def sweep(self) -> int:
        """Delete expired images; return how many."""
        removed = 0
        if not self.directory.is_dir():
            return 0
        cutoff = time.time() - self.ttl_s
        for path in self.directory.iterdir():
            if not _ID.match(path.name):
                continue
            try:
                expired = path.stat().st_mtime < cutoff
            except FileNotFoundError:
                continue  # another replica's sweep on this node, or a get() of an expired image, came first
            if expired:
                path.unlink(missing_ok=True)
                removed += 1
        return removed


class S3OutputStore(OutputStore):
    """Images in ``s3://bucket/prefix/``, handed out as presigned GET urls valid for ``ttl_s``.

    Credentials and endpoint come from boto3's environment. The service never lists or deletes objects
    (``sweep`` does nothing): deleting them is the job of a lifecycle rule on the bucket that expires objects
    under ``prefix/`` after N days, with N at least ``ttl_s`` in days, rounded up (see the README). Until the
    rule deletes an image, its url has stopped working after ``ttl_s`` and ``get`` treats it as expired.
    """

    def __init__(self, uri: str, ttl_s: float) -> None:
        import boto3

        parsed = urlparse(uri)
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.ttl_s = ttl_s
        self.client: Any = boto3.client("s3")

    def _key(self, image_id: str) -> str:
        return f"{self.prefix}/{image_id}" if self.prefix else image_id

    def put(self, data: bytes, media_type: str) -> str:
        image_id = new_image_id(media_type, auth.current().tenant)
        self.client.put_object(Bucket=self.bucket, Key=self._key(image_id), Body=data, ContentType=media_type)
        return image_id

    def url(self, image_id: str, base_url: str) -> str:
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(image_id)}, ExpiresIn=int(self.ttl_s)
        )
        return url

    def get(self, image_id: str) -> tuple[bytes, str] | None:
        if not owned(image_id, auth.current().tenant):
            return None
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(image_id))
        except self.client.exceptions.NoSuchKey:
            return None
        if time.time() - obj["LastModified"].timestamp() > self.ttl_s:
            return None
        return obj["Body"].read(), MEDIA_TYPES[image_id.rsplit(".", 1)[1]]

    def sweep(self) -> int:
        """Nothing to do here: the bucket's lifecycle rule deletes expired objects. Returns 0."""
        return 0


def sweep_interval(ttl_s: float) -> float:
    """Seconds between sweeps for a ttl: a quarter of it (so an unread image outlives its ttl by at most a
    quarter), no more than a minute, and no less than a second (a tiny ttl must not become a busy loop)."""
    return min(max(ttl_s / 4, 1.0), 60.0)


class OutputSweeper:
    """Deletes a store's expired images in the background: once at start (images an earlier replica left) and
    then every ``interval_s``. A sweep lists and unlinks files, so it runs in a thread, off the event loop."""

    def __init__(self, store: OutputStore, interval_s: float | None = None) -> None:
        self.store = store
        self.interval_s = sweep_interval(store.ttl_s) if interval_s is None else interval_s
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start sweeping on the running event loop (call it from a coroutine, or from code the loop runs)."""
        if not self.running:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="output-sweeper")

    async def stop(self) -> None:
        """Cancel the sweeps (a sweep already in its thread finishes there, unobserved)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                removed = await asyncio.to_thread(self.store.sweep)
            except Exception:
                logger.exception("could not delete expired images")
            else:
                if removed:
                    logger.info("deleted %d expired images", removed)
            await asyncio.sleep(self.interval_s)


# Scheme of `outputs.store` -> store class.
OUTPUT_STORES: dict[str, type[S3OutputStore]] = {"s3": S3OutputStore}


def open_output_store(directory: str, store: str | None, ttl_s: float) -> OutputStore:
    """The store configured by ``outputs``: ``store`` (e.g. ``s3://bucket/images``) or the local ``directory``."""
    if not store:
        return OutputStore(directory, ttl_s)
    scheme = urlparse(store).scheme
    if scheme not in OUTPUT_STORES:
        raise ValueError(f"outputs.store: unknown scheme {scheme!r}; known: {', '.join(sorted(OUTPUT_STORES))}")
    return OUTPUT_STORES[scheme](store, ttl_s)
