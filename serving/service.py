"""``GenerationService``: the one place a generation request is checked, run through the stages and answered.

REST routes (and later gRPC) are thin adapters over it. It holds DeploymentHandles to the three stages and
chains their calls so that tensors go stage to stage through Ray's object store: the ingress passes the
encoder's response object straight into the denoiser call, and only the encoded image bytes come back here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

from models.contracts import (
    DecodeParams,
    DenoiseParams,
    DenoiseProgress,
    EncodedImages,
    EncodeRequest,
    Latents,
)
from models.errors import StageInputError, UnknownModelError
from models.registry.errors import RegistryError
from serving.config import AppConfig, ModelCatalog, ModelSpec
from serving.env import SDSERVE_HOME
from serving.errors import ApiError, invalid
from serving.resolver import GenerationRequest, RequestResolver
from serving.schemas import ImageGenerationRequest

logger = logging.getLogger(__name__)

STAGES = ("text_encoder", "denoiser", "decoder")

OnProgress = Callable[[DenoiseProgress], Awaitable[None]]


@dataclass
class GenerationResult:
    request: GenerationRequest
    images: list[bytes]
    media_type: str
    model_version: str
    timings_ms: dict[str, float] = field(default_factory=dict)


class GenerationService:
    """Checks requests against the config, runs them through the stages and maps failures to API errors."""

    def __init__(self, config: AppConfig, text_encoder: Any, denoiser: Any, decoder: Any) -> None:
        self.config = config
        self.handles = {"text_encoder": text_encoder, "denoiser": denoiser, "decoder": decoder}
        self.models = ModelCatalogState()
        self.resolver = RequestResolver(config, self.models)
        self.snapshots = config.snapshot_cache(SDSERVE_HOME)  # pins references (offline: from what is cached)

    # -- requests ---------------------------------------------------------------------------------------------

    def prepare(self, req: ImageGenerationRequest) -> GenerationRequest:
        """Fill defaults and check the configured limits (see ``RequestResolver``)."""
        return self.resolver.resolve(req)

    async def generate(
        self, req: GenerationRequest, on_progress: OnProgress | None = None, preview: bool = False
    ) -> GenerationResult:
        """Run one request through the three stages within the configured deadline.

        Stage calls are pure functions of their inputs, so when a stage replica dies under the request the
        chain is issued again (up to ``limits.replica_loss_retries`` times) and lands on live replicas; the
        encoder's cache makes the re-run of the text stage free.

        With ``on_progress``, the denoiser streams a ``DenoiseProgress`` after each of its steps (carrying a
        low-resolution preview when ``preview`` is set) and ``on_progress`` is awaited for each; a re-run after
        a replica loss starts counting again from step 1.
        """
        started = time.perf_counter()
        limits = self.config.limits
        attempts = 0
        while True:
            attempts += 1
            remaining = limits.request_timeout_s - (time.perf_counter() - started)
            try:
                images = await self._with_deadline(
                    self._run_chain(req) if on_progress is None else self._run_streaming(req, on_progress, preview),
                    max(remaining, 0.0),
                )
                break
            except BaseException as exc:
                if _is_replica_loss(exc) and attempts <= limits.replica_loss_retries:
                    logger.warning("a stage replica died under a request (attempt %d); re-running it", attempts)
                    continue
                if _is_replica_loss(exc):
                    raise ApiError(
                        503,
                        "stage_unavailable",
                        f"stage replicas kept failing ({attempts} attempts); retry shortly",
                        headers={"Retry-After": str(limits.retry_after_s)},
                    ) from exc
                raise self._map_error(exc) from exc
        elapsed = (time.perf_counter() - started) * 1000
        logger.info(
            "generated model=%s steps=%d size=%dx%d n=%d user=%s in %.0f ms (attempts %d)",
            req.model, req.steps, req.width, req.height, req.num_images, req.user, elapsed, attempts,
        )  # fmt: skip
        return GenerationResult(
            request=req,
            images=images.images,
            media_type=images.media_type,
            model_version=images.model_version,
            timings_ms={"total": round(elapsed, 1)},
        )

    def _stage_inputs(self, req: GenerationRequest) -> tuple[EncodeRequest, DenoiseParams, DecodeParams]:
        encode = EncodeRequest(
            req.model, req.prompt, req.negative_prompt, with_negative=req.guidance_scale > 1.0, ref=req.ref
        )
        params = DenoiseParams(
            model=req.model,
            height=req.height,
            width=req.width,
            steps=req.steps,
            guidance_scale=req.guidance_scale,
            scheduler=req.scheduler,
            seed=req.seed,
            num_images=req.num_images,
            ref=req.ref,
        )
        return encode, params, DecodeParams(req.output_format, req.quality)

    async def _with_deadline(self, run: Awaitable[EncodedImages], timeout: float) -> EncodedImages:
        # Cancelling the chain on timeout cancels its stage calls, so the denoiser drops the job.
        try:
            return await asyncio.wait_for(run, timeout=timeout)
        except TimeoutError as exc:
            raise ApiError(
                504, "timeout", f"generation did not finish within {self.config.limits.request_timeout_s:g}s"
            ) from exc

    async def _run_chain(self, req: GenerationRequest) -> EncodedImages:
        encode, params, decode = self._stage_inputs(req)
        encoded = self.handles["text_encoder"].encode.remote(encode)
        # Passing the response objects on (not awaited here) keeps tensors out of the ingress.
        latents = self.handles["denoiser"].denoise.remote(encoded, params)
        decoded = self.handles["decoder"].decode.remote(latents, decode)
        try:
            images: EncodedImages = await decoded
        except asyncio.CancelledError:
            for response in (decoded, latents, encoded):
                response.cancel()
            raise
        return images

    async def _run_streaming(self, req: GenerationRequest, on_progress: OnProgress, preview: bool) -> EncodedImages:
        """The chain with the denoiser streaming its steps. Its final latents pass through this replica on
        their way to the decoder (4 channels at 1/8 resolution: about 1/48 of the pixels the decoder sends
        back anyway)."""
        encode, params, decode = self._stage_inputs(req)
        encoded = self.handles["text_encoder"].encode.remote(encode)
        stream = self.handles["denoiser"].options(stream=True).denoise_stream.remote(encoded, params, preview)
        latents: Latents | None = None
        try:
            async for item in stream:
                if isinstance(item, DenoiseProgress):
                    await on_progress(item)
                else:
                    latents = item
        except BaseException:  # cancelled, timed out, or on_progress failed: the denoiser drops the job
            stream.cancel()
            encoded.cancel()
            raise
        if latents is None:
            raise RuntimeError("the denoiser stream ended without latents")
        images: EncodedImages = await self.handles["decoder"].decode.remote(latents, decode)
        return images

    def _map_error(self, exc: BaseException) -> BaseException:
        """Translate stage and Ray failures into API errors; anything else stays a 500."""
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, UnknownModelError):
            return ApiError(404, "model_not_found", exc.message, exc.param)
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

    # -- catalog and rollout ----------------------------------------------------------------------------------

    async def apply_catalog(self, user_config: dict[str, Any]) -> None:
        """Take a (changed) model catalog; a changed reference is rolled out without dropping requests.

        At replica start every reference is pinned and served at once (the stages load the same catalog
        before they report ready). Later, a changed reference is pinned (a hub branch becomes a commit),
        loaded by every stage beside the old version, and only then do new requests go to it; requests in
        flight finish on the version they started with. A failed load keeps the old version serving and is
        reported in ``/readyz``, ``GET /v1/models`` and the log.
        """
        catalog = ModelCatalog.model_validate(user_config or {})
        state = self.models
        initial = not state.specs
        state.specs = {m.name: m for m in catalog.models}
        state.default = catalog.models[0].name if catalog.models else None
        for name in [n for n in state.active if n not in state.specs]:
            del state.active[name]
        changed = [m for m in catalog.models if state.configured.get(m.name) != m.source]
        if initial:
            await asyncio.gather(*(self._roll_out(m, prepare=False) for m in changed))
        elif changed:
            if state.rollout is not None and not state.rollout.done():
                state.rollout.cancel()
            state.rollout = asyncio.get_running_loop().create_task(self._roll_out_all(changed))

    async def _roll_out_all(self, models: list[ModelSpec]) -> None:
        await asyncio.gather(*(self._roll_out(m, prepare=True) for m in models))

    async def _roll_out(self, model: ModelSpec, prepare: bool) -> None:
        state = self.models
        state.configured[model.name] = model.source
        try:
            pinned = str(await asyncio.to_thread(self.snapshots.pin, model.source))
            if prepare:
                # Every stage loads the version before any request uses it.
                answers = await asyncio.gather(
                    *(self.handles[stage].prepare.remote(model.name, pinned) for stage in STAGES)
                )
                versions = {answer["version"] for answer in answers}
                if len(versions) != 1:
                    raise RuntimeError(f"stages loaded different versions of {pinned}: {sorted(versions)}")
                state.versions[model.name] = versions.pop()
        except Exception as exc:
            cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
            state.errors[model.name] = f"{type(cause).__name__}: {cause}"[:1000]
            logger.error("model %s: %s stays in service; %s failed: %s", model.name,
                         state.active.get(model.name), model.source, exc)  # fmt: skip
            return
        previous = state.active.get(model.name)
        state.active[model.name] = pinned
        state.errors.pop(model.name, None)
        logger.info("model %s now serves %s (configured %s, was %s)", model.name, pinned, model.source, previous)

    # -- catalog and health -----------------------------------------------------------------------------------

    async def describe_stages(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """Ask one replica of each stage what it holds; a stage that does not answer in time is not ready."""

        async def one(stage: str) -> dict[str, Any]:
            try:
                result: dict[str, Any] = await asyncio.wait_for(
                    self.handles[stage].describe.remote(), timeout=timeout_s
                )
                return {"ready": True, **result}
            except Exception as exc:  # not loaded yet, or failed to load
                return {"ready": False, "error": f"{type(exc).__name__}: {exc}"[:500]}

        results = await asyncio.gather(*(one(s) for s in STAGES))
        return dict(zip(STAGES, results, strict=True))

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


@dataclass
class ModelCatalogState:
    """The ingress's view of the catalog: what each model name is served from right now."""

    specs: dict[str, ModelSpec] = field(default_factory=dict)
    default: str | None = None
    configured: dict[str, str] = field(default_factory=dict)  # name -> reference as configured
    active: dict[str, str] = field(default_factory=dict)  # name -> pinned reference new requests use
    versions: dict[str, str] = field(default_factory=dict)  # name -> content id, once a stage reported it
    errors: dict[str, str] = field(default_factory=dict)  # name -> why the configured reference is not served
    rollout: asyncio.Task[None] | None = None

    def describe(self) -> dict[str, dict[str, Any]]:
        return {
            name: {
                "ref": self.configured.get(name),
                "serving": self.active.get(name),
                "version": self.versions.get(name),
                "error": self.errors.get(name),
            }
            for name in self.specs
        }


_REPLICA_LOSS = (RayActorError, ActorDiedError, ActorUnavailableError)


def _is_replica_loss(exc: BaseException) -> bool:
    """Did the request fail because a replica process died (anywhere along the chain)?"""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _REPLICA_LOSS):
            return True
        if isinstance(current, RayTaskError) and isinstance(current.cause, _REPLICA_LOSS):
            return True
        current = current.__cause__ or current.__context__
    return False
