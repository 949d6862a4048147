"""The error shape on paths the live service rarely takes (crashes), and the local output store."""

from __future__ import annotations

import os
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi.testclient import TestClient

from serving.errors import ApiError, install_error_handlers
from serving.outputs import OutputStore


def test_unhandled_exception_becomes_a_500_in_the_error_shape() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret detail")

    @app.get("/busy")
    async def busy() -> None:
        raise ApiError(503, "overloaded", "try later", headers={"Retry-After": "2"})

    client = TestClient(app, raise_server_exceptions=False)
    response = client.get("/boom")
    assert response.status_code == 500
    assert response.json() == {
        "error": {"code": "internal_error", "message": "internal error: RuntimeError", "param": None}
    }
    assert "secret detail" not in response.text
    busy_response = client.get("/busy")
    assert busy_response.status_code == 503 and busy_response.headers["retry-after"] == "2"


def test_output_store_round_trip_expiry_and_ids(tmp_path: Path) -> None:
    store = OutputStore(tmp_path, ttl_s=60)
    image_id = store.put(b"\x89PNG data", "image/png")
    assert image_id.endswith(".png")
    assert store.get(image_id) == (b"\x89PNG data", "image/png")
    assert store.get("../" + image_id) is None
    assert store.get("nothing.png") is None
    old = time.time() - 120
    os.utime(tmp_path / image_id, (old, old))
    assert store.get(image_id) is None
    assert not (tmp_path / image_id).exists()
    other = store.put(b"x", "image/webp")
    os.utime(tmp_path / other, (old, old))
    assert store.sweep() == 1
