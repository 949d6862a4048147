"""Typed data passed between stages: what each stage takes and returns.

Stage inputs and outputs travel through Ray's object store as pickled dataclasses holding CPU tensors; they
never pass through JSON or base64. The ingress only ever sees the final encoded image bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import numpy as np
    import torch

OutputFormat = Literal["png", "jpeg", "webp"]


@dataclass(frozen=True)
class AdapterUse:
    """A LoRA adapter a request applies: its catalog name, the pinned reference to load, the scale."""

    name: str
    ref: str
    scale: float = 1.0


@dataclass(frozen=True)
class EncodeRequest:
    """Input of the text-encoding stage."""

    model: str
    prompt: str
    negative_prompt: str | None
    with_negative: bool  # False when classifier-free guidance is off (guidance_scale <= 1)
    ref: str = ""  # pinned model reference to use; empty: the replica's active version of `model`
    loras: tuple[AdapterUse, ...] = ()  # adapters whose text-encoder layers apply


@dataclass(frozen=True)
class PromptEmbeddings:
    """Output of the text-encoding stage: CLIP hidden states, shape (1, 77 * chunks, dim)."""

    model: str
    model_version: str
    positive: torch.Tensor
    negative: torch.Tensor | None


@dataclass(frozen=True)
class DenoiseParams:
    """Sampling settings of the denoising stage (everything except the embeddings)."""

    model: str
    height: int
    width: int
    steps: int
    guidance_scale: float
    scheduler: str
    seed: int
    num_images: int = 1
    ref: str = ""  # pinned model reference to use; empty: the replica's active version of `model`
    # With an init image: the share of the schedule that runs (diffusers' img2img / inpaint `strength`:
    # int(steps * strength) steps run, starting from the init latents noised to that point).
    strength: float = 1.0
    loras: tuple[AdapterUse, ...] = ()  # adapters whose UNet layers apply to this request's rows


@dataclass(frozen=True)
class ImageEncodeParams:
    """Input of the VAE stage's ``encode_image``: which model's VAE, and the inpainting mask if any."""

    model: str
    ref: str = ""
    mask: np.ndarray | None = None  # (H, W) float32 in [0, 1] at the image's size, 1 = repaint; binarised at 0.5
    width: int | None = None  # resize the images to this size first (a hires pass after a non-exact upscale)
    height: int | None = None


@dataclass(frozen=True)
class ImageLatents:
    """Output of the VAE stage's ``encode_image``: the latent distribution of an init image (and for inpainting
    that of the masked image, and the mask at latent size).

    The distributions are sampled in the denoiser, with the request's one seeded generator, in the order
    diffusers draws from it (image latents, then the noise, then the masked image's latents), so a seed gives
    the reference pipeline's image even though encoding and denoising run on different replicas.
    """

    model: str
    model_version: str
    mean: torch.Tensor  # (1, C, h, w), before the family's scaling factor
    std: torch.Tensor
    scaling_factor: float
    mask: torch.Tensor | None = None  # (1, 1, h, w), 0 / 1, nearest-resized as diffusers does
    masked_mean: torch.Tensor | None = None  # the image with the repainted region blanked, encoded
    masked_std: torch.Tensor | None = None
    ref: str = ""


@dataclass(frozen=True)
class Latents:
    """Output of the denoising stage: final latents, shape (num_images, 4, height / 8, width / 8)."""

    model: str
    model_version: str
    tensor: torch.Tensor
    steps_run: int
    ref: str = ""  # the pinned model reference that produced them (the decoder uses the same version)


@dataclass(frozen=True)
class DenoiseProgress:
    """What the denoising stage reports after each step of a request (streamed before its ``Latents``)."""

    step: int  # steps done so far
    total_steps: int
    preview: bytes | None = None  # low-resolution JPEG of the first image, when asked for
    preview_media_type: str | None = None


@dataclass(frozen=True)
class Pixels:
    """Images between stages that work on pixels (decoder, upscaler, safety check): uint8 RGB, (n, h, w, 3).

    ``flagged`` / ``withheld`` carry the safety check's verdicts once it ran (one per image): a withheld image's
    pixels are zeroed and it is never encoded.
    """

    array: np.ndarray
    model_version: str
    flagged: tuple[bool, ...] = ()
    withheld: tuple[bool, ...] = ()


@dataclass(frozen=True)
class UpscaleParams:
    """What the upscaling stage does to a request's images."""

    upscaler: str  # name in the catalog's `upscalers`
    factor: float  # output size / input size; the model's native factor, or any other (resized after)
    ref: str = ""  # pinned reference; empty: the replica's active version of `upscaler`


@dataclass(frozen=True)
class SafetyParams:
    """How the safety stage treats a request's images."""

    checker: str  # name in the catalog's `safety_checkers`
    mode: Literal["flag", "block"]  # flag: mark flagged images; block: also withhold them
    ref: str = ""


@dataclass(frozen=True)
class DecodeParams:
    """How the last stage of a plan encodes the image files."""

    output_format: OutputFormat = "png"
    quality: int | None = None  # JPEG / WebP quality 0-100; None: the format's default


@dataclass(frozen=True)
class EncodedImages:
    """Output of a plan's last stage: one encoded file per image (empty for a withheld image)."""

    images: list[bytes]
    media_type: str
    model_version: str
    width: int
    height: int
    flagged: tuple[bool, ...] = ()  # the safety check's verdict per image; empty when it did not run
    withheld: tuple[bool, ...] = ()
