"""The AUTOMATIC1111 (stable-diffusion-webui) API subset: ``/sdapi/v1/...`` for the bots and plugins that speak it.

A thin translation onto ``GenerationService``: A1111 field names in, A1111 response shapes out, the same
validation and error shape as every other route. AUTOMATIC1111 is a single-user server, so ``progress`` and
``interrupt`` act on the txt2img calls of the ingress replica that answers (with one ingress replica, the
whole deployment). Each image of a batch is its own request seeded ``seed + i``, as in A1111, so an image's
seed from ``info`` reproduces it alone; the denoiser batches them together step by step anyway.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import APIRouter, Body
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.contracts import DenoiseProgress, Pixels
from models.images import decode_image, image_size
from models.schedulers import SCHEDULERS
from serving.errors import ApiError, content_policy_violation, invalid, validation_error
from serving.resolver import GenerationRequest
from serving.schemas import ImageGenerationRequest, UpscaleRequest
from serving.service import GenerationResult, GenerationService

MAX_A1111_SEED = 2**32 - 1

# Fields that would change the picture in A1111 but are not implemented here: refused when switched on,
# rather than silently ignored. Every other unknown field is accepted and ignored.
UNSUPPORTED_WHEN_SET = ("enable_hr", "restore_faces", "tiling", "init_images", "mask", "alwayson_scripts")


class Txt2ImgRequest(BaseModel):
    """``POST /sdapi/v1/txt2img`` (the fields sdserve honours; see the README's compatibility table)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(default="", description="What to draw; empty samples unconditionally, as in A1111.")
    negative_prompt: str = Field(default="", description="What to steer away from.")
    steps: int = Field(default=20, ge=1, description="Sampling steps (at most limits.max_steps).")
    cfg_scale: float = Field(default=7.0, ge=0, description="Guidance scale (at most limits.max_guidance_scale).")
    sampler_name: str | None = Field(default=None, description="Sampler as A1111 names it, e.g. 'Euler a'.")
    sampler_index: str | None = Field(default=None, description="Older clients' name for sampler_name.")
    scheduler: str | None = Field(default=None, description="A1111 1.9+ schedule type: 'Automatic' or 'Karras'.")
    seed: int = Field(default=-1, ge=-1, le=MAX_A1111_SEED, description="Seed; -1 picks one.")
    width: int = Field(default=512, ge=8, description="Width in pixels, a multiple of 8.")
    height: int = Field(default=512, ge=8, description="Height in pixels, a multiple of 8.")
    batch_size: int = Field(default=1, ge=1, description="Images per iteration (at most limits.max_images).")
    n_iter: int = Field(default=1, ge=1, le=100, description="Iterations (batches), run one after another.")
    override_settings: dict[str, Any] = Field(
        default_factory=dict, description="Only sd_model_checkpoint is honoured (a model from sd-models)."
    )


class ExtraSingleImageRequest(BaseModel):
    """``POST /sdapi/v1/extra-single-image``: upscale one image (A1111's "Extras" tab)."""

    model_config = ConfigDict(extra="allow")

    image: str = Field(description="The image, base64 (a data: URL prefix is accepted).")
    upscaler_1: str | None = Field(default=None, description="Upscaler name (GET /sdapi/v1/upscalers).")
    upscaling_resize: float = Field(default=2.0, description="Scale factor (resize_mode 0).")
    resize_mode: int = Field(default=0, description="0: scale by upscaling_resize (the only mode served).")


# Extras that other A1111 post-processors would run; refused when they would change the image.
EXTRAS_UNSUPPORTED_WHEN_SET = ("gfpgan_visibility", "codeformer_visibility", "extras_upscaler_2_visibility")


class Txt2ImgResponse(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str  # a JSON document as a string, as A1111 sends it


def sampler_names() -> dict[str, str]:
    """Every name A1111 users write for a sampler (lower-cased) -> the scheduler registry key."""
    names: dict[str, str] = {}
    for key, spec in SCHEDULERS.items():
        for name in (key, spec.label, *spec.aliases):
            names[name.lower()] = key
    return names


def resolve_sampler(name: str | None, schedule: str | None) -> str | None:
    """'DPM++ 2M' + schedule 'Karras' -> 'dpmpp_2m_karras'; None keeps the deployment's default."""
    if not name:
        return None
    wanted = name.strip().lower()
    if schedule and schedule.strip().lower() not in ("automatic", ""):
        wanted = f"{wanted} {schedule.strip().lower()}"
    key = sampler_names().get(wanted)
    if key is None:
        raise invalid(
            f"sampler {name!r} (schedule {schedule or 'Automatic'!r}) is not available; see /sdapi/v1/samplers",
            "sampler_name",
        )
    return key


@dataclass
class _Task:
    """One txt2img call, as /sdapi/v1/progress reports it."""

    job_count: int
    steps: int
    started: float = field(default_factory=time.time)
    job_no: int = 0
    step: dict[int, int] = field(default_factory=dict)  # image in the current batch -> steps done
    preview: bytes | None = None
    interrupted: bool = False
    running: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def sampling_step(self) -> int:
        return min(self.step.values(), default=0)


class A1111Api:
    """The A1111 endpoints' logic for one ingress replica."""

    def __init__(self, service: GenerationService) -> None:
        self.service = service
        self.tasks: list[_Task] = []

    def _model(self, settings: dict[str, Any]) -> str | None:
        wanted = settings.get("sd_model_checkpoint")
        if not wanted:
            return None
        for model in self.service.models.specs.values():
            if wanted == model.name:
                return model.name
        raise ApiError(
            404, "model_not_found", f"model {wanted!r} is not served; see /sdapi/v1/sd-models", "sd_model_checkpoint"
        )

    def prepare(self, body: Txt2ImgRequest) -> GenerationRequest:
        """The native request, checked by the same resolver as every other route; errors name A1111's fields.

        Sizes that are not multiples of 8 are refused with a 422 naming ``width`` / ``height`` rather than
        rounded (A1111 silently floors them, so its output would not have the size asked for)."""
        extra = body.model_extra or {}
        for name in UNSUPPORTED_WHEN_SET:
            if extra.get(name):
                raise invalid(f"{name} is not supported by this server", name)
        for name, value in (("width", body.width), ("height", body.height)):
            if value % 8:
                raise invalid(f"{name} {value} is not a multiple of 8", name)
        try:
            native = ImageGenerationRequest(
                prompt=body.prompt,
                negative_prompt=body.negative_prompt or None,
                model=self._model(body.override_settings),
                n=body.batch_size,
                size=f"{body.width}x{body.height}",
                steps=body.steps,
                guidance_scale=body.cfg_scale,
                seed=body.seed if body.seed >= 0 else secrets.randbelow(MAX_A1111_SEED),
                scheduler=resolve_sampler(body.sampler_name or body.sampler_index, body.scheduler),
                output_format="png",
            )
            return self.service.prepare(native)
        except ValidationError as exc:
            raise _a1111_names(validation_error(exc.errors())) from exc
        except ApiError as err:
            raise _a1111_names(err) from err

    async def txt2img(self, body: Txt2ImgRequest) -> Txt2ImgResponse:
        req = self.prepare(body)
        task = _Task(job_count=body.n_iter, steps=req.steps)
        self.tasks.append(task)
        images: list[bytes] = []
        flags: list[bool | None] = []
        seeds: list[int] = []
        withheld = 0
        version = ""
        try:
            for iteration in range(body.n_iter):
                task.job_no, task.step = iteration, {}
                batch = [
                    replace(req, num_images=1, seed=req.seed + iteration * body.batch_size + i)
                    for i in range(body.batch_size)
                ]
                runs = [asyncio.ensure_future(self._one(task, i, r)) for i, r in enumerate(batch)]
                task.running = set(runs)
                results = await asyncio.gather(*runs, return_exceptions=True)
                for r, result in zip(batch, results, strict=True):
                    if isinstance(result, asyncio.CancelledError) and task.interrupted:
                        continue  # interrupted: the images that finished are returned
                    if isinstance(result, ApiError) and result.code == "content_policy_violation":
                        withheld += 1  # this image was blocked; the others of the call are still returned
                        continue
                    if isinstance(result, BaseException):
                        raise result
                    images.extend(img for img, _ in result.delivered)
                    flags.extend(flag for _, flag in result.delivered)
                    seeds.append(r.seed)
                    version = result.model_version
                if task.interrupted:
                    break
        finally:
            self.tasks.remove(task)
        if withheld and not images:
            raise content_policy_violation(withheld)
        info = _info(body, req, seeds, version, task)
        if req.safety is not None:
            info["nsfw"] = flags  # per returned image
            info["withheld"] = withheld
        return Txt2ImgResponse(
            images=[base64.b64encode(img).decode("ascii") for img in images],
            parameters=body.model_dump(mode="json"),
            info=json.dumps(info),
        )

    async def _one(self, task: _Task, index: int, req: GenerationRequest) -> Any:
        async def progress(update: DenoiseProgress) -> None:
            task.step[index] = update.step
            if update.preview is not None and index == 0:
                task.preview = update.preview

        return await self.service.generate(req, progress, preview=True)

    async def extra_single_image(self, body: ExtraSingleImageRequest) -> dict[str, Any]:
        """Upscale one image the client sends (and check it, when the safety check is on)."""
        extra = body.model_extra or {}
        for name in EXTRAS_UNSUPPORTED_WHEN_SET:
            if extra.get(name):
                raise invalid(f"{name} is not supported by this server", name)
        if body.resize_mode != 0:
            raise invalid("only resize_mode 0 (scale by upscaling_resize) is supported", "resize_mode")
        if body.upscaler_1 in (None, "", "None"):
            raise invalid("choose an upscaler from /sdapi/v1/upscalers", "upscaler_1")
        try:
            data = base64.b64decode(body.image.partition(",")[2] if body.image.startswith("data:") else body.image)
            width, height = image_size(data)  # the header only: limits are checked before anything is decoded
        except Exception as exc:
            raise invalid(f"image is not a base64 PNG, JPEG or WebP image ({type(exc).__name__})", "image") from exc
        upscale = UpscaleRequest(model=body.upscaler_1, factor=body.upscaling_resize)
        try:
            req = self.service.resolver.resolve_postprocess(width, height, upscale, "png")
        except ApiError as err:
            raise _a1111_names(err, _EXTRAS_FIELDS) from err
        try:
            pixels = decode_image(data)
        except Exception as exc:
            raise invalid(f"image could not be decoded ({type(exc).__name__})", "image") from exc
        result = await self.service.postprocess(req, Pixels(pixels[None], model_version=""))
        return {"html_info": _extras_info(result), "image": base64.b64encode(result.delivered[0][0]).decode("ascii")}

    def upscalers(self) -> list[dict[str, Any]]:
        return [
            {"name": u.name, "model_name": u.name, "model_path": u.source, "model_url": None, "scale": None}
            for u in self.service.models.artifacts.get("upscalers", {}).values()
        ]

    def progress(self, skip_current_image: bool) -> dict[str, Any]:
        task = self.tasks[0] if self.tasks else None
        state: dict[str, Any] = {
            "skipped": False,
            "interrupted": bool(task and task.interrupted),
            "job": "",
            "job_count": task.job_count if task else 0,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(task.started if task else 0)),
            "job_no": task.job_no if task else 0,
            "sampling_step": task.sampling_step if task else 0,
            "sampling_steps": task.steps if task else 0,
        }
        if task is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        done = (task.job_no + task.sampling_step / task.steps) / task.job_count
        elapsed = time.time() - task.started
        image = None
        if task.preview is not None and not skip_current_image:
            image = base64.b64encode(task.preview).decode("ascii")
        return {
            "progress": round(done, 4),
            "eta_relative": round(elapsed / done - elapsed, 2) if done > 0 else 0.0,
            "state": state,
            "current_image": image,
            "textinfo": f"Step {task.sampling_step}/{task.steps}",
        }

    def interrupt(self) -> int:
        """Stop the running txt2img calls at their next denoising step; return how many were running."""
        for task in self.tasks:
            task.interrupted = True
            for run in task.running:
                run.cancel()
        return len(self.tasks)

    def sd_models(self) -> list[dict[str, Any]]:
        return [
            {
                "title": m.name,
                "model_name": m.name,
                "hash": None,
                "sha256": None,
                "filename": m.source,
                "config": None,
            }
            for m in self.service.models.specs.values()
        ]


# Native field -> the A1111 field a client sent it as (txt2img; extra-single-image).
_A1111_FIELDS = {"n": "batch_size", "guidance_scale": "cfg_scale", "scheduler": "sampler_name"}
_EXTRAS_FIELDS = {"upscale.model": "upscaler_1", "upscale.factor": "upscaling_resize", "upscale": "upscaler_1"}


def _a1111_names(err: ApiError, fields: dict[str, str] = _A1111_FIELDS) -> ApiError:
    """The same error, naming the field as the A1111 client wrote it (``size`` -> ``width`` or ``height``)."""
    param, message = err.param, err.message
    if param == "size":
        param = "height" if message.startswith("height") else "width"
    elif param in fields:
        if message.startswith(f"{param} "):
            message = f"{fields[param]}{message[len(param) :]}"
        param = fields[param]
    return ApiError(err.status, err.code, message, param, err.headers)


def _extras_info(result: GenerationResult) -> str:
    up = result.request.upscale
    text = f"Postprocess upscale by: {up.factor:g}, Postprocess upscaler: {up.upscaler}" if up else ""
    if result.flagged:
        text += f", NSFW: {result.flagged[0]}"
    return text


def _info(body: Txt2ImgRequest, req: GenerationRequest, seeds: list[int], version: str, task: _Task) -> dict[str, Any]:
    label = SCHEDULERS[req.scheduler].label
    infotexts = [
        f"{req.prompt}\nNegative prompt: {req.negative_prompt or ''}\nSteps: {req.steps}, Sampler: {label}, "
        f"CFG scale: {req.guidance_scale:g}, Seed: {seed}, Size: {req.width}x{req.height}, Model: {req.model}, "
        f"Version: sdserve"
        for seed in seeds
    ]
    return {
        "prompt": req.prompt,
        "all_prompts": [req.prompt] * len(seeds),
        "negative_prompt": body.negative_prompt,
        "all_negative_prompts": [body.negative_prompt] * len(seeds),
        "seed": seeds[0] if seeds else req.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0,
        "width": req.width,
        "height": req.height,
        "sampler_name": label,
        "cfg_scale": req.guidance_scale,
        "steps": req.steps,
        "batch_size": body.batch_size,
        "restore_faces": False,
        "sd_model_name": req.model,
        "sd_model_hash": version or None,
        "denoising_strength": None,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(task.started)),
        "clip_skip": 1,
        "interrupted": task.interrupted,
        "version": "sdserve",
    }


