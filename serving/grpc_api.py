"""gRPC adapter (``sdserve.v1.ImageGeneration`` and ``grpc.health.v1.Health``) over the same service layer.

Ray Serve's gRPC proxy routes each call by its method name to the method of that name on the application's
ingress deployment (``IngressDeployment.Generate`` ...), which hands it here. Requests are checked by the same
pydantic models as REST, and errors carry the same codes, mapped to gRPC status codes.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from pydantic import ValidationError

from serving.auth import OPEN, KeyRing, Principal, presented_key
from serving.errors import ApiError, invalid, validation_error
from serving.generated.sdserve.v1 import sdserve_pb2 as pb
from serving.jobs import JobManager
from serving.jobstore import JobRecord, JobState
from serving.schemas import JobRequest
from serving.service import GenerationService

# What Serve's gRPC proxy registers (the `grpc_servicer_functions` of the Serve config). They are imported in
# the proxy actor on every node, so they live in this installed package, not in a generated path.
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ImageGeneration"].full_name
SERVICER_FUNCTIONS = [
    "serving.generated.sdserve.v1.sdserve_pb2_grpc.add_ImageGenerationServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]

# Error code (the REST `error.code`) -> gRPC status; codes not listed fall back on their HTTP status.
STATUS_BY_CODE: dict[str, grpc.StatusCode] = {
    "invalid_request": grpc.StatusCode.INVALID_ARGUMENT,
    "idempotency_key_reused": grpc.StatusCode.INVALID_ARGUMENT,
    "model_not_found": grpc.StatusCode.NOT_FOUND,
    "job_not_found": grpc.StatusCode.NOT_FOUND,
    "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "stage_unavailable": grpc.StatusCode.UNAVAILABLE,
    "timeout": grpc.StatusCode.DEADLINE_EXCEEDED,
    "job_lost": grpc.StatusCode.ABORTED,
    "cancelled": grpc.StatusCode.CANCELLED,
    # A failed job's error reaches GenerateStream without its HTTP status: these say what it was.
    "content_policy_violation": grpc.StatusCode.INVALID_ARGUMENT,
    "upscaler_not_found": grpc.StatusCode.NOT_FOUND,
    "lora_not_found": grpc.StatusCode.NOT_FOUND,
    "lora_invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "lora_unavailable": grpc.StatusCode.UNAVAILABLE,
    "model_unavailable": grpc.StatusCode.UNAVAILABLE,
}
STATUS_BY_HTTP: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
JOB_STATES = {state: pb.JobState.Value(f"JOB_STATE_{state.name}") for state in JobState}


def grpc_status(err: ApiError) -> grpc.StatusCode:
    return STATUS_BY_CODE.get(err.code, STATUS_BY_HTTP.get(err.status, grpc.StatusCode.INTERNAL))


def set_status(grpc_context: Any, exc: BaseException) -> None:
    """Put an ``ApiError``'s status on the call; Serve's proxy sends it when the method then raises."""
    if isinstance(exc, ApiError) and grpc_context is not None:
        grpc_context.set_code(grpc_status(exc))
        grpc_context.set_details(f"{exc.code}: {exc.message}")


def to_request(msg: pb.GenerateRequest, *, embed_images: bool = False) -> JobRequest:
    """The REST request model from a GenerateRequest, checked by the same validators.

    The image fields (``init_image``, ``mask``) are files on the wire. By default they stay out of the request:
    pass them to ``GenerationService.prepare`` as they are (``uploads``), with no base64 copy. With
    ``embed_images`` they go in as base64, the form a job stores its request in.
    """
    fields: dict[str, Any] = {"prompt": msg.prompt, "n": msg.n or 1, "preview": msg.preview}
    for name in ("model", "negative_prompt", "steps", "seed", "scheduler", "output_format", "resize_mode"):
        if msg.HasField(name):
            fields[name] = getattr(msg, name)
    for name in ("guidance_scale", "strength"):
        if msg.HasField(name):
            fields[name] = round(getattr(msg, name), 4)  # float32 on the wire: 0.3 arrives as 0.30000001
    if msg.HasField("quality"):
        fields["output_compression"] = msg.quality
    if msg.HasField("width") != msg.HasField("height"):
        raise invalid("set both width and height, or neither", "width" if not msg.HasField("width") else "height")
    if msg.HasField("width"):
        fields["size"] = f"{msg.width}x{msg.height}"
    if msg.user:
        fields["user"] = msg.user
    if msg.HasField("upscale"):
        fields["upscale"] = {n: getattr(msg.upscale, n) for n in ("model", "factor") if msg.upscale.HasField(n)}
    if msg.HasField("safety"):
        fields["safety"] = msg.safety
    if msg.loras:
        fields["loras"] = [
            {"name": lora.name, **({"scale": lora.scale} if lora.HasField("scale") else {})} for lora in msg.loras
        ]
    if embed_images:
        for name, data in zip(("init_image", "mask"), uploads(msg), strict=True):
            if data is not None:
                fields[name] = base64.b64encode(data).decode("ascii")
    try:
        return JobRequest.model_validate(fields)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc


def uploads(msg: pb.GenerateRequest) -> tuple[bytes | None, bytes | None]:
    """The request's init image and mask files (None where empty: proto3 bytes cannot tell unset from empty)."""
    return msg.init_image or None, msg.mask or None


