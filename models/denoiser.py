"""Denoising stage: UNet + per-request scheduler, with step-level (continuous) batching.

Each request becomes a ``DenoiseJob`` that owns its scheduler instance, its latents and its random
generator. ``DenoiserStage.step`` advances a group of compatible jobs by one step with a single UNet call
(the timestep is passed per sample, so jobs at different steps and with different schedulers share a call).
``StepBatcher`` is the loop around it: requests join and leave the running batch between steps, the way LLM
servers batch decoding steps, so a 4-step request never waits behind a 50-step one.

A job run alone follows diffusers' ``StableDiffusionPipeline.__call__`` operation for operation (same
noise draw, same scaling, same guidance arithmetic), so results match the reference pipeline.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import math
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch

from models.contracts import DenoiseParams, DenoiseProgress, Latents, PromptEmbeddings
from models.cudagraphs import GraphedUNet, bucket_for
from models.previews import PREVIEW_MEDIA_TYPE, latent_preview
from models.schedulers import create_scheduler
from models.snapshot import ModelSnapshot

logger = logging.getLogger(__name__)

CLIP_WINDOW = 77  # tokens per prompt chunk: the sequence length of a one-chunk prompt's hidden states


def guidance_embedding(scale: float, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal embedding of the guidance scale for guidance-distilled (LCM) UNets, shape (1, dim)."""
    w = torch.tensor([(scale - 1.0) * 1000.0])
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -(math.log(10000.0) / (half - 1)))
    emb = w.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


@dataclass(eq=False)
class DenoiseJob:
    """One request's denoising run: its scheduler, latents and position in the schedule."""

    params: DenoiseParams
    model_version: str
    scheduler: Any
    latents: torch.Tensor
    hidden_states: torch.Tensor  # (2n or n, seq, dim): [negative..., positive...] under guidance
    timestep_cond: torch.Tensor | None
    step_kwargs: dict[str, Any]
    guided: bool
    index: int = 0
    cancelled: bool = False

    @property
    def total_steps(self) -> int:
        return len(self.scheduler.timesteps)

    @property
    def done(self) -> bool:
        return self.index >= self.total_steps

    @property
    def samples(self) -> int:
        """Rows this job adds to a UNet batch."""
        return self.latents.shape[0] * (2 if self.guided else 1)

    def batch_key(self) -> tuple[int, ...]:
        """Jobs with equal keys can share a UNet call (same latent size and prompt length)."""
        return (*self.latents.shape[1:], self.hidden_states.shape[1], int(self.timestep_cond is not None))


