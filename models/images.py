"""Image file encoding (PNG / JPEG / WebP) from uint8 arrays."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from models.contracts import DecodeParams, EncodedImages, Pixels

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
DEFAULT_QUALITY = {"jpeg": 90, "webp": 90}


def encode_image(pixels: np.ndarray, output_format: str, quality: int | None = None) -> bytes:
    """Encode an (H, W, 3) uint8 array. PNG is lossless and byte-for-byte deterministic."""
    image = Image.fromarray(pixels, mode="RGB")
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG")
    elif output_format in ("jpeg", "webp"):
        image.save(buffer, format=output_format.upper(), quality=quality or DEFAULT_QUALITY[output_format])
    else:
        raise ValueError(f"unsupported output format {output_format!r}")
    return buffer.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """An image file this service made, as an (H, W, 3) uint8 RGB array (untrusted uploads go through
    ``serving.uploads``, which decodes within limits)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def finish(pixels: Pixels, output: DecodeParams | None) -> Pixels | EncodedImages:
    """What a pixel stage returns: the pixels for the next stage, or (``output`` set: the plan's last stage)
    the encoded files. Encoding happens once, at the end; a withheld image is not encoded."""
    if output is None:
        return pixels
    withheld = pixels.withheld or (False,) * len(pixels.array)
    files = [b"" if hidden else encode_image(img, output.output_format, output.quality)
             for img, hidden in zip(pixels.array, withheld, strict=True)]  # fmt: skip
    return EncodedImages(
        images=files,
        media_type=MEDIA_TYPES[output.output_format],
        model_version=pixels.model_version,
        width=int(pixels.array.shape[2]),
        height=int(pixels.array.shape[1]),
        flagged=pixels.flagged,
        withheld=pixels.withheld,
    )


def resize_images(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """(n, H, W, 3) uint8 -> (n, height, width, 3), Lanczos (as diffusers' image processor resizes)."""
    return np.stack(
        [np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.LANCZOS)) for img in array]
    )
