"""Local store for images returned as ``url``: written by the ingress, served by ``GET /v1/images/{id}``."""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
MEDIA_TYPES = {ext: media for media, ext in EXTENSIONS.items()}
_ID = re.compile(r"^[0-9a-f]{32}\.(png|jpg|webp)$")


class OutputStore:
    """Images on local disk, named by an unguessable id, removed after ``ttl_s``."""

    def __init__(self, directory: str | Path, ttl_s: float) -> None:
        self.directory = Path(directory)
        self.ttl_s = ttl_s

    def put(self, data: bytes, media_type: str) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        image_id = f"{secrets.token_hex(16)}.{EXTENSIONS[media_type]}"
        tmp = self.directory / f".{image_id}.tmp"
        tmp.write_bytes(data)
        tmp.rename(self.directory / image_id)  # atomic: a reader never sees a partial file
        return image_id

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
