"""The file `sdserve render-serve-config` writes is accepted by Ray's own `serve run` and serves images."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from serving.local import free_port
from tests.serve_process import serve_run

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
    subprocess.run(
        [str(Path(sys.executable).parent / "sdserve"), "render-serve-config", str(app_yaml), "-o", str(serve_yaml)],
        check=True,
        timeout=120,
    )
    with serve_run(serve_yaml, port) as url:
        response = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a lighthouse"}, timeout=120)
        assert response.status_code == 200, response.text
        image = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
        assert image.size == (64, 64)
