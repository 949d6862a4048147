"""The AUTOMATIC1111 (stable-diffusion-webui) API subset: ``/sdapi/v1/...`` for the bots and plugins that speak it.

A thin translation onto ``GenerationService``: A1111 field names in, A1111 response shapes out, the same
validation and error shape as every other route. AUTOMATIC1111 is a single-user server, so ``progress`` and
``interrupt`` act on the txt2img / img2img calls of the ingress replica that answers (with one ingress replica,
the whole deployment). Each image of a batch is its own request seeded ``seed + i``, as in A1111, so an image's
seed from ``info`` reproduces it alone; the denoiser batches them together step by step anyway.

img2img prepares the init image and mask the way A1111's ``processing.py`` does (invert, blur, "only masked"
crop, "fill") with numpy and PIL here, hands the arrays to the service as an ``InitImage``, and finishes each
generated image as A1111 does: the init image's unmasked pixels are composited back over it ("apply overlay").
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
from fastapi import APIRouter, Body
from PIL import Image, ImageFilter
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.contracts import DenoiseProgress, Pixels
from models.images import decode_image, encode_image
from models.schedulers import SCHEDULERS
from serving import auth, uploads
from serving.errors import ApiError, content_policy_violation, invalid, validation_error
from serving.plans import plan_generation
from serving.resolver import GenerationRequest, InitImage
from serving.schemas import ImageGenerationRequest, LoraRequest, UpscaleRequest
from serving.service import GenerationResult, GenerationService

MAX_A1111_SEED = 2**32 - 1
HIRES_STRENGTH = 0.7  # A1111's denoising_strength for the hires pass when a request leaves it out
LATENT_UPSCALE_MODES = ("Latent",)  # the hires upscale of the latents served (A1111's bilinear "Latent")

# A1111's img2img resize_mode -> the geometry of serving.uploads.fit. 3 is A1111's "just resize (latent
# upscale)", which resizes the init image's latents; here the pixels are resized, as with 0.
RESIZE_MODES: dict[int, uploads.ResizeMode] = {0: "resize", 1: "crop", 2: "fill", 3: "resize"}
# inpainting_fill -> what A1111 calls it in the infotext ("Masked content").
MASKED_CONTENT = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}
# A1111's extra-network syntax in a prompt: <lora:name:weight> (weight optional, 1 by default; a second weight,
# A1111's separate UNet multiplier, is refused rather than ignored).
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
# The layers of A1111's "fill" (masking.fill): (blur radius, times composited), from the widest blur down.
_FILL_LAYERS = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


class GenerationFields(BaseModel):
    """The fields ``txt2img`` and ``img2img`` share (the ones sdserve honours; see the README's compatibility
    table)."""

    model_config = ConfigDict(extra="allow")

    # Fields that would change the picture in A1111 but are not implemented here, with the reason given: refused
    # when switched on, rather than silently ignored. Every other unknown field is accepted and ignored.
    refused: ClassVar[dict[str, str]] = dict.fromkeys(
        ("restore_faces", "tiling", "alwayson_scripts"), "is not supported by this server"
    )

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
    styles: list[str] = Field(
        default_factory=list, description="Style presets applied in order (GET /sdapi/v1/prompt-styles)."
    )


class Txt2ImgRequest(GenerationFields):
    """``POST /sdapi/v1/txt2img``; with ``enable_hr``, A1111's hires fix."""

    refused: ClassVar[dict[str, str]] = {
        **GenerationFields.refused,
        **dict.fromkeys(("init_images", "mask"), "belongs to POST /sdapi/v1/img2img"),
    }

    enable_hr: bool = Field(
        default=False, description="Hires fix: draw at width x height, upscale, then refine with an img2img pass."
    )
    hr_scale: float = Field(default=2.0, description="Hires size / first-pass size (when no hr_resize_x/y is set).")
    hr_resize_x: int = Field(default=0, ge=0, description="Hires width; 0: from hr_scale, or hr_resize_y's aspect.")
    hr_resize_y: int = Field(default=0, ge=0, description="Hires height; 0: from hr_scale, or hr_resize_x's aspect.")
    hr_upscaler: str | None = Field(
        default=None,
        description="'Latent' (any 'Latent (...)' variant, 'None' or unset): resize the latents; any other name: an "
        "upscaler from /sdapi/v1/upscalers.",
    )
    hr_second_pass_steps: int = Field(default=0, ge=0, description="Hires pass steps (before strength); 0: steps.")
    denoising_strength: float | None = Field(
        default=None, description="Strength of the hires pass; 0.7 if unset. Ignored without enable_hr."
    )


