"""The chart's own serveConfigV2 serves: extracted from the rendered RayService and run on a local Ray Serve
whose node advertises what the cluster's nodes would (fake GPUs and each group's custom resource)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from serving.auth import hash_key
from serving.local import free_port
from tests.chart.helpers import CHART, render
from tests.serve_process import serve_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY = "sds_chart-test-key"


def test_rendered_serve_config_generates_an_upscaled_checked_image(tiny_model_dir: Path, tmp_path: Path) -> None:
    """With an upscaler and a safety checker (block mode) in the values, the chart's serveConfigV2 runs all five
    stages, each on its group's resource, and serves an upscaled, checked image to a caller with an API key (the
    chart's default, auth on); a request whose only image the checker flags is refused as a content policy
    violation, and one without a key is refused as unauthorized."""
    from models.safety import create_test_safety_checker
    from models.upscaler import create_test_upscaler
    from tests.integration.conftest import FLAGGED_REQUEST, flagged_images

    flag, clear = flagged_images(tiny_model_dir)
    config = {
        "models": [{"name": "tiny", "source": str(tiny_model_dir)}],
        "defaults": {"steps": 4, "size": "64x64"},
        "upscalers": [{"name": "x4", "source": str(create_test_upscaler(tmp_path / "x4", seed=0))}],
        "safety_checkers": [
            {
                "name": "checker",
                "source": str(create_test_safety_checker(tmp_path / "c", flag_images=flag, clear_images=clear)),
            }
        ],
        "safety": {"mode": "block"},
    }
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"config": config, "auth": {"existingSecret": "sdserve-api-keys"}}))
    # Default (GPU) values: every stage asks for GPUs and its group's resource; API keys on.
    docs = render([values])
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    port = free_port()
    # The only changes: free ports instead of 8000 and 9000, and a local key file instead of the Secret's mount.
    serve_config["http_options"]["port"] = port
    serve_config["grpc_options"]["port"] = free_port()
    args = serve_config["applications"][0]["args"]
    assert args["auth"]["enabled"] is True and args["auth"]["keys_file"] == "/etc/sdserve/auth/keys.yaml"
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"keys": [{"id": "chart-test", "tenant": "chart", "sha256": hash_key(KEY)}]}))
    args["auth"]["keys_file"] = str(keys_file)
    config_file = tmp_path / "serve.yaml"
    config_file.write_text(yaml.safe_dump(serve_config))

    cluster = service["spec"]["rayClusterConfig"]
    advertised: dict[str, float] = {"CPU": 16, "GPU": 4}
    for params in [cluster["headGroupSpec"]["rayStartParams"]] + [
        g["rayStartParams"] for g in cluster["workerGroupSpecs"]
    ]:
        advertised.update(json.loads(json.loads(params["resources"])))
    # RAY_OVERRIDE_RESOURCES makes the local node advertise fake GPUs and the groups' custom resources.
    key = {"Authorization": f"Bearer {KEY}"}
    with serve_run(config_file, port, {"RAY_OVERRIDE_RESOURCES": json.dumps(advertised)}) as url:
        ready = httpx.get(f"{url}/readyz", headers=key, timeout=30).json()  # the details need a key
        assert {s: ready["stages"][s]["ready"] for s in ready["stages"]} == {
            "text_encoder": True,
            "denoiser": True,
            "decoder": True,
            "safety": True,
            "upscaler": True,
        }
        response = httpx.post(
            f"{url}/v1/images/generations",
            json={**FLAGGED_REQUEST, "upscale": {"model": "x4", "factor": 2}},
            headers=key,
            timeout=120,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["safety"] == {"mode": "block", "checker": "checker", "withheld": 1}
        (only,) = body["data"]
        assert only["flagged"] is False
        image = Image.open(io.BytesIO(base64.b64decode(only["b64_json"])))
        assert image.size == (128, 128) and body["size"] == "128x128"
        refused = httpx.post(f"{url}/v1/images/generations", json={**FLAGGED_REQUEST, "n": 1}, headers=key, timeout=120)
        assert (refused.status_code, refused.json()["error"]["code"]) == (400, "content_policy_violation")
        unauthorized = httpx.post(f"{url}/v1/images/generations", json={**FLAGGED_REQUEST, "n": 1}, timeout=30)
        assert (unauthorized.status_code, unauthorized.json()["error"]["code"]) == (401, "unauthorized")
    assert CHART.is_dir()
