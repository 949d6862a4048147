"""``StepBatcher``: continuous batching across requests, one denoising step at a time.

Requests join and leave the running batch between steps, the way LLM servers batch decoding steps, so a 4-step
request never waits behind a 50-step one. ``DenoiserStage.step`` does the torch work of one step.

Which jobs go next is cost-weighted fair (start-time fair queueing): every job keeps a virtual time, the compute
it has received, and the job with the least goes next. A step's cost is estimated from shapes alone (UNet rows x
latent height x latent width), so the order of calls is deterministic. One step of a 1024x1024 request costs as
much as 256 steps of a 64x64 one: a small request that arrives while a large one runs waits for the one large step
in flight, then gets up to as much compute before the large one's next step, instead of taking turns with it step
for step; while small requests keep coming, the large one still gets its equal share.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from models.adapters.slots import RowAdapters
from models.contracts import DenoiseParams, DenoiseProgress, ImageLatents, Latents, PromptEmbeddings
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
    vtime: float = 0.0  # virtual time: where it started plus the step cost it has been charged (``step_cost``)


def step_cost(job: DenoiseJob) -> int:
    """What one UNet step of ``job`` costs, in UNet rows x latent pixels: an estimate from shapes alone rather
    than a clock, so the order of calls is reproducible (the UNet's work grows about linearly with both)."""
    height, width = job.latents.shape[-2:]
    return job.samples * height * width


class StepBatcher:
    """Continuous batching across requests, one denoising step at a time.

    Every iteration takes a head job, gathers the other running jobs that share its batch key (up to
    ``max_batch_size`` images, whatever their virtual time), runs one UNet call for them on ``executor``,
    charges each its own ``step_cost`` and moves them to the back of the line. The head is the job with the
    least virtual time, the one that waited longest among equals; with ``fair=False`` it is simply the one
    that waited longest (round robin across batch keys, whatever a step costs).

    New requests join at the next step, at the system's virtual time: at least the virtual time of the call in
    flight, advanced after each call by the share of it each running job would have had. So they neither start
    at 0 and hold the others up until they catch up, nor queue behind the compute the others have already had,
    and a stream of arrivals cannot hold back a job they cannot share calls with: the clock they start at
    passes its virtual time. Finished or cancelled jobs leave.
    """

    def __init__(
        self,
        executor: Executor,
        max_batch_size: int = 8,
        on_step: Callable[[int, int], None] | None = None,
        fair: bool = True,
    ) -> None:
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.on_step = on_step  # (images in this UNet call, running jobs left out of it)
        self.fair = fair
        self._running: list[_Pending] = []
        self._starting: set[asyncio.Future[DenoiseJob]] = set()  # jobs being prepared, about to join
        self._clock = 0.0  # system virtual time: where new jobs start
        self._sharing = 1  # running jobs when the call in flight was chosen
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
        image: ImageLatents | Latents | None = None,
        adapters: RowAdapters = (),
    ) -> Latents:
        """Denoise one request among the others; ``on_progress`` hears of each of its steps (on the event loop),
        with a low-resolution preview when ``preview`` is set; ``image``: the init image's latents, if any;
        ``adapters``: the LoRA slots and scales its rows use (the caller holds the slots until this returns).
        Cancelling the caller stops the job before its next step."""
        loop = asyncio.get_running_loop()
        joined_at = self._clock  # the virtual time it arrived at, not the later one its preparation ends at
        start = loop.run_in_executor(self.executor, stage.start, params, embeddings, image)
        self._starting.add(start)
        try:
            job = await start
            job.adapters = adapters  # rows with other adapters (or none) still share its UNet calls
            pending = _Pending(job, stage, loop.create_future(), on_progress, preview, vtime=joined_at)
            self._running.append(pending)
        finally:
            self._starting.discard(start)
        self._wakeup.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop())
        try:
            return await asyncio.shield(pending.future)
        except asyncio.CancelledError:
            job.cancelled = True  # the loop drops it before its next step, freeing its slot
            raise

    async def stream(
        self,
        stage: DenoiserStage,
        params: DenoiseParams,
        embeddings: PromptEmbeddings,
        preview: bool = False,
        image: ImageLatents | Latents | None = None,
        adapters: RowAdapters = (),
    ) -> AsyncGenerator[DenoiseProgress | Latents, None]:
        """``submit`` that reports as it goes: a ``DenoiseProgress`` after every step, then the ``Latents``.
        Closing the iterator early drops the job before its next step."""
        progress: asyncio.Queue[DenoiseProgress] = asyncio.Queue()
        task = asyncio.ensure_future(
            self.submit(stage, params, embeddings, progress.put_nowait, preview, image, adapters)
        )
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
        # min() keeps the first of equals: the one that has waited longest.
        head = min(self._running, key=lambda p: p.vtime) if self.fair else self._running[0]
        self._clock = max(self._clock, head.vtime)
        self._sharing = len(self._running)
        key = (id(head.stage), head.job.batch_key())
        batch = [head]
        images = head.job.latents.shape[0]
        for p in self._running:
            if p is head or (id(p.stage), p.job.batch_key()) != key:
                continue
            n = p.job.latents.shape[0]
            if images + n > self.max_batch_size:
                break
            batch.append(p)
            images += n
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # A job being prepared was queued on the executor before any step chosen now: let it join this
            # choice rather than the next, or a small request would wait for two large steps instead of one.
            while self._starting:
                await asyncio.wait(set(self._starting))
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
            charged = 0
            for p in batch:
                p.vtime += step_cost(p.job)
                charged += step_cost(p.job)
            # The clock advances by what each running job would have had of this call under equal shares, so
            # jobs that keep arriving start later and later: a job that cannot share their calls (a large
            # one) gets its turn even when one arrives every call.
            self._clock += charged / max(self._sharing, 1)
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
