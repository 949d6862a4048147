"""Typed data passed between stages: what each stage takes and returns.

Stage inputs and outputs travel through Ray's object store as pickled dataclasses holding CPU tensors; they
never pass through JSON or base64. The ingress only ever sees the final encoded image bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
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
class DecodeParams:
    """How the decoding stage should encode its images."""

    output_format: OutputFormat = "png"
    quality: int | None = None  # JPEG / WebP quality 0-100; None: the format's default


@dataclass(frozen=True)
class EncodedImages:
    """Output of the decoding stage: one encoded file per image."""

    images: list[bytes]
    media_type: str
    model_version: str
