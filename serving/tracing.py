"""OpenTelemetry traces: one trace per request, from the ingress through every stage call it makes.

The ingress opens a server span per HTTP request and gRPC call, as the child of the client's W3C ``traceparent``
(header or metadata) when it sent one. Serve handle calls carry no OpenTelemetry context by themselves, so the
chain runner passes the current one explicitly: each stage call gets a ``trace`` keyword argument (a W3C carrier
dict, see ``carrier``) and the stage replica opens its span as that context's child. Spans carry the model, its
version and pinned reference, steps, batch size, the time queued before the stage ran and the adapters; an error
ends a span with status ERROR and an exception event.

Off unless an OTLP endpoint is configured through the standard ``OTEL_*`` variables (``serving.env``). Off, no
tracer provider is installed, ``setup`` does nothing, no span object is ever made and stage calls carry no
``trace`` argument. On, each process (the ingress and every stage replica) exports its own spans with OTLP/HTTP
protobuf on a batching background thread, with the resource attributes ``service.name`` (``sdserve`` unless
``OTEL_SERVICE_NAME`` says otherwise), ``process.pid`` and ``sdserve.component`` (ingress or the stage).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from serving import env

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

logger = logging.getLogger(__name__)

SERVICE_NAME = "sdserve"  # unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES name one
# gRPC codes that are the server's failure, not the caller's (OpenTelemetry's semantic conventions).
GRPC_SERVER_ERRORS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)

_tracer: Tracer | None = None
_lock = threading.Lock()


def setup(component: str) -> bool:
    """Install this process's tracer provider and OTLP exporter when tracing is configured (once per process).

    Args:
        component: ``ingress`` or the stage's name, the ``sdserve.component`` resource attribute.

    Returns:
        Whether this process records spans.
    """
    global _tracer
    if not env.TRACING_ENABLED:
        return False
    with _lock:
        if _tracer is not None:
            return True
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create({"process.pid": os.getpid(), "sdserve.component": component})
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
        # The sampler (OTEL_TRACES_SAMPLER, parent-based by default: a client's unsampled traceparent records
        # nothing), the batch delay and the exporter's endpoint, headers and timeout come from OTEL_* variables.
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        _tracer = provider.get_tracer("sdserve")
        logger.info("tracing on: %s spans go to %s", component, env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or
                    env.OTEL_EXPORTER_OTLP_ENDPOINT or "the SDK's default OTLP endpoint")  # fmt: skip
        return True


def enabled() -> bool:
    """Whether this process records spans (``setup`` found tracing configured)."""
    return _tracer is not None


def _propagator() -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator()


def carrier() -> dict[str, str] | None:
    """The current span's context as W3C headers (``traceparent``, ``tracestate``), for a stage call to carry;
    None when this process records no spans or no span is current."""
    if _tracer is None:
        return None
    headers: dict[str, str] = {}
    _propagator().inject(headers)
    return headers or None


def grpc_carrier(metadata: Any) -> dict[str, str]:
    """The W3C headers among gRPC invocation metadata (``(key, value)`` pairs)."""
    return {str(k).lower(): str(v) for k, v in metadata or () if str(k).lower() in ("traceparent", "tracestate")}


@contextmanager
def span(
    name: str,
    parent: Mapping[str, str] | None = None,
    *,
    attributes: Mapping[str, Any] | None = None,
    make_current: bool = False,
    record_errors: bool = True,
) -> Iterator[Span | None]:
    """A server span named ``name``, child of the W3C context in ``parent`` (a root when it holds none); yields
    None, and costs nothing more, when this process records no spans.

    Args:
        make_current: the current span while the block runs (the ingress: the stage calls it makes carry it).
            Stage spans are not made current: an async generator's block may be closed from another task.
        record_errors: an exception out of the block sets status ERROR and adds an exception event (the ingress
            sets its status from the response instead: a 4xx is the caller's error, not the server's).
    """
    if _tracer is None:
        yield None
        return
    from opentelemetry.trace import SpanKind

    parent_context = _propagator().extract(parent or {})
    created = _tracer.start_span(name, context=parent_context, kind=SpanKind.SERVER, attributes=_clean(attributes))
    try:
        with current(created if make_current else None):
            yield created
    except BaseException as exc:
        if record_errors:
            fail(created, exc)
        raise
    finally:
        created.end()


@contextmanager
def current(target: Span | None) -> Iterator[None]:
    """Make ``target`` the current span while the block runs (nothing without a span)."""
    if target is None:
        yield
        return
    from opentelemetry import context, trace

    token = context.attach(trace.set_span_in_context(target))
    try:
        yield
    finally:
        context.detach(token)


def annotate(target: Span | None, **attributes: Any) -> None:
    """Set attributes on a span (None: no span, nothing to do). Names without a dot get the ``sdserve.`` prefix;
    None values are left out; sequences become lists of strings."""
    if target is not None:
        target.set_attributes(_clean(attributes))


def _clean(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (attributes or {}).items():
        if value is None:
            continue
        if isinstance(value, list | tuple | set | frozenset):
            value = [str(v) for v in value]
        elif not isinstance(value, str | bool | int | float):
            value = str(value)
        out[key if "." in key else f"sdserve.{key}"] = value
    return out


def fail(target: Span | None, exc: BaseException | None = None, description: str = "") -> None:
    """End-of-request failure: status ERROR (and the exception as an event when there is one)."""
    if target is None:
        return
    from opentelemetry.trace import Status, StatusCode

    if exc is not None:
        target.record_exception(exc)
    target.set_status(Status(StatusCode.ERROR, description or (f"{type(exc).__name__}: {exc}"[:500] if exc else "")))


def trace_id(target: Span | None) -> str | None:
    """The span's trace id as 32 hex digits (None without a recording span)."""
    if target is None or not target.is_recording():
        return None
    return format(target.get_span_context().trace_id, "032x")


def finish_request(target: Span | None, entry: Mapping[str, Any], exc: BaseException | None = None) -> None:
    """Name the ingress span after its route and give it the request's audit fields; status ERROR for a server
    error (HTTP 5xx, or a gRPC code of the server's failure)."""
    if target is None:
        return
    status = entry.get("status")
    if entry.get("api") == "http":
        target.update_name(f"{entry.get('method')} {entry.get('route')}")
        http = {"http.request.method": entry.get("method"), "http.route": entry.get("route")}
        annotate(target, **http, **{"http.response.status_code": status})
        failed = isinstance(status, int) and status >= 500
    else:
        target.update_name(f"sdserve.v1.ImageGeneration/{entry.get('route')}")
        annotate(target, **{"rpc.system": "grpc", "rpc.method": entry.get("route"), "rpc.grpc.status": status})
        failed = status in GRPC_SERVER_ERRORS or (status != "OK" and exc is not None and not _is_api_error(exc))
    keep = ("tenant", "key_id", "model", "model_version", "mode", "size", "steps", "images", "styles", "loras")
    annotate(target, **{k: entry[k] for k in keep if k in entry}, **{"error.type": entry.get("error")})
    if failed:
        fail(target, exc, f"{status}")


def _is_api_error(exc: BaseException) -> bool:
    from serving.errors import ApiError

    return isinstance(exc, ApiError)
