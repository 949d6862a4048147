"""Where images returned as ``url`` are kept: a local folder, or an S3 bucket with presigned urls.

The ingress writes each image once and answers with a url. ``OUTPUT_STORES`` maps the scheme of
``outputs.store`` to the class; no ``outputs.store`` means the local folder ``outputs.directory``, served by
``GET /v1/images/{id}``.
"""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
MEDIA_TYPES = {ext: media for media, ext in EXTENSIONS.items()}
_ID = re.compile(r"^[0-9a-f]{32}\.(png|jpg|webp)$")


def new_image_id(media_type: str) -> str:
    return f"{secrets.token_hex(16)}.{EXTENSIONS[media_type]}"


class OutputStore:
    """Images on local disk, named by an unguessable id, removed after ``ttl_s``."""

    def __init__(self, directory: str | Path, ttl_s: float) -> None:
        self.directory = Path(directory)
        self.ttl_s = ttl_s

    def put(self, data: bytes, media_type: str) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        image_id = new_image_id(media_type)
        tmp = self.directory / f".{image_id}.tmp"
        tmp.write_bytes(data)
        tmp.rename(self.directory / image_id)  # atomic: a reader never sees a partial file
        return image_id

    def url(self, image_id: str, base_url: str) -> str:
        """Where a client downloads the image (``base_url``: the service's public base)."""
        return f"{base_url.rstrip('/')}/v1/images/{image_id}"

    def get(self, image_id: str) -> tuple[bytes, str] | None:
        """Return (bytes, media type), or None when unknown, malformed or expired."""
        if not _ID.match(image_id):
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
            if _ID.match(path.name) and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                removed += 1
        return removed


class S3OutputStore(OutputStore):
    """Images in ``s3://bucket/prefix/``, handed out as presigned GET urls valid for ``ttl_s``.

    Credentials and endpoint come from boto3's environment. Deleting old objects is the bucket's lifecycle
    rule's job (expire ``prefix/`` after a day, say); the urls stop working after ``ttl_s`` regardless.
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
        image_id = new_image_id(media_type)
        self.client.put_object(Bucket=self.bucket, Key=self._key(image_id), Body=data, ContentType=media_type)
        return image_id

    def url(self, image_id: str, base_url: str) -> str:
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(image_id)}, ExpiresIn=int(self.ttl_s)
        )
        return url

    def get(self, image_id: str) -> tuple[bytes, str] | None:
        if not _ID.match(image_id):
            return None
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(image_id))
        except self.client.exceptions.NoSuchKey:
            return None
        if time.time() - obj["LastModified"].timestamp() > self.ttl_s:
            return None
        return obj["Body"].read(), MEDIA_TYPES[image_id.rsplit(".", 1)[1]]

    def sweep(self) -> int:
        return 0  # a bucket lifecycle rule expires objects


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
