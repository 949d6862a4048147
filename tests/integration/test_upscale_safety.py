"""Upscaling and the safety check on every API, on the live app (tiny x4 upscaler; a checker in `flag` mode that
flags the first image of ``FLAGGED_REQUEST`` and passes the second)."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from PIL import Image

from serving.generated.sdserve.v1 import sdserve_pb2 as pb
from serving.generated.sdserve.v1 import sdserve_pb2_grpc as pb_grpc
from tests.integration.conftest import FLAGGED_REQUEST, LiveService, extra_app

UPSCALED = {"prompt": "a lighthouse at dusk", "seed": 11, "steps": 3}


def b64(data: str) -> bytes:
    return base64.b64decode(data)


def size_of(png: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(png)) as image:
        return image.size


@pytest.fixture(scope="module")
def stub(live: LiveService) -> Any:
    with grpc.insecure_channel(live.grpc_target) as channel:
        yield pb_grpc.ImageGenerationStub(channel)


def test_the_same_upscaled_image_through_rest_openai_grpc_jobs_and_a1111(live: LiveService, stub: Any) -> None:
    with live.client() as http:
        plain = http.post("/v1/images/generations", json=UPSCALED)
        assert plain.status_code == 200, plain.text
        generated = b64(plain.json()["data"][0]["b64_json"])

        rest = http.post("/v1/images/generations", json={**UPSCALED, "upscale": {"model": "x4", "factor": 4}})
        assert rest.status_code == 200, rest.text
        body = rest.json()
        upscaled = b64(body["data"][0]["b64_json"])
        assert body["size"] == "256x256" and size_of(upscaled) == (256, 256)  # the final size
        assert body["upscale"] == {"model": "x4", "factor": 4.0}

        extras = http.post(
            "/sdapi/v1/extra-single-image",
            json={"image": base64.b64encode(generated).decode(), "upscaler_1": "x4", "upscaling_resize": 4},
        )
        assert extras.status_code == 200, extras.text
        assert b64(extras.json()["image"]) == upscaled

        job = http.post("/v1/jobs", json={**UPSCALED, "upscale": {"factor": 4}}).json()  # x4 is the default
        deadline = time.monotonic() + 120
        while (state := http.get(f"/v1/jobs/{job['id']}").json())["state"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert state["state"] == "succeeded", state
        assert state["result"]["size"] == "256x256"
        assert http.get(f"/v1/jobs/{job['id']}/images/0").content == upscaled

    from openai import OpenAI

    client = OpenAI(base_url=f"{live.url}/v1", api_key="unused")
    sdk = client.images.generate(
        prompt=UPSCALED["prompt"], n=1, response_format="b64_json",
        extra_body={"seed": 11, "steps": 3, "upscale": {"model": "x4", "factor": 4}},
    )  # fmt: skip
    assert sdk.data is not None and b64(sdk.data[0].b64_json or "") == upscaled

    request = pb.GenerateRequest(prompt=UPSCALED["prompt"], seed=11, steps=3, upscale=pb.Upscale(model="x4", factor=4))
    response = stub.Generate(request, metadata=live.grpc_metadata(), timeout=120)
    assert response.images[0].data == upscaled
    assert (response.width, response.height, response.upscale.factor) == (256, 256, 4.0)


def test_upscale_errors_name_the_field(live: LiveService) -> None:
    with live.client() as http:
        unknown = http.post("/v1/images/generations", json={"prompt": "x", "upscale": {"model": "nope"}})
        assert unknown.status_code == 404
        assert unknown.json()["error"] | {"message": ""} == {
            "code": "upscaler_not_found", "param": "upscale.model", "message": "",
        }  # fmt: skip
        factor = http.post("/v1/images/generations", json={"prompt": "x", "upscale": {"factor": 9}})
        assert (factor.status_code, factor.json()["error"]["param"]) == (422, "upscale.factor")
        shape = http.post("/v1/images/generations", json={"prompt": "x", "upscale": {"factor": "big"}})
        assert (shape.status_code, shape.json()["error"]["param"]) == (422, "upscale.factor")
        extras = http.post("/sdapi/v1/extra-single-image", json={"image": "bm90IGFuIGltYWdl", "upscaler_1": "x4"})
        assert (extras.status_code, extras.json()["error"]["param"]) == (422, "image")
        png = io.BytesIO()
        Image.new("RGB", (16, 16)).save(png, format="PNG")
        image = base64.b64encode(png.getvalue()).decode()
        missing = http.post("/sdapi/v1/extra-single-image", json={"image": image, "upscaler_1": "nope"})
        assert (missing.status_code, missing.json()["error"]["param"]) == (404, "upscaler_1")
        assert [u["name"] for u in http.get("/sdapi/v1/upscalers").json()] == ["x4"]
        assert [u["id"] for u in http.get("/v1/upscalers").json()["data"]] == ["x4"]


def test_safety_flag_and_block_on_every_api(live: LiveService, stub: Any) -> None:
    with live.client() as http:
        flagged = http.post("/v1/images/generations", json=FLAGGED_REQUEST)
        assert flagged.status_code == 200, flagged.text
        body = flagged.json()
        assert [d["flagged"] for d in body["data"]] == [True, False]
        assert body["safety"] == {"mode": "flag", "checker": "checker", "withheld": 0}
        second = body["data"][1]["b64_json"]

        # A request may always ask for a stricter mode: the flagged image is withheld, the other returned.
        blocked = http.post("/v1/images/generations", json={**FLAGGED_REQUEST, "safety": "block"}).json()
        assert [d["b64_json"] for d in blocked["data"]] == [second]
        assert blocked["safety"]["withheld"] == 1
        every = http.post("/v1/images/generations", json={**FLAGGED_REQUEST, "n": 1, "safety": "block"})
        assert every.status_code == 400
        assert every.json()["error"]["code"] == "content_policy_violation"
        # ... but not a less strict one, unless the operator allows it.
        off = http.post("/v1/images/generations", json={**FLAGGED_REQUEST, "safety": "off"})
        assert (off.status_code, off.json()["error"]["param"]) == (422, "safety")

        a1111 = http.post(
            "/sdapi/v1/txt2img",
            json={"prompt": FLAGGED_REQUEST["prompt"], "seed": FLAGGED_REQUEST["seed"], "steps": 4,
                  "width": 64, "height": 64, "cfg_scale": 7.5, "sampler_name": "Euler"},
        )  # fmt: skip
        assert a1111.status_code == 200, a1111.text
        import json

        assert json.loads(a1111.json()["info"])["nsfw"] == [True]

        job = http.post("/v1/jobs", json={**FLAGGED_REQUEST, "safety": "block"}).json()
        deadline = time.monotonic() + 120
        while (state := http.get(f"/v1/jobs/{job['id']}").json())["state"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert state["state"] == "succeeded", state
        assert [image["flagged"] for image in state["result"]["data"]] == [False]
        assert state["result"]["safety"]["withheld"] == 1

    from openai import OpenAI

    sdk = OpenAI(base_url=f"{live.url}/v1", api_key="unused").images.generate(
        prompt=FLAGGED_REQUEST["prompt"], n=2, response_format="b64_json",
        extra_body={"seed": FLAGGED_REQUEST["seed"], "safety": "block"},
    )  # fmt: skip
    assert sdk.data is not None and [d.b64_json for d in sdk.data] == [second]

    request = pb.GenerateRequest(prompt=FLAGGED_REQUEST["prompt"], seed=FLAGGED_REQUEST["seed"], n=2)
    response = stub.Generate(request, metadata=live.grpc_metadata(), timeout=120)
    assert [image.flagged for image in response.images] == [True, False]
    block = pb.GenerateRequest(prompt=FLAGGED_REQUEST["prompt"], seed=FLAGGED_REQUEST["seed"], n=2, safety="block")
    response = stub.Generate(block, metadata=live.grpc_metadata(), timeout=120)
    assert (len(response.images), response.withheld) == (1, 1)
    with pytest.raises(grpc.RpcError) as info:
        block.n = 1
        stub.Generate(block, metadata=live.grpc_metadata(), timeout=120)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "content_policy_violation" in (info.value.details() or "")


def test_an_artifact_that_fails_verification_is_refused_and_the_rest_keeps_serving(
    live: LiveService, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "weights.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")  # no upscaler
    upscalers = [{"name": "x4", "source": str(live.upscaler_dir)}, {"name": "broken", "source": str(broken)}]
    with extra_app(live, "degraded", tmp_path / "out", upscalers=upscalers) as url:
        import httpx

        deadline = time.monotonic() + 300
        with httpx.Client(base_url=url, timeout=60) as http:
            while (ready := http.get("/readyz")).status_code != 200 or ready.json()["status"] == "not_ready":
                assert time.monotonic() < deadline, ready.text
                time.sleep(0.5)
            assert ready.json()["status"] == "degraded"
            assert "upscaler" in ready.json()["errors"]["broken"]
            ok = http.post("/v1/images/generations", json={"prompt": "x", "steps": 2, "upscale": {"model": "x4"}})
            assert ok.status_code == 200, ok.text
            refused = http.post("/v1/images/generations", json={"prompt": "x", "upscale": {"model": "broken"}})
            assert (refused.status_code, refused.json()["error"]["code"]) == (503, "model_unavailable"), refused.text

        # The upscaler replica exports the failed artifact as a metric (the chart's degraded alert reads it).
        def load_errors() -> float | None:
            labels = ('application="degraded"', 'stage="upscaler"')
            for line in httpx.get(live.metrics_url, timeout=10).text.splitlines():
                if line.startswith("ray_sdserve_model_load_errors{") and all(label in line for label in labels):
                    return float(line.rsplit(" ", 1)[1])
            return None

        while load_errors() != 1:
            assert time.monotonic() < deadline, load_errors()
            time.sleep(0.5)
