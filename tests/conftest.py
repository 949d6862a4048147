"""Shared fixtures: one tiny test model per session, built in code (no downloads); the `gpu` marker's skip."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import HubServer, S3Server, hub_server, s3_server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` are skipped where CUDA is unavailable (torch is imported only if one is collected)."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_tests:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.testmodels import create_test_model

    return create_test_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_inpaint_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.testmodels import create_test_model

    return create_test_model(tmp_path_factory.mktemp("models") / "tiny-inpaint", size="tiny", seed=0, inpainting=True)


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3-compatible server (moto) on loopback with a `models` bucket."""
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        server.client().create_bucket(Bucket="models")
        yield server


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """A Hugging Face hub (olah, offline mode) on loopback serving local git repositories."""
    with hub_server(tmp_path_factory.mktemp("hub")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server (Debian's, installed by `make redis`) on a free loopback port, without persistence."""
    import shutil
    import subprocess
    import time

    import redis

    from serving.local import free_port

    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed; run `make redis`"
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline and process.poll() is None, "redis-server did not start"
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=10)
