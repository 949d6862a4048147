"""``GenerationService``: the one service layer REST, OpenAI, A1111 and gRPC adapters call.

It turns resolved requests into plans (``serving/plans.py``) and hands them to the ``ChainRunner``, which calls
the stages so that tensors go stage to stage through Ray's object store: only the final encoded image bytes come
back here. Request resolution (defaults, limits) is ``RequestResolver``; model rollouts are ``ModelRollout``;
readiness is computed here once for every transport.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

from models.contracts import EncodedImages, Pixels
from models.errors import AdapterError, StageInputError, UnknownModelError
from models.registry.errors import RegistryError
from serving import audit, auth
from serving.audit import AuditLog
from serving.auth import KeyRing
from serving.config import AppConfig
from serving.env import SDSERVE_HOME
from serving.errors import ApiError, content_policy_violation, invalid
from serving.plans import Plan, plan_generation, plan_postprocess
from serving.quotas import Quotas
from serving.resolver import GenerationRequest, MaskSource, RequestResolver
from serving.rollout import ModelCatalogState, ModelRollout
from serving.runner import ChainRunner, OnProgress, RayStageClient, StageClient
from serving.schemas import ImageGenerationRequest
from serving.stages import STAGES, pipeline_stages

logger = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    request: GenerationRequest
    images: list[bytes]  # empty bytes for a withheld image
    media_type: str
    model_version: str
    width: int  # of the returned images (after upscaling)
    height: int
    flagged: tuple[bool, ...] = ()  # safety verdict per image; empty when the check did not run
    withheld: tuple[bool, ...] = ()
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def delivered(self) -> list[tuple[bytes, bool | None]]:
        """The images the client gets, each with its safety verdict (None: not checked); withheld ones left out."""
        withheld = self.withheld or (False,) * len(self.images)
        flagged: tuple[bool | None, ...] = self.flagged or (None,) * len(self.images)
        return [(img, flag) for img, flag, hidden in zip(self.images, flagged, withheld, strict=True) if not hidden]

    def settings(self) -> dict[str, Any]:
        """What reproduces the result; every API's response says it the same way (``GenerationSettings``)."""
        req = self.request
        up, safety = req.upscale, req.safety
        return {
            "model": req.model,
            "model_version": self.model_version,
            "seed": req.seed,
            "size": f"{self.width}x{self.height}",
            "steps": req.steps,
            "guidance_scale": req.guidance_scale,
            "scheduler": req.scheduler,
            "output_format": req.output_format,
            "timings_ms": self.timings_ms,
            "upscale": {"model": up.upscaler, "factor": up.factor} if up else None,
            "styles": list(req.styles) or None,
            "loras": [{"name": a.name, "scale": a.scale, "ref": a.ref} for a in req.loras] or None,
            "strength": req.init.strength if req.init else None,
            "inpainting": req.init.mask is not None if req.init else None,
            "hires": (
                {
                    "size": f"{req.hires.width}x{req.hires.height}",
                    "steps": req.hires.steps,
                    "denoising_strength": req.hires.strength,
                    "upscaler": req.hires.upscaler or "latent",
                }
                if req.hires
                else None
            ),
            "safety": (
                {"mode": safety.mode, "checker": safety.checker, "withheld": sum(self.withheld)} if safety else None
            ),
        }


