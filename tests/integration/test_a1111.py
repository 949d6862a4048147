"""The AUTOMATIC1111-compatible subset with A1111's field names and response shapes."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import LiveService

pytestmark = pytest.mark.integration

# An image made in a batch and the same seed made alone differ by at most this many 8-bit levels per channel
# (measured by `python -m benchmarks.batch_invariance`; README "Determinism and batching").
BATCH_TOLERANCE_LEVELS = 1

BODY = {
    "prompt": "a cozy cabin",
    "negative_prompt": "blurry",
    "steps": 3,
    "cfg_scale": 6.5,
    "sampler_name": "Euler a",
    "seed": 1234,
    "width": 64,
    "height": 96,
    "batch_size": 2,
    "n_iter": 2,
    # Fields A1111 clients commonly send that change nothing here when off.
    "restore_faces": False,
    "enable_hr": False,
    "send_images": True,
    "save_images": False,
}


def test_txt2img_shape_seeds_and_reproducibility(live: LiveService) -> None:
    with live.client() as client:
        response = client.post("/sdapi/v1/txt2img", json=BODY)
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"images", "parameters", "info"}
        assert len(body["images"]) == 4
        for b64 in body["images"]:
            assert Image.open(io.BytesIO(base64.b64decode(b64))).size == (64, 96)
        assert body["parameters"]["sampler_name"] == "Euler a"
        info = json.loads(body["info"])  # a JSON document inside a string, as in A1111
        assert info["all_seeds"] == [1234, 1235, 1236, 1237] and info["seed"] == 1234
        assert info["sampler_name"] == "Euler a" and info["cfg_scale"] == 6.5 and info["steps"] == 3
        assert info["infotexts"][1].startswith("a cozy cabin\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a")
        # Image i re-created alone from its seed: the same picture within the documented tolerance (the batch
        # it ran in may round the last bits differently; README "Determinism and batching").
        alone = client.post("/sdapi/v1/txt2img", json={**BODY, "seed": 1236, "batch_size": 1, "n_iter": 1}).json()
        assert _levels_apart(alone["images"][0], body["images"][2]) <= BATCH_TOLERANCE_LEVELS
        # ... and not merely any image: another seed is far from it.
        assert _levels_apart(alone["images"][0], body["images"][3]) > 10 * BATCH_TOLERANCE_LEVELS


def _levels_apart(a: str, b: str) -> int:
    """Largest per-channel difference of two base64 PNGs, in 8-bit levels."""
    x, y = (np.asarray(Image.open(io.BytesIO(base64.b64decode(v))), dtype=np.int16) for v in (a, b))
    assert x.shape == y.shape
    return int(np.abs(x - y).max())


@pytest.mark.parametrize(
    ("sampler", "schedule", "scheduler"),
    [
        ("DPM++ 2M Karras", None, "dpmpp_2m_karras"),
        ("DPM++ 2M", "Karras", "dpmpp_2m_karras"),
        ("k_euler", None, "euler"),
    ],
)
def test_sampler_names_as_a1111_users_write_them(
    live: LiveService, sampler: str, schedule: str | None, scheduler: str
) -> None:
    body = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": 5, "sampler_name": sampler}
    if schedule:
        body["scheduler"] = schedule
    with live.client() as client:
        a1111 = client.post("/sdapi/v1/txt2img", json=body).json()["images"][0]
        native = client.post(
            "/v1/images/generations",
            json={"prompt": "x", "steps": 2, "size": "64x64", "seed": 5, "scheduler": scheduler, "guidance_scale": 7.0},
        ).json()
    assert a1111 == native["data"][0]["b64_json"]


def test_unsupported_and_invalid_fields_use_the_error_shape(live: LiveService) -> None:
    with live.client() as client:
        for body, status, param in (
            ({"prompt": "x", "sampler_name": "Euler z"}, 422, "sampler_name"),
            ({"prompt": "x", "tiling": True}, 422, "tiling"),
            ({"prompt": "x", "init_images": ["abc"]}, 422, "init_images"),  # txt2img is not img2img
            ({"prompt": "x", "steps": 500}, 422, "steps"),
            ({"prompt": "x", "batch_size": 9}, 422, "batch_size"),
            ({"prompt": "x", "cfg_scale": 31}, 422, "cfg_scale"),
            ({"prompt": "a", "width": 63, "height": 64}, 422, "width"),
            ({"prompt": "a", "width": 64, "height": 2048}, 422, "height"),
            ({"prompt": "x", "override_settings": {"sd_model_checkpoint": "other"}}, 404, "sd_model_checkpoint"),
        ):
            response = client.post("/sdapi/v1/txt2img", json=body)
            assert response.status_code == status, (body, response.text)
            assert response.json()["error"]["param"] == param, (body, response.text)


def test_empty_prompt_is_accepted_as_in_a1111(live: LiveService) -> None:
    with live.client() as client:
        response = client.post("/sdapi/v1/txt2img", json={"prompt": "", "steps": 2, "width": 64, "height": 64})
        assert response.status_code == 200, response.text
        assert len(response.json()["images"]) == 1
        # No prompt at all is A1111's default: the empty prompt.
        assert client.post("/sdapi/v1/txt2img", json={"steps": 2, "width": 64, "height": 64}).status_code == 200


def test_models_and_samplers(live: LiveService) -> None:
    with live.client() as client:
        models = client.get("/sdapi/v1/sd-models").json()
        samplers = client.get("/sdapi/v1/samplers").json()
    assert [(m["title"], m["model_name"]) for m in models] == [("tiny", "tiny")]
    names = {s["name"]: s for s in samplers}
    assert {"Euler a", "Euler", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "PLMS"} <= set(names)
    assert "k_euler_a" in names["Euler a"]["aliases"]
    with live.client() as client:
        assert client.get("/sdapi/v1/latent-upscale-modes").json() == [{"name": "Latent"}]


def test_progress_and_interrupt(live: LiveService) -> None:
    with live.client() as client:
        idle = client.get("/sdapi/v1/progress").json()
        assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
        result: dict = {}
        body = {"prompt": "slow", "steps": 150, "width": 256, "height": 256, "seed": 3, "n_iter": 3}
        worker = threading.Thread(target=lambda: result.update(client.post("/sdapi/v1/txt2img", json=body).json()))
        worker.start()
        deadline = time.monotonic() + 60
        while True:
            progress = client.get("/sdapi/v1/progress").json()
            if progress["state"]["sampling_step"] >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert progress["state"]["sampling_steps"] == 150 and progress["state"]["job_count"] == 3
        assert 0 < progress["progress"] < 1 and progress["current_image"]
        assert client.post("/sdapi/v1/interrupt").status_code == 200
        worker.join(timeout=600)  # uninterrupted, the call would return three images instead
        assert not worker.is_alive()
    assert result["images"] == [] and json.loads(result["info"])["interrupted"] is True


# img2img and inpainting. Small images and few steps keep these fast; the tiny model's pictures are noise, so any
# repainted pixel differs from the init image's.
INIT = np.random.default_rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8)
IMG2IMG = {"prompt": "a red door", "steps": 4, "seed": 99, "width": 64, "height": 64, "sampler_name": "Euler"}


def _png(pixels: np.ndarray) -> str:
    """base64 PNG of an (H, W, 3) RGB or (H, W) grayscale uint8 array."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _square_mask(shape: tuple[int, int], rows: slice, cols: slice, inside: int = 255) -> np.ndarray:
    mask = np.full(shape, 255 - inside, dtype=np.uint8)
    mask[rows, cols] = inside
    return mask


