"""Image to image, inpainting and OpenAI's image edits through a real local Ray Serve over HTTP."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.images import b64, init_png, mask_png, png
from tests.integration.conftest import LiveService

pytestmark = pytest.mark.integration


def post(live: LiveService, path: str = "/v1/images/generations", **body: object) -> httpx.Response:
    with live.client() as client:
        return client.post(path, json={"prompt": "a lighthouse", "steps": 4, "seed": 11, **body})


def decoded(response: httpx.Response) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in response.json()["data"]]


def test_img2img_returns_the_init_images_size_and_is_reproducible(live: LiveService) -> None:
    # 96x72 -> the image's own size when `size` is left out.
    y, x = np.mgrid[0:72, 0:96]
    image = png(np.stack([x, y, x + y], axis=-1).astype(np.uint8))
    first = post(live, init_image=b64(image), strength=0.5)
    assert first.status_code == 200, first.text
    body = first.json()
    assert (body["size"], body["strength"], body["inpainting"]) == ("96x72", 0.5, False)
    assert decoded(first)[0].size == (96, 72)
    again = post(live, init_image=b64(image), strength=0.5)
    assert again.json()["data"] == body["data"]  # same seed and image, same bytes
    other = post(live, init_image=b64(image), strength=0.9)
    assert other.json()["data"] != body["data"]


def test_init_image_by_the_id_of_an_image_this_service_made(live: LiveService) -> None:
    made = post(live, response_format="url")
    image_id = made.json()["data"][0]["url"].rsplit("/", 1)[-1]
    response = post(live, init_image=image_id, strength=0.6, size="64x64")
    assert response.status_code == 200, response.text
    assert post(live, init_image="0" * 32 + ".png").status_code == 422


def test_inpainting_with_an_ordinary_unet(live: LiveService) -> None:
    response = post(live, init_image=b64(init_png()), mask=b64(mask_png()), n=2)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["strength"], body["inpainting"], len(body["data"])) == (1.0, True, 2)


def test_resize_mode_fits_an_image_of_another_aspect(live: LiveService) -> None:
    wide = png(np.full((40, 120, 3), 200, np.uint8))
    for mode in ("resize", "crop", "fill"):
        response = post(live, init_image=b64(wide), size="64x64", resize_mode=mode, mask=b64(mask_png(120, 40)))
        assert response.status_code == 200, (mode, response.text)
        assert decoded(response)[0].size == (64, 64)


def transparent_square(size: int = 64) -> bytes:
    """An RGBA image whose centre is fully transparent: OpenAI's way of marking the area to edit."""
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[..., :3] = 128
    rgba[..., 3] = 255
    rgba[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4, 3] = 0
    return png(rgba, "RGBA")


def test_openai_sdk_images_edit_with_image_and_mask(live: LiveService) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{live.url}/v1", api_key="unused")
    result = client.images.edit(
        image=("image.png", init_png(), "image/png"),
        mask=("mask.png", transparent_square(), "image/png"),
        prompt="a red boat",
        n=1,
        size="64x64",  # type: ignore[arg-type]
        response_format="b64_json",
        extra_body={"steps": 3, "seed": 5},
    )
    assert result.data is not None and result.data[0].b64_json
    assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).size == (64, 64)
    # Without a mask, the image's own transparent pixels mark the area.
    alone = client.images.edit(
        image=("image.png", transparent_square(), "image/png"), prompt="a red boat", response_format="b64_json",
        extra_body={"steps": 3, "seed": 5},
    )  # fmt: skip
    assert alone.data is not None and len(alone.data) == 1


