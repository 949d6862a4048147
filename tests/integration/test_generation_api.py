"""End-to-end generation through a real local Ray Serve over HTTP."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tests.integration.conftest import LiveService

pytestmark = pytest.mark.integration


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def generate(live: LiveService, **body: object) -> httpx.Response:
    with live.client() as client:
        return client.post("/v1/images/generations", json={"prompt": "a red apple", **body})


def test_png_b64_of_the_requested_size(live: LiveService) -> None:
    response = generate(live, size="96x64", n=2, seed=3)
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["data"]) == 2
    for item in body["data"]:
        image = decode(item["b64_json"])
        assert image.format == "PNG" and image.size == (96, 64) and image.mode == "RGB"
    assert body["model"] == "tiny" and body["seed"] == 3 and body["size"] == "96x64"
    assert response.headers["x-sdserve-model-version"] == body["model_version"]
    assert body["data"][0]["b64_json"] != body["data"][1]["b64_json"]


@pytest.mark.parametrize(("fmt", "pil_name"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats_as_url(live: LiveService, fmt: str, pil_name: str) -> None:
    response = generate(live, response_format="url", output_format=fmt, output_compression=80)
    assert response.status_code == 200, response.text
    url = response.json()["data"][0]["url"]
    assert url.startswith(live.url)
    image_response = httpx.get(url, timeout=30)
    assert image_response.status_code == 200
    assert image_response.headers["content-type"] == f"image/{fmt}"
    image = Image.open(io.BytesIO(image_response.content))
    assert image.format == pil_name and image.size == (64, 64)


def test_unknown_image_id_is_404(live: LiveService) -> None:
    with live.client() as client:
        # A well-formed id that names no image, and a path that is no image id at all.
        for image_id, code in (("0" * 32 + ".png", "image_not_found"), ("..%2F..%2Fetc%2Fpasswd", "not_found")):
            response = client.get(f"/v1/images/{image_id}")
            assert response.status_code == 404
            assert response.json()["error"]["code"] == code


def test_same_seed_same_bytes(live: LiveService) -> None:
    body = {"prompt": "a castle on a hill", "seed": 1234, "scheduler": "euler_a", "steps": 5}
    first = generate(live, **body).json()["data"][0]["b64_json"]
    second = generate(live, **body).json()["data"][0]["b64_json"]
    other = generate(live, **{**body, "seed": 1235}).json()["data"][0]["b64_json"]
    assert first == second
    assert first != other


@pytest.mark.parametrize(
    ("scheduler", "guidance", "negative"),
    [("euler", 7.5, None), ("dpmpp_2m_karras", 5.0, "blurry, low quality"), ("ddim", 1.0, None)],
)
def test_staged_service_equals_diffusers_pipeline(
    live: LiveService, scheduler: str, guidance: float, negative: str | None
) -> None:
    from diffusers import StableDiffusionPipeline

    from models.schedulers import create_scheduler

    prompt = "a photo of an astronaut riding a horse on mars"
    response = generate(
        live, prompt=prompt, negative_prompt=negative, size="64x64", steps=6, guidance_scale=guidance,
        scheduler=scheduler, seed=77, n=2,
    )  # fmt: skip
    assert response.status_code == 200, response.text
    served = np.stack([np.asarray(decode(d["b64_json"])) for d in response.json()["data"]])

    pipe = StableDiffusionPipeline.from_pretrained(live.model_dir, safety_checker=None)
    pipe.scheduler = create_scheduler(scheduler, dict(pipe.scheduler.config))
    reference = pipe(
        prompt, negative_prompt=negative, height=64, width=64, num_inference_steps=6, guidance_scale=guidance,
        num_images_per_prompt=2, generator=torch.Generator("cpu").manual_seed(77), output_type="np",
    ).images  # fmt: skip
    reference = (reference * 255).round().astype("uint8")
    assert served.shape == reference.shape
    assert np.abs(served.astype(int) - reference.astype(int)).max() <= 1


def test_concurrent_requests_all_succeed_and_share_steps(live: LiveService) -> None:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=live.url, timeout=120) as client:
            bodies = [
                {"prompt": f"prompt number {i}", "seed": i, "steps": 12, "scheduler": ["euler", "ddim", "lcm"][i % 3]}
                for i in range(10)
            ]
            return await asyncio.gather(*(client.post("/v1/images/generations", json=b) for b in bodies))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 10
    seeds = [r.json()["seed"] for r in responses]
    assert seeds == list(range(10))
    with live.client() as client:
        denoiser = client.get("/readyz").json()["stages"]["denoiser"]
    # Step-level batching: concurrent requests shared UNet calls.
    assert denoiser["recent_batch_sizes"]["max"] > 1


def test_long_prompt_within_limit_is_served(live: LiveService) -> None:
    prompt = ", ".join(["a cozy living room with a fireplace"] * 12)  # well over 77 tokens
    response = generate(live, prompt=prompt)
    assert response.status_code == 200, response.text


def test_openai_python_sdk(live: LiveService) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{live.url}/v1", api_key="unused")
    result = client.images.generate(
        model="tiny", prompt="a cute dog", n=1, size="64x64", response_format="b64_json",  # type: ignore[arg-type]
        extra_body={"steps": 3, "seed": 9},
    )  # fmt: skip
    assert result.data is not None and result.data[0].b64_json
    assert decode(result.data[0].b64_json).size == (64, 64)
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