def test_img2img_returns_the_requested_size_and_reports_the_strength(live: LiveService) -> None:
    wide = np.random.default_rng(8).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    body = {**IMG2IMG, "init_images": [f"data:image/png;base64,{_png(wide)}"], "denoising_strength": 0.5}
    with live.client() as client:
        response = client.post("/sdapi/v1/img2img", json={**body, "resize_mode": 1})
        assert response.status_code == 200, response.text
        result = response.json()
        txt2img = client.post("/sdapi/v1/txt2img", json=IMG2IMG).json()
    assert set(result) == {"images", "parameters", "info"}
    assert len(result["images"]) == 1 and _pixels(result["images"][0]).shape == (64, 64, 3)
    info = json.loads(result["info"])
    assert info["denoising_strength"] == 0.5 and (info["width"], info["height"]) == (64, 64)
    assert "Size: 64x64, Model: tiny, Denoising strength: 0.5" in info["infotexts"][0]
    assert result["parameters"]["init_images"] is None  # not echoed unless include_init_images
    # The init image was used: the same seed without it is another picture.
    assert result["images"][0] != txt2img["images"][0]


def test_img2img_inpainting_with_blur_and_inverted_mask(live: LiveService) -> None:
    """Black marks the region to repaint when inverted; the blur widens it by a few pixels, no more."""
    mask = _square_mask((64, 64), slice(0, 16), slice(0, 16), inside=0)
    body = {**IMG2IMG, "init_images": [_png(INIT)], "mask": _png(mask), "mask_blur": 4}
    with live.client() as client:
        inverted = client.post("/sdapi/v1/img2img", json={**body, "inpainting_mask_invert": 1})
        assert inverted.status_code == 200, inverted.text
        plain = client.post("/sdapi/v1/img2img", json=body).json()
    out, other = _pixels(inverted.json()["images"][0]), _pixels(plain["images"][0])
    assert (out[:16, :16] != INIT[:16, :16]).any()
    assert (out[32:, 32:] == INIT[32:, 32:]).all()  # beyond the blur's reach: the init image's own pixels
    assert (other[32:, 32:] != INIT[32:, 32:]).any()  # not inverted, the other region is repainted
    params = json.loads(inverted.json()["info"])["extra_generation_params"]
    assert params["Mask blur"] == 4 and params["Mask mode"] == "Inpaint not masked"


