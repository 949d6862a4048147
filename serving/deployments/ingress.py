"""Ingress deployment: the FastAPI app and the gRPC methods, built per replica around one service layer.

Serve's HTTP proxy hands HTTP requests to the FastAPI app; its gRPC proxy calls the method named like the RPC
(``Generate``, ``GenerateStream``, ..., and ``Check`` / ``Watch`` of the standard health service).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from serving import audit, tracing
from serving.a1111 import A1111Api
from serving.api import create_api
from serving.auth import act_as, reset_principal
from serving.config import AppConfig
from serving.errors import ApiError
from serving.generated.sdserve.v1 import sdserve_pb2 as pb
from serving.grpc_api import GrpcApi, authenticate, grpc_status, set_status
from serving.jobs import JobManager
from serving.jobstore import open_job_store
from serving.outputs import OutputSweeper, open_output_store
from serving.service import GenerationService

logger = logging.getLogger(__name__)
T = TypeVar("T")


@serve.deployment(name="Ingress")
@serve.ingress()
class IngressDeployment:
    def __init__(self, config: dict[str, Any], stages: dict[str, DeploymentHandle]) -> None:
        """``stages``: a handle per deployed stage of the stage table, by stage name."""
        self.config = AppConfig.model_validate(config)
        tracing.setup("ingress")
        self.service = GenerationService.over_handles(self.config, stages)
        out = self.config.outputs
        self.outputs = open_output_store(out.directory, out.store, out.ttl_s)
        # Serve runs __init__ on the replica's event loop, which then runs the sweeps between requests.
        self.sweeper = OutputSweeper(self.outputs)
        self.sweeper.start()
        store = open_job_store(self.config.jobs)
        (logger.info if store.shared else logger.warning)("job store: %s", store.description)
        self.jobs = JobManager(self.service, store, self.config.jobs)
        self.a1111 = A1111Api(self.service)
        self.grpc = GrpcApi(self.service, self.jobs)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """The model catalog (Serve ``user_config``): new references are rolled out in the background."""
        await self.service.apply_catalog(user_config)

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Called by Serve after __init__: routes close over this replica's service.
        from serving.metrics import api_metrics

        return create_api(self.service, self.outputs, self.jobs, self.a1111, api_metrics())

    async def __del__(self) -> None:
        # Serve calls this on graceful shutdown: the sweeps stop, and jobs still running here end as failed
        # (job_lost).
        await self.sweeper.stop()
        await self.jobs.stop()

    # -- gRPC (sdserve.v1.ImageGeneration) ---------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext) -> pb.GenerateResponse:
        return await self._unary(self.grpc.generate, request, grpc_context)

    async def GenerateStream(
        self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        metadata = grpc_context.invocation_metadata()
        with tracing.span("sdserve.v1.ImageGeneration/GenerateStream", tracing.grpc_carrier(metadata)) as span:
            try:
                act_as(authenticate(self.service.keys, metadata))
                events = self.grpc.generate_stream(request)
                # The job starts before the first event and its stage calls take the context current then; the
                # span is not current across yields (a generator may be closed from another task).
                with tracing.current(span):
                    event = await anext(events, None)
                while event is not None:
                    yield event
                    event = await anext(events, None)
            except BaseException as exc:
                set_status(grpc_context, exc)
                raise

    async def GetJob(self, request: pb.GetJobRequest, grpc_context: RayServegRPCContext) -> pb.Job:
        return await self._unary(self.grpc.get_job, request, grpc_context)

    async def CancelJob(self, request: pb.CancelJobRequest, grpc_context: RayServegRPCContext) -> pb.Job:
        return await self._unary(self.grpc.cancel_job, request, grpc_context)

    async def ListModels(
        self, request: pb.ListModelsRequest, grpc_context: RayServegRPCContext
    ) -> pb.ListModelsResponse:
        async def models(_: pb.ListModelsRequest) -> pb.ListModelsResponse:
            return self.grpc.list_models()

        return await self._unary(models, request, grpc_context)

    async def _unary(self, method: Callable[[Any], Awaitable[T]], request: Any, grpc_context: RayServegRPCContext) -> T:
        """A data-plane RPC: the caller's key checked (its tenant scopes jobs), errors as gRPC statuses, and its
        audit line."""
        fields, audit_token = audit.begin()
        started = time.perf_counter()
        metadata = grpc_context.invocation_metadata()
        principal = None
        status = "OK"
        error: BaseException | None = None
        carrier = tracing.grpc_carrier(metadata)
        with tracing.span("sdserve.v1.ImageGeneration", carrier, make_current=True, record_errors=False) as span:
            try:
                principal = authenticate(self.service.keys, metadata)
                token = act_as(principal)
                try:
                    return await _unary(method(request), grpc_context)
                finally:
                    reset_principal(token)
            except BaseException as exc:
                set_status(grpc_context, exc)
                status = grpc_status(exc).name if isinstance(exc, ApiError) else type(exc).__name__
                error = exc
                raise
            finally:
                audit.end(audit_token)
                entry = {
                    "tenant": principal.tenant if principal else None,
                    "key_id": principal.key_id if principal else None,
                    "api": "grpc",
                    "method": "RPC",
                    "route": getattr(method, "__name__", "rpc"),
                    "status": status,
                    "latency_ms": round((time.perf_counter() - started) * 1000, 1),
                    "trace_id": tracing.trace_id(span) or audit.trace_id(carrier.get("traceparent")),
                    **fields,
                }
                self.service.audit.write(entry)
                tracing.finish_request(span, entry, error)

    # -- gRPC (grpc.health.v1.Health) --------------------------------------------------------------------------

    async def Check(
        self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext
    ) -> health_pb2.HealthCheckResponse:
        return await _unary(self.grpc.health(request), grpc_context)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        try:
            async for status in self.grpc.watch_health(request):
                yield status
        except BaseException as exc:
            set_status(grpc_context, exc)
            raise


async def _unary(call: Awaitable[T], grpc_context: RayServegRPCContext) -> T:
    try:
        return await call
    except BaseException as exc:
        set_status(grpc_context, exc)
        raise
