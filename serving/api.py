"""REST routes: thin adapters from HTTP to ``GenerationService``."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException

from models.schedulers import SCHEDULERS
from serving import audit, tracing
from serving.a1111 import A1111Api, create_router
from serving.auth import act_as, presented_key, reset_principal
from serving.errors import ApiError, BodySizeLimit, install_error_handlers, invalid, validation_error
from serving.jobs import JobManager, image_path
from serving.jobstore import JobRecord
from serving.metrics import ApiMetrics
from serving.outputs import IMAGE_ID_PATTERN, MEDIA_TYPES, OutputStore
from serving.resolver import GenerationRequest
from serving.schemas import (
    ErrorDetail,
    ErrorResponse,
    ImageData,
    ImageGenerationRequest,
    ImageGenerationResponse,
    JobImage,
    JobImages,
    JobProgress,
    JobRequest,
    JobResponse,
    LoraCard,
    LoraList,
    ModelCard,
    ModelList,
)
from serving.service import GenerationService

logger = logging.getLogger(__name__)

# Routes that answer without a key: liveness / readiness probes and the API's own documentation.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
UNAUTHORIZED = "a valid API key is required: `Authorization: Bearer <key>` (HTTP Basic with the key as password)"

# The multipart body of POST /v1/images/edits, for the OpenAPI document.
_EDIT_FORM: dict[str, Any] = {
    "type": "object",
    "required": ["image", "prompt"],
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "PNG / JPEG / WebP to edit."},
        "mask": {"type": "string", "format": "binary", "description": "PNG; transparent pixels mark the edit."},
        "prompt": {"type": "string"},
        "n": {"type": "integer"},
        "size": {"type": "string"},
        "response_format": {"type": "string", "enum": ["b64_json", "url"]},
    },
}
_FILE_FIELDS = {"image": "image", "image[]": "image", "mask": "mask"}


async def read_edit_form(request: Request, max_bytes: int) -> tuple[ImageGenerationRequest, bytes, bytes | None]:
    """The edit request's fields (form strings converted as JSON would be), its image and its mask."""
    try:
        form = await request.form(max_files=3, max_fields=64)
    except HTTPException:  # the body size limit (413)
        raise
    except Exception as exc:  # not multipart, or malformed
        raise invalid(f"expected a multipart/form-data body: {exc}") from exc
    try:
        return await _edit_fields(form, max_bytes)
    finally:
        await form.close()


async def _edit_fields(form: Any, max_bytes: int) -> tuple[ImageGenerationRequest, bytes, bytes | None]:
    from starlette.datastructures import UploadFile

    files: dict[str, bytes] = {}
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            name = _FILE_FIELDS.get(key)
            if name is None:
                raise invalid(f"unexpected file field {key!r}", key)
            if name in files:
                raise invalid(f"send one `{name}`", name)
            data = await value.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise ApiError(
                    422, "invalid_request", f"{name} is over {max_bytes} bytes (limits.max_upload_bytes)", name
                )
            files[name] = data
        else:
            fields[key] = value
    if "image" not in files:
        raise invalid("send the image to edit as the `image` file field", "image")
    for key in ("init_image", "mask"):
        if key in fields:
            raise invalid(f"send `{key}` as a file field", key)
    try:
        body = ImageGenerationRequest.model_validate(fields, strict=False)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc
    return body, files["image"], files.get("mask")


# Image routes answer with the file itself; the OpenAPI document says so instead of application/json.
_IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The image file.", "content": {media: {} for media in MEDIA_TYPES.values()}}
}


class _ImageIdConvertor(Convertor[str]):
    """Path segment of an image id (``<32 hex>.<ext>``): any other segment under /v1/images/ is no image, so
    ``GET /v1/images/generations`` is a 405 for the POST route, not a missing image."""

    regex = IMAGE_ID_PATTERN

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("image_id", _ImageIdConvertor())

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        404: "Unknown model",
        413: "Request body too large",
        422: "Invalid request",
        500: "Internal error",
        503: "Overloaded or a stage is unavailable",
        504: "Deadline exceeded",
    }.items()
}


