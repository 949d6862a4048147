"""Denoiser deployment: UNet + scheduler loop with step-level batching across requests."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from ray import serve

from models.contracts import DenoiseParams, DenoiseProgress, ImageLatents, Latents, PromptEmbeddings
from serving import tracing
from serving.config import AppConfig
from serving.deployments.adapters import AdapterAffinity, adapter_support, lora_options
from serving.deployments.common import StageReplica

if TYPE_CHECKING:
    from opentelemetry.trace import Span


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
        # When the UNet call before the latest one ended, and the latest one's images (for spans, see _first_step).
        self._previous_step_end = self._last_step_end = 0.0
        self._last_step_images = 0

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
        self._previous_step_end, self._last_step_end = self._last_step_end, time.perf_counter()
        self._last_step_images = images

    def _first_step(self, span: Span | None, arrived: float) -> None:
        """On a request's first progress report. The step batcher reports right after the UNet call that ran the
        request's first step, so the call before that one ended when the UNet was free for it: the request
        queued from its arrival until then (0 if the UNet was idle when it came; its own preparation is not
        counted). ``batch_size``: the images in the UNet call of its first step."""
        queued = max(self._previous_step_end - arrived, 0.0)
        tracing.annotate(
            span,
            queue_ms=round(queued * 1000, 3),
            first_step_ms=round((time.perf_counter() - arrived) * 1000, 3),
            batch_size=self._last_step_images,
        )

    async def _prepare(self, span: Span | None, params: DenoiseParams) -> tuple[DenoiseParams, Any]:
        """The request pinned to the model version it runs on, and that version's stage (loaded if need be); its
        adapter set registered with the router."""
        params = self.pinned(params, await self.resolve(params.model, params.ref))
        self._annotate(span, params)
        stage = self.runtime.get(params.model, params.ref)
        await self.register_route()
        return params, stage

    def _annotate(self, span: Span | None, params: DenoiseParams) -> None:
        self.annotate_model(span, params.model, params.ref, params.loras)
        tracing.annotate(
            span,
            steps=params.steps,
            strength=params.strength,
            images=params.num_images,
            size=f"{params.width}x{params.height}",
            scheduler=params.scheduler,
            guidance_scale=params.guidance_scale,
        )

    async def denoise(
        self,
        embeddings: PromptEmbeddings,
        params: DenoiseParams,
        image: ImageLatents | Latents | None = None,
        trace: Mapping[str, str] | None = None,
    ) -> Latents:
        """Denoise one request among the others; ``image``: the init image's latents (img2img, inpainting, a hires
        pass), None for text to image; ``trace``: the caller's trace context (see ``serving.tracing``)."""
        arrived = time.perf_counter()
        with self.traced("denoise", trace) as span:
            params, stage = await self._prepare(span, params)
            reported: list[DenoiseProgress] = []

            def on_progress(item: DenoiseProgress) -> None:
                if not reported:
                    self._first_step(span, arrived)
                    reported.append(item)

            with self.metrics.request():
                async with self.adapters.slots(stage, params.loras) as slots:
                    rows = tuple((slot, scale) for _, slot, scale in slots)
                    result: Latents = await self.batcher.submit(
                        stage, params, embeddings, on_progress if span else None, image=image, adapters=rows
                    )
            return result

    async def denoise_stream(
        self,
        embeddings: PromptEmbeddings,
        params: DenoiseParams,
        image: ImageLatents | Latents | None = None,
        preview: bool = False,
        trace: Mapping[str, str] | None = None,
    ) -> AsyncIterator[DenoiseProgress | Latents]:
        """``denoise`` that reports as it goes: a ``DenoiseProgress`` after every step, then the ``Latents``.

        Call it through a streaming handle (``handle.options(stream=True)``). When the caller cancels the
        stream, the job leaves the batch before its next step.
        """
        arrived = time.perf_counter()
        with self.traced("denoise", trace) as span:
            params, stage = await self._prepare(span, params)
            # Closed at once when the caller cancels the stream (not whenever it is garbage-collected), so the job
            # leaves the batch before its next step.
            with self.metrics.request():
                async with self.adapters.slots(stage, params.loras) as slots:
                    rows = tuple((slot, scale) for _, slot, scale in slots)
                    stream = self.batcher.stream(stage, params, embeddings, preview, image, rows)
                    first = True
                    async with contextlib.aclosing(stream) as items:
                        async for item in items:
                            if first and span is not None:
                                # Read as the report comes: the next UNet call has not ended yet.
                                self._first_step(span, arrived)
                            first = False
                            yield item

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["running_jobs"] = self.batcher.active
        recent = self.batcher.batch_sizes[-100:]
        info["recent_batch_sizes"] = {"max": max(recent, default=0), "mean": sum(recent) / max(len(recent), 1)}
        info["loras"] = {**self.adapters.describe(dict(self.runtime.loaded)), "routes": self.held_routes()}
        return info
