"""Plans and the chain runner, driven with in-process stage clients (no Ray cluster).

The real tiny stages answer the calls, so these tests check the same chain the deployments run: the runner's
output equals the stages called by hand; streaming reports every step; the deadline, cancellation and replica
loss behave as the service promises.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ray.exceptions import ActorDiedError

from models.contracts import (
    DecodeParams,
    DenoiseProgress,
    EncodedImages,
    ImageEncodeParams,
    ImageLatents,
    Latents,
    Pixels,
    PromptEmbeddings,
    UpscaleParams,
)
from models.decoder import DecoderStage
from models.denoiser import DenoiserStage
from models.errors import UnknownModelError
from models.images import encode_image, finish
from models.snapshot import ArtifactSnapshot, open_snapshot
from models.stepbatcher import StepBatcher
from models.text_encoder import TextEncoderStage
from models.upscaler import UpscalerStage, create_test_upscaler
from serving.config import LimitsSpec
from serving.errors import ApiError
from serving.plans import Plan, StageCall, plan_generation
from serving.resolver import GenerationRequest, HiresFix, InitImage
from serving.runner import ChainRunner, LocalStageClient

CPU = torch.device("cpu")
REQ = GenerationRequest(
    model="tiny",
    prompt="a red fox",
    negative_prompt=None,
    width=64,
    height=64,
    num_images=2,
    steps=3,
    guidance_scale=5.0,
    scheduler="euler",
    seed=7,
    output_format="png",
)


class Encoder:
    def __init__(self, stage: TextEncoderStage) -> None:
        self.stage = stage

    def encode(self, request: Any) -> PromptEmbeddings:
        return self.stage.encode([request])[0]


class Denoiser:
    def __init__(self, stage: DenoiserStage, executor: ThreadPoolExecutor) -> None:
        self.stage = stage
        self.executor = executor
        self.batchers: dict[int, StepBatcher] = {}

    @property
    def batcher(self) -> StepBatcher:
        """One step batcher per event loop (each test runs its own loop)."""
        loop = id(asyncio.get_running_loop())
        return self.batchers.setdefault(loop, StepBatcher(self.executor, max_batch_size=4))

    async def denoise(self, embeddings: PromptEmbeddings, params: Any, image: Any = None) -> Latents:
        return await self.batcher.submit(self.stage, params, embeddings, image=image)

    async def denoise_stream(
        self, embeddings: PromptEmbeddings, params: Any, image: Any = None, preview: bool = False
    ) -> AsyncIterator[Any]:
        async with contextlib.aclosing(self.batcher.stream(self.stage, params, embeddings, preview, image)) as items:
            async for item in items:
                yield item


class Decoder:
    def __init__(self, stage: DecoderStage) -> None:
        self.stage = stage

    def decode(self, latents: Latents, output: DecodeParams | None) -> Pixels | EncodedImages:
        return self.stage.decode([(latents, output)])[0]

    def encode_image(self, pixels: Pixels, params: ImageEncodeParams) -> ImageLatents:
        return self.stage.encode_image(pixels, params)


class Upscaler:
    def __init__(self, stage: UpscalerStage) -> None:
        self.stage = stage

    def upscale(self, pixels: Pixels, params: UpscaleParams, output: DecodeParams | None) -> Pixels | EncodedImages:
        return finish(Pixels(self.stage.upscale(pixels.array, params.factor), pixels.model_version), output)


@pytest.fixture(scope="module")
def stages(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    snap = open_snapshot(str(tiny_model_dir))
    executor = ThreadPoolExecutor(max_workers=1)
    upscaler = create_test_upscaler(tmp_path_factory.mktemp("upscaler"), "realesr-general-x4v3", size="tiny")
    return {
        "text_encoder": Encoder(TextEncoderStage("tiny", snap, CPU, torch.float32)),
        "denoiser": Denoiser(DenoiserStage("tiny", snap, CPU, torch.float32), executor),
        "decoder": Decoder(DecoderStage("tiny", snap, CPU, torch.float32)),
        "upscaler": Upscaler(UpscalerStage("x4", ArtifactSnapshot(upscaler, "v1", "upscaler"), CPU, torch.float32)),
    }


def runner(targets: dict[str, Any], **limits: Any) -> ChainRunner:
    clients = {name: LocalStageClient(target) for name, target in targets.items()}
    return ChainRunner(clients, LimitsSpec(**limits), map_error=_map_error)


def _map_error(exc: BaseException) -> BaseException:
    if isinstance(exc, UnknownModelError):
        return ApiError(404, "model_not_found", exc.message, exc.param)
    return exc


def test_text_to_image_plan_is_the_three_stages_and_only_the_last_encodes() -> None:
    plan = plan_generation(REQ)
    assert plan.stages == ("text_encoder", "denoiser", "decoder")
    assert [call.output for call in plan.calls[:-1]] == [None, None]
    assert plan.calls[-1].output == DecodeParams("png", None)
    assert plan.calls[1].progress


def test_adapters_reach_the_text_encoder_and_the_denoiser_with_their_route() -> None:
    from models.contracts import AdapterUse

    uses = (AdapterUse("ink", "s3://loras/ink@v2", 0.8), AdapterUse("grain", "file:///loras/grain", 1.0))
    for req in (replace(REQ, loras=uses), replace(REQ, loras=uses, hires=HiresFix(128, 128, 2, 0.5, None))):
        plan = plan_generation(req)
        routed = {c.stage for c in plan.calls if c.route}
        assert routed == {"text_encoder", "denoiser"}
        assert {c.route for c in plan.calls if c.route} == {"file:///loras/grain|s3://loras/ink@v2"}
        encode = next(c for c in plan.calls if c.method == "encode").args[0]
        assert encode.loras == uses
        assert all(a.loras == uses for c in plan.calls if c.method == "denoise" for a in c.args if hasattr(a, "loras"))
    assert not any(c.route for c in plan_generation(REQ).calls)


def test_runner_output_equals_the_stages_called_by_hand(stages: dict[str, Any]) -> None:
    plan = plan_generation(REQ)
    result = asyncio.run(runner(stages).run(plan))
    assert isinstance(result, EncodedImages)
    assert (result.width, result.height, result.media_type) == (64, 64, "image/png")

    encode, params = plan.calls[0].args[0], plan.calls[1].args[0]
    embeddings = stages["text_encoder"].stage.encode([encode])[0]
    latents = stages["denoiser"].stage.run(params, embeddings)
    pixels = stages["decoder"].stage.decode_pixels(latents.tensor)
    assert result.images == [encode_image(img, "png") for img in pixels]


def test_streaming_reports_every_step_and_gives_the_same_images(stages: dict[str, Any]) -> None:
    seen: list[int] = []

    async def on_progress(item: DenoiseProgress) -> None:
        seen.append(item.step)

    plan = plan_generation(REQ)
    streamed = asyncio.run(runner(stages).run(plan, on_progress))
    assert seen == [1, 2, 3]
    assert streamed.images == asyncio.run(runner(stages).run(plan)).images


class Hangs:
    """A stage whose call never finishes; it records that it was cancelled."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = False

    async def decode(self, *args: Any) -> None:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