class GrpcApi:
    """The RPCs, transport-side only: messages in, messages out, errors as ``ApiError``."""

    def __init__(self, service: GenerationService, jobs: JobManager) -> None:
        self.service = service
        self.jobs = jobs

    async def generate(self, msg: pb.GenerateRequest) -> pb.GenerateResponse:
        image, mask = uploads(msg)
        # Decoding the uploads is CPU work: off the event loop.
        req = await asyncio.to_thread(self.service.prepare, to_request(msg), image, mask)
        result = await self.service.generate(req)
        images = [(img, result.media_type, flag) for img, flag in result.delivered]
        return _response(images, result.settings())

    async def generate_stream(self, msg: pb.GenerateRequest) -> AsyncIterator[pb.GenerateEvent]:
        """Run the request as a job and stream its events. A caller that goes away cancels the job."""
        job, _ = await self.jobs.submit(to_request(msg, embed_images=True))  # a job keeps its images
        finished = False
        try:
            async for item in self.jobs.events(job.id):
                if item is None:
                    continue
                _, event = item
                kind = event["type"]
                if kind == "queued":
                    yield pb.GenerateEvent(job_id=job.id, queued=pb.Queued(position=event["position"]))
                elif kind == "step":
                    yield pb.GenerateEvent(job_id=job.id, progress=_progress(event))
                elif kind == "done":
                    finished = True
                    done = await self.jobs.get(job.id)
                    yield pb.GenerateEvent(job_id=job.id, result=await self._result(done))
                else:
                    finished = True
                    error = event.get("error") or {"code": "cancelled", "message": "the job was cancelled"}
                    raise ApiError(500, error["code"], error["message"])
        finally:
            if not finished:
                # Not awaited: this generator may be closing because its own task was cancelled.
                task = asyncio.ensure_future(self.jobs.cancel(job.id))
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def get_job(self, msg: pb.GetJobRequest) -> pb.Job:
        return await self._job(await self.jobs.get(msg.job_id))

    async def cancel_job(self, msg: pb.CancelJobRequest) -> pb.Job:
        return await self._job(await self.jobs.cancel(msg.job_id))

    def list_models(self) -> pb.ListModelsResponse:
        models = self.service.models.specs.values()
        return pb.ListModelsResponse(models=[pb.Model(id=m.name, description=m.description) for m in models])

    async def health(self, msg: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
        """SERVING when ``/readyz`` would say ready or degraded; the service name is "" (the whole server) or
        ImageGeneration."""
        if msg.service not in ("", SERVICE_NAME):
            raise ApiError(404, "not_found", f"unknown service {msg.service!r}")
        ready = (await self.service.readiness())["status"] != "not_ready"
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    async def watch_health(
        self, msg: health_pb2.HealthCheckRequest, period_s: float = 5.0
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The status now, then again whenever it changes (checked every ``period_s``)."""
        last = None
        while True:
            current = await self.health(msg)
            if current.status != last:
                last = current.status
                yield current
            await asyncio.sleep(period_s)

    async def _job(self, job: JobRecord) -> pb.Job:
        out = pb.Job(
            id=job.id,
            state=JOB_STATES[job.state],
            step=job.step,
            total_steps=job.total_steps,
            created_at=job.created_at,
            updated_at=job.updated_at,
        )
        if job.error is not None:
            out.error.CopyFrom(pb.JobError(code=job.error.code, message=job.error.message))
        if job.result is not None:
            out.result.CopyFrom(await self._result(job))
        return out

    async def _result(self, job: JobRecord) -> pb.GenerateResponse:
        r = job.result
        if r is None:
            raise ApiError(500, "internal_error", "the job has no result")
        images = await self.jobs.images(job)
        flags: list[bool | None] = r.flagged or [None] * len(images)
        return _response([(img, r.media_type, flag) for img, flag in zip(images, flags, strict=True)], r.settings())


def _response(images: list[tuple[bytes, str, bool | None]], settings: dict[str, Any]) -> pb.GenerateResponse:
    """A GenerateResponse from the images and the settings block every API reports (``GenerationSettings``)."""
    width, height = (int(v) for v in settings["size"].split("x"))
    upscale, safety = settings.get("upscale"), settings.get("safety")
    return pb.GenerateResponse(
        images=[pb.Image(data=img, media_type=media, flagged=flag) for img, media, flag in images],
        model=settings["model"],
        model_version=settings["model_version"],
        seed=settings["seed"],
        width=width,
        height=height,
        steps=settings["steps"],
        guidance_scale=settings["guidance_scale"],
        scheduler=settings["scheduler"],
        timings_ms=settings["timings_ms"],
        withheld=safety["withheld"] if safety else 0,
        upscale=pb.Upscale(model=upscale["model"], factor=upscale["factor"]) if upscale else None,
        strength=settings.get("strength"),
        inpainting=settings.get("inpainting"),
        loras=[pb.Lora(name=a["name"], scale=a["scale"], ref=a["ref"]) for a in settings.get("loras") or []],
    )


def _progress(event: dict[str, Any]) -> pb.Progress:
    progress = pb.Progress(step=event["step"], total_steps=event["total_steps"])
    if event.get("preview"):
        progress.preview = base64.b64decode(event["preview"])
        progress.preview_media_type = event["preview_media_type"]
    return progress


def authenticate(keys: KeyRing | None, metadata: Sequence[tuple[str, Any]]) -> Principal:
    """The caller of an RPC from its ``authorization`` metadata (``Bearer <key>``); ``OPEN`` when keys are off.
    A missing, unknown or revoked key is a 401 (``UNAUTHENTICATED``)."""
    if keys is None:
        return OPEN
    presented = next((str(value) for name, value in metadata if name.lower() == "authorization"), None)
    principal = keys.verify(presented_key(presented))
    if principal is None:
        raise ApiError(401, "unauthorized", "a valid API key is required in the `authorization` metadata (Bearer)")
    return principal
