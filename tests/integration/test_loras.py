"""Per-request LoRA through the service: the catalog, every API's way of naming adapters, concurrent requests with
different adapters, and the refusals."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import LiveService

pytestmark = pytest.mark.integration


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)


def generate(live: LiveService, **fields: Any) -> dict[str, Any]:
    with live.client() as client:
        response = client.post("/v1/images/generations", json={"prompt": "a paper boat", "seed": 99, **fields})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_catalog_lists_pinned_adapters(live: LiveService) -> None:
    with live.client() as client:
        native = client.get("/v1/loras").json()["data"]
        a1111 = client.get("/sdapi/v1/loras").json()
        assert client.post("/sdapi/v1/refresh-loras").status_code == 200
    names = {"ink", "paper", "grain", "broken", "xl"}
    assert {a["name"] for a in native} == names
    assert all(a["ref"] and a["error"] is None for a in native)
    assert {a["name"] for a in a1111} == names


def test_concurrent_requests_with_different_adapters_each_get_their_own(live: LiveService) -> None:
    """Four requests with four adapter sets (one with none), sent together, equal their solo runs; the adapters
    change the image and the response names them with their pinned references."""
    sets: list[list[dict[str, Any]]] = [
        [],
        [{"name": "ink", "scale": 0.8}],
        [{"name": "paper", "scale": 1.2}],
        [{"name": "grain", "scale": 1.0}, {"name": "ink", "scale": 0.5}],
    ]
    fields = {"steps": 12, "seed": 5}
    solo = [generate(live, loras=s or None, **fields) for s in sets]
    with ThreadPoolExecutor(len(sets)) as pool:
        together = list(pool.map(lambda s: generate(live, loras=s or None, **fields), sets))
    for alone, shared in zip(solo, together, strict=True):
        diff = np.abs(pixels(alone["data"][0]["b64_json"]) - pixels(shared["data"][0]["b64_json"]))
        assert diff.max() <= 1  # the batching tolerance (README: rows of one UNet call are independent)
    images = [pixels(r["data"][0]["b64_json"]) for r in solo]
    for i in range(1, len(images)):
        assert np.abs(images[i] - images[0]).max() > 8, f"adapter set {i} left the image unchanged"
    assert solo[0].get("loras") is None
    named = solo[3]["loras"]
    assert [(a["name"], a["scale"]) for a in named] == [("grain", 1.0), ("ink", 0.5)]
    assert all(a["ref"] for a in named)


def test_a1111_prompt_tags_and_openai_extra_body(live: LiveService) -> None:
    import openai

    native = generate(live, prompt="a red kite", loras=[{"name": "ink", "scale": 0.7}])
    with live.client() as client:
        a1111 = client.post(
            "/sdapi/v1/txt2img",
            json={"prompt": "a red kite <lora:ink:0.7>", "seed": 99, "steps": 4, "width": 64, "height": 64,
                  "cfg_scale": 7.5, "sampler_name": "Euler"},
        )  # fmt: skip
    assert a1111.status_code == 200, a1111.text
    info = a1111.json()["info"]
    assert "<lora:ink:0.7>" in info and "Lora hashes" in info
    assert np.abs(pixels(a1111.json()["images"][0]) - pixels(native["data"][0]["b64_json"])).max() <= 1
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused")
    sdk = client.images.generate(prompt="a red kite", extra_body={"seed": 99, "loras": [{"name": "ink", "scale": 0.7}]})
    assert sdk.data and sdk.data[0].b64_json
    assert np.abs(pixels(sdk.data[0].b64_json) - pixels(native["data"][0]["b64_json"])).max() <= 1


@pytest.mark.parametrize(
    ("loras", "status", "code", "param"),
    [
        ([{"name": "nope"}], 404, "lora_not_found", "loras[0].name"),
        ([{"name": "ink", "scale": 9.0}], 422, "invalid_request", "loras[0].scale"),
        ([{"name": n} for n in ("ink", "paper", "grain", "xl", "broken")], 422, "invalid_request", "loras"),
        ([{"name": "broken"}], 422, "lora_invalid", "loras"),
        ([{"name": "xl"}], 422, "lora_invalid", "loras"),
        ([{"name": "ink"}, {"name": "ink"}], 422, "invalid_request", "loras[1].name"),
    ],
)
def test_bad_adapters_are_refused(
    live: LiveService, loras: list[dict[str, Any]], status: int, code: str, param: str
) -> None:
    with live.client() as client:
        response = client.post("/v1/images/generations", json={"prompt": "x", "loras": loras})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param)
    if loras == [{"name": "xl"}]:
        assert "sdxl" in error["message"]
    generate(live, loras=[{"name": "ink"}])  # the replicas keep serving


def test_grpc_generate_with_adapters(live: LiveService) -> None:
    import grpc

    from serving.generated.sdserve.v1 import sdserve_pb2 as pb
    from serving.generated.sdserve.v1 import sdserve_pb2_grpc as pb_grpc

    native = generate(live, prompt="a glass bird", loras=[{"name": "paper", "scale": 0.9}])
    request = pb.GenerateRequest(prompt="a glass bird", seed=99, loras=[pb.Lora(name="paper", scale=0.9)])
    with grpc.insecure_channel(live.grpc_target) as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        response = stub.Generate(request, metadata=live.grpc_metadata(), timeout=120)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(
                pb.GenerateRequest(prompt="x", loras=[pb.Lora(name="nope")]), metadata=live.grpc_metadata(), timeout=60
            )
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert [(a.name, a.ref) for a in response.loras] == [("paper", native["loras"][0]["ref"])]
    ours = np.asarray(Image.open(io.BytesIO(response.images[0].data)).convert("RGB")).astype(int)
    assert np.abs(ours - pixels(native["data"][0]["b64_json"])).max() <= 1


def test_replicas_hold_the_adapter_sets_they_served(live: LiveService) -> None:
    """The text encoder and the denoiser register a request's adapter set with Serve's multiplexing (what the
    router prefers for the next request with that set) and hold its adapters in host memory and device slots."""
    body = generate(live, prompt="a copper kettle", loras=[{"name": "paper", "scale": 1.0}, {"name": "ink"}])
    route = "|".join(sorted(a["ref"] for a in body["loras"]))
    with live.client() as client:
        stages = client.get("/readyz").json()["stages"]
    for name in ("text_encoder", "denoiser"):
        loras = stages[name]["loras"]
        assert route in loras["routes"], name
        assert {a["ref"] for a in body["loras"]} <= set(loras["host_adapters"]), name
    resident = next(iter(stages["denoiser"]["loras"]["slots"].values()))["resident"]
    assert {a["ref"] for a in body["loras"]} <= set(resident)


def test_jobs_with_different_adapters_run_in_the_same_unet_calls(live: LiveService) -> None:
    """Four jobs with four adapter sets (one with none): once all four are between their first and last step they
    are in the denoiser's running batch together, and every UNet call from then on holds all of them (the step
    batcher puts every running job of one shape into the call); each result equals its solo run."""
    import time

    sets: list[list[dict[str, Any]] | None] = [
        None,
        [{"name": "ink"}],
        [{"name": "paper", "scale": 0.7}],
        [{"name": "grain"}, {"name": "ink", "scale": 0.4}],
    ]
    steps = 40
    body = {"prompt": "a tin robot", "steps": steps, "seed": 3}
    with live.client() as client:
        ids = [client.post("/v1/jobs", json={**body, "loras": s}).json()["id"] for s in sets]
        deadline = time.monotonic() + 120
        together = False
        while not together and time.monotonic() < deadline:
            jobs = [client.get(f"/v1/jobs/{i}").json() for i in ids]
            done = [j["progress"]["step"] for j in jobs]
            together = all(0 < s < steps for s in done)
            if any(j["state"] in ("succeeded", "failed", "cancelled") for j in jobs):
                break
            time.sleep(0.02)
        assert together, f"the four jobs were never running at once: steps {done}"
        results = []
        for job_id in ids:
            while (job := client.get(f"/v1/jobs/{job_id}").json())["state"] in ("queued", "running"):
                assert time.monotonic() < deadline + 60
                time.sleep(0.1)
            assert job["state"] == "succeeded", job
            image = client.get(job["result"]["data"][0]["url"])
            results.append(np.asarray(Image.open(io.BytesIO(image.content)).convert("RGB")).astype(int))
        denoiser = client.get("/readyz").json()["stages"]["denoiser"]
    assert denoiser["recent_batch_sizes"]["max"] >= len(sets)
    for loras, shared in zip(sets, results, strict=True):
        alone = pixels(generate(live, loras=loras, **body)["data"][0]["b64_json"])
        assert np.abs(alone - shared).max() <= 1
