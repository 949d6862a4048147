"""``StepBatcher``: continuous batching across requests, one denoising step at a time.

Requests join and leave the running batch between steps, the way LLM servers batch decoding steps, so a 4-step
request never waits behind a 50-step one. ``DenoiserStage.step`` does the torch work of one step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from models.contracts import DenoiseParams, DenoiseProgress, Latents, PromptEmbeddings
from models.denoiser import DenoiseJob, DenoiserStage
from models.previews import PREVIEW_MEDIA_TYPE, latent_preview

logger = logging.getLogger(__name__)


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