class Img2ImgRequest(GenerationFields):
    """``POST /sdapi/v1/img2img``: image to image, and inpainting with ``mask``."""

    init_images: list[str] = Field(description="One image, base64 PNG / JPEG / WebP (a data: URL prefix too).")
    denoising_strength: float = Field(default=0.75, description="How much to repaint, (0, 1].")
    mask: str | None = Field(
        default=None, description="Inpainting mask, base64, the init image's size; white repaints."
    )
    mask_blur: int = Field(default=4, ge=0, description="Gaussian blur radius applied to the mask, in pixels.")
    inpainting_fill: int = Field(
        default=1, ge=0, le=3, description="Masked content: 0 fill, 1 original; 2 and 3 run as 1 (README)."
    )
    inpaint_full_res: bool = Field(
        default=False, description="'Only masked': inpaint the mask's region at width x height, paste it back."
    )
    inpaint_full_res_padding: int = Field(default=32, ge=0, description="Pixels around the mask's region.")
    inpainting_mask_invert: int = Field(default=0, ge=0, le=1, description="1: repaint the black pixels instead.")
    resize_mode: int = Field(
        default=0, ge=0, le=3, description="0 just resize, 1 crop and resize, 2 resize and fill, 3 as 0."
    )
    include_init_images: bool = Field(default=False, description="Echo init_images and mask in `parameters`.")


class ExtraSingleImageRequest(BaseModel):
    """``POST /sdapi/v1/extra-single-image``: upscale one image (A1111's "Extras" tab)."""

    model_config = ConfigDict(extra="allow")

    image: str = Field(description="The image, base64 (a data: URL prefix is accepted).")
    upscaler_1: str | None = Field(default=None, description="Upscaler name (GET /sdapi/v1/upscalers).")
    upscaling_resize: float = Field(default=2.0, description="Scale factor (resize_mode 0).")
    resize_mode: int = Field(default=0, description="0: scale by upscaling_resize (the only mode served).")


# Extras that other A1111 post-processors would run; refused when they would change the image.
EXTRAS_UNSUPPORTED_WHEN_SET = ("gfpgan_visibility", "codeformer_visibility", "extras_upscaler_2_visibility")


class ImagesResponse(BaseModel):
    """What txt2img and img2img answer."""

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


def hires_upscaler(name: str | None) -> str | None:
    """A1111's ``hr_upscaler`` -> an upscaler of the catalog, or None to upscale the latents ('Latent' and its
    variants, 'None', or no name)."""
    if not name or name == "None" or name.lower().startswith("latent"):
        return None
    return name


@dataclass
class _Task:
    """One txt2img / img2img call, as /sdapi/v1/progress reports it."""

    job_count: int
    steps: int  # denoising steps of one image, over all its passes
    started: float = field(default_factory=time.time)
    job_no: int = 0
    step: dict[int, int] = field(default_factory=dict)  # image in the current batch -> steps done
    preview: bytes | None = None
    interrupted: bool = False
    running: set[asyncio.Task[Any]] = field(default_factory=set)
    tenant: str = ""  # progress and interrupt are the caller's tenant's only

    @property
    def sampling_step(self) -> int:
        return min(self.step.values(), default=0)


