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
class EncodeRequest:
    """Input of the text-encoding stage."""

    model: str
    prompt: str
    negative_prompt: str | None
    with_negative: bool  # False when classifier-free guidance is off (guidance_scale <= 1)
    ref: str = ""  # pinned model reference to use; empty: the replica's active version of `model`


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
