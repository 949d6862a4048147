"""The file `sdserve render-serve-config` writes is accepted by Ray's own `serve run` and serves images."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from serving.local import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_serve_run_with_rendered_config(tiny_model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    app_yaml = tmp_path / "app.yaml"
    app_yaml.write_text(
        yaml.safe_dump(
            {
                "models": [{"name": "tiny", "source": f"file://{tiny_model_dir}"}],
                "http": {"host": "127.0.0.1", "port": port},
                "defaults": {"size": "64x64", "steps": 3},
                "outputs": {"directory": str(tmp_path / "outputs")},
            }
        )
    )
    serve_yaml = tmp_path / "serve.yaml"
    bin_dir = Path(sys.executable).parent
    subprocess.run(
        [str(bin_dir / "sdserve"), "render-serve-config", str(app_yaml), "-o", str(serve_yaml)],
        check=True,
        timeout=120,
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [str(bin_dir / "serve"), "run", str(serve_yaml)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"{url}/readyz", timeout=10).status_code == 200
            except httpx.HTTPError:
                ready = False
            if ready:
                break
            time.sleep(1)
        assert ready, "the app from the rendered config never became ready"
        response = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a lighthouse"}, timeout=120)
        assert response.status_code == 200, response.text
        image = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
        assert image.size == (64, 64)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
