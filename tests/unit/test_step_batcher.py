"""The continuous-batching loop: joins between steps, cancellation frees the slot, failures stay local."""

from __future__ import annotations

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from models.contracts import DenoiseParams, EncodeRequest
from models.denoiser import DenoiserStage
from models.snapshot import open_snapshot
from models.stepbatcher import StepBatcher
from models.text_encoder import TextEncoderStage

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def parts(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    snap = open_snapshot(str(tiny_model_dir))
    encoder = TextEncoderStage("tiny", snap, CPU, torch.float32)
    denoiser = DenoiserStage("tiny", snap, CPU, torch.float32)
    (emb,) = encoder.encode([EncodeRequest("tiny", "a cat", None, True)])
    return denoiser, emb


def test_concurrent_jobs_share_steps_and_match_solo_runs(parts) -> None:  # type: ignore[no-untyped-def]
    denoiser, emb = parts
    params = [DenoiseParams("tiny", 64, 64, steps, 5.0, "euler", seed) for seed, steps in ((1, 6), (2, 3), (3, 4))]

    async def run():  # type: ignore[no-untyped-def]
        batcher = StepBatcher(ThreadPoolExecutor(1), max_batch_size=8)
        results = await asyncio.gather(*(batcher.submit(denoiser, p, emb) for p in params))
        return batcher, results

    batcher, results = asyncio.run(run())
    assert max(batcher.batch_sizes) > 1
    for p, result in zip(params, results, strict=True):
        assert result.steps_run == p.steps
        assert torch.allclose(result.tensor, denoiser.run(p, emb).tensor, atol=1e-4)


def test_cancelled_job_leaves_the_batch(parts) -> None:  # type: ignore[no-untyped-def]
    denoiser, emb = parts

    async def run():  # type: ignore[no-untyped-def]
        batcher = StepBatcher(ThreadPoolExecutor(1), max_batch_size=8)
        long = asyncio.create_task(batcher.submit(denoiser, DenoiseParams("tiny", 64, 64, 150, 5.0, "euler", 1), emb))
        while not batcher.batch_sizes:
            await asyncio.sleep(0.01)
        long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long
        short = await batcher.submit(denoiser, DenoiseParams("tiny", 64, 64, 2, 5.0, "euler", 2), emb)
        return batcher, short

    batcher, short = asyncio.run(run())
    assert short.steps_run == 2
    assert batcher.active == 0
    assert len(batcher.batch_sizes) < 100  # the 150-step job did not run to completion


def test_batch_limit_is_respected(parts) -> None:  # type: ignore[no-untyped-def]
    denoiser, emb = parts

    async def run():  # type: ignore[no-untyped-def]
        batcher = StepBatcher(ThreadPoolExecutor(1), max_batch_size=3)
        params = [DenoiseParams("tiny", 64, 64, 3, 5.0, "ddim", i, num_images=2) for i in range(4)]
        await asyncio.gather(*(batcher.submit(denoiser, p, emb) for p in params))
        return batcher

    batcher = asyncio.run(run())
    assert max(batcher.batch_sizes) <= 3


def test_progress_reports_every_step_with_previews_on_request(parts) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    denoiser, emb = parts
    seen: dict[str, list] = {"plain": [], "preview": []}

    async def run():  # type: ignore[no-untyped-def]
        batcher = StepBatcher(ThreadPoolExecutor(1), max_batch_size=8)
        await asyncio.gather(
            batcher.submit(denoiser, DenoiseParams("tiny", 64, 64, 3, 5.0, "euler", 1), emb, seen["plain"].append),
            batcher.submit(
                denoiser, DenoiseParams("tiny", 96, 64, 4, 5.0, "euler", 2), emb, seen["preview"].append, preview=True
            ),
        )

    asyncio.run(run())
    assert [(p.step, p.total_steps, p.preview) for p in seen["plain"]] == [(1, 3, None), (2, 3, None), (3, 3, None)]
    assert [(p.step, p.total_steps) for p in seen["preview"]] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    image = Image.open(io.BytesIO(seen["preview"][-1].preview))
    assert image.format == "JPEG" and image.size == (64 // 8, 96 // 8)  # (width, height) of a 96-high, 64-wide request
    assert seen["preview"][-1].preview_media_type == "image/jpeg"
