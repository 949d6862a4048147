"""API keys: who may call, and which tenant a call acts for.

Keys live in a YAML file (a mounted Kubernetes Secret in the chart), one entry per key, stored as its SHA-256
hash, never the key itself:

    keys:
      - id: team-a-ci          # names the key in logs (never the key)
        tenant: team-a         # jobs, images and A1111 progress are scoped to it
        sha256: 9f86d08...     # `sdserve keys create --tenant team-a` prints a new key and this line

API keys are long random tokens (``new_key``: 256 bits), not passwords: a fast hash does not make them guessable,
and it lets a request be checked with one hash and a dictionary lookup instead of a slow KDF per stored key. The
file is re-read when it changes (rotation without a restart); a file that does not parse at start stops the
service with the line it failed on, and at a reload keeps the old keys in force and logs why.

Clients send ``Authorization: Bearer <key>`` (the OpenAI SDK's ``api_key``), HTTP Basic with the key as password
(A1111 clients' ``--api-auth`` / ``webuiapi.set_auth``), or gRPC ``authorization`` metadata.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Principal:
    """Who a call acts for: a tenant and the key's id (``OPEN`` when the service runs without keys)."""

    tenant: str
    key_id: str


OPEN = Principal(tenant="", key_id="")

_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("sdserve_principal", default=OPEN)


def current() -> Principal:
    """The principal of the request being served (``OPEN`` outside one, or when auth is off)."""
    return _current.get()


def act_as(principal: Principal) -> contextvars.Token[Principal]:
    """Serve the rest of this context (a request) as ``principal``; undo with ``reset_principal``."""
    return _current.set(principal)


def reset_principal(token: contextvars.Token[Principal]) -> None:
    _current.reset(token)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return "sds_" + secrets.token_urlsafe(32)


def presented_key(authorization: str | None) -> str | None:
    """The key in an ``Authorization`` value: ``Bearer <key>``, or ``Basic`` with the key as the password."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        _, sep, password = decoded.partition(":")
        return password if sep and password else None
    return None


class KeyFileError(ValueError):
    """The key file does not parse; the message names the line."""


def parse_key_file(text: str, source: str = "keys file") -> dict[str, Principal]:
    """sha256 hex -> principal; ``KeyFileError`` naming the line of the first problem."""
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise KeyFileError(f"{source}: not YAML{line}: {getattr(exc, 'problem', exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("keys", []), list):
        raise KeyFileError(f"{source}: expected a mapping with a `keys` list")
    lines = {i: n for i, n in enumerate(_entry_lines(text))}
    ring: dict[str, Principal] = {}
    for i, entry in enumerate(data.get("keys") or []):
        where = f"{source}, key {i + 1} (line {lines.get(i, '?')})"
        if not isinstance(entry, dict):
            raise KeyFileError(f"{where}: expected a mapping with id, tenant and sha256")
        key_id, tenant, digest = entry.get("id"), entry.get("tenant"), str(entry.get("sha256", "")).lower()
        if not isinstance(key_id, str) or not key_id or not isinstance(tenant, str) or not tenant:
            raise KeyFileError(f"{where}: `id` and `tenant` must be non-empty strings")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise KeyFileError(f"{where}: `sha256` must be 64 hex digits (the SHA-256 of the key)")
        if digest in ring:
            raise KeyFileError(f"{where}: the same key is listed twice")
        ring[digest] = Principal(tenant=tenant, key_id=key_id)
    return ring


def _entry_lines(text: str) -> list[int]:
    """1-based line numbers of the `- ` entries of the keys list, in order (for error messages)."""
    return [n for n, line in enumerate(text.splitlines(), 1) if line.lstrip().startswith("- ")]


class KeyRing:
    """The keys of a key file, re-read when the file changes (checked at most every ``interval_s``)."""

    def __init__(self, path: str, interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.interval_s = interval_s
        self.clock = clock
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._ring = parse_key_file(self.path.read_text(), str(self.path))  # fails the start with the line
        self._checked = clock()
        self.reload_error: str | None = None
        logger.info("API keys: %d keys for %d tenants from %s", len(self._ring), len(self.tenants), self.path)

    @property
    def tenants(self) -> set[str]:
        return {p.tenant for p in self._ring.values()}

    def _stat(self) -> tuple[float, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime, st.st_size)

    def refresh(self) -> None:
        now = self.clock()
        with self._lock:
            if now - self._checked < self.interval_s:
                return
            self._checked = now
            stamp = self._stat()
            if stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                self._ring = parse_key_file(self.path.read_text(), str(self.path))
                self.reload_error = None
                logger.info("API keys reloaded: %d keys from %s", len(self._ring), self.path)
            except (OSError, KeyFileError) as exc:
                self.reload_error = str(exc)
                logger.error("API keys not reloaded, the previous keys stay in force: %s", exc)

    def verify(self, key: str | None) -> Principal | None:
        """The principal of a presented key, or None (missing, unknown or revoked: the caller cannot tell)."""
        if not key:
            return None
        self.refresh()
        # A lookup by the key's hash: what its timing could reveal is about the hash, which tells nothing of
        # other keys (finding a key from a hash prefix is as hard as guessing the key).
        with self._lock:
            return self._ring.get(hash_key(key))