def test_deadline_gives_504_and_cancels_the_stage_call() -> None:
    hangs = Hangs()
    plan = Plan((StageCall("decoder", "decode", (1,), encodes=True),))
    with pytest.raises(ApiError) as info:
        asyncio.run(runner({"decoder": hangs}, request_timeout_s=0.2).run(plan))
    assert (info.value.status, info.value.code) == (504, "timeout")
    assert hangs.cancelled


def test_a_caller_that_goes_away_cancels_every_stage_call() -> None:
    hangs = Hangs()
    plan = Plan((StageCall("decoder", "decode", (1,), encodes=True),))

    async def main() -> None:
        task = asyncio.ensure_future(runner({"decoder": hangs}).run(plan))
        await hangs.started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert hangs.cancelled


class DiesFirst:
    """A stage whose replica dies under the first ``deaths`` calls."""

    def __init__(self, deaths: int) -> None:
        self.deaths = deaths
        self.calls = 0

    def decode(self, value: int, output: Any) -> int:
        self.calls += 1
        if self.calls <= self.deaths:
            raise ActorDiedError()
        return value * 2


def test_replica_loss_reruns_the_plan_then_gives_up_with_503() -> None:
    plan = Plan((StageCall("decoder", "decode", encodes=True),), input=21)
    flaky = DiesFirst(deaths=2)
    assert asyncio.run(runner({"decoder": flaky}, replica_loss_retries=2).run(plan)) == 42
    assert flaky.calls == 3

    dead = DiesFirst(deaths=10)
    with pytest.raises(ApiError) as info:
        asyncio.run(runner({"decoder": dead}, replica_loss_retries=2).run(plan))
    assert (info.value.status, info.value.code) == (503, "stage_unavailable")
    assert dead.calls == 3


