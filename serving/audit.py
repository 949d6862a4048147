"""The audit log: one JSON line per API call, saying who did what and how it went.

Fields: ``ts``, ``tenant`` and ``key_id`` (never the key), ``api`` (http / grpc), ``method`` and ``route`` (the
route's template, or the RPC), ``status`` (HTTP status, or the gRPC code's name), ``latency_ms``, ``trace_id``
(the request's trace with tracing on, else from a W3C ``traceparent`` the client sent), and what the call
generated when it did: ``model``, ``model_version``, ``size``, ``steps``, ``images``, ``styles``, ``mode``
(txt2img / img2img / inpaint / hires), ``error`` (the error code). Lines go to the ``sdserve.audit`` logger and,
with ``audit.path``, are appended to that file.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("sdserve.audit")

_fields: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("sdserve_audit", default=None)
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def note(**fields: Any) -> None:
    """Add fields to the audit line of the call being served (a no-op outside one)."""
    current = _fields.get()
    if current is not None:
        current.update(fields)


def begin() -> tuple[dict[str, Any], contextvars.Token[dict[str, Any] | None]]:
    """Start collecting the fields of one call (the dict is shared with everything the call runs)."""
    fields: dict[str, Any] = {}
    return fields, _fields.set(fields)


def end(token: contextvars.Token[dict[str, Any] | None]) -> None:
    _fields.reset(token)


def trace_id(traceparent: str | None) -> str | None:
    match = _TRACEPARENT.match((traceparent or "").strip().lower())
    return match.group(1) if match else None


class AuditLog:
    """Writes audit lines (to the logger, and to ``path`` when set)."""

    def __init__(self, path: str | None = None) -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()

    def write(self, entry: dict[str, Any]) -> None:
        line = json.dumps({"ts": round(time.time(), 3), **entry}, sort_keys=False, default=str)
        logger.info(line)
        if self.path is not None:
            with self._lock:
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    with self.path.open("a") as out:
                        out.write(line + "\n")
                except OSError:
                    logger.exception("audit line not written to %s", self.path)
