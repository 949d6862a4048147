"""What the baselines share with each other and with sdserve, so the comparison is fair: the same model
folder, scheduler, dtype, thread count and image encoding, and the same OpenAI-style request and response."""

from __future__ import annotations

import asyncio
import base64
import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def load_pipeline(model_dir: str) -> Any:
    """The pipeline on the device sdserve would pick (CUDA fp16 when present, else CPU fp32)."""
    from diffusers import StableDiffusionPipeline

    from models.devices import available_cpus, configure_threads, resolve_device, resolve_dtype
    from models.schedulers import create_scheduler

    configure_threads(available_cpus())  # every CPU, in and out of Ray (Ray starts workers with 1 thread)
    device = resolve_device("auto")
    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir, safety_checker=None, torch_dtype=resolve_dtype("auto", device)
    ).to(device)
    pipe.scheduler = create_scheduler("euler", dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_png(pipe: Any, body: dict[str, Any]) -> list[str]:
    """Run one OpenAI-style request; return base64 PNGs."""
    import torch

    width, height = (int(v) for v in body.get("size", "256x256").split("x"))
    images = pipe(
        body["prompt"],
        negative_prompt=body.get("negative_prompt"),
        height=height,
        width=width,
        num_inference_steps=int(body.get("steps", 20)),
        guidance_scale=float(body.get("guidance_scale", 7.5)),
        num_images_per_prompt=int(body.get("n", 1)),
        generator=torch.Generator("cpu").manual_seed(int(body.get("seed", 0))),
    ).images
    out = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return out


class PipelineWorker:
    """One pipeline on one dedicated thread that both loads it and runs every generation.

    What a careful server does, and what sdserve's stages do: each thread that runs torch work gets its own
    OpenMP thread team, and loading on one thread while generating on another made every UNet call about
    1.5x slower on two cores. Giving the baselines the same treatment keeps the comparison about design.
    """

    def __init__(self, model_dir: str) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
        self.pipe = self.executor.submit(load_pipeline, model_dir).result()

    async def generate(self, body: dict[str, Any]) -> list[str]:
        return await asyncio.wrap_future(self.executor.submit(generate_png, self.pipe, body))