@dataclass(frozen=True)
class Img2ImgInput:
    """An img2img call's init image prepared A1111's way, and how each generated image is finished."""

    init: InitImage  # what the denoiser starts from, at the request's width x height
    base: np.ndarray  # (H, W, 3) uint8: what the outputs are composited into; its size is the returned size
    alpha: np.ndarray | None  # (H, W) float32: weight of the generated image over ``base``; None: no composite
    box: tuple[int, int, int, int] | None  # "only masked": (x1, y1, x2, y2) of ``base`` the generated image fills
    infotext: dict[str, Any]  # A1111's extra generation parameters

    @property
    def size(self) -> tuple[int, int]:
        return self.base.shape[1], self.base.shape[0]

    def finish(self, image: bytes) -> bytes:
        """A1111's "apply overlay": the generated image (resized into ``box`` for "only masked") over ``base``
        with ``alpha``, so a pixel the mask keeps is the init image's own rather than its trip through the VAE."""
        if self.alpha is None:
            return image
        generated = decode_image(image)
        if self.box is not None:
            x1, y1, x2, y2 = self.box
            pasted = self.base.copy()
            pasted[y1:y2, x1:x2] = uploads.fit(generated, x2 - x1, y2 - y1, "crop")
            generated = pasted
        alpha = self.alpha[..., None]
        composite = self.base * (1.0 - alpha) + generated * alpha
        return encode_image(np.rint(composite).astype(np.uint8), "png")


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

    def prepare(self, body: GenerationFields) -> GenerationRequest:
        """The native request for the fields txt2img and img2img share, checked by the same resolver as every other
        route; errors name A1111's fields. The prompt's ``<lora:...>`` tags become the request's adapters and are
        not encoded (as in A1111).

        Sizes that are not multiples of 8 are refused with a 422 naming ``width`` / ``height`` rather than
        rounded (A1111 silently floors them, so its output would not have the size asked for)."""
        extra = body.model_extra or {}
        for name, reason in body.refused.items():
            if extra.get(name):
                raise invalid(f"{name} {reason}", name)
        for name, value in (("width", body.width), ("height", body.height)):
            if value % 8:
                raise invalid(f"{name} {value} is not a multiple of 8", name)
        prompt, loras = lora_tags(body.prompt)
        try:
            native = ImageGenerationRequest(
                prompt=prompt,
                loras=loras or None,
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
            return self.service.prepare(native, styles=tuple(body.styles))
        except ValidationError as exc:
            raise _a1111_names(validation_error(exc.errors())) from exc
        except ApiError as err:
            raise _a1111_names(err) from err

    async def txt2img(self, body: Txt2ImgRequest) -> ImagesResponse:
        req = self.prepare(body)
        infotext: dict[str, Any] = {}
        info: dict[str, Any] = {}
        if body.enable_hr:
            req, infotext = self._hires(body, req)
            info = {"enable_hr": True, "hr_scale": body.hr_scale, "hr_upscaler": infotext["Hires upscaler"]}
        size = (req.hires.width, req.hires.height) if req.hires else (req.width, req.height)
        return await self._generate(body, req, body.model_dump(mode="json"), size, infotext, info)

    def _hires(self, body: Txt2ImgRequest, req: GenerationRequest) -> tuple[GenerationRequest, dict[str, Any]]:
        """``req`` with A1111's hires fix, and the infotext entries A1111 writes for it."""
        extra = body.model_extra or {}
        for name, first_pass in (
            ("hr_prompt", body.prompt),
            ("hr_negative_prompt", body.negative_prompt),
            ("hr_sampler_name", body.sampler_name or body.sampler_index),
            ("hr_scheduler", body.scheduler),
            ("hr_checkpoint_name", req.model),
        ):
            value = extra.get(name)
            if value and value != first_pass and not str(value).startswith("Use same"):
                raise invalid(f"{name}: the hires pass reuses the first pass's setting here; leave {name} out", name)
        strength = HIRES_STRENGTH if body.denoising_strength is None else body.denoising_strength
        resize = (body.hr_resize_x, body.hr_resize_y)
        param = "hr_resize_x" if body.hr_resize_x else "hr_resize_y" if body.hr_resize_y else "hr_scale"
        req = self.service.resolver.hires_fix(
            req, body.hr_scale, resize, hires_upscaler(body.hr_upscaler), body.hr_second_pass_steps, strength, param
        )
        hires = req.hires
        assert hires is not None
        infotext: dict[str, Any] = (
            {"Hires resize": f"{hires.width}x{hires.height}"} if any(resize) else {"Hires upscale": body.hr_scale}
        )
        if body.hr_second_pass_steps:
            infotext["Hires steps"] = hires.steps
        infotext["Hires upscaler"] = hires.upscaler or LATENT_UPSCALE_MODES[0]
        return req, infotext

    async def img2img(self, body: Img2ImgRequest) -> ImagesResponse:
        req = self.prepare(body)
        # Decoding, blurring and filling are CPU work: off the event loop every other request of the replica uses.
        prepared = await asyncio.to_thread(self._init_image, body, req)
        parameters = body.model_dump(mode="json")
        if not body.include_init_images:  # as A1111: the uploads are not echoed back unless asked for
            parameters.update(init_images=None, mask=None)
        req = replace(req, init=prepared.init)
        return await self._generate(body, req, parameters, prepared.size, prepared.infotext, finish=prepared.finish)

    def _init_image(self, body: Img2ImgRequest, req: GenerationRequest) -> Img2ImgInput:
        """Decode the upload (and mask) with the upload limits and prepare them as A1111's img2img does: the mask
        inverted (``inpainting_mask_invert``), blurred (``mask_blur``), then either the whole image fitted to the
        request's size by ``resize_mode``, or (``inpaint_full_res``) the mask's padded region cropped out and fitted
        to it; the region to repaint pre-filled from its surroundings with ``inpainting_fill`` 0."""
        if len(body.init_images) != 1:
            raise invalid(
                f"init_images holds {len(body.init_images)} images; send one (every image of the call starts from it)",
                "init_images",
            )
        strength = body.denoising_strength
        if not 0.0 < strength <= 1.0:
            raise invalid("denoising_strength must be above 0 and at most 1", "denoising_strength")
        if int(req.steps * strength) < 1:
            raise invalid(
                f"denoising_strength {strength:g} x {req.steps} steps leaves no step to run; raise either",
                "denoising_strength",
            )
        limits = self.service.config.limits
        bounds = {"max_bytes": limits.max_upload_bytes, "max_pixels": limits.max_upload_pixels}
        data = uploads.decode_base64(body.init_images[0], "init_images", limits.max_upload_bytes)
        rgb = uploads.read_image(data, "init_images", **bounds).rgb
        width, height = req.width, req.height
        if body.mask is None:
            pixels = uploads.fit(rgb, width, height, RESIZE_MODES[body.resize_mode])
            return Img2ImgInput(InitImage(pixels, None, strength), pixels, None, None, {})

        data = uploads.decode_base64(body.mask, "mask", limits.max_upload_bytes)
        mask = uploads.read_mask(data, "mask", source="luminance", **bounds)
        if mask.shape != rgb.shape[:2]:
            raise invalid(
                f"mask is {mask.shape[1]}x{mask.shape[0]} and the init image {rgb.shape[1]}x{rgb.shape[0]}; send "
                "them at one size",
                "mask",
            )
        infotext: dict[str, Any] = {}
        if body.inpainting_mask_invert:
            mask = 1.0 - mask
            infotext["Mask mode"] = "Inpaint not masked"
        if body.mask_blur:
            mask = _blur(mask, body.mask_blur)
            infotext["Mask blur"] = body.mask_blur
        if not (mask >= uploads.MASK_THRESHOLD).any():
            raise invalid(
                "mask marks nothing to repaint (after inpainting_mask_invert and mask_blur): its white pixels mark "
                "the region to repaint",
                "mask",
            )
        box = None
        if body.inpaint_full_res:
            box = x1, y1, x2, y2 = _crop_box(mask, body.inpaint_full_res_padding, width, height)
            pixels = uploads.fit(np.ascontiguousarray(rgb[y1:y2, x1:x2]), width, height, "fill")
            repaint = uploads.fit(np.ascontiguousarray(mask[y1:y2, x1:x2]), width, height, "fill")
            base, alpha = rgb, mask
            infotext |= {"Inpaint area": "Only masked", "Masked area padding": body.inpaint_full_res_padding}
        else:
            mode = RESIZE_MODES[body.resize_mode]
            pixels, repaint = uploads.fit(rgb, width, height, mode), uploads.fit(mask, width, height, mode)
            # A1111 doubles the mask for the overlay: every pixel the model repaints (mask >= 0.5) shows the
            # generated image alone, and the blur fades it out only beyond the mask's edge.
            base, alpha = pixels, np.clip(repaint * 2.0, 0.0, 1.0)
        if body.inpainting_fill == 0:
            pixels = _fill(pixels, repaint)
        # 2 (latent noise) and 3 (latent nothing) replace the masked latents in A1111; here the region starts from
        # the init image as with 1, and the infotext says so.
        infotext["Masked content"] = MASKED_CONTENT[0 if body.inpainting_fill == 0 else 1]
        return Img2ImgInput(InitImage(pixels, repaint, strength), base, alpha, box, infotext)

    async def _generate(
        self,
        body: GenerationFields,
        req: GenerationRequest,
        parameters: dict[str, Any],
        size: tuple[int, int],
        infotext: dict[str, Any],
        info: dict[str, Any] | None = None,
        finish: Callable[[bytes], bytes] | None = None,
    ) -> ImagesResponse:
        """Run ``n_iter`` batches of ``batch_size`` images and answer in A1111's shape.

        Args:
            parameters: the response's ``parameters`` (the request, echoed).
            size: (width, height) of the returned images.
            infotext: A1111's extra generation parameters (in ``info`` and in each infotext).
            info: further ``info`` entries.
            finish: applied to each returned image file (img2img's overlay), in a thread.
        """
        task = _Task(job_count=body.n_iter, steps=_steps_per_image(req), tenant=auth.current().tenant)
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
        if finish is not None:
            images = [await asyncio.to_thread(finish, img) for img in images]
        details = {**_info(body, req, seeds, version, task, size, infotext), **(info or {})}
        if req.safety is not None:
            details["nsfw"] = flags  # per returned image
            details["withheld"] = withheld
        return ImagesResponse(
            images=[base64.b64encode(img).decode("ascii") for img in images],
            parameters=parameters,
            info=json.dumps(details),
        )

    async def _one(self, task: _Task, index: int, req: GenerationRequest) -> Any:
        async def progress(update: DenoiseProgress) -> None:
            task.step[index] = update.step  # counts on across the hires fix's passes
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
        # Untrusted: decoded within the upload limits (bytes, declared pixels, formats) before anything else.
        limits = self.service.config.limits
        data = uploads.decode_base64(body.image, "image", limits.max_upload_bytes)
        image = await asyncio.to_thread(
            uploads.read_image, data, "image", max_bytes=limits.max_upload_bytes, max_pixels=limits.max_upload_pixels
        )
        pixels = image.rgb
        height, width = pixels.shape[:2]
        upscale = UpscaleRequest(model=body.upscaler_1, factor=body.upscaling_resize)
        try:
            req = self.service.resolver.resolve_postprocess(width, height, upscale, "png")
        except ApiError as err:
            raise _a1111_names(err, _EXTRAS_FIELDS) from err
        result = await self.service.postprocess(req, Pixels(pixels[None], model_version=""))
        return {"html_info": _extras_info(result), "image": base64.b64encode(result.delivered[0][0]).decode("ascii")}

    def upscalers(self) -> list[dict[str, Any]]:
        return [
            {"name": u.name, "model_name": u.name, "model_path": u.source, "model_url": None, "scale": None}
            for u in self.service.models.artifacts.get("upscalers", {}).values()
        ]

    def _mine(self) -> list[_Task]:
        """The running calls of the caller's tenant: another tenant's progress and calls are not its to see."""
        tenant = auth.current().tenant
        return [task for task in self.tasks if task.tenant == tenant]

    def progress(self, skip_current_image: bool) -> dict[str, Any]:
        mine = self._mine()
        task = mine[0] if mine else None
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
        """Stop the caller's running txt2img / img2img calls at their next denoising step; return how many."""
        mine = self._mine()
        for task in mine:
            task.interrupted = True
            for run in task.running:
                run.cancel()
        return len(mine)

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


# Native field -> the A1111 field a client sent it as (txt2img / img2img; extra-single-image).
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


def lora_tags(prompt: str) -> tuple[str, list[LoraRequest]]:
    """A1111's ``<lora:name:weight>`` tags of ``prompt``: the prompt without them, and the adapters they name
    (other extra networks, e.g. ``<hypernet:...>``, are refused: this service does not serve them)."""
    loras: list[LoraRequest] = []

    def take(match: re.Match[str]) -> str:
        kind, args = match.group(1), match.group(2).split(":")
        if kind != "lora":
            raise invalid(f"extra network <{kind}:...> is not served; only <lora:name:weight>", "prompt")
        if len(args) > 2:
            raise invalid(f"<lora:{match.group(2)}>: a separate UNet weight is not supported", "prompt")
        try:
            scale = float(args[1]) if len(args) == 2 else 1.0
        except ValueError:
            raise invalid(f"<lora:{match.group(2)}>: the weight must be a number", "prompt") from None
        loras.append(LoraRequest(name=args[0].strip(), scale=scale))
        return ""

    stripped = _EXTRA_NETWORK.sub(take, prompt)
    return (" ".join(stripped.split()) if loras else stripped), loras


def _steps_per_image(req: GenerationRequest) -> int:
    """Denoising steps one image of ``req`` runs over all its passes, as /sdapi/v1/progress counts them."""
    return plan_generation(req).total_steps


def _info(
    body: GenerationFields,
    req: GenerationRequest,
    seeds: list[int],
    version: str,
    task: _Task,
    size: tuple[int, int],
    infotext: dict[str, Any],
) -> dict[str, Any]:
    """A1111's ``info``. ``width`` / ``height`` are the returned images' size; each infotext keeps A1111's
    ``Size`` (the size sampled at, before a hires pass), so pasting it into A1111 asks for the same call."""
    label = SCHEDULERS[req.scheduler].label
    strength = req.init.strength if req.init else req.hires.strength if req.hires else None
    tail: dict[str, Any] = {"Size": f"{req.width}x{req.height}", "Model": req.model}
    if strength is not None:
        tail["Denoising strength"] = f"{strength:g}"
    if req.loras:  # A1111 writes each adapter's short hash; the pinned reference says exactly which file it was
        tail["Lora hashes"] = json.dumps(", ".join(f"{a.name}: {a.ref}" for a in req.loras))
    tail |= {**infotext, "Version": "sdserve"}
    settings = ", ".join(f"{key}: {value}" for key, value in tail.items())
    infotexts = [
        f"{body.prompt}\nNegative prompt: {req.negative_prompt or ''}\nSteps: {req.steps}, Sampler: {label}, "
        f"CFG scale: {req.guidance_scale:g}, Seed: {seed}, {settings}"
        for seed in seeds
    ]
    return {
        "prompt": body.prompt,
        "all_prompts": [body.prompt] * len(seeds),
        "negative_prompt": body.negative_prompt,
        "all_negative_prompts": [body.negative_prompt] * len(seeds),
        "seed": seeds[0] if seeds else req.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0,
        "width": size[0],
        "height": size[1],
        "sampler_name": label,
        "cfg_scale": req.guidance_scale,
        "steps": req.steps,
        "batch_size": body.batch_size,
        "restore_faces": False,
        "sd_model_name": req.model,
        "sd_model_hash": version or None,
        "denoising_strength": strength,
        "extra_generation_params": infotext,
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": list(req.styles),
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(task.started)),
        "clip_skip": 1,
        "interrupted": task.interrupted,
        "version": "sdserve",
    }


