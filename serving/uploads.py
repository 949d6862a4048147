"""Uploaded images (init images, masks) decoded from untrusted bytes, with limits, before anything else sees them.

Every refusal is a 422 naming the request field. The pixel limit is checked on the size the file's header
declares, before a byte is decompressed, so a small file that expands to gigabytes (a decompression bomb)
costs nothing. Nothing here touches Pillow's global settings (``MAX_IMAGE_PIXELS``, ``LOAD_TRUNCATED_IMAGES``).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from serving.errors import ApiError, invalid

ResizeMode = Literal["resize", "crop", "fill"]
"""A1111's ``resize_mode`` 0, 1, 2: just resize / crop and resize / resize and fill."""

FORMATS = ("PNG", "JPEG", "WEBP")
_DATA_URL = re.compile(r"^data:[^,]*?;base64,", re.IGNORECASE)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grayscale PNGs ("I": older Pillow)
MASK_THRESHOLD = 0.5  # diffusers binarises masks at 0.5


@dataclass(frozen=True)
class UploadedImage:
    """A decoded upload: colour as stored (never composited over a background) and its transparency, if any."""

    rgb: np.ndarray  # (H, W, 3) uint8, EXIF orientation applied
    alpha: np.ndarray | None  # (H, W) uint8 when the file had transparency, else None


