"""The deployment graph: an ingress and one deployment per stage of the stage table the config runs, each
replica holding only its own component (or artifact)."""

from __future__ import annotations

import pytest

from tests.integration.conftest import LiveService

pytestmark = pytest.mark.integration


def test_serve_status_shows_one_deployment_per_stage(live: LiveService) -> None:
    from ray import serve

    from serving.stages import deployed_stages

    app = serve.status().applications[live.config.app_name]
    assert app.status == "RUNNING"
    expected = {"Ingress"} | {stage.deployment for stage in deployed_stages(live.config)}
    assert expected == {"Ingress", "TextEncoder", "Denoiser", "Decoder", "Safety", "Upscaler"}
    assert set(app.deployments) == expected
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
    # The artifact stages hold their artifact and nothing of the model.
    for stage, name, modules in (
        ("upscaler", "x4", ["RRDBNet"]),
        ("safety", "checker", ["StableDiffusionSafetyChecker"]),
    ):
        info = stages[stage]
        assert info["ready"] is True and list(info["models"]) == [name]
        assert info["models"][name]["torch_modules"] == modules
        assert not any(f.startswith(("unet/", "vae/", "text_encoder/")) for f in info["models"][name]["files"])
        pids.add(info["pid"])
    assert len(pids) == 5  # separate processes
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
