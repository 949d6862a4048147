"""``RequestResolver``: a wire request becomes a ``GenerationRequest`` with every default filled in and every
configured limit checked.

This is the one place request limits live: the wire schemas check only shape and type, so the bounds come
from ``AppConfig.limits`` alone (raising ``limits.max_steps`` in the config is all it takes). Plain Python,
no Ray: unit tests drive it directly.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import numpy as np

from models.contracts import AdapterUse, OutputFormat, SafetyParams, UpscaleParams
from serving import uploads
from serving.config import SAFETY_STRICTNESS, AppConfig, SafetyMode
from serving.errors import ApiError, invalid
from serving.outputs import IMAGE_ID_PATTERN
from serving.schemas import ImageGenerationRequest, LoraRequest, UpscaleRequest
from serving.stages import ADAPTER_CATALOG

if TYPE_CHECKING:
    from serving.rollout import ModelCatalogState

# A CLIP token covers at most this many characters of a prompt (the longest entries of CLIP's vocabulary are
# well under it), so a text longer than ``max_prompt_tokens * CHARS_PER_TOKEN`` cannot fit and is refused
# before anything tokenizes it: a 10 MB prompt costs a length check, not seconds of the encoder's time.
CHARS_PER_TOKEN = 32

# Strength when a request leaves it out: A1111's denoising_strength default with only an init image; a full
# repaint with a mask (diffusers' inpaint default, and what an inpainting model is trained for).
IMG2IMG_STRENGTH = 0.75
INPAINT_STRENGTH = 1.0
_IMAGE_ID = re.compile(IMAGE_ID_PATTERN)

MaskSource = Literal["luminance", "alpha"]


@dataclass(frozen=True)
class InitImage:
    """The image an image-to-image or inpainting request starts from, decoded and fitted to the request's size."""

    pixels: np.ndarray  # (height, width, 3) uint8
    mask: np.ndarray | None  # (height, width) float32, 1 = repaint; None: image to image
    strength: float


@dataclass(frozen=True)
class HiresFix:
    """A1111's hires fix: after the first pass, upscale to (width, height) and refine with an image-to-image pass."""

    width: int
    height: int
    steps: int
    strength: float
    upscaler: str | None  # an upscaler of the catalog; None: upscale the latents


@dataclass(frozen=True)
class GenerationRequest:
    """A request with every default filled in and every limit checked; transport-neutral."""

    model: str
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_images: int
    steps: int
    guidance_scale: float
    scheduler: str
    seed: int
    output_format: OutputFormat
    quality: int | None = None
    user: str | None = None
    ref: str = ""  # the pinned model reference this request runs on (every stage uses the same version)
    upscale: UpscaleParams | None = None
    safety: SafetyParams | None = None  # None: no safety check
    init: InitImage | None = None  # image to image / inpainting
    hires: HiresFix | None = None
    styles: tuple[str, ...] = ()  # the style presets applied (already folded into the fields above)
    loras: tuple[AdapterUse, ...] = ()  # LoRA adapters, each with the pinned reference the stages load


