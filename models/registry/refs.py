"""Model references: ``scheme://location@version`` strings, parsed once into ``ModelRef``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from models.registry.errors import RegistryError

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ModelRef:
    """A parsed reference.

    Attributes:
        scheme: ``file``, ``s3`` or ``hf`` (the key of the source that handles it).
        location: ``/abs/path`` for files, ``bucket/prefix`` for S3, ``org/name`` for the hub.
        version: the part after ``@``: an S3 version folder, a hub branch, tag or commit; None for files.
    """

    scheme: str
    location: str
    version: str | None = None

    def __str__(self) -> str:
        suffix = f"@{self.version}" if self.version else ""
        return f"{self.scheme}://{self.location}{suffix}"

    @property
    def is_commit(self) -> bool:
        return self.version is not None and bool(_COMMIT.match(self.version))

    def with_version(self, version: str) -> ModelRef:
        return ModelRef(self.scheme, self.location, version)


def parse_ref(text: str) -> ModelRef:
    """Parse a reference; a bare path is a ``file://`` reference.

    Raises:
        RegistryError: the text is not a reference we understand.
    """
    text = text.strip()
    if "://" not in text:
        return ModelRef("file", str(Path(text).expanduser().resolve()))
    parsed = urlparse(text)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise RegistryError("file references take an absolute path: file:///path/to/model", text)
        return ModelRef("file", str(Path(parsed.path).resolve()))
    rest = f"{parsed.netloc}{parsed.path}".rstrip("/")
    location, _, version = rest.rpartition("@") if "@" in rest else (rest, "", "")
    if not location or "/" not in location:
        raise RegistryError(f"expected {scheme}://<bucket-or-org>/<name>[@version]", text)
    return ModelRef(scheme, location, version or None)
