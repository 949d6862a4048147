"""Uploaded init images and masks: formats, limits, modes, mask conventions and resizing, on files built in memory."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import pytest
from PIL import Image, ImageFile

from serving import uploads
from serving.errors import ApiError
from serving.uploads import (
    UploadedImage,
    check_mask,
    decode_base64,
    fit,
    mask_from_alpha,
    read_image,
    read_mask,
    snap_size,
)

MB = 1024 * 1024
LIMITS = {"max_bytes": 6 * MB, "max_pixels": 4096 * 4096}


def encode(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def gradient(height: int = 32, width: int = 48) -> np.ndarray:
    """A smooth image, so lossy codecs come back close to it."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), np.full_like(x, 90)], -1).astype(np.uint8)


def read(data: bytes, param: str = "init_image", **limits: int) -> UploadedImage:
    return read_image(data, param, **{**LIMITS, **limits})


def refused(call: Callable[[], object], param: str) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call()
    assert caught.value.status == 422
    assert caught.value.code == "invalid_request"
    assert caught.value.param == param
    return caught.value


def png_with_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR declares width x height (CRC fixed), as a decompression bomb's header would."""
    data = bytearray(encode(Image.new("L", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)  # IHDR data starts after signature, length and type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def raw_png(width: int, height: int, depth: int, colour_type: int, rows: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any image data is decompressed."""

    def load(self: ImageFile.ImageFile) -> None:
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


# --- formats ---------------------------------------------------------------------------------------------------


def test_png_decodes_to_the_exact_pixels() -> None:
    pixels = noise(20, 30)
    image = read(encode(Image.fromarray(pixels)))
    assert image.rgb.dtype == np.uint8
    np.testing.assert_array_equal(image.rgb, pixels)
    assert image.alpha is None


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_jpeg_and_webp_decode_close_to_the_source(fmt: str) -> None:
    pixels = gradient()
    image = read(encode(Image.fromarray(pixels), fmt, quality=95))
    assert image.rgb.shape == pixels.shape
    assert np.abs(image.rgb.astype(int) - pixels).mean() < 3
    assert image.alpha is None


@pytest.mark.parametrize(
    "data",
    [
        encode(Image.fromarray(gradient()), "GIF"),
        encode(Image.fromarray(gradient()), "BMP"),
        encode(Image.fromarray(gradient()), "TIFF"),
        b"this is not an image",
        bytes(range(256)) * 4,
    ],
    ids=["gif", "bmp", "tiff", "text", "garbage"],
)
def test_other_formats_are_refused(data: bytes) -> None:
    err = refused(lambda: read(data, "mask"), "mask")
    assert "not a PNG, JPEG or WebP image" in err.message


def test_empty_upload_is_refused() -> None:
    assert "empty" in refused(lambda: read(b""), "init_image").message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_refused(fmt: str) -> None:
    data = encode(Image.fromarray(noise(64, 64)), fmt)
    err = refused(lambda: read(data[: len(data) // 2]), "init_image")
    assert "truncated or corrupt" in err.message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_damaged_files_never_raise_anything_but_a_422(fmt: str) -> None:
    data = encode(Image.fromarray(noise(16, 16)), fmt)
    rng = np.random.default_rng(1)
    for _ in range(40):
        damaged = bytearray(data)
        for at in rng.integers(0, len(data), 3):
            damaged[at] ^= int(rng.integers(1, 256))
        try:
            image = read(bytes(damaged))
        except ApiError as err:
            assert (err.status, err.param) == (422, "init_image")
        else:
            assert image.rgb.shape[2] == 3


# --- limits ----------------------------------------------------------------------------------------------------


def test_upload_over_max_bytes_is_refused() -> None:
    data = encode(Image.fromarray(noise(16, 16)))
    assert read(data, max_bytes=len(data)).rgb.shape == (16, 16, 3)
    err = refused(lambda: read(data, max_bytes=len(data) - 1), "init_image")
    assert str(len(data) - 1) in err.message
    assert "limits.max_upload_bytes" in err.message


def test_header_over_max_pixels_is_refused_before_decoding(no_decoding: None) -> None:
    data = png_with_size(5000, 5000)  # 25 M pixels declared, 1 pixel of data
    err = refused(lambda: read(data, max_pixels=4096 * 4096), "init_image")
    assert "5000x5000" in err.message
    assert "limits.max_upload_pixels" in err.message


def test_header_past_pillows_own_bomb_limit_is_refused_the_same_way(no_decoding: None) -> None:
    err = refused(lambda: read(png_with_size(100_000, 100_000), "mask"), "mask")
    assert "limits.max_upload_pixels" in err.message


def test_real_decompression_bomb_is_refused_before_decoding(no_decoding: None) -> None:
    data = encode(Image.new("1", (8000, 8000)))  # 64 M pixels in a few KB
    assert len(data) < 64 * 1024
    err = refused(lambda: read(data), "init_image")
    assert "8000x8000" in err.message


# --- orientation and modes -------------------------------------------------------------------------------------


def test_exif_orientation_is_applied() -> None:
    stored = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 tall: left half red, right half blue
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    image = read(encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes()))
    assert image.rgb.shape == (40, 20, 3)
    assert image.rgb[5, 10, 0] > 200 > image.rgb[5, 10, 2]  # the left edge is now the top
    assert image.rgb[35, 10, 2] > 200 > image.rgb[35, 10, 0]


def test_rgba_returns_colour_as_stored_and_alpha() -> None:
    rgba = np.concatenate([noise(8, 8), np.arange(64, dtype=np.uint8).reshape(8, 8, 1) * 4], -1)
    image = read(encode(Image.fromarray(rgba)))
    np.testing.assert_array_equal(image.rgb, rgba[..., :3])  # no compositing, even under alpha 0
    assert image.alpha is not None
    np.testing.assert_array_equal(image.alpha, rgba[..., 3])


def test_la_becomes_gray_rgb_with_alpha() -> None:
    gray = np.array([[0, 100, 255]], np.uint8)
    alpha = np.array([[255, 0, 7]], np.uint8)
    image = read(encode(Image.fromarray(np.stack([gray, alpha], -1))))
    np.testing.assert_array_equal(image.rgb, np.repeat(gray[..., None], 3, axis=2))
    assert image.alpha is not None
    np.testing.assert_array_equal(image.alpha, alpha)


def test_palette_with_transparency() -> None:
    palette = Image.new("P", (3, 1))
    palette.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90])
    palette.putdata([0, 1, 2])
    image = read(encode(palette, transparency=1))
    np.testing.assert_array_equal(image.rgb[0], [[10, 20, 30], [40, 50, 60], [70, 80, 90]])
    assert image.alpha is not None
    np.testing.assert_array_equal(image.alpha[0], [255, 0, 255])


def test_palette_without_transparency_has_no_alpha() -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([1, 2, 3, 4, 5, 6])
    palette.putdata([1, 0])
    image = read(encode(palette))
    np.testing.assert_array_equal(image.rgb[0], [[4, 5, 6], [1, 2, 3]])
    assert image.alpha is None


def test_gray_colour_key_becomes_alpha() -> None:
    image = read(encode(Image.fromarray(np.array([[0, 9, 200]], np.uint8)), transparency=9))
    assert image.alpha is not None
    np.testing.assert_array_equal(image.alpha[0], [255, 0, 255])


def test_cmyk_jpeg_becomes_rgb() -> None:
    image = read(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95))  # red
    assert image.rgb.shape == (16, 16, 3)
    assert np.abs(image.rgb.astype(int) - [255, 0, 0]).max() < 8


def test_16_bit_gray_keeps_the_high_byte() -> None:
    samples = np.array([[0, 255, 256, 32768, 65535]], np.uint16)
    data = encode(Image.fromarray(samples))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    image = read(data)
    np.testing.assert_array_equal(image.rgb[0, :, 0], [0, 0, 1, 128, 255])  # not clipped at 255
    np.testing.assert_array_equal(image.rgb[..., 0], image.rgb[..., 2])


def test_16_bit_rgb_keeps_the_high_byte() -> None:
    image = read(raw_png(1, 1, 16, 2, b"\x00" + struct.pack(">HHH", 65535, 32768, 256)))
    np.testing.assert_array_equal(image.rgb[0, 0], [255, 128, 1])


def test_one_bit_becomes_black_and_white() -> None:
    image = read(encode(Image.fromarray(np.array([[True, False, True]]))))
    np.testing.assert_array_equal(image.rgb[0, :, 1], [255, 0, 255])


# --- masks -----------------------------------------------------------------------------------------------------


def mask(data: bytes, source: Literal["luminance", "alpha"]) -> np.ndarray:
    return read_mask(data, "mask", source=source, **LIMITS)


def test_luminance_mask_white_repaints() -> None:
    values = mask(encode(Image.fromarray(np.array([[0, 51, 255]], np.uint8))), "luminance")
    assert values.dtype == np.float32
    np.testing.assert_allclose(values, [[0.0, 0.2, 1.0]], atol=1e-6)


def test_luminance_mask_uses_grayscale_weights_and_ignores_transparent_pixels() -> None:
    rgba = np.array([[[255, 0, 0, 255], [255, 255, 255, 255], [255, 255, 255, 0]]], np.uint8)
    values = mask(encode(Image.fromarray(rgba)), "luminance")
    np.testing.assert_allclose(values, [[76 / 255, 1.0, 0.0]], atol=1e-6)  # red is L=76 in ITU-R 601-2


def test_alpha_mask_marks_fully_transparent_pixels() -> None:
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, :, 3] = [0, 128, 255]
    rgba[0, 1, :3] = 255  # colour plays no part
    np.testing.assert_array_equal(mask(encode(Image.fromarray(rgba)), "alpha"), [[1.0, 0.0, 0.0]])