def create_router(api: A1111Api) -> APIRouter:
    """The ``/sdapi/v1`` routes (thin: they call ``A1111Api``)."""
    router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111 compatible"])

    @router.post("/txt2img", response_model=Txt2ImgResponse)
    async def txt2img(body: Txt2ImgRequest = Body(...)) -> Txt2ImgResponse:  # noqa: B008
        return await api.txt2img(body)

    @router.post("/extra-single-image")
    async def extra_single_image(body: ExtraSingleImageRequest = Body(...)) -> dict[str, Any]:  # noqa: B008
        return await api.extra_single_image(body)

    @router.get("/upscalers")
    async def upscalers() -> list[dict[str, Any]]:
        return api.upscalers()

    @router.get("/progress")
    async def progress(skip_current_image: bool = False) -> dict[str, Any]:
        return api.progress(skip_current_image)

    @router.post("/interrupt")
    async def interrupt() -> dict[str, Any]:
        api.interrupt()
        return {}

    @router.get("/sd-models")
    async def sd_models() -> list[dict[str, Any]]:
        return api.sd_models()

    @router.get("/samplers")
    async def samplers() -> list[dict[str, Any]]:
        return [
            {"name": spec.label, "aliases": [key, *spec.aliases], "options": {}} for key, spec in SCHEDULERS.items()
        ]

    return router
