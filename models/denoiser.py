"""Denoising stage: UNet + per-request scheduler, with step-level (continuous) batching.

Each request becomes a ``DenoiseJob`` that owns its scheduler instance, its latents and its random
generator. ``DenoiserStage.step`` advances a group of compatible jobs by one step with a single UNet call
(the timestep is passed per sample, so jobs at different steps and with different schedulers share a call).
``models/stepbatcher.py``'s ``StepBatcher`` is the loop around it: requests join and leave the running batch
between steps, the way LLM servers batch decoding steps, so a 4-step request never waits behind a 50-step one.

What a job feeds the UNet comes from the job: text to image starts from noise; image to image starts from the
init image's latents noised to the point ``strength`` selects; inpainting with an inpainting UNet (9 input
channels) adds the mask and the masked image's latents as extra channels of every row, and with an ordinary
UNet blends the known region back into the latents after every step. Jobs of the same UNet and shapes share
UNet calls whatever they are.

A job run alone follows diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline`` /
``StableDiffusionInpaintPipeline`` operation for operation (same draws from the one generator in the same order,
same scaling, same guidance arithmetic), so results match the reference pipelines.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from models.adapters.slots import UNET_TARGETS, LoraBank, RowAdapters
from models.contracts import DenoiseParams, ImageLatents, Latents, PromptEmbeddings
from models.cudagraphs import ROW_BUCKETS, GraphedUNet, bucket_for
from models.errors import StageInputError
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


@dataclass(frozen=True)
class MaskBlend:
    """Inpainting with an ordinary (4-channel) UNet: after every step the region outside the mask is replaced by
    the init image's latents noised to the next timestep, as diffusers' inpaint pipeline does."""

    image_latents: torch.Tensor  # (n, C, h, w), scaled
    mask: torch.Tensor  # (n, 1, h, w), 1 = repaint
    noise: torch.Tensor  # the job's initial noise


@dataclass(eq=False)
class DenoiseJob:
    """One request's denoising run: its scheduler, latents, UNet inputs and position in the schedule."""

    params: DenoiseParams
    model_version: str
    scheduler: Any
    timesteps: torch.Tensor  # the ones this job runs (the tail of the schedule when strength < 1)
    latents: torch.Tensor
    hidden_states: torch.Tensor  # (2n or n, seq, dim): [negative..., positive...] under guidance
    timestep_cond: torch.Tensor | None
    step_kwargs: dict[str, Any]
    guided: bool
    extra_inputs: torch.Tensor | None = None  # channels appended to every UNet row (inpainting UNets)
    blend: MaskBlend | None = None
    adapters: RowAdapters = ()  # (LoRA slot, scale) pairs every row of this job uses
    index: int = 0
    cancelled: bool = False

    @property
    def total_steps(self) -> int:
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        return self.index >= self.total_steps

    @property
    def samples(self) -> int:
        """Rows this job adds to a UNet batch."""
        return self.latents.shape[0] * (2 if self.guided else 1)

    def batch_key(self) -> tuple[int, ...]:
        """Jobs with equal keys can share a UNet call (same UNet input shape and prompt length)."""
        channels = self.latents.shape[1] + (0 if self.extra_inputs is None else self.extra_inputs.shape[1])
        return (channels, *self.latents.shape[2:], self.hidden_states.shape[1], int(self.timestep_cond is not None))


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
        lora_slots: int = 0,
        lora_max_rank: int = 64,
        loras_per_request: int = 4,
        max_rows: int = 2 * 8,
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
        # Per-request LoRA: a fixed set of slots in the UNet's attention / feed-forward layers (models/adapters).
        # Under graphs the adapter path is always part of the captured pass (rows without adapters read slot 0,
        # zeros), so one graph serves every mix of adapters.
        self.loras: LoraBank | None = None
        if lora_slots:
            rows = max(max_rows, ROW_BUCKETS[-1]) if self.graphs is not None else max_rows
            self.loras = LoraBank(
                self.unet, UNET_TARGETS, lora_slots, lora_max_rank, loras_per_request, rows, component="UNet"
            )
            self.loras.rows.always_on = self.graphs is not None
            self.loras.set_rows([])
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
        latent = (config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
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

    @property
    def inpainting(self) -> bool:
        """An inpainting UNet: it takes the mask and the masked image's latents beside the latents."""
        return int(self.unet.config.in_channels) == 2 * self.latent_channels + 1

    def start(
        self, params: DenoiseParams, embeddings: PromptEmbeddings, image: ImageLatents | Latents | None = None
    ) -> DenoiseJob:
        """Prepare a job: scheduler, initial latents and UNet inputs, as the reference pipelines do.

        Args:
            image: the init image's latent distribution (img2img, inpainting when it carries a mask), or exact
                latents to start from (a hires-fix second pass; resized to ``params``' size when they differ).
        """
        from diffusers.utils.torch_utils import randn_tensor

        if self.inpainting and not (isinstance(image, ImageLatents) and image.mask is not None):
            raise StageInputError(f"model {self.name!r} is an inpainting model: send an init image and a mask", "mask")
        scheduler = create_scheduler(params.scheduler, self.scheduler_config)
        scheduler.set_timesteps(params.steps, device=self.device)
        timesteps = scheduler.timesteps
        if image is not None:  # diffusers' get_timesteps: the last int(steps * strength) steps run
            skipped = params.steps - min(int(params.steps * params.strength), params.steps)
            if params.steps - skipped < 1:
                raise StageInputError(
                    f"strength {params.strength:g} x {params.steps} steps leaves no step to run; raise either",
                    "strength",
                )
            timesteps = timesteps[skipped * scheduler.order :]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(skipped * scheduler.order)
        # Every draw comes from the request's own generator, on the CPU, in the reference pipeline's order, so a
        # seed means the same image on every device and whatever else shares the batch.
        generator = torch.Generator("cpu").manual_seed(params.seed)
        n = params.num_images
        shape = (n, self.latent_channels, params.height // self.vae_scale_factor, params.width // self.vae_scale_factor)

        def draw(size: tuple[int, ...] | torch.Size) -> torch.Tensor:
            return randn_tensor(size, generator=generator, device=self.device, dtype=self.dtype)

        def sample(mean: torch.Tensor, std: torch.Tensor, scaling: float) -> torch.Tensor:
            """A draw from the VAE's latent distribution, scaled and repeated to the job's images."""
            eps = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            x = scaling * (mean + std * eps)
            return x.to(self.device, self.dtype).repeat(n // x.shape[0], 1, 1, 1)

        first = timesteps[:1].repeat(n)
        extra = blend = None
        if image is None:
            latents = draw(shape) * scheduler.init_noise_sigma
        elif isinstance(image, Latents):
            init = image.tensor.to(self.device, self.dtype)
            if tuple(init.shape[-2:]) != shape[-2:]:
                init = torch.nn.functional.interpolate(init, size=shape[-2:], mode="bilinear", antialias=False)
            init = init.repeat(n // init.shape[0], 1, 1, 1)
            latents = scheduler.add_noise(init, draw(shape), first)
        elif image.mask is None:  # StableDiffusionImg2ImgPipeline.prepare_latents
            init = sample(image.mean, image.std, image.scaling_factor)
            latents = scheduler.add_noise(init, draw(init.shape), first)
        else:  # StableDiffusionInpaintPipeline.prepare_latents, then prepare_mask_latents
            full_strength = params.strength == 1.0
            init = None
            if not self.inpainting or not full_strength:
                init = sample(image.mean, image.std, image.scaling_factor)
            noise = draw(shape)
            if full_strength:
                latents = noise * scheduler.init_noise_sigma
            else:
                assert init is not None
                latents = scheduler.add_noise(init, noise, first)
            assert image.masked_mean is not None and image.masked_std is not None
            masked = sample(image.masked_mean, image.masked_std, image.scaling_factor)  # drawn either way
            mask = image.mask.to(self.device, self.dtype).repeat(n, 1, 1, 1)
            if self.inpainting:
                extra = torch.cat([mask, masked], dim=1)
            else:
                assert init is not None
                blend = MaskBlend(init, mask, noise)

        timestep_cond = None
        guidance_dim = self.unet.config.time_cond_proj_dim
        if guidance_dim is not None:
            w = guidance_embedding(params.guidance_scale, guidance_dim, self.dtype)
            timestep_cond = w.repeat(n, 1).to(self.device)
        guided = params.guidance_scale > 1.0 and guidance_dim is None

        positive = embeddings.positive.to(self.device, self.dtype).repeat(n, 1, 1)
        if guided:
            if embeddings.negative is None:
                raise ValueError("guidance needs negative embeddings")
            negative = embeddings.negative.to(self.device, self.dtype).repeat(n, 1, 1)
            hidden = torch.cat([negative, positive])
            if extra is not None:
                extra = torch.cat([extra] * 2)
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
            timesteps=timesteps,
            latents=latents,
            hidden_states=hidden,
            timestep_cond=timestep_cond,
            step_kwargs=step_kwargs,
            guided=guided,
            extra_inputs=extra,
            blend=blend,
        )

    @torch.inference_mode()
    def step(self, jobs: list[DenoiseJob]) -> None:
        """Advance every job by one step with a single UNet call. Jobs must share a ``batch_key``."""
        inputs, timesteps, hidden, conds = [], [], [], []
        rows: list[RowAdapters] = []
        for job in jobs:
            t = job.timesteps[job.index]
            x = torch.cat([job.latents] * 2) if job.guided else job.latents
            x = job.scheduler.scale_model_input(x, t)
            if job.extra_inputs is not None:
                x = torch.cat([x, job.extra_inputs], dim=1)
            inputs.append(x)
            rows += [job.adapters] * x.shape[0]  # the unconditional rows too, as diffusers applies a LoRA
            timesteps.append(t.to(torch.float32).expand(x.shape[0]))
            hidden.append(job.hidden_states)
            if job.timestep_cond is not None:
                conds.append(job.timestep_cond)
        sample, steps, states = torch.cat(inputs), torch.cat(timesteps), torch.cat(hidden)
        cond = torch.cat(conds) if conds else None
        if self.loras is not None:
            self.loras.set_rows(rows)
        elif any(rows):
            raise ValueError("adapters need lora_slots")
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
            t = job.timesteps[job.index]
            job.latents = job.scheduler.step(pred, t, job.latents, **job.step_kwargs, return_dict=False)[0]
            if job.blend is not None:
                known = job.blend.image_latents
                if job.index < job.total_steps - 1:
                    known = job.scheduler.add_noise(
                        known, job.blend.noise, job.timesteps[job.index + 1 : job.index + 2]
                    )
                job.latents = (1 - job.blend.mask) * known + job.blend.mask * job.latents
            job.index += 1

    def result(self, job: DenoiseJob) -> Latents:
        return Latents(
            model=self.name,
            model_version=job.model_version,
            tensor=job.latents.to("cpu"),
            steps_run=job.index,
            ref=job.params.ref,
        )

    def run(
        self,
        params: DenoiseParams,
        embeddings: PromptEmbeddings,
        image: ImageLatents | Latents | None = None,
        adapters: RowAdapters = (),
    ) -> Latents:
        """Run one request to completion on its own (no batching); ``adapters``: its LoRA slots and scales."""
        job = self.start(params, embeddings, image)
        job.adapters = adapters
        while not job.done:
            self.step([job])
        return self.result(job)