def test_img2img_pixels_outside_the_mask_are_the_init_image(live: LiveService) -> None:
    """A1111's overlay: the generated image is composited over the init image with the mask as alpha, so a pixel
    the mask keeps is returned exactly as sent, with either masked content."""
    mask = _square_mask((64, 64), slice(16, 48), slice(16, 48))
    body = {**IMG2IMG, "init_images": [_png(INIT)], "mask": _png(mask), "mask_blur": 0}
    with live.client() as client:
        original, fill = (
            client.post("/sdapi/v1/img2img", json={**body, "inpainting_fill": content}).json() for content in (1, 0)
        )
    kept = mask == 0
    for result in (original, fill):
        out = _pixels(result["images"][0])
        assert (out[kept] == INIT[kept]).all()
        assert (out[~kept] != INIT[~kept]).any()
    # "fill" starts the region from its surroundings' colours instead of the pixels that were there.
    assert original["images"][0] != fill["images"][0]
    assert json.loads(fill["info"])["extra_generation_params"]["Masked content"] == "fill"


def test_inpaint_full_res_pastes_the_region_back_into_the_whole_image(live: LiveService) -> None:
    """'Only masked': the mask's padded region is inpainted at 64x64 and composited into the 128x96 init image,
    which is what comes back; every pixel beyond the padded region is the init image's."""
    init = np.random.default_rng(9).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    mask = _square_mask((96, 128), slice(40, 56), slice(60, 76))
    body = {
        **IMG2IMG,
        "init_images": [_png(init)],
        "mask": _png(mask),
        "mask_blur": 4,
        "inpaint_full_res": True,
        "inpaint_full_res_padding": 8,
    }
    with live.client() as client:
        response = client.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    out = _pixels(response.json()["images"][0])
    assert out.shape == (96, 128, 3)
    # The blur spreads the mask by under 12 pixels and the padding adds 8: the crop is inside rows 20-76, cols 40-96.
    outside = np.ones((96, 128), dtype=bool)
    outside[20:76, 40:96] = False
    assert (out[outside] == init[outside]).all()
    assert (out[44:52, 64:72] != init[44:52, 64:72]).any()
    info = json.loads(response.json()["info"])
    assert (info["width"], info["height"]) == (128, 96)
    assert info["extra_generation_params"]["Inpaint area"] == "Only masked"


