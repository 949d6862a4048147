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

from models.contracts import OutputFormat, UpscaleParams
from serving.config import AppConfig
from serving.errors import ApiError, invalid
from serving.schemas import ImageGenerationRequest

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