def test_edits_field_errors(live: LiveService) -> None:
    with live.client() as client:
        files = {"mask": ("m.png", transparent_square(), "image/png")}
        missing = client.post("/v1/images/edits", data={"prompt": "x"}, files=files)
        assert (missing.status_code, missing.json()["error"]["param"]) == (422, "image")
        opaque_mask = client.post(
            "/v1/images/edits",
            data={"prompt": "x", "steps": "2"},
            files={"image": ("i.png", init_png(), "image/png"), "mask": ("m.png", init_png(), "image/png")},
        )
        assert (opaque_mask.status_code, opaque_mask.json()["error"]["param"]) == (422, "mask")
        bad_number = client.post(
            "/v1/images/edits", data={"prompt": "x", "n": "two"}, files={"image": ("i.png", init_png(), "image/png")}
        )
        assert (bad_number.status_code, bad_number.json()["error"]["param"]) == (422, "n")
        not_multipart = client.post("/v1/images/edits", json={"prompt": "x"})
        assert not_multipart.status_code == 422


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid 1x1 PNG whose header claims ``width`` x ``height`` pixels."""
    data = bytearray(png(np.zeros((1, 1, 3), np.uint8)))
    ihdr = bytearray(data[12:29])
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"init_image": "not base64 at all!"}, "init_image"),
        ({"init_image": b64(b"GIF89a not really")}, "init_image"),
        ({"init_image": b64(init_png()[: len(init_png()) // 2])}, "init_image"),  # truncated
        ({"init_image": b64(bomb_png())}, "init_image"),
        ({"init_image": b64(init_png()), "strength": 0.0}, "strength"),
        ({"init_image": b64(init_png()), "strength": 1.5}, "strength"),
        ({"init_image": b64(init_png()), "strength": 0.1}, "strength"),  # int(4 * 0.1) = 0 steps
        ({"init_image": b64(init_png()), "mask": b64(mask_png(32, 32))}, "mask"),  # another size, no resize_mode
        ({"init_image": b64(init_png()), "mask": b64(png(np.zeros((64, 64), np.uint8), "L"))}, "mask"),  # nothing
        ({"mask": b64(mask_png())}, "init_image"),
    ],
)
def test_bad_init_images_and_masks_are_422_naming_the_field(live: LiveService, body: dict, param: str) -> None:
    response = post(live, **body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_request", param)


def test_a_job_keeps_its_init_image(live: LiveService) -> None:
    with live.client() as client:
        submitted = client.post(
            "/v1/jobs", json={"prompt": "a lighthouse", "steps": 3, "init_image": b64(init_png()), "strength": 0.7}
        )
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        while (job := client.get(f"/v1/jobs/{job_id}").json())["state"] in ("queued", "running"):
            client.get(f"/v1/jobs/{job_id}/events", timeout=60).read()  # returns when the job ends
        assert job["state"] == "succeeded", job
        assert job["result"]["strength"] == 0.7


def test_an_inpainting_model_through_the_service_equals_its_stages(
    live: LiveService, tiny_inpaint_model_dir: Path, tmp_path: Path
) -> None:
    """A 9-channel inpainting UNet served by its own application: the image equals the stages run in-process
    on the same inputs (mask and masked-image latents cross replicas intact); without a mask it is a 422."""
    import time

    import torch

    from models.contracts import DenoiseParams, EncodeRequest, ImageEncodeParams, Pixels
    from models.decoder import DecoderStage
    from models.denoiser import DenoiserStage
    from models.snapshot import open_snapshot
    from models.text_encoder import TextEncoderStage
    from tests.integration.conftest import extra_app

    image, mask = init_png(), mask_png()
    body = {"prompt": "a lighthouse", "steps": 4, "seed": 21, "guidance_scale": 7.5, "scheduler": "euler_a"}
    models = [{"name": "inpaint", "source": str(tiny_inpaint_model_dir)}]
    with (
        extra_app(live, "inpaint", tmp_path / "out", models=models) as url,
        httpx.Client(base_url=url, timeout=120) as http,
    ):
        deadline = time.monotonic() + 300
        while (ready := http.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.5)
        served = http.post("/v1/images/generations", json={**body, "init_image": b64(image), "mask": b64(mask)})
        assert served.status_code == 200, served.text
        no_mask = http.post("/v1/images/generations", json={**body, "init_image": b64(image)})
        assert (no_mask.status_code, no_mask.json()["error"]["param"]) == (422, "mask")

    snap, cpu = open_snapshot(str(tiny_inpaint_model_dir)), torch.device("cpu")
    (emb,) = TextEncoderStage("m", snap, cpu, torch.float32).encode([EncodeRequest("m", "a lighthouse", None, True)])
    decoder = DecoderStage("m", snap, cpu, torch.float32)
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))[None]
    repaint = np.asarray(Image.open(io.BytesIO(mask)), dtype=np.float32) / 255.0
    latents = decoder.encode_image(Pixels(pixels, ""), ImageEncodeParams("m", mask=repaint))
    params = DenoiseParams("m", 64, 64, 4, 7.5, "euler_a", 21, strength=1.0)
    expected = decoder.decode_pixels(DenoiserStage("m", snap, cpu, torch.float32).run(params, emb, latents).tensor)[0]
    got = np.asarray(decoded(served)[0].convert("RGB"))
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
