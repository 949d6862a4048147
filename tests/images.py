"""Small image files built in memory for the API tests (init images, masks)."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def init_png(width: int = 64, height: int = 64) -> bytes:
    """A smooth gradient: structure an image-to-image pass keeps."""
    y, x = np.mgrid[0:height, 0:width]
    return png(np.stack([x * 3, y * 3, np.full_like(x, 120)], axis=-1).astype(np.uint8))


def mask_png(width: int = 64, height: int = 64) -> bytes:
    """White (repaint) in the middle, black (keep) around it."""
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return png(mask, "L")
