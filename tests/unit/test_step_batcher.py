"""The continuous-batching loop: joins between steps, cancellation frees the slot, failures stay local, and the
next UNet call is chosen cost-weighted fair (asserted on the order of calls, which does not depend on timing)."""

from __future__ import annotations

import asyncio
import io
import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from models.contracts import DenoiseParams, EncodeRequest, Latents, PromptEmbeddings
from models.denoiser import DenoiseJob, DenoiserStage
from models.snapshot import open_snapshot
from models.stepbatcher import StepBatcher
from models.text_encoder import TextEncoderStage

CPU = torch.device("cpu")
# On the tiny model a 256x256 step costs (256 / 64) ** 2 = 16 steps of a 64x64 request (latents are 1/8 a side).
LARGE, SMALL = 256, 64
COST_RATIO = (LARGE // SMALL) ** 2


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


def label(job: DenoiseJob) -> str:
    """``L`` for a large job, ``S<steps>`` for a small one, ``W`` / ``T`` for a wide / tall one (64x128, 128x64)."""
    height, width = (side * 8 for side in job.latents.shape[-2:])
    if height == width:
        return "L" if height == LARGE else f"S{job.total_steps}"
    return "W" if width > height else "T"


class UNetCalls:
    """Records the jobs of every UNet call the stage makes (``"S2+S3"``: one call for both); can submit a
    request while a given call is under way."""

    def __init__(self, denoiser: DenoiserStage, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log: list[str] = []
        self.during: dict[int, Callable[[], object]] = {}  # call number (from 1) -> run on the compute thread
        step = denoiser.step

        def recording_step(jobs: list[DenoiseJob]) -> None:
            self.log.append("+".join(sorted(label(job) for job in jobs)))
            hook = self.during.pop(len(self.log), None)
            if hook is not None:
                hook()
            step(jobs)

        monkeypatch.setattr(denoiser, "step", recording_step)

    def submit_during(
        self, call: int, batcher: StepBatcher, denoiser: DenoiserStage, params: DenoiseParams, emb: PromptEmbeddings
    ) -> list[asyncio.Task[Latents]]:
        """Submit ``params`` while UNet call number ``call`` runs; the list holds the request once submitted."""
        loop = asyncio.get_running_loop()
        late: list[asyncio.Task[Latents]] = []
        self.during[call] = lambda: loop.call_soon_threadsafe(
            lambda: late.append(asyncio.ensure_future(batcher.submit(denoiser, params, emb)))
        )
        return late


def small(steps: int, seed: int) -> DenoiseParams:
    return DenoiseParams("tiny", SMALL, SMALL, steps, 5.0, "euler", seed)


def large(steps: int) -> DenoiseParams:
    return DenoiseParams("tiny", LARGE, LARGE, steps, 5.0, "euler", 0)


@pytest.mark.parametrize(
    ("fair", "expected"),
    [
        # After the large step, the small jobs (batched together) finish before the large one's next step...
        (True, ["L", "S2+S3+S4", "S2+S3+S4", "S3+S4", "S4", "L", "L"]),
        # ...where round robin makes them take turns with it, one large step per small one.
        (False, ["L", "S2+S3+S4", "L", "S2+S3+S4", "L", "S3+S4", "S4"]),
    ],
)
def test_small_jobs_finish_after_one_large_step_when_fair(parts, monkeypatch, fair, expected) -> None:  # type: ignore[no-untyped-def]
    denoiser, emb = parts
    calls = UNetCalls(denoiser, monkeypatch)

    async def run():  # type: ignore[no-untyped-def]
        batcher = StepBatcher(ThreadPoolExecutor(1), max_batch_size=8, fair=fair)
        params = [large(3), small(2, 1), small(3, 2), small(4, 3)]
        return await asyncio.gather(*(batcher.submit(denoiser, p, emb) for p in params))

    results = asyncio.run(run())
    assert calls.log == expected
    assert [r.steps_run for r in results] == [3, 2, 3, 4]


def test_large_job_gets_one_step_per_cost_ratio_of_small_steps(parts, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A long small job does not hold a large one up: the large one runs whenever it has had less compute."""
    denoiser, emb = parts
    calls = UNetCalls(denoiser, monkeypatch)

    async def run():  # type: ignore[no-untyped-def]
        batcher = StepBatcher(ThreadPoolExecutor(1), max_batch_size=8)
        await asyncio.gather(batcher.submit(denoiser, large(3), emb), batcher.submit(denoiser, small(40, 1), emb))

    asyncio.run(run())
    ratio = ["S40"] * COST_RATIO
    assert calls.log == ["L", *ratio, "L", *ratio, "L"] + ["S40"] * (40 - 2 * COST_RATIO)


def test_small_job_arriving_during_a_large_step_waits_for_that_step_only(parts, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    denoiser, emb = parts
    calls = UNetCalls(denoiser, monkeypatch)

    async def run():  # type: ignore[no-untyped-def]
        batcher = StepBatcher(ThreadPoolExecutor(1), max_batch_size=8)
        late = calls.submit_during(2, batcher, denoiser, small(4, 1), emb)
        first = await batcher.submit(denoiser, large(5), emb)
        return first, await late[0]

    first, late = asyncio.run(run())
    # It arrives during the second large step: its preparation, queued behind that step, joins the next choice.
    assert calls.log == ["L", "L", "S4", "S4", "S4", "S4", "L", "L", "L"]
    assert (first.steps_run, late.steps_run) == (5, 4)


def test_late_job_is_neither_starved_nor_starving(parts, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Two jobs of equal cost that cannot share a call (wide and tall): one arriving after the other has run
    four steps starts at the other's virtual time, so they take turns instead of the late one running four
    steps in a row to catch up (as it would from 0) or waiting for the other to finish."""
    denoiser, emb = parts
    calls = UNetCalls(denoiser, monkeypatch)

    async def run():  # type: ignore[no-untyped-def]
        batcher = StepBatcher(ThreadPoolExecutor(1), max_batch_size=8)
        late = calls.submit_during(4, batcher, denoiser, DenoiseParams("tiny", 128, 64, 4, 5.0, "euler", 2), emb)
        await batcher.submit(denoiser, DenoiseParams("tiny", 64, 128, 10, 5.0, "euler", 1), emb)
        await late[0]

    asyncio.run(run())
    assert calls.log == ["W"] * 4 + ["T", "W"] * 4 + ["W"] * 2


def test_a_stream_of_arrivals_does_not_starve_a_large_job(parts, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A small request arriving during every UNet call (saturation, or few-step models): the large job still
    gets a step at least once per cost ratio's worth of small calls, and finishes while they keep coming."""
    denoiser, emb = parts
    calls = UNetCalls(denoiser, monkeypatch)
    arrivals = 6 * COST_RATIO

    async def run():  # type: ignore[no-untyped-def]
        batcher = StepBatcher(ThreadPoolExecutor(1), max_batch_size=8)
        late = [calls.submit_during(n, batcher, denoiser, small(3, n), emb) for n in range(1, arrivals + 1)]
        first = await batcher.submit(denoiser, large(3), emb)
        while not all(late):
            await asyncio.sleep(0.01)
        return first, await asyncio.gather(*(tasks[0] for tasks in late))

    first, rest = asyncio.run(run())
    assert first.steps_run == 3 and len(rest) == arrivals
    large_calls = [i for i, call in enumerate(calls.log) if call == "L"]
    assert len(large_calls) == 3 and large_calls[-1] < arrivals  # done while requests still arrive
    gaps = [b - a for a, b in itertools.pairwise(large_calls)]
    assert max(gaps) <= 2 * COST_RATIO