def job_response(job: JobRecord, base_url: str) -> JobResponse:
    """The REST view of a job record (image paths made absolute against ``base_url``)."""
    result = None
    if job.result is not None:
        r = job.result
        result = JobImages(
            data=[
                JobImage(url=f"{base_url}{image_path(job.id, i)}", flagged=r.flagged[i] if r.flagged else None)
                for i in range(r.images)
            ],
            **r.settings(),
        )
    return JobResponse(
        id=job.id,
        state=job.state.value,
        created_at=job.created_at,
        updated_at=job.updated_at,
        progress=JobProgress(step=job.step, total_steps=job.total_steps),
        result=result,
        error=ErrorDetail(**job.error.model_dump()) if job.error else None,
        events_url=f"{base_url}/v1/jobs/{job.id}/events",
    )


def create_api(
    service: GenerationService,
    outputs: OutputStore,
    jobs: JobManager,
    a1111: A1111Api,
    metrics: ApiMetrics | None = None,
) -> FastAPI:
    """Build the FastAPI app for one ingress replica (``metrics`` None: record none, e.g. outside Ray)."""
    app = FastAPI(
        title="sdserve",
        version="0.1.0",
        description="Stable Diffusion serving: OpenAI Images API compatible text-to-image, asynchronous jobs "
        "with live progress, and the AUTOMATIC1111 API subset.",
        # The ingress opens one span per request itself, for HTTP and gRPC alike (audit_line, serving/tracing.py);
        # FastAPI's native spans (a second server span, and one per dependency, endpoint and serialization) would
        # be recorded through the same tracer provider beside it.
        telemetry={"tracing": False, "operation_spans": False},
    )
    install_error_handlers(app, on_error=metrics.observe_error if metrics else None)
    config = service.config
    app.add_middleware(BodySizeLimit, max_bytes=config.limits.max_body_bytes)

    keys = service.keys
    if keys is None:
        logger.warning("API keys are off: anyone who reaches this port can generate images (auth.enabled)")
    else:

        @app.middleware("http")
        async def authenticate(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
            """Every route but health and the API docs needs a key; the principal scopes jobs, images and
            A1111 progress to its tenant."""
            path = request.url.path.removeprefix(request.scope.get("root_path", "")) or "/"
            if path in OPEN_PATHS:
                return await call_next(request)
            principal = keys.verify(presented_key(request.headers.get("authorization")))
            if principal is None:
                challenge = 'Basic realm="sdserve"' if path.startswith("/sdapi/") else 'Bearer realm="sdserve"'
                body = {"error": {"code": "unauthorized", "message": UNAUTHORIZED, "param": None}}
                audit.note(error="unauthorized")
                if metrics is not None:
                    metrics.observe_error("unauthorized")
                return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": challenge})
            request.state.principal = principal  # for the audit line, written outside this middleware
            token = act_as(principal)
            try:
                return await call_next(request)
            finally:
                reset_principal(token)

    if metrics is not None:

        @app.middleware("http")
        async def record(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
            started = time.perf_counter()
            response = await call_next(request)
            route = getattr(request.scope.get("route"), "path", "unmatched")
            metrics.observe_request(route, response.status_code, time.perf_counter() - started)
            return response

    @app.middleware("http")  # added last: outermost, so its line (and span) covers the auth refusals too
    async def audit_line(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """The request's audit line and, with tracing on, its server span (the parent of its stage calls)."""
        fields, token = audit.begin()
        started = time.perf_counter()
        status = 500
        name = f"{request.method} {request.url.path}"
        with tracing.span(name, request.headers, make_current=True, record_errors=False) as span:
            try:
                response = await call_next(request)
                status = response.status_code
                return response
            finally:
                audit.end(token)
                principal = getattr(request.state, "principal", None)
                entry = {
                    "tenant": principal.tenant if principal else None,
                    "key_id": principal.key_id if principal else None,
                    "api": "http",
                    "method": request.method,
                    "route": getattr(request.scope.get("route"), "path", request.url.path),
                    "status": status,
                    "latency_ms": round((time.perf_counter() - started) * 1000, 1),
                    "trace_id": tracing.trace_id(span) or audit.trace_id(request.headers.get("traceparent")),
                    **fields,
                }
                service.audit.write(entry)
                tracing.finish_request(span, entry)

    def base_url(request: Request) -> str:
        return (config.outputs.public_base_url or str(request.base_url)).rstrip("/")

    def lookup_image(image_id: str) -> bytes | None:
        found = outputs.get(image_id)
        return found[0] if found is not None else None

    service.resolver.lookup_image = lookup_image

    @app.post("/v1/images/generations", response_model=ImageGenerationResponse, responses=_ERRORS)
    async def generate(body: ImageGenerationRequest, request: Request) -> JSONResponse:
        """Text to image; with `init_image` image to image, with `mask` too inpainting."""
        req = await asyncio.to_thread(service.prepare, body)  # may decode an uploaded image: off the event loop
        return await respond(body, req, request)

    @app.post(
        "/v1/images/edits",
        response_model=ImageGenerationResponse,
        responses=_ERRORS,
        openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": _EDIT_FORM}}, "required": True}},
    )
    async def edit(request: Request) -> JSONResponse:
        """OpenAI's image edit (multipart): `image`, optional `mask` whose fully transparent pixels mark the region
        to edit (without one, the image's own transparent pixels do; an opaque image without a mask is redrawn
        whole, image to image), `prompt`, `n`, `size`, `response_format`, and the generation endpoint's other
        flat fields (`negative_prompt`, `steps`, `seed`, `strength`, ...)."""
        body, image, mask = await read_edit_form(request, config.limits.max_upload_bytes)
        req = await asyncio.to_thread(service.prepare, body, image, mask, "alpha")
        return await respond(body, req, request)

    async def respond(body: ImageGenerationRequest, req: GenerationRequest, request: Request) -> JSONResponse:
        result = await service.generate(req)
        if body.response_format == "url":
            base = base_url(request)
            data = [
                ImageData(url=outputs.url(outputs.put(img, result.media_type), base), flagged=flag)
                for img, flag in result.delivered
            ]
        else:
            data = [
                ImageData(b64_json=base64.b64encode(img).decode("ascii"), flagged=flag)
                for img, flag in result.delivered
            ]
        response = ImageGenerationResponse(created=int(time.time()), data=data, **result.settings())
        if metrics is not None:
            metrics.observe_images(req.model, len(data))
        headers = {"x-sdserve-model-version": result.model_version, "x-sdserve-seed": str(req.seed)}
        return JSONResponse(response.model_dump(mode="json", exclude_none=True), headers=headers)

    @app.get(
        "/v1/images/{image_id:image_id}", response_class=Response, responses={**_IMAGE_RESPONSES, 404: _ERRORS[404]}
    )
    async def get_image(image_id: str) -> Response:
        found = outputs.get(image_id)
        if found is None:
            raise ApiError(404, "image_not_found", "no such image, or it expired", "image_id")
        data, media_type = found
        return Response(content=data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/v1/jobs", status_code=202, response_model=JobResponse, responses=_ERRORS)
    async def submit_job(
        body: JobRequest,
        request: Request,
        idempotency_key: str | None = Header(default=None, max_length=256),
    ) -> JSONResponse:
        """Start a generation and answer at once (202); follow it at `events_url` or poll `GET /v1/jobs/{id}`."""
        job, created = await jobs.submit(body, idempotency_key)
        headers = {"Location": f"/v1/jobs/{job.id}"}
        if not created:
            headers["Idempotent-Replayed"] = "true"
        content = job_response(job, base_url(request)).model_dump(mode="json")
        return JSONResponse(content, status_code=202, headers=headers)

    @app.get("/v1/jobs/{job_id}", response_model=JobResponse, responses={404: _ERRORS[404]})
    async def get_job(job_id: str, request: Request) -> JobResponse:
        return job_response(await jobs.get(job_id), base_url(request))

    @app.delete("/v1/jobs/{job_id}", response_model=JobResponse, responses={404: _ERRORS[404]})
    async def cancel_job(job_id: str, request: Request) -> JobResponse:
        """Cancel a job: the denoiser drops it before its next step. A finished job is left as it is."""
        return job_response(await jobs.cancel(job_id), base_url(request))

    @app.get(
        "/v1/jobs/{job_id}/events",
        response_class=StreamingResponse,
        responses={200: {"description": "Server-Sent Events", "content": {"text/event-stream": {}}}, 404: _ERRORS[404]},
    )
    async def job_events(
        job_id: str, last_event_id: str | None = Header(default=None, max_length=64)
    ) -> StreamingResponse:
        """Server-Sent Events: `queued`, `step` (with `preview` when asked for), then `done`, `failed` or
        `cancelled`. Reconnect with `Last-Event-ID` to resume after the last event seen."""
        events = jobs.events(job_id, last_event_id)
        first = await anext(events)  # a missing job is a 404 here, before the stream starts

        async def stream() -> AsyncIterator[str]:
            item = first
            while True:
                if item is None:
                    yield ": keep-alive\n\n"
                else:
                    event_id, event = item
                    yield f"id: {event_id}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"
                try:
                    item = await anext(events)
                except StopAsyncIteration:
                    return

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    @app.get(
        "/v1/jobs/{job_id}/images/{index}", response_class=Response, responses={**_IMAGE_RESPONSES, 404: _ERRORS[404]}
    )
    async def job_image(job_id: str, index: int) -> Response:
        data, media_type = await jobs.image(job_id, index)
        return Response(content=data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    app.include_router(create_router(a1111))

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        states = service.models.describe()
        return ModelList(
            data=[
                ModelCard(id=name, description=spec.description, **states[name])
                for name, spec in service.models.specs.items()
            ]
        )

    @app.get("/v1/upscalers")
    async def list_upscalers() -> dict[str, Any]:
        """Upscalers requests may name in `upscale.model` (the first is the default)."""
        upscalers = service.models.artifacts.get("upscalers", {})
        return {
            "object": "list",
            "data": [{"id": u.name, "description": u.description, "ref": u.source} for u in upscalers.values()],
        }

    @app.get("/v1/loras", response_model=LoraList)
    async def list_loras() -> LoraList:
        """LoRA adapters requests may name in `loras` (or A1111's `<lora:name:weight>`), with the pinned
        reference each request loads."""
        return LoraList(data=[LoraCard(**a) for a in service.models.describe_adapters()])

    @app.get("/v1/styles")
    async def list_styles() -> dict[str, Any]:
        """Style presets requests may name in `style`: built-in, configured, and the preset folder's files."""
        presets = service.resolver.presets
        return {
            "object": "list",
            "data": [p.model_dump(exclude_none=True) for p in presets.all().values()],
            "errors": presets.errors,
        }

    @app.get("/v1/schedulers")
    async def list_schedulers() -> dict[str, Any]:
        return {
            "object": "list",
            "default": config.defaults.scheduler,
            "data": [{"id": name, "label": spec.label} for name, spec in SCHEDULERS.items()],
        }

    @app.get("/v1/status")
    async def status() -> dict[str, Any]:
        """Running replicas per deployment (for dashboards and the load generator)."""
        return {
            "application": config.app_name,
            "replicas": await service.replica_counts(),
            "job_store": jobs.store.description,
            "auth": "api_keys" if service.keys is not None else "off (open to anyone who reaches the port)",
        }

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: _ERRORS[503]})
    async def readyz(request: Request) -> JSONResponse:
        """`ready`, `degraded` (serving; a configured model or artifact failed to load) or 503 `not_ready`.
        With API keys on, probes without a key get the status alone; the details (stages, devices, versions,
        files, errors) need a key."""
        state = await service.readiness()
        not_ready = state.pop("not_ready")
        if keys is not None and keys.verify(presented_key(request.headers.get("authorization"))) is None:
            state = {"status": state["status"]}
        if state["status"] == "not_ready":
            err = ApiError(503, "not_ready", f"not ready: {', '.join(not_ready)}")
            body = {"error": {"code": err.code, "message": err.message, "param": None}}
            return JSONResponse({**body, **state}, status_code=503)
        return JSONResponse(state)

    return app
