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
            ({"prompt": "x", "enable_hr": True}, 422, "enable_hr"),
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