@pytest.mark.parametrize(
    ("upscaler", "fields", "size", "reported"),
    [
        ("Latent", {"hr_scale": 2}, 128, "Latent"),
        ("x4", {"hr_scale": 2}, 128, "x4"),
        ("Latent (nearest)", {"hr_resize_x": 96}, 96, "Latent"),  # every latent variant runs as "Latent"
    ],
)
def test_txt2img_hires_fix(live: LiveService, upscaler: str, fields: dict, size: int, reported: str) -> None:
    body = {**IMG2IMG, "steps": 3, "enable_hr": True, "hr_upscaler": upscaler, **fields}
    with live.client() as client:
        response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    assert _pixels(response.json()["images"][0]).shape == (size, size, 3)
    info = json.loads(response.json()["info"])
    assert (info["width"], info["height"]) == (size, size)
    assert info["enable_hr"] is True and info["hr_upscaler"] == reported
    assert info["denoising_strength"] == 0.7  # A1111's default for the hires pass
    assert "Size: 64x64" in info["infotexts"][0] and f"Hires upscaler: {reported}" in info["infotexts"][0]


def test_img2img_and_hires_refusals_name_a1111_fields(live: LiveService) -> None:
    init = _png(INIT)
    small_mask = _png(np.full((32, 32), 255, dtype=np.uint8))
    black, white = (_png(np.full((64, 64), v, dtype=np.uint8)) for v in (0, 255))
    with live.client() as client:
        for path, body, status, param in (
            ("img2img", {"init_images": ["%%% not base64 %%%"]}, 422, "init_images"),
            ("img2img", {"init_images": [base64.b64encode(b"not an image").decode()]}, 422, "init_images"),
            ("img2img", {"init_images": []}, 422, "init_images"),
            ("img2img", {"init_images": [init, init]}, 422, "init_images"),
            ("img2img", {}, 422, "init_images"),
            ("img2img", {"init_images": [init], "denoising_strength": 0}, 422, "denoising_strength"),
            ("img2img", {"init_images": [init], "denoising_strength": 1.5}, 422, "denoising_strength"),
            ("img2img", {"init_images": [init], "denoising_strength": 0.1}, 422, "denoising_strength"),  # 0 steps
            ("img2img", {"init_images": [init], "mask": small_mask}, 422, "mask"),
            ("img2img", {"init_images": [init], "mask": black}, 422, "mask"),
            ("img2img", {"init_images": [init], "mask": white, "inpainting_mask_invert": 1}, 422, "mask"),
            ("img2img", {"init_images": [init], "mask": "bm90IGFuIGltYWdl"}, 422, "mask"),
            ("img2img", {"init_images": [init], "resize_mode": 4}, 422, "resize_mode"),
            ("img2img", {"init_images": [init], "cfg_scale": 31}, 422, "cfg_scale"),
            ("txt2img", {"enable_hr": True, "hr_upscaler": "nope"}, 404, "hr_upscaler"),
            ("txt2img", {"enable_hr": True, "hr_scale": 16}, 422, "hr_scale"),
            ("txt2img", {"enable_hr": True, "denoising_strength": 0}, 422, "denoising_strength"),
            ("txt2img", {"enable_hr": True, "hr_prompt": "something else"}, 422, "hr_prompt"),
        ):
            response = client.post(f"/sdapi/v1/{path}", json={**IMG2IMG, **body})
            assert response.status_code == status, (body, response.text)
            assert response.json()["error"]["param"] == param, (body, response.text)