class DenoiserStage:
    """Holds one model's UNet and scheduler config."""

    def __init__(
        self,
        name: str,
        snapshot: ModelSnapshot,
        device: torch.device,
        dtype: torch.dtype,
        cuda_graphs: bool = True,
        warm_up: tuple[int, int, int] | None = None,
    ) -> None:
        from diffusers import UNet2DConditionModel

        self.name = name
        self.snapshot = snapshot
        self.device = device
        self.dtype = dtype
        self.unet = UNet2DConditionModel.from_pretrained(
            snapshot.path, subfolder="unet", torch_dtype=dtype, use_safetensors=snapshot.use_safetensors
        ).to(device)
        self.unet.eval()
        # On CUDA the forward pass is replayed from captured graphs (one per padded batch shape).
        self.graphs = GraphedUNet(self.unet) if cuda_graphs and device.type == "cuda" else None
        config_file = snapshot.component_dir("scheduler") / "scheduler_config.json"
        self.scheduler_config: dict[str, Any] = json.loads(config_file.read_text())
        self.vae_scale_factor = snapshot.family.vae_scale_factor
        # The family's latent channels, not the UNet's input channels (an inpainting UNet takes more).
        self.latent_channels = snapshot.family.latent_channels
        if warm_up is not None:
            self.warm_up(*warm_up)

    @property
    def version(self) -> str:
        return self.snapshot.version

    @torch.inference_mode()
    def warm_up(self, height: int, width: int, max_images: int) -> int:
        """Capture the CUDA graphs of every batch of up to ``max_images`` guided images at one size (one-chunk
        prompts) before serving, so no request waits for a capture. Returns the number of graphs held."""
        if self.graphs is None:
            return 0
        config = self.unet.config
        latent = (self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        top = bucket_for(2 * max_images, self.graphs.buckets) or self.graphs.buckets[-1]
        started = time.perf_counter()
        zeros = functools.partial(torch.zeros, device=self.device, dtype=self.dtype)
        try:
            for rows in (b for b in self.graphs.buckets if b <= top):
                cond = zeros((rows, config.time_cond_proj_dim)) if config.time_cond_proj_dim is not None else None
                steps = torch.zeros((rows,), device=self.device, dtype=torch.float32)
                hidden = zeros((rows, CLIP_WINDOW, config.cross_attention_dim))
                self.graphs(zeros((rows, *latent)), steps, hidden, cond)
        except Exception:  # a shape the UNet rejects: requests capture their own graphs as they come
            logger.exception("CUDA graph warm-up of %s failed", self.name)
        logger.info(
            "%s: %d CUDA graphs ready for %dx%d, up to %d images per step, in %.1f s",
            self.name, len(self.graphs.graphs), width, height, max_images, time.perf_counter() - started,
        )  # fmt: skip
        return len(self.graphs.graphs)

    def loaded_modules(self) -> dict[str, str]:
        graphs = self.graphs.describe() if self.graphs is not None else None
        return {
            "unet": type(self.unet).__name__,
            "scheduler": "config",
            "cuda_graphs": "off" if graphs is None else json.dumps(graphs, sort_keys=True),
        }

    def start(self, params: DenoiseParams, embeddings: PromptEmbeddings) -> DenoiseJob:
        """Prepare a job: scheduler, initial noise and guidance inputs, as the reference pipeline does."""
        from diffusers.utils.torch_utils import randn_tensor

        scheduler = create_scheduler(params.scheduler, self.scheduler_config)
        scheduler.set_timesteps(params.steps, device=self.device)
        # Noise is drawn on the CPU from the request's own generator, so a seed means the same image on
        # every device and whatever else shares the batch.
        generator = torch.Generator("cpu").manual_seed(params.seed)
        shape = (
            params.num_images,
            self.latent_channels,
            params.height // self.vae_scale_factor,
            params.width // self.vae_scale_factor,
        )
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        latents = latents * scheduler.init_noise_sigma

        timestep_cond = None
        guidance_dim = self.unet.config.time_cond_proj_dim
        if guidance_dim is not None:
            w = guidance_embedding(params.guidance_scale, guidance_dim, self.dtype)
            timestep_cond = w.repeat(params.num_images, 1).to(self.device)
        guided = params.guidance_scale > 1.0 and guidance_dim is None

        n = params.num_images
        positive = embeddings.positive.to(self.device, self.dtype).repeat(n, 1, 1)
        if guided:
            if embeddings.negative is None:
                raise ValueError("guidance needs negative embeddings")
            negative = embeddings.negative.to(self.device, self.dtype).repeat(n, 1, 1)
            hidden = torch.cat([negative, positive])
        else:
            hidden = positive

        accepted = set(inspect.signature(scheduler.step).parameters)
        step_kwargs: dict[str, Any] = {}
        if "eta" in accepted:
            step_kwargs["eta"] = 0.0  # DDIM's eta, as the reference pipeline defaults it (not exposed)
        if "generator" in accepted:
            step_kwargs["generator"] = generator
        return DenoiseJob(
            params=params,
            model_version=self.version,
            scheduler=scheduler,
            latents=latents,
            hidden_states=hidden,
            timestep_cond=timestep_cond,
            step_kwargs=step_kwargs,
            guided=guided,
        )

    @torch.inference_mode()
    def step(self, jobs: list[DenoiseJob]) -> None:
        """Advance every job by one step with a single UNet call. Jobs must share a ``batch_key``."""
        inputs, timesteps, hidden, conds = [], [], [], []
        for job in jobs:
            t = job.scheduler.timesteps[job.index]
            x = torch.cat([job.latents] * 2) if job.guided else job.latents
            x = job.scheduler.scale_model_input(x, t)
            inputs.append(x)
            timesteps.append(t.to(torch.float32).expand(x.shape[0]))
            hidden.append(job.hidden_states)
            if job.timestep_cond is not None:
                conds.append(job.timestep_cond)
        sample, steps, states = torch.cat(inputs), torch.cat(timesteps), torch.cat(hidden)
        cond = torch.cat(conds) if conds else None
        if self.graphs is not None:
            noise = self.graphs(sample, steps, states, cond)
        else:
            noise = self.unet(sample, steps, encoder_hidden_states=states, timestep_cond=cond, return_dict=False)[0]
        offset = 0
        for job, x in zip(jobs, inputs, strict=True):
            pred = noise[offset : offset + x.shape[0]]
            offset += x.shape[0]
            if job.guided:
                uncond, text = pred.chunk(2)
                pred = uncond + job.params.guidance_scale * (text - uncond)
            t = job.scheduler.timesteps[job.index]
            job.latents = job.scheduler.step(pred, t, job.latents, **job.step_kwargs, return_dict=False)[0]
            job.index += 1

    def result(self, job: DenoiseJob) -> Latents:
        return Latents(
            model=self.name,
            model_version=job.model_version,
            tensor=job.latents.to("cpu"),
            steps_run=job.index,
            ref=job.params.ref,
        )

    def run(self, params: DenoiseParams, embeddings: PromptEmbeddings) -> Latents:
        """Run one request to completion on its own (no batching)."""
        job = self.start(params, embeddings)
        while not job.done:
            self.step([job])
        return self.result(job)


@dataclass(eq=False)
class _Pending:
    job: DenoiseJob
    stage: DenoiserStage
    future: asyncio.Future[Latents]
    on_progress: Callable[[DenoiseProgress], None] | None = None
    preview: bool = False


class StepBatcher:
    """Continuous batching across requests, one denoising step at a time.

    Every iteration takes the job that has waited longest, gathers the other running jobs that share its
    batch key (up to ``max_batch_size`` images), runs one UNet call for them on ``executor`` and moves them
    to the back of the line. New requests join at the next step; finished or cancelled ones leave.
    """

    def __init__(
        self,
        executor: Executor,
        max_batch_size: int = 8,
        on_step: Callable[[int, int], None] | None = None,
    ) -> None:
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.on_step = on_step  # (images in this UNet call, running jobs left out of it)
        self._running: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batch_sizes: list[int] = []  # images per UNet call, most recent last (bounded)

    @property
    def active(self) -> int:
        return len(self._running)

    async def submit(
        self,
        stage: DenoiserStage,
        params: DenoiseParams,
        embeddings: PromptEmbeddings,
        on_progress: Callable[[DenoiseProgress], None] | None = None,
        preview: bool = False,
    ) -> Latents:
        """Denoise one request among the others; ``on_progress`` hears of each of its steps (on the event loop),
        with a low-resolution preview when ``preview`` is set. Cancelling the caller stops the job before its
        next step."""
        loop = asyncio.get_running_loop()
        job = await loop.run_in_executor(self.executor, stage.start, params, embeddings)
        pending = _Pending(job, stage, loop.create_future(), on_progress, preview)
        self._running.append(pending)
        self._wakeup.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop())
        try:
            return await asyncio.shield(pending.future)
        except asyncio.CancelledError:
            job.cancelled = True  # the loop drops it before its next step, freeing its slot
            raise

    async def stream(
        self, stage: DenoiserStage, params: DenoiseParams, embeddings: PromptEmbeddings, preview: bool = False
    ) -> AsyncGenerator[DenoiseProgress | Latents, None]:
        """``submit`` that reports as it goes: a ``DenoiseProgress`` after every step, then the ``Latents``.
        Closing the iterator early drops the job before its next step."""
        progress: asyncio.Queue[DenoiseProgress] = asyncio.Queue()
        task = asyncio.ensure_future(self.submit(stage, params, embeddings, progress.put_nowait, preview))
        try:
            while not task.done() or not progress.empty():
                getter = asyncio.ensure_future(progress.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            yield task.result()
        finally:
            task.cancel()  # a no-op once finished; otherwise the job leaves the batch

    def _next_batch(self) -> list[_Pending]:
        self._running = [p for p in self._running if not p.job.cancelled and not p.future.done()]
        if not self._running:
            return []
        head = self._running[0]
        key = (id(head.stage), head.job.batch_key())
        batch: list[_Pending] = []
        images = 0
        for p in self._running:
            if (id(p.stage), p.job.batch_key()) != key:
                continue
            n = p.job.latents.shape[0]
            if batch and images + n > self.max_batch_size:
                break
            batch.append(p)
            images += n
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._next_batch()
            if not batch:
                self._wakeup.clear()
                if not self._running:
                    await self._wakeup.wait()
                continue
            stage = batch[0].stage
            previews = [p.job for p in batch if p.preview]
            try:
                finished, shown = await loop.run_in_executor(
                    self.executor, self._advance, stage, [p.job for p in batch], previews
                )
            except Exception as exc:  # a failed step fails the jobs in it, not the loop
                logger.exception("denoising step failed for %d job(s)", len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            self.batch_sizes.append(sum(p.job.latents.shape[0] for p in batch))
            del self.batch_sizes[:-1000]
            if self.on_step is not None:
                self.on_step(self.batch_sizes[-1], len(self._running) - len(batch))
            stepped = set(map(id, batch))
            self._running = [p for p in self._running if id(p) not in stepped] + batch
            for p in batch:
                if p.on_progress is not None and not p.job.cancelled:
                    image = shown.get(id(p.job))
                    p.on_progress(
                        DenoiseProgress(p.job.index, p.job.total_steps, image, PREVIEW_MEDIA_TYPE if image else None)
                    )
                result = finished.get(id(p.job))
                if result is not None and not p.future.done():
                    p.future.set_result(result)

    @staticmethod
    def _advance(
        stage: DenoiserStage, jobs: list[DenoiseJob], previews: list[DenoiseJob]
    ) -> tuple[dict[int, Latents], dict[int, bytes]]:
        """One step for ``jobs``, then the results of those that finished and the previews asked for
        (device-to-host copies and JPEG encoding included, so the event loop never waits on them)."""
        stage.step(jobs)
        finished = {id(job): stage.result(job) for job in jobs if job.done}
        shown = {id(job): image for job in previews if (image := latent_preview(job.latents)) is not None}
        return finished, shown