def test_alpha_mask_without_alpha_is_refused() -> None:
    data = encode(Image.fromarray(gradient()))
    err = refused(lambda: mask(data, "alpha"), "mask")
    assert "alpha channel" in err.message


def test_mask_uses_the_upload_limits() -> None:
    bomb = png_with_size(5000, 5000)
    refused(lambda: read_mask(bomb, "mask", max_bytes=MB, max_pixels=4096 * 4096, source="alpha"), "mask")


def test_mask_from_alpha() -> None:
    rgba = np.full((2, 2, 4), 255, np.uint8)
    rgba[1, 0, 3] = 0
    image = read(encode(Image.fromarray(rgba), "WEBP", lossless=True))
    np.testing.assert_array_equal(mask_from_alpha(image, "image"), [[0.0, 0.0], [1.0, 0.0]])
    err = refused(lambda: mask_from_alpha(read(encode(Image.fromarray(gradient()))), "image"), "image")
    assert "send a mask" in err.message


def test_check_mask_refuses_a_mask_with_nothing_to_edit() -> None:
    assert "nothing to edit" in refused(lambda: check_mask(np.zeros((4, 4), np.float32), "mask"), "mask").message
    refused(lambda: check_mask(np.full((4, 4), 0.49, np.float32), "mask"), "mask")
    marked = np.zeros((4, 4), np.float32)
    marked[2, 3] = 0.5
    check_mask(marked, "mask")


