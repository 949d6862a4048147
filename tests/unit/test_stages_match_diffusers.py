"""The three stages, run in-process and chained, reproduce diffusers' StableDiffusionPipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.contracts import DecodeParams, DenoiseParams, EncodeRequest
from models.decoder import DecoderStage
from models.denoiser import DenoiserStage
from models.schedulers import create_scheduler
from models.snapshot import open_snapshot
from models.text_encoder import TextEncoderStage

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def stages(tiny_model_dir: Path) -> tuple[TextEncoderStage, DenoiserStage, DecoderStage]:
    snap = open_snapshot(str(tiny_model_dir))
    return (
        TextEncoderStage("tiny", snap, CPU, torch.float32, max_prompt_tokens=300),
        DenoiserStage("tiny", snap, CPU, torch.float32),
        DecoderStage("tiny", snap, CPU, torch.float32),
    )


@pytest.fixture()
def pipeline(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)


def run_staged(stages, prompt, negative, params: DenoiseParams) -> np.ndarray:  # type: ignore[no-untyped-def]
    encoder, denoiser, decoder = stages
    (emb,) = encoder.encode([EncodeRequest("tiny", prompt, negative, params.guidance_scale > 1)])
    latents = denoiser.run(params, emb)
    return decoder.decode_pixels(latents.tensor)


def run_reference(pipeline, prompt, negative, params: DenoiseParams) -> np.ndarray:  # type: ignore[no-untyped-def]
    pipeline.scheduler = create_scheduler(params.scheduler, dict(pipeline.scheduler.config))
    out = pipeline(
        prompt,
        negative_prompt=negative,
        height=params.height,
        width=params.width,
        num_inference_steps=params.steps,
        guidance_scale=params.guidance_scale,
        num_images_per_prompt=params.num_images,
        generator=torch.Generator("cpu").manual_seed(params.seed),
        output_type="np",
    ).images
    return (out * 255).round().astype("uint8")


@pytest.mark.parametrize(
    ("scheduler", "guidance", "num_images", "negative"),
    [
        ("euler", 7.5, 1, None),
        ("euler_a", 5.0, 2, "blurry"),
        ("dpmpp_2m_karras", 7.5, 1, "low quality, watermark"),
        ("ddim", 1.0, 1, None),
        ("heun", 3.0, 1, None),
        ("lcm", 1.0, 1, None),
    ],
)
def test_staged_equals_diffusers(stages, pipeline, scheduler, guidance, num_images, negative) -> None:  # type: ignore[no-untyped-def]
    params = DenoiseParams(
        model="tiny",
        height=64,
        width=64,
        steps=4,
        guidance_scale=guidance,
        scheduler=scheduler,
        seed=1234,
        num_images=num_images,
    )
    prompt = "a photo of an astronaut riding a horse on mars"
    staged = run_staged(stages, prompt, negative, params)
    reference = run_reference(pipeline, prompt, negative, params)
    assert staged.shape == reference.shape == (num_images, 64, 64, 3)
    diff = np.abs(staged.astype(int) - reference.astype(int))
    assert diff.max() <= 1, f"max pixel difference {diff.max()}"
    assert staged.std() > 0  # not a blank image


def test_step_batching_matches_single_runs(stages) -> None:  # type: ignore[no-untyped-def]
    """Jobs with different schedulers, step counts and seeds share UNet calls yet give their own results."""
    encoder, denoiser, _decoder = stages
    specs = [("euler", 3, 1), ("dpmpp_2m", 5, 2), ("euler_a", 4, 3)]
    jobs, singles = [], []
    for sched, steps, seed in specs:
        params = DenoiseParams("tiny", 64, 64, steps, 6.0, sched, seed)
        (emb,) = encoder.encode([EncodeRequest("tiny", f"prompt {seed}", None, True)])
        jobs.append(denoiser.start(params, emb))
        singles.append(denoiser.run(params, emb).tensor)
    while not all(j.done for j in jobs):
        denoiser.step([j for j in jobs if not j.done])
    for job, single in zip(jobs, singles, strict=True):
        assert torch.allclose(job.latents, single, atol=1e-4)


def test_long_prompt_is_chunked_not_truncated(stages) -> None:  # type: ignore[no-untyped-def]
    encoder = stages[0]
    short = "a cat"
    long = ", ".join(["a red apple on a wooden table"] * 20)
    ids = encoder.token_ids(long)
    assert len(ids) > 75
    emb_short, emb_long = encoder.encode(
        [EncodeRequest("tiny", short, None, True), EncodeRequest("tiny", long, None, True)]
    )
    chunks = -(-len(ids) // 75)
    assert emb_long.positive.shape[1] == 77 * chunks
    assert emb_long.negative is not None and emb_long.negative.shape == emb_long.positive.shape
    assert emb_short.positive.shape[1] == 77
    # The tail of a long prompt changes its embedding: nothing was cut off.
    (emb_other,) = encoder.encode([EncodeRequest("tiny", long + ", a green pear", None, False)])
    assert not torch.equal(emb_other.positive, emb_long.positive)


def test_prompt_over_the_limit_is_refused(stages) -> None:  # type: ignore[no-untyped-def]
    from models.errors import PromptTooLongError

    encoder = stages[0]
    too_long = " ".join(["astronaut"] * (encoder.max_prompt_tokens + 1))
    with pytest.raises(PromptTooLongError) as info:
        encoder.encode([EncodeRequest("tiny", "a cat", too_long, True)])
    assert info.value.param == "negative_prompt"


def test_long_prompt_runs_end_to_end(stages) -> None:  # type: ignore[no-untyped-def]
    long = ", ".join(["a castle on a hill in a fantasy world"] * 12)
    params = DenoiseParams("tiny", 64, 64, 2, 7.0, "euler", 5)
    pixels = run_staged(stages, long, "blurry", params)
    assert pixels.shape == (1, 64, 64, 3)


def test_embedding_cache_hits(stages) -> None:  # type: ignore[no-untyped-def]
    encoder = stages[0]
    before = encoder.cache_hits
    first = encoder.encode([EncodeRequest("tiny", "a cozy living room", None, False)])[0]
    second = encoder.encode([EncodeRequest("tiny", "a cozy living room", None, False)])[0]
    assert encoder.cache_hits > before
    assert torch.equal(first.positive, second.positive)


def test_tiled_decode_above_threshold(stages) -> None:  # type: ignore[no-untyped-def]
    decoder = stages[2]
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    old = decoder.tile_above_pixels
    try:
        decoder.tile_above_pixels = 64 * 64
        before = decoder.tiled_decodes
        tiled = decoder.decode_pixels(latents)
        assert decoder.tiled_decodes == before + 1
    finally:
        decoder.tile_above_pixels = old
    plain = decoder.decode_pixels(latents)
    assert tiled.shape == plain.shape == (1, 128, 128, 3)


def test_encoded_formats(stages) -> None:  # type: ignore[no-untyped-def]
    from models.contracts import Latents

    decoder = stages[2]
    latents = Latents("tiny", "v", torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), 1)
    out = decoder.decode(
        [(latents, DecodeParams("png")), (latents, DecodeParams("jpeg", 80)), (latents, DecodeParams("webp"))]
    )
    assert out[0].images[0].startswith(b"\x89PNG")
    assert out[1].images[0].startswith(b"\xff\xd8")
    assert out[2].images[0][8:12] == b"WEBP"
    assert all(len(o.images) == 2 for o in out)