def test_stage_errors_are_mapped_and_a_missing_stage_is_refused() -> None:
    class Unknown:
        def decode(self, *args: Any) -> None:
            raise UnknownModelError("model 'x' is not served", "model")

    plan = Plan((StageCall("decoder", "decode", (1,), encodes=True),))
    with pytest.raises(ApiError) as info:
        asyncio.run(runner({"decoder": Unknown()}).run(plan))
    assert (info.value.status, info.value.code, info.value.param) == (404, "model_not_found", "model")
    with pytest.raises(ApiError) as missing:
        asyncio.run(runner({}).run(plan))
    assert missing.value.status == 503


def test_a_plan_passes_each_output_to_the_next_call() -> None:
    class Add:
        def step(self, value: int, amount: int) -> int:
            return value + amount

    class Double:
        async def step(self, value: int, output: Any) -> tuple[int, Any]:
            return value * 2, output

    plan = Plan(
        (
            StageCall("a", "step", (1, 2)),  # the first call of a plan without input gets only its args
            StageCall("b", "step", encodes=True, output=DecodeParams("jpeg", 80)),
        )
    )
    assert asyncio.run(runner({"a": Add(), "b": Double()}).run(plan)) == (6, DecodeParams("jpeg", 80))


def test_post_processing_steps_follow_the_stage_table_and_only_the_last_encodes() -> None:
    from dataclasses import replace

    from models.contracts import SafetyParams, UpscaleParams
    from serving.plans import plan_postprocess

    req = replace(REQ, upscale=UpscaleParams("x4", 4.0), safety=SafetyParams("checker", "block"))
    plan = plan_generation(req)
    assert plan.stages == ("text_encoder", "denoiser", "decoder", "safety", "upscaler")
    assert [call.output for call in plan.calls] == [None] * 4 + [DecodeParams("png", None)]
    assert plan.calls[3].args == (SafetyParams("checker", "block"),)
    assert plan.calls[4].args == (UpscaleParams("x4", 4.0),)

    uploaded = plan_postprocess(replace(req, safety=None), pixels := object())
    assert uploaded.stages == ("upscaler",) and uploaded.input is pixels
    assert uploaded.calls[0].arguments(pixels) == (pixels, UpscaleParams("x4", 4.0), DecodeParams("png", None))
    with pytest.raises(ValueError):
        plan_postprocess(REQ, object())  # nothing to do


def gradient(size: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    return np.stack([x * 4, y * 4, np.full_like(x, 90)], axis=-1).astype(np.uint8)


def test_image_to_image_plan_encodes_the_image_on_the_vae_stage_first(stages: dict[str, Any]) -> None:
    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 16:48] = 1.0
    req = replace(REQ, init=InitImage(gradient(), mask, 0.75))
    plan = plan_generation(req)
    assert plan.stages == ("decoder", "text_encoder", "denoiser", "decoder")
    assert isinstance(plan.input, Pixels) and plan.input.array.shape == (1, 64, 64, 3)
    result = asyncio.run(runner(stages).run(plan))

    encode_image_params, encode, params = plan.calls[0].args[0], plan.calls[1].args[0], plan.calls[2].args[0]
    assert params.strength == 0.75 and encode_image_params.mask is mask
    latents = stages["decoder"].stage.encode_image(plan.input, encode_image_params)
    embeddings = stages["text_encoder"].stage.encode([encode])[0]
    denoised = stages["denoiser"].stage.run(params, embeddings, latents)
    pixels = stages["decoder"].stage.decode_pixels(denoised.tensor)
    assert result.images == [encode_image(img, "png") for img in pixels]


@pytest.mark.parametrize("upscaler", [None, "x4"])
def test_hires_fix_plan_refines_at_the_larger_size(stages: dict[str, Any], upscaler: str | None) -> None:
    """txt2img, then (latents resized, or pixels upscaled and encoded again) an img2img pass at 128x128 on the same
    prompt: the plan reuses the first call's embeddings, and streaming reports both passes."""
    req = replace(REQ, num_images=1, hires=HiresFix(128, 128, 4, 0.5, upscaler))
    plan = plan_generation(req)
    middle = ("upscaler", "decoder") if upscaler else ()
    expected = ("text_encoder", "denoiser", *(("decoder",) if upscaler else ()), *middle, "denoiser", "decoder")
    assert plan.stages == expected
    seen: list[tuple[int, int]] = []

    async def on_progress(item: DenoiseProgress) -> None:
        seen.append((item.step, item.total_steps))

    result = asyncio.run(runner(stages).run(plan, on_progress))
    assert (result.width, result.height, len(result.images)) == (128, 128, 1)
    assert seen == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]  # 3 steps, then int(4 * 0.5), counted on
    assert plan.total_steps == 5
    assert asyncio.run(runner(stages).run(plan)).images == result.images  # streamed or not, the same images
