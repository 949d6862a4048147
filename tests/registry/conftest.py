"""Registry tests: the session's S3 (moto) and hub (olah) servers, pointed at from this process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.servers import HubServer, S3Server


@pytest.fixture
def s3_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3


def point_hub_at(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """What HF_ENDPOINT does in a fresh process (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture
def hub_env(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    point_hub_at(monkeypatch, hub.url)
    return hub


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model that a test may publish (push writes the manifest into it)."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture(scope="module")
def tiny_safety_checker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight safety checker (CompVis repo layout), made once per module: copy it before pushing."""
    from models.safety import create_test_safety_checker

    return create_test_safety_checker(tmp_path_factory.mktemp("safety") / "checker", seed=0)
