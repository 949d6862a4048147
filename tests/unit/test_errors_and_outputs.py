"""The error shape on paths the live service rarely takes (crashes), and the local output store."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI
from fastapi.testclient import TestClient

from serving.errors import ApiError, install_error_handlers
from serving.outputs import OutputStore, OutputSweeper


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


def age(path: Path, seconds: float) -> None:
    """Make a file look written ``seconds`` ago."""
    then = time.time() - seconds
    os.utime(path, (then, then))


async def until(condition: Callable[[], bool], deadline_s: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail after ``deadline_s`` (never reached when the code works)."""
    async with asyncio.timeout(deadline_s):
        while not condition():
            await asyncio.sleep(0.005)


def test_the_sweeper_deletes_images_nobody_fetches(tmp_path: Path) -> None:
    store = OutputStore(tmp_path, ttl_s=60)
    # An unread image expires on schedule, within a quarter of its ttl and never more than a minute late.
    assert OutputSweeper(store).interval_s == 15
    assert OutputSweeper(OutputStore(tmp_path, ttl_s=86400)).interval_s == 60

    async def main() -> None:
        left_by_an_earlier_replica = tmp_path / store.put(b"old", "image/png")
        age(left_by_an_earlier_replica, 120)
        fresh = tmp_path / store.put(b"new", "image/jpeg")
        sweeper = OutputSweeper(store, interval_s=0.01)
        sweeper.start()
        await until(lambda: not left_by_an_earlier_replica.exists())
        assert fresh.exists()
        age(fresh, 120)  # expires while the sweeper runs, still unread
        await until(lambda: not fresh.exists())
        assert sweeper.running
        await sweeper.stop()
        assert not sweeper.running

    asyncio.run(main())


def test_a_failed_sweep_does_not_stop_the_sweeper(tmp_path: Path) -> None:
    class FlakyStore(OutputStore):
        failures = 2

        def sweep(self) -> int:
            if self.failures:
                self.failures -= 1
                raise PermissionError("outputs folder not readable")
            return super().sweep()

    store = FlakyStore(tmp_path, ttl_s=60)

    async def main() -> None:
        image = tmp_path / store.put(b"old", "image/webp")
        age(image, 120)
        sweeper = OutputSweeper(store, interval_s=0.01)
        sweeper.start()
        await until(lambda: not image.exists())
        assert store.failures == 0  # deleted by the sweep after the two that failed
        await sweeper.stop()

    asyncio.run(main())
