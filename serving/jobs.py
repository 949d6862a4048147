"""Asynchronous jobs: submit now, follow the denoiser's real steps, fetch the images later.

``JobManager`` is transport-neutral, like ``GenerationService`` under it: the REST routes (``/v1/jobs``) and
the gRPC servicer (``GenerateStream``, ``GetJob``, ``CancelJob``) both call it.

Life of a job: ``queued`` (submitted; its position counts the earlier jobs not yet denoising) -> ``running``
(from its first denoising step, one ``step`` event per step, each with a low-resolution preview when asked
for) -> ``succeeded`` / ``failed`` / ``cancelled``.

Jobs do not bypass the stages' backpressure: each ingress replica sends at most ``jobs.max_running`` jobs to
the stages at once, and the jobs it accepted beyond those wait in its job queue (first come, first served,
still ``queued``). Only a full queue (``jobs.max_queued``) refuses a submit, with ``503 overloaded``. A job on
its way through the stages that meets a full stage queue waits and tries again within
``limits.request_timeout_s`` of leaving the job queue, since it was accepted.

The ingress replica that accepted the job drives it and holds a lease on it in the store. When that replica
dies mid-run, the denoising work dies with it (the chain of stage calls is driven from there): once the lease
lapses, whoever reads the job next marks it ``failed`` with code ``job_lost``; finished jobs and their images
stay readable until they expire (or, in the memory store, until newer jobs need the room).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any, NoReturn

from models.contracts import DenoiseProgress
from serving import auth
from serving.config import JobsSpec
from serving.errors import ApiError
from serving.jobstore import JobError, JobRecord, JobResult, JobState, JobStore, JobStoreFull
from serving.plans import plan_generation
from serving.schemas import JobRequest
from serving.service import GenerationRequest, GenerationResult, GenerationService, OnProgress

logger = logging.getLogger(__name__)

TERMINAL_EVENTS = {"done", "failed", "cancelled"}


def request_hash(request: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class JobManager:
    """Submits, drives, cancels and reports jobs for one ingress replica."""

    def __init__(self, service: GenerationService, store: JobStore, spec: JobsSpec) -> None:
        self.service = service
        self.store = store
        self.spec = spec
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._running: set[str] = set()  # jobs sent to the stages (at most spec.max_running)
        self._waiting: dict[str, asyncio.Future[None]] = {}  # the job queue, oldest first (at most spec.max_queued)
        self._lease_task: asyncio.Task[None] | None = None
        self._stopping = False

    # -- submit and drive -------------------------------------------------------------------------------------

    async def submit(self, body: JobRequest, idempotency_key: str | None = None) -> tuple[JobRecord, bool]:
        """Check the request and queue it; return (job, created). A retried submit with the same
        idempotency key returns the first job (and takes no place in the queue); the same key with a different
        request is a 422. A full job queue or job store is a 503 ``overloaded``."""
        # A bad request fails here, as a 422, not later as a failed job (off the event loop: it may decode images).
        req = await asyncio.to_thread(self.service.prepare, body)
        request = body.model_dump(mode="json", exclude_unset=True)
        now = time.time()
        tenant = auth.current().tenant
        if idempotency_key is not None and tenant:  # one tenant's key never names another's job
            idempotency_key = f"{tenant}/{idempotency_key}"
        job = JobRecord(
            id=f"job_{secrets.token_hex(12)}",
            tenant=tenant,
            created_at=now,
            updated_at=now,
            request=request,
            request_hash=request_hash(request),
            idempotency_key=idempotency_key,
            preview=body.preview,
            total_steps=plan_generation(req).total_steps,
        )
        if idempotency_key is not None:
            owner = await self.store.claim_key(idempotency_key, job)
            if owner != job.id:
                existing = await self.store.get(owner)
                if existing is not None:
                    if existing.request_hash != job.request_hash:
                        raise ApiError(
                            422,
                            "idempotency_key_reused",
                            "this Idempotency-Key was used for a different request",
                            "Idempotency-Key",
                        )
                    return await self._checked(existing), False
        if self.service.quotas.active:  # a new job: counted now and refused now (429), not after the 202
            try:
                await asyncio.to_thread(self.service.quotas.charge, tenant, req)
            except ApiError:
                if idempotency_key is not None:  # a retry with this key must be free to create the job
                    await self.store.release_key(idempotency_key, job)
                raise
        if not self._take_place(job.id):
            await self._refuse(job, idempotency_key, "the job queue is full")
        try:
            await self.store.create(job)
            await self.store.append_event(job, {"type": "queued", "position": await self.store.queue_position(job)})
        except JobStoreFull as exc:
            logger.warning("refusing a job: %s", exc)
            self._leave(job.id)
            await self._refuse(job, idempotency_key, "the job store is full of unfinished jobs")
        except BaseException:  # the store failed, or the caller went away: the place must not leak
            self._leave(job.id)
            raise
        self._tasks[job.id] = asyncio.create_task(self._run(job, req), name=job.id)
        if self._lease_task is None or self._lease_task.done():
            self._lease_task = asyncio.create_task(self._renew_leases())
        # Let the task start: one cancelled before its first step never runs, so it would neither record the
        # cancel nor give back its place.
        await asyncio.sleep(0)
        await self.store.renew_leases([job.id], self.spec.lease_s)
        return job, True

    async def _refuse(self, job: JobRecord, idempotency_key: str | None, why: str) -> NoReturn:
        if idempotency_key is not None:  # a retry with this key must be free to create the job
            await self.store.release_key(idempotency_key, job)
        raise ApiError(
            503,
            "overloaded",
            f"{why}; retry shortly",
            headers={"Retry-After": str(self.service.config.limits.retry_after_s)},
        )

    async def _run(self, job: JobRecord, req: GenerationRequest) -> None:
        async def progress(update: DenoiseProgress) -> None:
            job.state = JobState.RUNNING
            job.step, job.total_steps, job.updated_at = update.step, update.total_steps, time.time()
            await self.store.save(job)
            event: dict[str, Any] = {"type": "step", "step": update.step, "total_steps": update.total_steps}
            if update.preview is not None:
                event["preview"] = base64.b64encode(update.preview).decode("ascii")
                event["preview_media_type"] = update.preview_media_type
            await self.store.append_event(job, event)
            # A cancel sent to another ingress replica reaches this one through the store, at the next step.
            if await self.store.cancel_requested(job.id):
                self._tasks[job.id].cancel()

        try:
            waiter = self._waiting.get(job.id)
            if waiter is not None:
                await waiter  # this job's turn in the queue
            if await self.store.cancel_requested(job.id):  # cancelled through another ingress replica meanwhile
                raise asyncio.CancelledError
            result = await self._generate(job, req, progress)
        except asyncio.CancelledError:
            if self._stopping:
                await self._finish(job, JobState.FAILED, JobError(code="job_lost", message=_LOST))
            else:
                await self._finish(job, JobState.CANCELLED)
        except ApiError as err:
            await self._finish(job, JobState.FAILED, JobError(code=err.code, message=err.message, param=err.param))
        except Exception as exc:
            logger.exception("job %s failed", job.id)
            await self._finish(job, JobState.FAILED, JobError(code="internal_error", message=type(exc).__name__))
        else:
            await self.store.put_images(job, [img for img, _ in result.delivered])
            job.result = _result(result)
            await self._finish(job, JobState.SUCCEEDED)
        finally:
            self._tasks.pop(job.id, None)
            self._leave(job.id)

    async def _generate(self, job: JobRecord, req: GenerationRequest, progress: OnProgress) -> GenerationResult:
        """Run the job through the stages. A stage queue that is full now does not fail the job (it was
        accepted): it waits, backing off up to ``retry_after_s``, and tries again until the request deadline."""
        limits = self.service.config.limits
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.request_timeout_s
        attempt = 0
        while True:
            try:
                # Only the stage calls count against the deadline: a backoff that wakes late ends as
                # "overloaded" below, whatever the timing.
                async with asyncio.timeout_at(deadline):
                    return await self.service.generate(req, progress, preview=job.preview, charged=True)
            except TimeoutError as exc:
                raise ApiError(
                    504, "timeout", f"the job did not finish within {limits.request_timeout_s:g}s of leaving the queue"
                ) from exc
            except ApiError as err:
                if err.code != "overloaded":
                    raise
                attempt += 1
                delay = min(float(limits.retry_after_s), 0.05 * 2**attempt) * random.uniform(0.5, 1.0)
                if loop.time() + delay >= deadline:
                    raise
                last = err
            logger.info("job %s: the stages are at capacity; trying again in %.2fs", job.id, delay)
            await asyncio.sleep(delay)
            if loop.time() >= deadline:
                raise last
            if await self.store.cancel_requested(job.id):
                raise asyncio.CancelledError

    def _take_place(self, job_id: str) -> bool:
        """Give a new job a slot towards the stages, or else a place in the queue; False when both are full."""
        if len(self._running) < self.spec.max_running:  # then nobody waits either
            self._running.add(job_id)
        elif len(self._waiting) < self.spec.max_queued:
            self._waiting[job_id] = asyncio.get_running_loop().create_future()
        else:
            return False
        return True

    def _leave(self, job_id: str) -> None:
        """Free the job's slot or place in the queue; a freed slot goes to the job that waited longest."""
        self._waiting.pop(job_id, None)
        if job_id not in self._running:
            return
        self._running.discard(job_id)
        while self._waiting and len(self._running) < self.spec.max_running:
            next_id, waiter = next(iter(self._waiting.items()))
            del self._waiting[next_id]
            if not waiter.done():  # done: cancelled while it waited
                self._running.add(next_id)
                waiter.set_result(None)

    async def _finish(self, job: JobRecord, state: JobState, error: JobError | None = None) -> None:
        job.state, job.error, job.updated_at = state, error, time.time()
        await self.store.save(job)
        event: dict[str, Any] = {"type": _TERMINAL[state]}
        if error is not None:
            event["error"] = error.model_dump()
        if job.result is not None:
            event["images"] = [image_path(job.id, i) for i in range(job.result.images)]
        await self.store.append_event(job, event)

    async def _renew_leases(self) -> None:
        while self._tasks:
            try:
                await self.store.renew_leases(list(self._tasks), self.spec.lease_s)
            except Exception:
                logger.exception("could not renew job leases")
            await asyncio.sleep(self.spec.lease_s / 3)

    async def stop(self) -> None:
        """Replica shutdown: running jobs end as failed (job_lost) rather than silently vanish."""
        self._stopping = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._lease_task is not None:
            self._lease_task.cancel()
        await self.store.close()

    # -- read and cancel --------------------------------------------------------------------------------------

    async def get(self, job_id: str) -> JobRecord:
        job = await self.store.get(job_id)
        if job is None or job.tenant != auth.current().tenant:  # another tenant's job is not found, not refused
            raise ApiError(404, "job_not_found", f"no job {job_id!r}, or it expired", "job_id")
        return await self._checked(job)

    async def _checked(self, job: JobRecord) -> JobRecord:
        """Mark a job lost when no live replica holds its lease any more."""
        if job.state.finished or job.id in self._tasks or await self.store.lease_alive(job.id):
            return job
        logger.warning("job %s lost its ingress replica; marking it failed", job.id)
        await self._finish(job, JobState.FAILED, JobError(code="job_lost", message=_LOST))
        return job

    async def cancel(self, job_id: str) -> JobRecord:
        """Cancel a job. The replica running it stops it before its next denoising step; the returned record
        may still say ``running`` until then. Cancelling a finished job changes nothing."""
        job = await self.get(job_id)
        if job.state.finished:
            return job
        await self.store.request_cancel(job)
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=5)
            return await self.get(job_id)
        return job

    async def events(self, job_id: str, after: str | None = None) -> AsyncIterator[tuple[str, dict[str, Any]] | None]:
        """The job's events from after ``after`` until its last; None now and then while nothing happens (for
        keep-alives)."""
        await self.get(job_id)
        cursor = after
        while True:
            found = await self.store.read_events(job_id, cursor, wait_s=self.spec.keepalive_s)
            if not found:
                try:
                    await self.get(job_id)  # notices a lost job, whose "failed" event comes next
                except ApiError:
                    return  # expired or dropped from the store: no event will come
                yield None
                continue
            for event_id, event in found:
                cursor = event_id
                yield event_id, event
                if event["type"] in TERMINAL_EVENTS:
                    return

    async def images(self, job: JobRecord) -> list[bytes]:
        if job.result is None:
            return []
        found = [await self.store.get_image(job.id, i) for i in range(job.result.images)]
        return [data for data in found if data is not None]

    async def image(self, job_id: str, index: int) -> tuple[bytes, str]:
        job = await self.get(job_id)
        data = await self.store.get_image(job_id, index) if job.result is not None else None
        if data is None or job.result is None:
            raise ApiError(404, "image_not_found", "no such image, or it expired", "index")
        return data, job.result.media_type


_LOST = "the ingress replica running this job stopped before it finished; submit it again"
_TERMINAL = {JobState.SUCCEEDED: "done", JobState.FAILED: "failed", JobState.CANCELLED: "cancelled"}


def image_path(job_id: str, index: int) -> str:
    return f"/v1/jobs/{job_id}/images/{index}"


def _result(result: GenerationResult) -> JobResult:
    req = result.request
    settings = result.settings()
    return JobResult(
        images=len(result.delivered),
        media_type=result.media_type,
        model=req.model,
        model_version=result.model_version,
        seed=req.seed,
        width=result.width,
        height=result.height,
        steps=req.steps,
        guidance_scale=req.guidance_scale,
        scheduler=req.scheduler,
        output_format=req.output_format,
        timings_ms=result.timings_ms,
        flagged=[flag for _, flag in result.delivered],
        upscale=settings["upscale"],
        safety=settings["safety"],
        strength=settings["strength"],
        inpainting=settings["inpainting"],
        hires=settings["hires"],
    )