def _blur(mask: np.ndarray, radius: int) -> np.ndarray:
    """A1111's ``mask_blur``: PIL's Gaussian blur of the 8-bit mask."""
    blurred = Image.fromarray(np.rint(mask * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(blurred, dtype=np.float32) / 255.0


def _fill(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A1111's "fill" masked content (``masking.fill``): the region to repaint painted over with ever less blurred
    copies of the pixels the mask keeps, so it starts from its surroundings' colours rather than its own."""
    size = (rgb.shape[1], rgb.shape[0])
    keep = Image.fromarray(np.rint((1.0 - mask) * 255).astype(np.uint8))
    kept = Image.new("RGBa", size)  # premultiplied, so blurring does not bleed the cut-out pixels' colour
    kept.paste(Image.fromarray(rgb).convert("RGBA").convert("RGBa"), mask=keep)
    filled = Image.new("RGBA", size)
    for radius, repeats in _FILL_LAYERS:
        layer = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            filled.alpha_composite(layer)
    return np.asarray(filled.convert("RGB")).copy()


def _crop_box(mask: np.ndarray, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """A1111's "only masked" region (``get_crop_region`` + ``expand_crop_region``): the bounding box of the
    mask's non-zero pixels with ``padding`` around it, grown on its short side to the aspect ratio of
    width x height and kept inside the image; (x1, y1, x2, y2), x2 / y2 exclusive."""
    image_h, image_w = mask.shape
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    x1, x2 = max(int(cols[0]) - padding, 0), min(int(cols[-1]) + 1 + padding, image_w)
    y1, y2 = max(int(rows[0]) - padding, 0), min(int(rows[-1]) + 1 + padding, image_h)
    if (x2 - x1) * height > (y2 - y1) * width:  # wider than the request: take more rows
        y1, y2 = _grow(y1, y2, int((x2 - x1) * height / width), image_h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * width / height), image_w)
    return x1, y1, x2, y2


def _grow(start: int, stop: int, length: int, limit: int) -> tuple[int, int]:
    """[start, stop) widened about its centre to ``length``, shifted back inside [0, limit) and cut at its end."""
    extra = length - (stop - start)
    start, stop = start - extra // 2, stop + extra - extra // 2
    if stop > limit:
        start, stop = start - (stop - limit), limit
    if start < 0:
        start, stop = 0, min(stop - start, limit)
    return start, stop


def create_router(api: A1111Api) -> APIRouter:
    """The ``/sdapi/v1`` routes (thin: they call ``A1111Api``)."""
    router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111 compatible"])

    @router.post("/txt2img", response_model=ImagesResponse)
    async def txt2img(body: Txt2ImgRequest = Body(...)) -> ImagesResponse:  # noqa: B008
        return await api.txt2img(body)

    @router.post("/img2img", response_model=ImagesResponse)
    async def img2img(body: Img2ImgRequest = Body(...)) -> ImagesResponse:  # noqa: B008
        return await api.img2img(body)

    @router.post("/extra-single-image")
    async def extra_single_image(body: ExtraSingleImageRequest = Body(...)) -> dict[str, Any]:  # noqa: B008
        return await api.extra_single_image(body)

    @router.get("/upscalers")
    async def upscalers() -> list[dict[str, Any]]:
        return api.upscalers()

    @router.get("/prompt-styles")
    async def prompt_styles() -> list[dict[str, Any]]:
        """The style presets, as A1111 lists its styles (`{prompt}` marks where the prompt goes)."""
        presets = api.service.resolver.presets.all().values()
        return [{"name": p.name, "prompt": p.prompt, "negative_prompt": p.negative_prompt or ""} for p in presets]

    @router.get("/loras")
    async def loras() -> list[dict[str, Any]]:
        """The adapters prompts may name with `<lora:name:weight>`, as A1111 lists its LoRA files."""
        return [
            {"name": a["name"], "alias": a["name"], "path": a["ref"] or a["source"], "metadata": {}}
            for a in api.service.models.describe_adapters()
        ]

    @router.post("/refresh-loras")
    async def refresh_loras() -> None:
        """Pin every adapter's reference again (a hub branch that moved serves its new commit)."""
        await api.service.rollout.pin_adapters()

    @router.get("/latent-upscale-modes")
    async def latent_upscale_modes() -> list[dict[str, Any]]:
        """The hires fix's latent upscalers (A1111 lists them apart from /upscalers)."""
        return [{"name": name} for name in LATENT_UPSCALE_MODES]

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
