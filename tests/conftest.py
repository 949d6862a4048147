"""Shared fixtures: one tiny test model per session, built in code (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.testmodels import create_test_model

    return create_test_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)