def decode_base64(text: str, param: str, max_bytes: int) -> bytes:
    """Bytes of a base64 upload: standard or URL-safe alphabet, padding optional, whitespace and a
    ``data:image/...;base64,`` prefix tolerated. An upload over ``max_bytes`` is refused before it is decoded."""
    payload = "".join(_DATA_URL.sub("", text.strip(), count=1).split())
    if not payload:
        raise invalid(f"{param} is empty; send a base64-encoded PNG, JPEG or WebP image", param)
    unpadded = payload.rstrip("=")
    # len(unpadded) * 3 // 4 is the exact decoded length of well-formed base64: checked before decoding.
    if len(unpadded) * 3 // 4 > max_bytes:
        raise _too_large(param, len(unpadded) * 3 // 4, max_bytes)
    standard = unpadded.replace("-", "+").replace("_", "/")
    try:
        data = base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
    except (binascii.Error, ValueError):  # ValueError: characters outside ASCII
        raise invalid(f"{param} is not valid base64", param) from None
    if len(data) > max_bytes:
        raise _too_large(param, len(data), max_bytes)
    return data


def read_image(data: bytes, param: str, *, max_bytes: int, max_pixels: int) -> UploadedImage:
    """Decode a PNG, JPEG or WebP upload to 8-bit RGB (plus alpha when the file has transparency).

    Args:
        data: the file's bytes, as uploaded.
        param: the request field, named in every refusal.
        max_bytes: ``limits.max_upload_bytes``.
        max_pixels: ``limits.max_upload_pixels``; compared with the header's width x height before decoding.
    """
    if not data:
        raise invalid(f"{param} is empty; send a PNG, JPEG or WebP image", param)
    if len(data) > max_bytes:
        raise _too_large(param, len(data), max_bytes)
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own check of the header (its warning is an error when warnings are); ours is usually lower.
        raise invalid(
            f"{param} declares more pixels than the most accepted, {max_pixels} (limits.max_upload_pixels)", param
        ) from None
    except Exception:  # UnidentifiedImageError, or whatever a plugin's header parser hits on hostile bytes
        raise invalid(f"{param} is not a PNG, JPEG or WebP image", param) from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise invalid(
                f"{param} is {width}x{height} = {width * height} pixels; the most accepted is {max_pixels} "
                "(limits.max_upload_pixels)",
                param,
            )
        kind = image.format or "image"
        try:
            image.load()
            return _to_arrays(_upright(image))
        except Exception:
            # Pillow's decoders answer bad data with OSError, SyntaxError, ValueError, struct.error, EOFError and
            # more depending on the plugin; only Pillow runs in this block, so any of them means a bad file.
            raise invalid(f"{param} could not be decoded: the {kind} file is truncated or corrupt", param) from None


def read_mask(
    data: bytes, param: str, *, max_bytes: int, max_pixels: int, source: Literal["luminance", "alpha"]
) -> np.ndarray:
    """An uploaded mask as (H, W) float32 in [0, 1], 1 = repaint.

    ``luminance`` (A1111, diffusers): white repaints, black keeps; a fully transparent pixel keeps.
    ``alpha`` (OpenAI edits): fully transparent pixels are the area to edit, everything else is kept.
    """
    image = read_image(data, param, max_bytes=max_bytes, max_pixels=max_pixels)
    if source == "alpha":
        if image.alpha is None:
            raise invalid(
                f"{param}: the mask must have an alpha channel; its transparent pixels mark the area to edit", param
            )
        return _transparent(image.alpha)
    # The same weights as Pillow's "L" conversion (ITU-R 601-2), so a grayscale file round-trips exactly.
    gray = np.asarray(Image.fromarray(image.rgb).convert("L"), dtype=np.float32) / 255.0
    if image.alpha is not None:
        gray[image.alpha == 0] = 0.0
    return gray


def mask_from_alpha(image: UploadedImage, param: str) -> np.ndarray:
    """OpenAI's edits without a mask: the image's own fully transparent pixels are the area to edit."""
    if image.alpha is None:
        raise invalid(
            f"{param} has no transparency to use as the mask: send a mask, or an image whose fully transparent "
            "pixels mark the area to edit",
            param,
        )
    return _transparent(image.alpha)


def check_mask(mask: np.ndarray, param: str) -> None:
    """Refuse a mask that would repaint nothing (no pixel reaches diffusers' 0.5 threshold)."""
    if not (mask >= MASK_THRESHOLD).any():
        raise invalid(
            f"{param}: the mask marks nothing to edit; white pixels (or, for an OpenAI-style mask, fully "
            "transparent pixels) mark the area to repaint",
            param,
        )


def snap_size(width: int, height: int, multiple: int = 8) -> tuple[int, int]:
    """Round each side down to a multiple of ``multiple`` (the VAE's scale factor), as diffusers does; never
    below ``multiple``."""
    return max(multiple, width - width % multiple), max(multiple, height - height % multiple)


def fit(array: np.ndarray, width: int, height: int, mode: ResizeMode) -> np.ndarray:
    """Bring an (H, W, 3) uint8 image or an (H, W) float32 mask to exactly (height, width).

    ``resize`` stretches; ``crop`` scales to cover the box keeping the aspect ratio and keeps the centre;
    ``fill`` scales to fit inside, centres it and fills the borders by repeating the edge pixels (images) or
    with 0 = keep (masks). The geometry is A1111's ``resize_image``. An array already at the size is returned
    as is.
    """
    is_mask = array.ndim == 2 and array.dtype == np.float32
    is_image = array.ndim == 3 and array.shape[2] == 3 and array.dtype == np.uint8
    if not (is_mask or is_image):
        raise ValueError(
            f"fit takes an (H, W, 3) uint8 image or an (H, W) float32 mask, not {array.dtype} {array.shape}"
        )
    src_h, src_w = array.shape[:2]
    if (src_h, src_w) == (height, width):
        return array
    if mode == "resize":
        return _resize(array, width, height)
    box_ratio, src_ratio = width / height, src_w / src_h
    cover = mode == "crop"
    if cover:
        # Resample only the centre region that covers the box, straight to the box's size: scaling the whole
        # source first would make a huge intermediate out of a thin image (64 x 262144 to cover 1024 x 1024).
        scale = max(width / src_w, height / src_h)
        crop_w, crop_h = width / scale, height / scale
        left, top = (src_w - crop_w) / 2, (src_h - crop_h) / 2
        return _resize(array, width, height, box=(left, top, left + crop_w, top + crop_h))
    if box_ratio > src_ratio:  # height decides the scale
        new_w, new_h = max(1, src_w * height // src_h), height
    else:
        new_w, new_h = width, max(1, src_h * width // src_w)
    scaled = _resize(array, new_w, new_h)
    top, left = height // 2 - new_h // 2, width // 2 - new_w // 2
    pad = [(top, height - new_h - top), (left, width - new_w - left)]
    if is_mask:
        return np.pad(scaled, pad, mode="constant", constant_values=0.0)
    return np.pad(scaled, [*pad, (0, 0)], mode="edge")


def _resize(
    array: np.ndarray, width: int, height: int, box: tuple[float, float, float, float] | None = None
) -> np.ndarray:
    if box is None and (array.shape[1], array.shape[0]) == (width, height):
        return array
    # LANCZOS, as diffusers' VaeImageProcessor; a float mask resizes in mode "F" and is clipped after ringing.
    resized = np.asarray(Image.fromarray(array).resize((width, height), Image.Resampling.LANCZOS, box=box))
    if array.ndim == 2:
        return np.clip(resized, 0.0, 1.0).astype(np.float32)
    return resized.copy()


def _too_large(param: str, size: int, max_bytes: int) -> ApiError:
    return invalid(
        f"{param} is {size} bytes; the largest accepted upload is {max_bytes} bytes (limits.max_upload_bytes)", param
    )


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation. Unreadable EXIF is metadata, not pixels: the image is kept as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        return image


def _to_arrays(image: Image.Image) -> UploadedImage:
    if image.mode in _SIXTEEN_BIT:
        raw = np.asarray(image).astype(np.int64)
        # Pillow's convert("L") clips 16-bit samples at 255; the high byte is the 8-bit value.
        gray = (np.clip(raw, 0, 65535) >> 8).astype(np.uint8)
        key = image.info.get("transparency")
        alpha = None if not isinstance(key, int) else np.where(raw == key, 0, 255).astype(np.uint8)
        return UploadedImage(np.repeat(gray[..., None], 3, axis=2), alpha)
    if image.mode == "F":  # Pillow's own float convention: samples in 0..255
        gray = np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8)
        return UploadedImage(np.repeat(gray[..., None], 3, axis=2), None)
    if image.has_transparency_data:  # RGBA, LA, PA, P / L / RGB with a tRNS colour key
        rgba = np.array(image.convert("RGBA"))
        return UploadedImage(np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3]))
    return UploadedImage(np.array(image.convert("RGB")), None)  # RGB, L, 1, P, CMYK


def _transparent(alpha: np.ndarray) -> np.ndarray:
    return (alpha == 0).astype(np.float32)