class GenerationService:
    """Runs requests through the stages and maps failures to API errors.

    Args:
        config: the application's config.
        clients: stage name -> client (``RayStageClient`` over a Serve handle in the ingress; in-process clients
            in tests). A stage the config does not deploy is simply absent.
    """

    def __init__(self, config: AppConfig, clients: Mapping[str, StageClient]) -> None:
        self.config = config
        self.clients = dict(clients)
        self.models = ModelCatalogState()
        self.resolver = RequestResolver(config, self.models)
        pipeline = {s.name: self.clients[s.name] for s in pipeline_stages() if s.name in self.clients}
        self.rollout = ModelRollout(self.models, config.snapshot_cache(SDSERVE_HOME), pipeline)
        self.runner = ChainRunner(self.clients, config.limits, self._map_error)
        auth = config.auth
        self.keys = KeyRing(auth.keys_file, auth.reload_interval_s) if auth.enabled and auth.keys_file else None
        self.audit = AuditLog(config.audit.path)
        self.quotas = Quotas(config.quotas, config.jobs.store_url)

    @classmethod
    def over_handles(cls, config: AppConfig, handles: Mapping[str, Any]) -> GenerationService:
        """The service over Serve ``DeploymentHandle``s (the ingress's case)."""
        return cls(config, {name: RayStageClient(handle) for name, handle in handles.items()})

    # -- requests ---------------------------------------------------------------------------------------------

    def prepare(
        self,
        req: ImageGenerationRequest,
        image: bytes | None = None,
        mask: bytes | None = None,
        mask_source: MaskSource = "luminance",
        styles: tuple[str, ...] = (),
    ) -> GenerationRequest:
        """Apply style presets, fill defaults, check the configured limits and decode uploaded images (see
        ``RequestResolver``)."""
        return self.resolver.resolve(req, image, mask, mask_source, styles)

    async def generate(
        self,
        req: GenerationRequest,
        on_progress: OnProgress | None = None,
        preview: bool = False,
        charged: bool = False,
    ) -> GenerationResult:
        """Run one request's plan within the configured deadline (see ``ChainRunner``), within the caller's
        tenant's quotas (a 429 before any stage runs; ``charged``: already counted, as a job is at submit).

        With ``on_progress``, the denoiser streams a ``DenoiseProgress`` after each of its steps (carrying a
        low-resolution preview when ``preview`` is set) and ``on_progress`` is awaited for each.
        """
        async with self.quotas.admit(auth.current().tenant, req, charge=not charged):
            return await self._run(req, plan_generation(req), on_progress, preview)

    async def postprocess(self, req: GenerationRequest, pixels: Pixels) -> GenerationResult:
        """Run only the post-processing ``req`` asks for (e.g. an upscale) on an image the client sent."""
        return await self._run(req, plan_postprocess(req, pixels), None, False)

    async def _run(
        self, req: GenerationRequest, plan: Plan, on_progress: OnProgress | None, preview: bool
    ) -> GenerationResult:
        started = time.perf_counter()
        images: EncodedImages = await self.runner.run(plan, on_progress, preview)
        if images.withheld and all(images.withheld):
            raise content_policy_violation(len(images.withheld))
        elapsed = (time.perf_counter() - started) * 1000
        mode = (
            "hires"
            if req.hires
            else "txt2img"
            if req.init is None
            else "inpaint"
            if req.init.mask is not None
            else "img2img"
        )
        audit.note(
            model=req.model or None,
            model_version=images.model_version,
            mode=mode if req.model else "postprocess",
            size=f"{images.width}x{images.height}",
            steps=req.steps,
            images=len(images.images) - sum(images.withheld),
            styles=list(req.styles) or None,
            loras=[f"{a.name}:{a.scale:g}" for a in req.loras] or None,
        )
        logger.info(
            "generated model=%s plan=%s steps=%d size=%dx%d n=%d user=%s in %.0f ms",
            req.model, "+".join(plan.stages), req.steps, images.width, images.height, len(images.images), req.user,
            elapsed,
        )  # fmt: skip
        return GenerationResult(
            request=req,
            images=images.images,
            media_type=images.media_type,
            model_version=images.model_version,
            width=images.width,
            height=images.height,
            flagged=images.flagged,
            withheld=images.withheld,
            timings_ms={"total": round(elapsed, 1)},
        )

    def _map_error(self, exc: BaseException) -> BaseException:
        """Translate stage and Ray failures into API errors; anything else stays a 500."""
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, UnknownModelError):
            return ApiError(404, "model_not_found", exc.message, exc.param)
        if isinstance(exc, AdapterError):
            return ApiError(422, "lora_invalid", exc.message, exc.param)
        if isinstance(exc, StageInputError):
            return invalid(exc.message, exc.param)
        if isinstance(exc, RegistryError):
            return ApiError(503, "model_unavailable", f"the model version could not be loaded: {exc.message}")
        if isinstance(exc, BackPressureError):
            return ApiError(
                503,
                "overloaded",
                "the service is at capacity; retry shortly",
                headers={"Retry-After": str(self.config.limits.retry_after_s)},
            )
        if isinstance(exc, DeploymentUnavailableError):
            return ApiError(503, "stage_unavailable", f"a stage is unavailable: {type(exc).__name__}")
        if isinstance(exc, RequestCancelledError | asyncio.CancelledError):
            return exc
        logger.error("generation failed: %r", exc)
        return exc

    # -- catalog and health -----------------------------------------------------------------------------------

    async def apply_catalog(self, user_config: dict[str, Any]) -> None:
        """Take a (changed) catalog (see ``ModelRollout``)."""
        await self.rollout.apply(user_config)

    async def describe_stages(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """Ask one replica of each deployed stage what it holds; a stage that does not answer in time is not
        ready."""

        async def one(name: str) -> dict[str, Any]:
            try:
                result: dict[str, Any] = await asyncio.wait_for(self.clients[name].call("describe"), timeout=timeout_s)
                return {"ready": True, **result}
            except Exception as exc:  # not loaded yet, or failed to load
                return {"ready": False, "error": f"{type(exc).__name__}: {exc}"[:500]}

        names = [name for name in STAGES if name in self.clients]
        results = await asyncio.gather(*(one(name) for name in names))
        return dict(zip(names, results, strict=True))

    async def readiness(self) -> dict[str, Any]:
        """``status``: ``not_ready`` (a stage does not answer, or a model has no loaded version), ``degraded``
        (serving, but a configured model or artifact failed to load and the previous one, if any, still
        serves) or ``ready``; with the reasons, the models and what each stage holds. REST ``/readyz`` and
        gRPC health both answer from this."""
        stages = await self.describe_stages()
        models = self.models.describe()
        not_ready = [name for name, info in stages.items() if not info["ready"]]
        not_ready += [f"model {name}" for name, info in models.items() if info["serving"] is None]
        failed = {name: info["error"] for name, info in models.items() if info["error"]}
        for stage, info in stages.items():
            for name, error in info.get("load_errors", {}).items():
                failed.setdefault(name, f"{stage}: {error}")
        status = "not_ready" if not_ready else "degraded" if failed else "ready"
        return {"status": status, "not_ready": not_ready, "errors": failed, "models": models, "stages": stages}

    async def replica_counts(self) -> dict[str, int]:
        """Running replicas per deployment of this application, from the Serve controller."""
        from ray import serve

        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(self.config.app_name)
        if app is None:
            return {}
        return {
            name: sum(n for state, n in d.replica_states.items() if state == "RUNNING")
            for name, d in app.deployments.items()
        }
