"""Asynchronous jobs: submit now, follow the denoiser's real steps, fetch the images later.

``JobManager`` is transport-neutral, like ``GenerationService`` under it: the REST routes (``/v1/jobs``) and
the gRPC servicer (``GenerateStream``, ``GetJob``, ``CancelJob``) both call it.

Life of a job: ``queued`` (submitted; its position counts the earlier jobs not yet denoising) -> ``running``
(from its first denoising step, one ``step`` event per step, each with a low-resolution preview when asked
for) -> ``succeeded`` / ``failed`` / ``cancelled``. The ingress replica that accepted the job drives it and
holds a lease on it in the store. When that replica dies mid-run, the denoising work dies with it (the chain
of stage calls is driven from there): once the lease lapses, whoever reads the job next marks it ``failed``
with code ``job_lost``; finished jobs and their images stay readable until they expire.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from models.contracts import DenoiseProgress
from serving.config import JobsSpec
from serving.errors import ApiError
from serving.jobstore import JobError, JobRecord, JobResult, JobState, JobStore
from serving.schemas import JobRequest
from serving.service import GenerationRequest, GenerationResult, GenerationService

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
        self._lease_task: asyncio.Task[None] | None = None
        self._stopping = False

    # -- submit and drive -------------------------------------------------------------------------------------

    async def submit(self, body: JobRequest, idempotency_key: str | None = None) -> tuple[JobRecord, bool]:
        """Check the request and start it; return (job, created). A retried submit with the same
        idempotency key returns the first job; the same key with a different request is a 422."""
        req = self.service.prepare(body)  # a bad request fails here, as a 422, not later as a failed job
        request = body.model_dump(mode="json", exclude_unset=True)
        now = time.time()
        job = JobRecord(
            id=f"job_{secrets.token_hex(12)}",
            created_at=now,
            updated_at=now,
            request=request,
            request_hash=request_hash(request),
            idempotency_key=idempotency_key,
            preview=body.preview,
            total_steps=req.steps,
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
        await self.store.create(job)
        await self.store.append_event(job, {"type": "queued", "position": await self.store.queue_position(job)})
        self._tasks[job.id] = asyncio.create_task(self._run(job, req), name=job.id)
        if self._lease_task is None or self._lease_task.done():
            self._lease_task = asyncio.create_task(self._renew_leases())
        await self.store.renew_leases([job.id], self.spec.lease_s)
        return job, True

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
            result = await self.service.generate(req, progress, preview=job.preview)
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
            await self.store.put_images(job, result.images)
            job.result = _result(result)
            await self._finish(job, JobState.SUCCEEDED)
        finally:
            self._tasks.pop(job.id, None)

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
        if job is None:
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
                with contextlib.suppress(ApiError):
                    await self.get(job_id)  # notices a lost job, whose "failed" event comes next
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
    return JobResult(
        images=len(result.images),
        media_type=result.media_type,
        model=req.model,
        model_version=result.model_version,
        seed=req.seed,
        width=req.width,
        height=req.height,
        steps=req.steps,
        guidance_scale=req.guidance_scale,
        scheduler=req.scheduler,
        output_format=req.output_format,
        timings_ms=result.timings_ms,
    )