# --- fit and snap_size -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["resize", "crop", "fill"])
@pytest.mark.parametrize("kind", ["image", "mask"])
def test_fit_gives_the_requested_shape(mode: uploads.ResizeMode, kind: str) -> None:
    source = noise(30, 70) if kind == "image" else (noise(30, 70)[..., 0] > 127).astype(np.float32)
    out = fit(source, 64, 48, mode)
    assert out.shape[:2] == (48, 64)
    assert out.dtype == source.dtype
    if kind == "mask":
        assert out.min() >= 0.0 and out.max() <= 1.0  # LANCZOS ringing is clipped


@pytest.mark.parametrize("mode", ["resize", "crop", "fill"])
def test_fit_returns_an_array_at_the_size_unchanged(mode: uploads.ResizeMode) -> None:
    source = noise(24, 40)
    assert fit(source, 40, 24, mode) is source


def test_fit_crop_keeps_the_centre() -> None:
    source = noise(50, 100)
    np.testing.assert_array_equal(fit(source, 50, 50, "crop"), source[:, 25:75])  # no scaling needed
    stripes = np.zeros((100, 200, 3), np.uint8)
    stripes[:, 80:120] = 255  # a white band in the middle third... of a 2:1 image
    out = fit(stripes, 40, 40, "crop")  # scaled to 80x40, centre 40 columns kept
    assert out[:, 16:24].min() > 240 and out[:, :4].max() < 15 and out[:, -4:].max() < 15


