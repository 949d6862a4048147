"""One error shape for every failure: ``{"error": {"code", "message", "param"}}``.

Every route, validation failure, unknown path and unexpected crash answers with it, so clients need one
parser. ``ApiError`` carries the HTTP status; the gRPC adapter maps the same codes to gRPC statuses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving import audit

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with its HTTP status and stable machine-readable code."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers or {}

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray pickles exceptions raised in replicas (gRPC calls end that way); keep every field.
        return (type(self), (self.status, self.code, self.message, self.param, self.headers))


def content_policy_violation(withheld: int) -> ApiError:
    """Every image of a request was withheld by the safety check: OpenAI's answer to a refused image, in our error
    shape."""
    return ApiError(
        400, "content_policy_violation", f"the safety checker flagged every image ({withheld}); none is returned"
    )


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(422, "invalid_request", message, param)


def validation_error(errors: Sequence[Any]) -> ApiError:
    """A 422 from pydantic's error list (request bodies over REST, request messages over gRPC)."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":  # its loc is a character offset, not a field
        where = [p for p in first.get("loc", ()) if isinstance(p, int)]
        at = f" at character {where[0]}" if where else ""
        detail = (first.get("ctx") or {}).get("error") or first.get("msg")
        return invalid(f"the request body is not valid JSON{at}: {detail}")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    message = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}" for e in errors
    )
    return invalid(message or "invalid request", ".".join(loc) or None)


def error_body(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "param": param}}


def _respond(err: ApiError) -> JSONResponse:
    return JSONResponse(error_body(err.code, err.message, err.param), status_code=err.status, headers=err.headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


def install_error_handlers(app: FastAPI, on_error: Callable[[str], None] | None = None) -> None:
    """Route every kind of failure through the one error shape; ``on_error`` sees each error code."""

    def error_response(err: ApiError) -> JSONResponse:
        audit.note(error=err.code)
        if on_error is not None:
            on_error(err.code)
        return _respond(err)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI answers 400 for a body it could not parse at all (e.g. JSON nested past Python's
            # recursion limit); like any other malformed body, that is a 422 here.
            return error_response(invalid(f"the request body could not be parsed: {exc.detail}"))
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        # Starlette's headers (Allow on a 405) are part of the answer.
        return error_response(ApiError(exc.status_code, code, str(exc.detail), headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(ApiError(500, "internal_error", f"internal error: {type(exc).__name__}"))


class BodySizeLimit:
    """ASGI middleware: refuse a request body over ``max_bytes`` with a 413 in the one error shape.

    A declared ``Content-Length`` over the limit is refused before a byte of the body is read; a chunked body
    is counted as it arrives and refused once it passes the limit, so an oversized body is never held whole.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> ApiError:
        return ApiError(413, "payload_too_large", f"the request body is larger than {self.max_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _respond(self._error())(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # FastAPI re-raises its HTTPException from body parsing; the handler above shapes it.
                    raise HTTPException(413, self._error().message)
            return message

        await self.app(scope, counted, send)