class RequestResolver:
    """Defaults and limits from the config, models from the live catalog.

    ``lookup_image`` finds an image this service produced by its id (``init_image`` may name one instead of
    carrying the file); None: only inline images are accepted.
    """

    def __init__(self, config: AppConfig, models: ModelCatalogState) -> None:
        from serving.presets import PresetLibrary

        self.config = config
        self.models = models
        self.lookup_image: Callable[[str], bytes | None] | None = None
        self.presets = PresetLibrary(config.styles)

    def resolve(
        self,
        req: ImageGenerationRequest,
        image: bytes | None = None,
        mask: bytes | None = None,
        mask_source: MaskSource = "luminance",
        styles: tuple[str, ...] = (),
    ) -> GenerationRequest:
        """Check ``req`` and fill its defaults. ``image`` / ``mask``: uploaded files that take the place of
        ``req.init_image`` / ``req.mask`` (multipart and gRPC carry bytes); ``mask_source`` says how a mask marks
        the region to repaint (white pixels, or OpenAI's transparent ones); ``styles``: presets applied after
        ``req.style`` (A1111's ``styles`` list)."""
        names = (*((req.style,) if req.style else ()), *styles)
        req = self.apply_styles(req, names, "style" if req.style else "styles")
        limits, defaults = self.config.limits, self.config.defaults
        model = req.model or self.models.default
        if model is None or model not in self.models.specs:
            raise ApiError(404, "model_not_found", f"model {model!r} is not served; see GET /v1/models", "model")
        ref = self.models.active.get(model)
        if ref is None:
            raise ApiError(
                503, "model_unavailable", f"model {model!r} has no loaded version: {self.models.errors.get(model)}"
            )
        max_chars = limits.max_prompt_tokens * CHARS_PER_TOKEN
        for name, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt or "")):
            # Runs of whitespace count once, as CLIP's text cleaning collapses them.
            if len(text) > max_chars and (length := len(" ".join(text.split()))) > max_chars:
                raise invalid(
                    f"{name} has {length} characters; at most {max_chars} "
                    f"({limits.max_prompt_tokens} CLIP tokens) are accepted",
                    name,
                )
        steps = req.steps if req.steps is not None else defaults.steps
        if steps > limits.max_steps:
            raise invalid(f"steps must be at most {limits.max_steps}", "steps")
        if req.n > limits.max_images:
            raise invalid(f"n must be at most {limits.max_images}", "n")
        guidance = req.guidance_scale if req.guidance_scale is not None else defaults.guidance_scale
        if guidance > limits.max_guidance_scale:
            raise invalid(f"guidance_scale must be at most {limits.max_guidance_scale:g}", "guidance_scale")
        if req.size:
            asked_w, asked_h = (int(v) for v in req.size.split("x"))
            self.check_size(asked_w, asked_h)
        # Uploads last: the cheap checks above refuse a bad request before any image is decoded.
        if image is None and req.init_image is not None:
            image = self.upload(req.init_image, "init_image")
        if mask is None and req.mask is not None:
            mask = self.upload(req.mask, "mask")
        if image is None and (mask is not None or req.strength is not None):
            raise invalid("`mask` and `strength` need an init image", "init_image")
        init = None
        if image is not None:
            init, width, height = self.init_image(req, image, mask, mask_source)
            if int(steps * init.strength) < 1:
                raise invalid(
                    f"strength {init.strength:g} x {steps} steps leaves no step to run; raise either", "strength"
                )
        else:
            width, height = (int(v) for v in (req.size or defaults.size).split("x"))
        self.check_size(width, height)
        return GenerationRequest(
            upscale=self.upscale(req.upscale, width, height),
            safety=self.safety(req.safety),
            model=model,
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            width=width,
            height=height,
            num_images=req.n,
            steps=steps,
            guidance_scale=guidance,
            scheduler=req.scheduler or defaults.scheduler,
            seed=req.seed if req.seed is not None else secrets.randbelow(2**32),
            output_format=req.output_format or defaults.output_format,
            quality=req.output_compression,
            user=req.user,
            ref=ref,
            init=init,
            styles=names,
            loras=self.adapters(req.loras or []),
        )

    def adapters(self, asked: list[LoraRequest], param: str = "loras") -> tuple[AdapterUse, ...]:
        """The adapters a request names, checked against the catalog (404 ``lora_not_found``) and the limits."""
        limits, spec = self.config.limits, self.config.lora
        if len(asked) > limits.max_loras:
            raise invalid(f"at most {limits.max_loras} LoRA adapters per request (limits.max_loras)", param)
        catalog = self.models.artifacts.get(ADAPTER_CATALOG, {})
        uses: dict[str, AdapterUse] = {}
        for i, lora in enumerate(asked):
            if lora.name not in catalog:
                raise ApiError(
                    404, "lora_not_found", f"LoRA {lora.name!r} is not served; see GET /v1/loras", f"{param}[{i}].name"
                )
            if not (math.isfinite(lora.scale) and spec.min_scale <= lora.scale <= spec.max_scale):
                raise invalid(
                    f"LoRA scale {lora.scale:g} is outside {spec.min_scale:g} to {spec.max_scale:g} "
                    "(lora.min_scale, lora.max_scale)",
                    f"{param}[{i}].scale",
                )
            if lora.name in uses:
                raise invalid(f"LoRA {lora.name!r} is named twice", f"{param}[{i}].name")
            ref = self.models.adapters.get(lora.name)
            if ref is None:
                error = self.models.adapter_errors.get(lora.name, "not pinned yet")
                raise ApiError(503, "lora_unavailable", f"LoRA {lora.name!r} cannot be loaded: {error}", param)
            uses[lora.name] = AdapterUse(lora.name, ref, lora.scale)
        return tuple(uses.values())

    def apply_styles(self, req: ImageGenerationRequest, names: tuple[str, ...], param: str) -> ImageGenerationRequest:
        """``req`` with the presets ``names`` applied in order: each wraps the prompt in its template and fills
        the fields the request (and earlier presets) left unset. 404 ``style_not_found`` for an unknown name."""
        for name in names:
            spec = self.presets.get(name)
            if spec is None:
                raise ApiError(
                    404, "style_not_found", f"style {name!r} is not a preset of this service; see GET /v1/styles", param
                )
            template = spec.prompt if "{prompt}" in spec.prompt else f"{{prompt}}, {spec.prompt}"
            update: dict[str, object] = {"prompt": template.replace("{prompt}", req.prompt)}
            if spec.negative_prompt:
                asked = req.negative_prompt or ""
                if "{prompt}" in spec.negative_prompt:
                    update["negative_prompt"] = spec.negative_prompt.replace("{prompt}", asked)
                else:
                    update["negative_prompt"] = ", ".join(p for p in (asked, spec.negative_prompt) if p)
            for field in ("model", "size", "steps", "guidance_scale", "scheduler"):
                if getattr(req, field) is None and getattr(spec, field) is not None:
                    update[field] = getattr(spec, field)
            if req.upscale is None and spec.upscale is not None:
                update["upscale"] = UpscaleRequest(model=spec.upscale.model, factor=spec.upscale.factor)
            if req.loras is None and spec.loras is not None:
                update["loras"] = [LoraRequest(name=lora.name, scale=lora.scale) for lora in spec.loras]
            req = req.model_copy(update=update)
        return req

    def check_size(self, width: int, height: int, param: str = "size") -> None:
        limits = self.config.limits
        for name, value in (("width", width), ("height", height)):
            if not limits.min_size <= value <= limits.max_size:
                raise invalid(f"{name} {value} is outside {limits.min_size}-{limits.max_size}", param)

    def upload(self, value: str, param: str) -> bytes:
        """An image field's file: base64 (a data URL too), or the id of an image this service produced."""
        if _IMAGE_ID.fullmatch(value):
            found = self.lookup_image(value) if self.lookup_image is not None else None
            if found is None:
                raise invalid(f"{param}: no image with id {value!r} (it expired, or was not made here)", param)
            return found
        return uploads.decode_base64(value, param, self.config.limits.max_upload_bytes)

    def init_image(
        self, req: ImageGenerationRequest, image: bytes, mask: bytes | None, mask_source: MaskSource
    ) -> tuple[InitImage, int, int]:
        """Decode the init image (and mask) with the upload limits, fit them to the request's size (``size``, or
        the image's own rounded down to multiples of 8) by ``resize_mode``; (init, width, height)."""
        limits = self.config.limits
        bounds = {"max_bytes": limits.max_upload_bytes, "max_pixels": limits.max_upload_pixels}
        decoded = uploads.read_image(image, "init_image", **bounds)
        rgb = decoded.rgb
        alpha_mask = None
        if mask is not None:
            repaint = uploads.read_mask(mask, "mask", source=mask_source, **bounds)
        elif mask_source == "alpha" and decoded.alpha is not None and (decoded.alpha == 0).any():
            repaint = alpha_mask = uploads.mask_from_alpha(decoded, "image")  # OpenAI: the image's own transparency
        else:
            repaint = None
        if repaint is not None and repaint.shape != rgb.shape[:2] and req.resize_mode is None:
            raise invalid(
                f"the mask is {repaint.shape[1]}x{repaint.shape[0]} and the image {rgb.shape[1]}x{rgb.shape[0]}; "
                "send them at one size, or set resize_mode",
                "mask",
            )
        if req.size:
            width, height = (int(v) for v in req.size.split("x"))
        else:
            width, height = uploads.snap_size(rgb.shape[1], rgb.shape[0])
        self.check_size(width, height, "size" if req.size else "init_image")
        mode = req.resize_mode or "resize"
        rgb = uploads.fit(rgb, width, height, mode)
        if repaint is not None:
            repaint = uploads.fit(repaint, width, height, mode)
            uploads.check_mask(repaint, "image" if alpha_mask is not None else "mask")
        strength = req.strength
        if strength is None:
            strength = IMG2IMG_STRENGTH if repaint is None else INPAINT_STRENGTH
        if not 0.0 < strength <= 1.0:
            raise invalid("strength must be above 0 and at most 1", "strength")
        return InitImage(rgb, repaint, strength), width, height

    def hires_fix(
        self,
        req: GenerationRequest,
        scale: float,
        resize: tuple[int, int],
        upscaler: str | None,
        steps: int,
        strength: float,
        param: str = "hr_scale",
    ) -> GenerationRequest:
        """``req`` with a hires pass (A1111's ``enable_hr``): target size from ``resize`` (width, height; 0 keeps
        the aspect, both 0 use ``scale``), rounded down to multiples of 8; ``steps`` 0: the first pass's count."""
        if req.init is not None:
            raise invalid("the hires fix is for text to image; leave out init_image", "enable_hr")
        rx, ry = resize
        limit = self.config.limits.max_size
        if not math.isfinite(scale) or scale > limit:
            raise invalid("hr_scale must be a finite number", param)
        for name, value in (("hr_resize_x", rx), ("hr_resize_y", ry)):
            if value > limit:
                raise invalid(f"{name} {value} is above limits.max_size ({limit})", name)
        if rx <= 0 and ry <= 0:
            if scale <= 1.0 and scale != 1.0:
                raise invalid("hr_scale must be at least 1", param)
            rx, ry = round(req.width * scale), round(req.height * scale)
        elif rx <= 0:
            rx = round(req.width * ry / req.height)
        elif ry <= 0:
            ry = round(req.height * rx / req.width)
        width, height = uploads.snap_size(rx, ry)
        self.check_size(width, height, param)
        steps = steps or req.steps
        max_steps = self.config.limits.max_steps
        if steps > max_steps:
            raise invalid(f"hr_second_pass_steps must be at most {max_steps}", "hr_second_pass_steps")
        if not 0.0 < strength <= 1.0:
            raise invalid("denoising_strength must be above 0 and at most 1", "denoising_strength")
        if int(steps * strength) < 1:
            raise invalid(f"denoising_strength {strength:g} x {steps} steps leaves no step", "denoising_strength")
        if upscaler is not None:
            upscalers = self.models.artifacts.get("upscalers", {})
            if upscaler not in upscalers:
                raise ApiError(404, "upscaler_not_found", f"upscaler {upscaler!r} is not served", "hr_upscaler")
            factor = width / req.width
            if not 1.0 < factor <= self.config.limits.max_upscale_factor:
                raise invalid(
                    f"an upscaler enlarges by more than 1 and at most {self.config.limits.max_upscale_factor:g} "
                    f"(limits.max_upscale_factor), not {factor:g}; use a latent upscale for this size",
                    param,
                )
        if req.upscale is not None:
            req = replace(req, upscale=self.upscale_checked(req.upscale, width, height))
        return replace(req, hires=HiresFix(width, height, steps, strength, upscaler))

    def upscale_checked(self, up: UpscaleParams, width: int, height: int) -> UpscaleParams:
        pixels = round(width * up.factor) * round(height * up.factor)
        if pixels > self.config.limits.max_output_pixels:
            raise invalid(f"upscaling {width}x{height} by {up.factor:g} gives too many pixels", "upscale.factor")
        return up

    def resolve_postprocess(
        self, width: int, height: int, upscale: UpscaleRequest | None, output_format: OutputFormat
    ) -> GenerationRequest:
        """A request that only post-processes an image the client sent (no model, no denoising)."""
        return GenerationRequest(
            model="",
            prompt="",
            negative_prompt=None,
            width=width,
            height=height,
            num_images=1,
            steps=0,
            guidance_scale=0.0,
            scheduler="",
            seed=0,
            output_format=output_format,
            upscale=self.upscale(upscale, width, height),
            safety=self.safety(None),
        )

    def upscale(self, req: UpscaleRequest | None, width: int, height: int) -> UpscaleParams | None:
        """The upscale a request asks for, checked against the catalog and the limits (None: no upscale)."""
        if req is None:
            return None
        limits = self.config.limits
        upscalers = self.models.artifacts.get("upscalers", {})
        if not upscalers:
            raise invalid("this service has no upscaler configured; leave out `upscale`", "upscale")
        name = req.model or next(iter(upscalers))
        if name not in upscalers:
            raise ApiError(
                404, "upscaler_not_found", f"upscaler {name!r} is not served; see GET /v1/upscalers", "upscale.model"
            )
        if not 1.0 < req.factor <= limits.max_upscale_factor:
            raise invalid(f"upscale.factor must be above 1 and at most {limits.max_upscale_factor:g}", "upscale.factor")
        pixels = round(width * req.factor) * round(height * req.factor)
        if pixels > limits.max_output_pixels:
            raise invalid(
                f"upscaling {width}x{height} by {req.factor:g} gives {pixels} pixels; at most "
                f"{limits.max_output_pixels} (limits.max_output_pixels)",
                "upscale.factor",
            )
        return UpscaleParams(name, req.factor)

    def safety(self, asked: SafetyMode | None) -> SafetyParams | None:
        """The safety check a request runs with: the service's mode, or the request's when that is stricter (or
        the operator lets requests relax it)."""
        spec = self.config.safety
        mode = spec.mode
        if asked is not None and asked != mode:
            if SAFETY_STRICTNESS[asked] < SAFETY_STRICTNESS[mode] and not spec.allow_request_off:
                raise invalid(f"this service does not let a request relax its safety check ({mode})", "safety")
            mode = asked
        if mode == "off":
            return None
        checkers = self.models.artifacts.get("safety_checkers", {})
        if not checkers:
            if asked is None:  # the operator's setting, not the client's request: a server-side problem
                raise ApiError(503, "stage_unavailable", f"safety.mode is {mode} but no safety checker is configured")
            raise invalid("this service has no safety checker configured", "safety")
        return SafetyParams(next(iter(checkers)), mode)