def test_fit_fill_centres_and_repeats_the_edges() -> None:
    source = noise(50, 100)
    out = fit(source, 100, 100, "fill")
    np.testing.assert_array_equal(out[25:75], source)
    np.testing.assert_array_equal(out[:25], np.broadcast_to(source[0], (25, 100, 3)))
    np.testing.assert_array_equal(out[75:], np.broadcast_to(source[-1], (25, 100, 3)))
    filled = fit(np.ones((50, 100), np.float32), 100, 100, "fill")
    assert filled[:25].max() == 0.0 and filled[75:].max() == 0.0 and filled[25:75].min() == 1.0


def test_fit_resize_stretches() -> None:
    source = np.zeros((10, 20, 3), np.uint8)
    source[:, 10:] = 255
    out = fit(source, 40, 40, "resize")
    assert out[:, :15].max() < 10 and out[:, 25:].min() > 245


def test_snap_size_rounds_down_to_the_multiple() -> None:
    assert snap_size(513, 770) == (512, 768)
    assert snap_size(512, 512) == (512, 512)
    assert snap_size(5, 3) == (8, 8)
    assert snap_size(130, 200, multiple=64) == (128, 192)


# --- base64 ----------------------------------------------------------------------------------------------------


def test_decode_base64_accepts_data_urls_whitespace_and_urlsafe() -> None:
    payload = bytes(range(250, 256)) + b"\xfb\xff"  # encodes with '+' / '/' and padding
    text = base64.b64encode(payload).decode()
    assert decode_base64(text, "image", 100) == payload
    assert decode_base64(f"data:image/png;base64,{text}", "image", 100) == payload
    assert decode_base64(f"{text[:4]}\n{text[4:]}\n", "image", 100) == payload
    assert decode_base64(base64.urlsafe_b64encode(payload).decode().rstrip("="), "image", 100) == payload


def test_decode_base64_refuses_invalid_text() -> None:
    assert "base64" in refused(lambda: decode_base64("not base64!", "image", 100), "image").message
    refused(lambda: decode_base64("data:image/png;base64,ab€d", "image", 100), "image")
    refused(lambda: decode_base64("abcde", "image", 100), "image")  # 5 characters decode to no whole byte count
    refused(lambda: decode_base64("  ", "image", 100), "image")


def test_decode_base64_limit_is_exact_and_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    text = base64.b64encode(b"0123456789").decode()  # 10 bytes, padded
    assert decode_base64(text, "image", 10) == b"0123456789"

    def decode(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("decoded an upload over the limit")

    monkeypatch.setattr(uploads.base64, "b64decode", decode)
    err = refused(lambda: decode_base64(text, "image", 9), "image")
    assert "limits.max_upload_bytes" in err.message
