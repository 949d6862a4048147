"""``RequestResolver``: a wire request becomes a ``GenerationRequest`` with every default filled in and every
configured limit checked.

This is the one place request limits live: the wire schemas check only shape and type, so the bounds come
from ``AppConfig.limits`` alone (raising ``limits.max_steps`` in the config is all it takes). Plain Python,
no Ray: unit tests drive it directly.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from models.contracts import OutputFormat, SafetyParams, UpscaleParams
from serving.config import SAFETY_STRICTNESS, AppConfig, SafetyMode
from serving.errors import ApiError, invalid
from serving.schemas import ImageGenerationRequest, UpscaleRequest

if TYPE_CHECKING:
    from serving.rollout import ModelCatalogState

# A CLIP token covers at most this many characters of a prompt (the longest entries of CLIP's vocabulary are
# well under it), so a text longer than ``max_prompt_tokens * CHARS_PER_TOKEN`` cannot fit and is refused
# before anything tokenizes it: a 10 MB prompt costs a length check, not seconds of the encoder's time.
CHARS_PER_TOKEN = 32


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


class RequestResolver:
    """Defaults and limits from the config, models from the live catalog."""

    def __init__(self, config: AppConfig, models: ModelCatalogState) -> None:
        self.config = config
        self.models = models

    def resolve(self, req: ImageGenerationRequest) -> GenerationRequest:
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
        width, height = (int(v) for v in (req.size or defaults.size).split("x"))
        for name, value in (("width", width), ("height", height)):
            if not limits.min_size <= value <= limits.max_size:
                raise invalid(f"{name} {value} is outside {limits.min_size}-{limits.max_size}", "size")
        steps = req.steps if req.steps is not None else defaults.steps
        if steps > limits.max_steps:
            raise invalid(f"steps must be at most {limits.max_steps}", "steps")
        if req.n > limits.max_images:
            raise invalid(f"n must be at most {limits.max_images}", "n")
        guidance = req.guidance_scale if req.guidance_scale is not None else defaults.guidance_scale
        if guidance > limits.max_guidance_scale:
            raise invalid(f"guidance_scale must be at most {limits.max_guidance_scale:g}", "guidance_scale")
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
        )

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
