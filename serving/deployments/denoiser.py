"""Denoiser deployment: UNet + scheduler loop with step-level batching across requests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from models.contracts import DenoiseParams, DenoiseProgress, ImageLatents, Latents, PromptEmbeddings
from serving.config import AppConfig
from serving.deployments.adapters import AdapterAffinity, adapter_support, lora_options
from serving.deployments.common import StageReplica


@serve.deployment(name="Denoiser")
class DenoiserDeployment(AdapterAffinity, StageReplica):
    kind = "denoiser"

    def __init__(self, config: dict[str, Any]) -> None:
        from models.stepbatcher import StepBatcher

        super().__init__(config)
        self.batcher = StepBatcher(
            self.executor, max_batch_size=self.config.denoiser.max_batch_size, on_step=self._record_step
        )
        self.adapters = adapter_support(self, "unet")

    @staticmethod
    def stage_options(config: AppConfig) -> dict[str, Any]:
        """CUDA graphs, captured at load for the default size and every batch the step batcher can form; LoRA
        slots for as many rows as one UNet call has."""
        width, height = (int(v) for v in config.defaults.size.split("x"))
        images = max(config.denoiser.max_batch_size, config.limits.max_images)
        return {
            "cuda_graphs": config.denoiser.cuda_graphs,
            "warm_up": (height, width, images),
            "max_rows": 2 * images,
            **lora_options(config),
        }

    def _record_step(self, images: int, waiting: int) -> None:
        self.metrics.observe_batch(images)
        self.metrics.set_queue_depth(waiting)

    async def denoise(
        self, embeddings: PromptEmbeddings, params: DenoiseParams, image: ImageLatents | Latents | None = None
    ) -> Latents:
        """Denoise one request among the others; ``image``: the init image's latents (img2img, inpainting, a hires
        pass), None for text to image."""
        params = self.pinned(params, await self.resolve(params.model, params.ref))
        stage = self.runtime.get(params.model, params.ref)
        await self.register_route()
        with self.metrics.request():
            async with self.adapters.slots(stage, params.loras) as slots:
                rows = tuple((slot, scale) for _, slot, scale in slots)
                result: Latents = await self.batcher.submit(stage, params, embeddings, image=image, adapters=rows)
        return result

    async def denoise_stream(
        self,
        embeddings: PromptEmbeddings,
        params: DenoiseParams,
        image: ImageLatents | Latents | None = None,
        preview: bool = False,
    ) -> AsyncIterator[DenoiseProgress | Latents]:
        """``denoise`` that reports as it goes: a ``DenoiseProgress`` after every step, then the ``Latents``.

        Call it through a streaming handle (``handle.options(stream=True)``). When the caller cancels the
        stream, the job leaves the batch before its next step.
        """
        params = self.pinned(params, await self.resolve(params.model, params.ref))
        stage = self.runtime.get(params.model, params.ref)
        await self.register_route()
        # Closed at once when the caller cancels the stream (not whenever it is garbage-collected), so the job
        # leaves the batch before its next step.
        with self.metrics.request():
            async with self.adapters.slots(stage, params.loras) as slots:
                rows = tuple((slot, scale) for _, slot, scale in slots)
                stream = self.batcher.stream(stage, params, embeddings, preview, image, rows)
                async with contextlib.aclosing(stream) as items:
                    async for item in items:
                        yield item

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["running_jobs"] = self.batcher.active
        recent = self.batcher.batch_sizes[-100:]
        info["recent_batch_sizes"] = {"max": max(recent, default=0), "mean": sum(recent) / max(len(recent), 1)}
        info["loras"] = {**self.adapters.describe(dict(self.runtime.loaded)), "routes": self.held_routes()}
        return info
