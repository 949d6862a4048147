"""Wire schemas of the REST API: the OpenAI Images API request and response, plus sdserve's extensions.

Only shape and type are checked here (strict types: a JSON ``true`` is not a number, ``"2"`` is not an integer).
Every bound a deployment can change (steps, images, guidance, size, prompt length) is ``AppConfig.limits``,
checked once by ``RequestResolver``, so raising a limit in the config is all it takes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.schedulers import SCHEDULERS
from serving.config import SafetyMode

MAX_SEED = 2**63 - 1


class UpscaleRequest(BaseModel):
    """The ``upscale`` extension: upscale the generated images before they are returned."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(default=None, description="Upscaler from GET /v1/upscalers; the first if unset.")
    factor: float = Field(
        default=2.0, description="Output size / generated size (at most limits.max_upscale_factor); e.g. 4."
    )


class LoraRequest(BaseModel):
    """One LoRA adapter a request applies."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(description="Adapter name from GET /v1/loras.")
    scale: float = Field(default=1.0, description="How strongly it applies (within lora.min_scale-lora.max_scale).")


class ImageGenerationRequest(BaseModel):
    """``POST /v1/images/generations`` (OpenAI Images API, with Stable Diffusion extensions)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(description="What to draw; an empty prompt samples unconditionally.")
    model: str | None = Field(default=None, description="Model name from GET /v1/models; the default model if unset.")
    n: int = Field(default=1, ge=1, description="Number of images (at most limits.max_images).")
    size: str | None = Field(
        default=None, description="WIDTHxHEIGHT in pixels, multiples of 8 (e.g. 512x512); the default if unset."
    )
    response_format: Literal["b64_json", "url"] = Field(
        default="b64_json", description="b64_json: the image inline; url: a link to GET /v1/images/{id}."
    )
    user: str | None = Field(default=None, max_length=256, description="End-user id, logged for abuse tracing.")
    # OpenAI fields accepted for compatibility; they do not change the result.
    quality: str | None = Field(default=None, description="Accepted for OpenAI compatibility; ignored.")
    style: str | None = Field(
        default=None,
        description="Style preset (GET /v1/styles): a prompt template, negative prompt and defaults; request "
        "fields override it. OpenAI's `vivid` and `natural` are built in.",
    )
    # Stable Diffusion extensions.
    negative_prompt: str | None = Field(default=None, description="What to steer away from.")
    steps: int | None = Field(default=None, ge=1, description="Denoising steps (at most limits.max_steps).")
    guidance_scale: float | None = Field(
        default=None, ge=0, description="Classifier-free guidance (at most limits.max_guidance_scale)."
    )
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, description="Random seed; the same request and seed give the same image."
    )
    scheduler: str | None = Field(default=None, description="Sampler name from GET /v1/schedulers.")
    output_format: Literal["png", "jpeg", "webp"] | None = Field(default=None, description="Image file format.")
    output_compression: int | None = Field(
        default=None, ge=0, le=100, description="JPEG / WebP quality 0-100 (OpenAI's name for it)."
    )
    upscale: UpscaleRequest | None = Field(default=None, description="Upscale the images before returning them.")
    init_image: str | None = Field(
        default=None,
        description="Image to image: the image to start from, base64 PNG / JPEG / WebP (a data URL too) or the id "
        "of an image this service made (`<id>` of a /v1/images/<id> url). The output has `size`, else the "
        "image's size rounded down to multiples of 8.",
    )
    mask: str | None = Field(
        default=None,
        description="Inpainting: a mask image (base64 or image id) whose white pixels mark the region to repaint; "
        "the same size as the init image unless resize_mode is set.",
    )
    strength: float | None = Field(
        default=None,
        description="How much of the init image to repaint, (0, 1]: int(steps * strength) steps run. Default 0.75, "
        "or 1 with a mask.",
    )
    resize_mode: Literal["resize", "crop", "fill"] | None = Field(
        default=None,
        description="How an init image (and mask) of another size or aspect ratio fits `size`: stretch (resize, "
        "the default), scale to cover and crop the centre (crop), or scale to fit and fill the borders (fill).",
    )
    safety: SafetyMode | None = Field(
        default=None,
        description="Safety check for this request; unset: the service's safety.mode. A less strict mode than the "
        "service's is refused unless the operator allows it.",
    )
    loras: list[LoraRequest] | None = Field(
        default=None,
        description="LoRA adapters to apply, each with a scale (at most limits.max_loras); requests with different "
        'adapters share UNet calls. With the OpenAI SDK: `extra_body={"loras": [...]}`.',
    )

    @field_validator("size")
    @classmethod
    def _size_shape(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = value.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError("size must look like WIDTHxHEIGHT, e.g. 512x512")
        width, height = (int(p) for p in parts)
        if width % 8 or height % 8:
            raise ValueError("width and height must be multiples of 8")
        return f"{width}x{height}"

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str | None) -> str | None:
        if value is not None and value not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {value!r}; choose from {', '.join(sorted(SCHEDULERS))}")
        return value


