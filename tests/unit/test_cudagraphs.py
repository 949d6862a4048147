"""CUDA graphs for the UNet: bucketing, the eager path off CUDA, and (on a GPU) graphs equal eager calls."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.contracts import DenoiseParams, EncodeRequest
from models.cudagraphs import ROW_BUCKETS, GraphedUNet, bucket_for
from models.denoiser import DenoiserStage
from models.snapshot import open_snapshot
from models.text_encoder import TextEncoderStage


def test_rows_pad_to_the_next_bucket() -> None:
    assert [bucket_for(r) for r in (1, 2, 3, 5, 7, 9, 17, 33, 64)] == [1, 2, 4, 6, 8, 12, 24, 48, 64]
    assert bucket_for(ROW_BUCKETS[-1] + 1) is None  # larger batches run eagerly


def unet_inputs(unet, rows: int, device: torch.device, dtype: torch.dtype, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator("cpu").manual_seed(seed)
    c = unet.config
    size = c.sample_size
    sample = torch.randn((rows, c.in_channels, size, size), generator=g).to(device, dtype)
    steps = torch.randint(0, 1000, (rows,), generator=g).to(device, torch.float32)
    hidden = torch.randn((rows, 77, c.cross_attention_dim), generator=g).to(device, dtype)
    return sample, steps, hidden


def test_off_cuda_the_unet_is_called_eagerly(tiny_model_dir: Path) -> None:
    snap = open_snapshot(str(tiny_model_dir))
    stage = DenoiserStage("tiny", snap, torch.device("cpu"), torch.float32, warm_up=(64, 64, 4))
    assert stage.graphs is None and stage.loaded_modules()["cuda_graphs"] == "off"
    assert stage.warm_up(64, 64, 4) == 0
    graphed = GraphedUNet(stage.unet)
    sample, steps, hidden = unet_inputs(stage.unet, 3, torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        out = graphed(sample, steps, hidden, None)
        ref = stage.unet(sample, steps, encoder_hidden_states=hidden, return_dict=False)[0]
    assert torch.equal(out, ref)
    assert graphed.describe() == {"graphs": 0, "replays": 0, "eager_calls": 1}


@pytest.mark.gpu
def test_graph_replays_match_eager_calls(tiny_model_dir: Path) -> None:
    cuda = torch.device("cuda")
    stage = DenoiserStage("tiny", open_snapshot(str(tiny_model_dir)), cuda, torch.float16)
    assert stage.graphs is not None
    with torch.inference_mode():
        for rows, seed in ((2, 0), (3, 1), (4, 2), (3, 3)):  # 3 rows pad to the 4-row graph, captured once
            sample, steps, hidden = unet_inputs(stage.unet, rows, cuda, torch.float16, seed)
            ref = stage.unet(sample, steps, encoder_hidden_states=hidden, return_dict=False)[0]
            out = stage.graphs(sample, steps, hidden, None)
            assert out.shape == ref.shape
            torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    assert stage.graphs.describe() == {"graphs": 2, "replays": 4, "eager_calls": 0}


@pytest.mark.gpu
def test_denoising_with_graphs_matches_without(tiny_model_dir: Path) -> None:
    cuda = torch.device("cuda")
    snap = open_snapshot(str(tiny_model_dir))
    encoder = TextEncoderStage("tiny", snap, cuda, torch.float16)
    params = DenoiseParams("tiny", 64, 64, 6, 7.5, "euler_a", seed=7, num_images=2)
    (emb,) = encoder.encode([EncodeRequest("tiny", "a red cube", "blurry", True)])
    graphed = DenoiserStage("tiny", snap, cuda, torch.float16).run(params, emb).tensor
    eager = DenoiserStage("tiny", snap, cuda, torch.float16, cuda_graphs=False).run(params, emb).tensor
    torch.testing.assert_close(graphed, eager, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_warm_up_captures_every_batch_before_the_first_request(tiny_model_dir: Path) -> None:
    cuda = torch.device("cuda")
    snap = open_snapshot(str(tiny_model_dir))
    stage = DenoiserStage("tiny", snap, cuda, torch.float16, warm_up=(64, 64, 3))
    assert stage.graphs is not None
    assert len(stage.graphs.graphs) == 4  # rows 1, 2, 4, 6: up to three guided images
    encoder = TextEncoderStage("tiny", snap, cuda, torch.float16)
    (emb,) = encoder.encode([EncodeRequest("tiny", "a red cube", "blurry", True)])
    for images in (1, 2, 3):
        stage.run(DenoiseParams("tiny", 64, 64, 3, 7.5, "euler", seed=1, num_images=images), emb)
    assert stage.graphs.describe() == {"graphs": 4, "replays": 9, "eager_calls": 0}  # nothing captured late


@pytest.mark.gpu
def test_graphs_stay_valid_across_adapter_mixes_and_slot_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    """One captured graph per batch shape serves any mix of LoRA slots, and adapters copied into slots after the
    capture: graphed steps equal eager ones with the same adapters."""
    from models.adapters import read_lora
    from models.testmodels import create_test_lora

    cuda = torch.device("cuda")
    snap = open_snapshot(str(tiny_model_dir))
    options = {"lora_slots": 3, "lora_max_rank": 8, "loras_per_request": 2, "max_rows": 8}
    graphed = DenoiserStage("tiny", snap, cuda, torch.float16, warm_up=(64, 64, 4), **options)  # type: ignore[arg-type]
    eager = DenoiserStage("tiny", snap, cuda, torch.float16, cuda_graphs=False, **options)  # type: ignore[arg-type]
    captured = len(graphed.graphs.graphs) if graphed.graphs else 0
    assert captured > 0
    files = [
        create_test_lora(tiny_model_dir, tmp_path / f"l{i}", "kohya", 4 * (i + 1), None, False, i) for i in range(2)
    ]
    encoder = TextEncoderStage("tiny", snap, cuda, torch.float16)
    (emb,) = encoder.encode([EncodeRequest("tiny", "a red cube", "blurry", True)])
    for mix in ((), ((0, 0.8),), ((1, 1.0), (0, 0.5))):
        results = []
        for stage in (graphed, eager):
            assert stage.loras is not None
            slots = [stage.loras.acquire(str(files[i]), read_lora(files[i]).unet) for i, _ in mix]
            adapters = tuple((slot, scale) for slot, (_, scale) in zip(slots, mix, strict=True))
            params = DenoiseParams("tiny", 64, 64, 4, 7.5, "euler", seed=3, num_images=2)
            results.append(stage.run(params, emb, adapters=adapters).tensor)
            for slot in slots:
                stage.loras.release(slot)
        torch.testing.assert_close(results[0], results[1], rtol=1e-2, atol=1e-2)
    assert graphed.graphs is not None and len(graphed.graphs.graphs) == captured  # no recapture
