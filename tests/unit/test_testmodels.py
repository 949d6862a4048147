"""The test-model factory writes the diffusers layout, deterministically, and refuses to overwrite; every size
builds components that fit together the way the stages assume, and `sd15` is SD1.5's architecture."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from models.snapshot import SnapshotError, open_snapshot
from models.testmodels import TEST_MODEL_SIZES, create_test_model
from serving.cli import main

# The published SD1.5 checkpoint (diffusers layout), independent of the factory's table: parameters per
# component (UNet 860M, CLIP ViT-L/14 text tower, VAE) and the UNet's block structure.
SD15_PARAMETERS = {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}
SD15_DOWN_BLOCKS = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
SD15_UP_BLOCKS = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
SIZES = ["tiny", "bench", pytest.param("sd15", marks=pytest.mark.slow)]


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


@pytest.fixture(scope="module")
def built(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    """A model of each size, written once per module; the large ones are deleted afterwards (sd15 is 2 GB)."""
    paths = {"tiny": tiny_model_dir}

    def build(size: str) -> Path:
        if size not in paths:
            paths[size] = create_test_model(tmp_path_factory.mktemp(size) / size, size=size)
        return paths[size]

    yield build
    for size, path in paths.items():
        if size != "tiny":
            shutil.rmtree(path, ignore_errors=True)


def config(model: Path, component: str) -> dict:
    loaded: dict = json.loads((model / component / "config.json").read_text())
    return loaded


def tensors(model: Path, component: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of every tensor in the component's safetensors, read from the file header.

    CLIP names lose the ``text_model.`` prefix SD1.5's own checkpoint has (transformers 5 writes them without;
    both load)."""
    from safetensors import safe_open

    (weights,) = (model / component).glob("*.safetensors")
    with safe_open(str(weights), "pt") as f:
        return {
            name.removeprefix("text_model."): (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype())
            for name in f.keys()  # noqa: SIM118 (a safe_open handle is not iterable)
        }


@pytest.mark.parametrize("size", SIZES)
def test_components_fit_together(built: Callable[[str], Path], size: str) -> None:
    """What the stages assume of any SD1 snapshot holds for every size the factory builds."""
    from transformers import CLIPTokenizer

    model = built(size)
    family = open_snapshot(str(model)).family
    unet, vae, text = (config(model, c) for c in ("unet", "vae", "text_encoder"))
    shapes = {c: {k: shape for k, (shape, _) in tensors(model, c).items()} for c in ("unet", "vae", "text_encoder")}
    # The denoiser makes family.latent_channels latents at 1/vae_scale_factor of the image; the decoder reads them.
    assert unet["in_channels"] == unet["out_channels"] == vae["latent_channels"] == family.latent_channels
    assert shapes["unet"]["conv_in.weight"][1] == shapes["unet"]["conv_out.weight"][0] == family.latent_channels
    assert shapes["vae"]["decoder.conv_in.weight"][1] == family.latent_channels
    assert 2 ** (len(vae["block_out_channels"]) - 1) == family.vae_scale_factor
    assert unet["sample_size"] * family.vae_scale_factor == TEST_MODEL_SIZES[size].default_resolution
    # Every cross-attention of the UNet reads the text encoder's last hidden state.
    hidden = shapes["text_encoder"]["final_layer_norm.weight"][0]
    cross = [shape for name, shape in shapes["unet"].items() if name.endswith("attn2.to_k.weight")]
    assert cross and all(shape[1] == hidden for shape in cross)
    # Every id the tokenizer produces has an embedding row, and its window is the encoder's 77 positions.
    tokenizer = CLIPTokenizer.from_pretrained(model / "tokenizer")
    vocab_rows = shapes["text_encoder"]["embeddings.token_embedding.weight"][0]
    assert len(tokenizer) <= vocab_rows
    positions = shapes["text_encoder"]["embeddings.position_embedding.weight"][0]
    assert positions == tokenizer.model_max_length == 77
    assert (text["bos_token_id"], text["eos_token_id"]) == (tokenizer.bos_token_id, tokenizer.eos_token_id)


def test_bench_has_the_sd15_block_structure(built: Callable[[str], Path]) -> None:
    """`bench` stands in for SD1.5 on CPU: the same blocks (so the same kernels run), only narrower."""
    unet = config(built("bench"), "unet")
    assert unet["down_block_types"] == SD15_DOWN_BLOCKS and unet["up_block_types"] == SD15_UP_BLOCKS
    assert unet["layers_per_block"] == 2 and unet["mid_block_type"] == "UNetMidBlock2DCrossAttn"


@pytest.mark.slow
def test_sd15_size_is_the_real_architecture(built: Callable[[str], Path]) -> None:
    """GPU timings are only SD1.5's if the model is: parameter for parameter, fp16 on disk, 512 px, CLIP-L."""
    model = built("sd15")
    found = {c: tensors(model, c) for c in SD15_PARAMETERS}
    counts = {c: sum(math.prod(shape) for shape, _ in found[c].values()) for c in SD15_PARAMETERS}
    assert counts == SD15_PARAMETERS
    assert {dtype for component in found.values() for _, dtype in component.values()} == {"F16"}
    unet = config(model, "unet")
    assert unet["down_block_types"] == SD15_DOWN_BLOCKS and unet["up_block_types"] == SD15_UP_BLOCKS
    assert unet["sample_size"] == 64 and unet["cross_attention_dim"] == 768  # 512 px latents; CLIP-L width
    assert unet["attention_head_dim"] == 8  # diffusers' name for SD1's 8 heads (the count leaves shapes alone)
    assert found["text_encoder"]["embeddings.token_embedding.weight"][0] == (49408, 768)
    assert config(model, "vae")["scaling_factor"] == 0.18215


def test_cli_create_test(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "create-test", str(tmp_path / "m"), "--size", "tiny", "--seed", "3"]) == 0
    assert "wrote tiny test model" in capsys.readouterr().out
    assert open_snapshot(str(tmp_path / "m"), ("unet", "scheduler")).family.name == "sd1"


def test_snapshot_checks(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(SnapshotError, match=r"model_index\.json"):
        open_snapshot(str(tmp_path))
    with pytest.raises(SnapshotError, match="scheme"):
        open_snapshot("s3://bucket/model")
    assert open_snapshot(f"file://{tiny_model_dir}").path == tiny_model_dir
