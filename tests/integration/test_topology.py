"""The deployment graph: an ingress and three stage deployments, each replica holding only its component."""

from __future__ import annotations

import pytest

from tests.integration.conftest import LiveService

pytestmark = pytest.mark.integration


def test_serve_status_shows_four_separate_deployments(live: LiveService) -> None:
    from ray import serve

    app = serve.status().applications[live.config.app_name]
    assert app.status == "RUNNING"
    assert set(app.deployments) == {"Ingress", "TextEncoder", "Denoiser", "Decoder"}
    assert all(d.status == "HEALTHY" for d in app.deployments.values())


def test_each_stage_replica_holds_only_its_component(live: LiveService) -> None:
    with live.client() as client:
        response = client.get("/readyz")
    assert response.status_code == 200, response.text
    stages = response.json()["stages"]
    expected = {
        "text_encoder": (["CLIPTextModel"], ("tokenizer/", "text_encoder/")),
        "denoiser": (["UNet2DConditionModel"], ("unet/", "scheduler/")),
        "decoder": (["AutoencoderKL"], ("vae/",)),
    }
    pids = set()
    for stage, (modules, prefixes) in expected.items():
        info = stages[stage]
        assert info["ready"] is True
        assert info["stage"] == stage and info["device"] == "cpu" and info["dtype"] == "float32"
        model = info["models"]["tiny"]
        assert model["torch_modules"] == modules
        files = [f for f in model["files"] if f != "model_index.json"]
        assert files and all(f.startswith(prefixes) for f in files)
        pids.add(info["pid"])
    assert len(pids) == 3  # three separate processes
    versions = {stages[s]["models"]["tiny"]["version"] for s in expected}
    assert len(versions) == 1


def test_health_and_models(live: LiveService) -> None:
    with live.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        models = client.get("/v1/models").json()
        assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
        schedulers = {s["id"] for s in client.get("/v1/schedulers").json()["data"]}
        assert {"euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "lcm"} <= schedulers
        assert client.get("/docs").status_code == 200
        assert "/v1/images/generations" in client.get("/openapi.json").json()["paths"]
