"""Image file encoding (PNG / JPEG / WebP) from uint8 arrays."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

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
