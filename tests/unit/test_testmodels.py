"""The test-model factory writes the diffusers layout, deterministically, and refuses to overwrite."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from models.snapshot import SnapshotError, open_snapshot
from models.testmodels import TEST_MODEL_SIZES, create_test_model
from serving.cli import main


def digest(path: Path) -> dict[str, str]:
    return {
        p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_layout_and_determinism(tiny_model_dir: Path, tmp_path: Path) -> None:
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for folder in ("tokenizer", "text_encoder", "unet", "vae", "scheduler"):
        assert (tiny_model_dir / folder).is_dir()
    assert not [p for p in tiny_model_dir.rglob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth")]
    assert (tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tiny_model_dir / "tokenizer" / "vocab.json").is_file()
    again = create_test_model(tmp_path / "again", size="tiny", seed=0)
    assert digest(again) == digest(tiny_model_dir)
    other = create_test_model(tmp_path / "other", size="tiny", seed=1)
    assert (
        digest(other)["unet/diffusion_pytorch_model.safetensors"]
        != digest(tiny_model_dir)["unet/diffusion_pytorch_model.safetensors"]
    )
    with pytest.raises(FileExistsError):
        create_test_model(again, size="tiny")


def test_sd15_size_is_the_real_architecture() -> None:
    spec = TEST_MODEL_SIZES["sd15"]
    assert spec.unet["block_out_channels"] == (320, 640, 1280, 1280)
    assert spec.text["hidden_size"] == 768 and spec.text["num_hidden_layers"] == 12
    assert spec.vae["block_out_channels"] == (128, 256, 512, 512)
    assert spec.vocab_size == 49408


def test_cli_create_test(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "create-test", str(tmp_path / "m"), "--size", "tiny", "--seed", "3"]) == 0
    assert "wrote tiny test model" in capsys.readouterr().out
    assert open_snapshot(str(tmp_path / "m"), stage="denoiser").family.name == "sd1"


def test_snapshot_checks(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(SnapshotError, match=r"model_index\.json"):
        open_snapshot(str(tmp_path))
    with pytest.raises(SnapshotError, match="scheme"):
        open_snapshot("s3://bucket/model")
    assert open_snapshot(f"file://{tiny_model_dir}").path == tiny_model_dir