class ImageData(BaseModel):
    """One generated image."""

    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    flagged: bool | None = Field(default=None, description="The safety checker's verdict (when the check ran).")


class UpscaleSettings(BaseModel):
    model: str
    factor: float


class SafetySettings(BaseModel):
    mode: Literal["flag", "block"]
    checker: str
    withheld: int = Field(description="Flagged images left out of `data` (block mode).")


class HiresSettings(BaseModel):
    size: str = Field(description="Size of the second pass (the returned size before any upscale).")
    steps: int
    denoising_strength: float
    upscaler: str = Field(description="`latent`, or the upscaler that enlarged the first pass.")


class LoraSettings(BaseModel):
    name: str
    scale: float
    ref: str = Field(description="The pinned reference of the adapter version that was applied.")


class GenerationSettings(BaseModel):
    """What a Stable Diffusion user needs to reproduce a result (shared by image and job responses)."""

    model: str
    model_version: str
    seed: int
    size: str
    steps: int
    guidance_scale: float
    scheduler: str
    output_format: str
    timings_ms: dict[str, float]
    upscale: UpscaleSettings | None = None
    safety: SafetySettings | None = None
    strength: float | None = Field(default=None, description="With an init image: the strength it ran with.")
    inpainting: bool | None = Field(default=None, description="With an init image: whether a mask was applied.")
    hires: HiresSettings | None = None
    styles: list[str] | None = Field(default=None, description="The style presets applied, in order.")
    loras: list[LoraSettings] | None = Field(default=None, description="The LoRA adapters applied.")


class ImageGenerationResponse(GenerationSettings):
    """OpenAI-compatible response, plus the settings that reproduce the result."""

    created: int
    data: list[ImageData]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "sdserve"
    description: str = ""
    ref: str | None = Field(default=None, description="The model reference as configured.")
    serving: str | None = Field(default=None, description="The pinned reference new requests run on.")
    version: str | None = Field(default=None, description="Content id of the served version, once known.")
    error: str | None = Field(default=None, description="Why the configured reference is not (yet) served.")


class LoraCard(BaseModel):
    name: str
    source: str = Field(description="The adapter reference as configured.")
    ref: str | None = Field(default=None, description="The pinned reference requests load.")
    description: str = ""
    error: str | None = Field(default=None, description="Why the reference could not be pinned.")


class LoraList(BaseModel):
    object: Literal["list"] = "list"
    data: list[LoraCard]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    code: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    """The one error shape every failure uses."""

    error: ErrorDetail


class JobRequest(ImageGenerationRequest):
    """``POST /v1/jobs``: the same fields as ``POST /v1/images/generations``, plus ``preview``. Results are
    always served as urls (``response_format`` is ignored)."""

    preview: bool = Field(default=False, description="Attach a low-resolution preview to each step event.")


class JobProgress(BaseModel):
    step: int = Field(description="Denoising steps done.")
    total_steps: int


class JobImage(BaseModel):
    url: str
    flagged: bool | None = Field(default=None, description="The safety checker's verdict (when the check ran).")


class JobImages(GenerationSettings):
    """What a succeeded job made: image urls and the settings that reproduce them."""

    data: list[JobImage]


class JobResponse(BaseModel):
    """A job's state (``GET /v1/jobs/{id}``, and the answer to a submit or a cancel)."""

    id: str
    object: Literal["job"] = "job"
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created_at: float
    updated_at: float
    progress: JobProgress
    result: JobImages | None = None
    error: ErrorDetail | None = None
    events_url: str
