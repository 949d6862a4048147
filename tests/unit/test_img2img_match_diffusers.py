"""Image to image and inpainting, run through the stages in-process, reproduce diffusers' pipelines.

The VAE stage encodes, the denoiser samples and denoises, the VAE stage decodes: the same work diffusers'
``StableDiffusionImg2ImgPipeline`` / ``StableDiffusionInpaintPipeline`` do in one process, so on the same weights,
seed and settings the pixels agree within 1/255 on CPU fp32 (schedulers that draw from the generator included).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.contracts import DenoiseParams, EncodeRequest, ImageEncodeParams, Pixels
from models.decoder import DecoderStage
from models.denoiser import DenoiserStage
from models.errors import StageInputError
from models.schedulers import create_scheduler
from models.snapshot import open_snapshot
from models.text_encoder import TextEncoderStage

CPU = torch.device("cpu")
PROMPT = "a watercolour painting of a lighthouse at dusk"


def load_stages(path: Path) -> tuple[TextEncoderStage, DenoiserStage, DecoderStage]:
    snap = open_snapshot(str(path))
    return (
        TextEncoderStage("tiny", snap, CPU, torch.float32),
        DenoiserStage("tiny", snap, CPU, torch.float32),
        DecoderStage("tiny", snap, CPU, torch.float32),
    )


@pytest.fixture(scope="module")
def stages(tiny_model_dir: Path) -> tuple[TextEncoderStage, DenoiserStage, DecoderStage]:
    return load_stages(tiny_model_dir)


@pytest.fixture(scope="module")
def inpaint_stages(tiny_inpaint_model_dir: Path) -> tuple[TextEncoderStage, DenoiserStage, DecoderStage]:
    return load_stages(tiny_inpaint_model_dir)


def init_image(size: int = 64) -> np.ndarray:
    """A smooth gradient with a block in it: structure the VAE keeps."""
    y, x = np.mgrid[0:size, 0:size]
    image = np.stack([x * 255 / size, y * 255 / size, np.full_like(x, 96)], axis=-1)
    image[size // 4 : size // 2, size // 4 : size // 2] = (240, 30, 60)
    return image.astype(np.uint8)


def centre_mask(size: int = 64) -> np.ndarray:
    mask = np.zeros((size, size), np.float32)
    mask[size // 4 : 3 * size // 4, size // 8 : 5 * size // 8] = 1.0
    return mask


def run_staged(stages, params: DenoiseParams, image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:  # type: ignore[no-untyped-def]
    encoder, denoiser, decoder = stages
    (emb,) = encoder.encode([EncodeRequest("tiny", PROMPT, "blurry", params.guidance_scale > 1)])
    latents = decoder.encode_image(Pixels(image[None], "v"), ImageEncodeParams("tiny", mask=mask))
    return decoder.decode_pixels(denoiser.run(params, emb, latents).tensor)


def run_reference(path: Path, params: DenoiseParams, image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    cls = StableDiffusionImg2ImgPipeline if mask is None else StableDiffusionInpaintPipeline
    pipeline = cls.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipeline.scheduler = create_scheduler(params.scheduler, dict(pipeline.scheduler.config))
    extra = {} if mask is None else {"mask_image": Image.fromarray((mask * 255).astype(np.uint8), "L")}
    out = pipeline(
        PROMPT,
        image=Image.fromarray(image),
        strength=params.strength,
        negative_prompt="blurry",
        num_inference_steps=params.steps,
        guidance_scale=params.guidance_scale,
        num_images_per_prompt=params.num_images,
        generator=torch.Generator("cpu").manual_seed(params.seed),
        output_type="np",
        **extra,
    ).images
    return (out * 255).round().astype("uint8")


def assert_close(staged: np.ndarray, reference: np.ndarray, num_images: int) -> None:
    assert staged.shape == reference.shape == (num_images, 64, 64, 3)
    diff = np.abs(staged.astype(int) - reference.astype(int))
    assert diff.max() <= 1, f"max pixel difference {diff.max()}"
    assert staged.std() > 0


@pytest.mark.parametrize(
    ("scheduler", "strength", "guidance", "num_images"),
    [
        ("euler", 0.6, 7.5, 1),
        ("euler_a", 0.75, 5.0, 2),  # draws from the generator at every step
        ("dpmpp_2m_karras", 0.5, 7.5, 1),
        ("ddim", 1.0, 1.0, 1),
        ("pndm", 0.8, 6.0, 1),
    ],
)
def test_img2img_equals_diffusers(stages, tiny_model_dir, scheduler, strength, guidance, num_images) -> None:  # type: ignore[no-untyped-def]
    params = DenoiseParams("tiny", 64, 64, 5, guidance, scheduler, 321, num_images, strength=strength)
    image = init_image()
    assert_close(
        run_staged(stages, params, image, None), run_reference(tiny_model_dir, params, image, None), num_images
    )


@pytest.mark.parametrize(("scheduler", "strength", "num_images"), [("euler_a", 1.0, 1), ("euler", 0.7, 2)])
def test_inpaint_with_inpainting_unet_equals_diffusers(  # type: ignore[no-untyped-def]
    inpaint_stages, tiny_inpaint_model_dir, scheduler, strength, num_images
) -> None:
    params = DenoiseParams("tiny", 64, 64, 4, 7.0, scheduler, 99, num_images, strength=strength)
    image, mask = init_image(), centre_mask()
    staged = run_staged(inpaint_stages, params, image, mask)
    assert_close(staged, run_reference(tiny_inpaint_model_dir, params, image, mask), num_images)


@pytest.mark.parametrize(("scheduler", "strength"), [("euler_a", 1.0), ("dpmpp_2m", 0.6)])
def test_inpaint_with_ordinary_unet_equals_diffusers(stages, tiny_model_dir, scheduler, strength) -> None:  # type: ignore[no-untyped-def]
    params = DenoiseParams("tiny", 64, 64, 5, 7.0, scheduler, 7, strength=strength)
    image, mask = init_image(), centre_mask()
    staged = run_staged(stages, params, image, mask)
    assert_close(staged, run_reference(tiny_model_dir, params, image, mask), 1)


def test_img2img_keeps_the_image_at_low_strength(stages) -> None:  # type: ignore[no-untyped-def]
    """Less strength, closer to the init image's latents (the point of img2img), on the same seed. (Latents, not
    pixels: random VAE weights do not reconstruct an image.)"""
    encoder, denoiser, decoder = stages
    (emb,) = encoder.encode([EncodeRequest("tiny", PROMPT, None, True)])
    image = decoder.encode_image(Pixels(init_image()[None], "v"), ImageEncodeParams("tiny"))
    target = image.scaling_factor * image.mean
    distance = {}
    for strength in (0.2, 0.6, 1.0):
        params = DenoiseParams("tiny", 64, 64, 10, 7.0, "euler", 5, strength=strength)
        distance[strength] = (denoiser.run(params, emb, image).tensor - target).abs().mean().item()
    assert distance[0.2] < distance[0.6] < distance[1.0]


def test_strength_that_runs_no_step_is_refused(stages) -> None:  # type: ignore[no-untyped-def]
    encoder, denoiser, decoder = stages
    (emb,) = encoder.encode([EncodeRequest("tiny", PROMPT, None, False)])
    latents = decoder.encode_image(Pixels(init_image()[None], "v"), ImageEncodeParams("tiny"))
    with pytest.raises(StageInputError) as info:
        denoiser.start(DenoiseParams("tiny", 64, 64, 4, 1.0, "euler", 1, strength=0.2), emb, latents)
    assert info.value.param == "strength"


def test_inpainting_model_needs_a_mask(inpaint_stages) -> None:  # type: ignore[no-untyped-def]
    encoder, denoiser, _ = inpaint_stages
    (emb,) = encoder.encode([EncodeRequest("tiny", PROMPT, None, False)])
    with pytest.raises(StageInputError) as info:
        denoiser.start(DenoiseParams("tiny", 64, 64, 4, 1.0, "euler", 1), emb)
    assert info.value.param == "mask"


def test_jobs_of_every_kind_share_unet_calls(stages) -> None:  # type: ignore[no-untyped-def]
    """txt2img, img2img and inpaint (4-channel UNet) jobs of the same shapes step together and still give what
    each gives alone."""
    encoder, denoiser, decoder = stages
    (emb,) = encoder.encode([EncodeRequest("tiny", PROMPT, None, True)])
    image = Pixels(init_image()[None], "v")
    runs = [
        (DenoiseParams("tiny", 64, 64, 4, 6.0, "euler", 1), None),
        (
            DenoiseParams("tiny", 64, 64, 6, 6.0, "euler_a", 2, strength=0.5),
            decoder.encode_image(image, ImageEncodeParams("tiny")),
        ),
        (
            DenoiseParams("tiny", 64, 64, 5, 6.0, "dpmpp_2m", 3, strength=0.8),
            decoder.encode_image(image, ImageEncodeParams("tiny", mask=centre_mask())),
        ),
    ]
    jobs = [denoiser.start(params, emb, latents) for params, latents in runs]
    assert len({job.batch_key() for job in jobs}) == 1
    calls = 0
    while not all(j.done for j in jobs):
        denoiser.step([j for j in jobs if not j.done])
        calls += 1
    assert calls < sum(job.total_steps for job in jobs)
    for job, (params, latents) in zip(jobs, runs, strict=True):
        assert torch.allclose(job.latents, denoiser.run(params, emb, latents).tensor, atol=1e-4)
