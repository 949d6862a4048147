"""Job backpressure and the memory job store's bounds, driven through ``JobManager`` with an in-process stand-in
for ``GenerationService`` (no Ray): a job waits its turn instead of failing, only a full queue refuses, and the
memory store keeps its size by dropping the jobs that finished earliest."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from models.contracts import DenoiseProgress
from serving.config import AppConfig, JobsSpec
from serving.errors import ApiError
from serving.jobs import JobManager
from serving.jobstore import JobRecord, JobState, JobStoreFull, MemoryJobStore, open_job_store
from serving.quotas import Quotas
from serving.schemas import JobRequest
from serving.service import GenerationRequest, GenerationResult, OnProgress

T = TypeVar("T")


class FakeService:
    """What ``JobManager`` uses of ``GenerationService``. ``generate`` holds every call until ``release`` is set,
    and first answers ``overloaded`` ``refusals`` times, like a stage handle whose queue is full."""

    def __init__(self, config: AppConfig, image_bytes: int = 16) -> None:
        self.config = config
        self.image_bytes = image_bytes
        self.release = asyncio.Event()
        self.refusals = 0
        self.calls: list[str] = []  # prompts, in the order they were sent to the "stages"
        self.in_flight = 0
        self.peak = 0  # most calls in flight at once
        self.quotas = Quotas(config.quotas)

    def prepare(self, body: JobRequest) -> GenerationRequest:
        return GenerationRequest(
            model="tiny",
            prompt=body.prompt,
            negative_prompt=None,
            width=64,
            height=64,
            num_images=body.n,
            steps=body.steps or 2,
            guidance_scale=7.5,
            scheduler="euler",
            seed=body.seed or 0,
            output_format="png",
        )

    async def generate(
        self,
        req: GenerationRequest,
        on_progress: OnProgress | None = None,
        preview: bool = False,
        charged: bool = False,
    ) -> GenerationResult:
        self.calls.append(req.prompt)
        if self.refusals > 0:
            self.refusals -= 1
            raise ApiError(503, "overloaded", "the service is at capacity; retry shortly")
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await self.release.wait()
            for step in range(1, req.steps + 1):
                if on_progress is not None:
                    await on_progress(DenoiseProgress(step=step, total_steps=req.steps))
        finally:
            self.in_flight -= 1
        images = [req.prompt.encode().ljust(self.image_bytes, b".")] * req.num_images
        return GenerationResult(
            request=req, images=images, media_type="image/png", model_version="v1", width=req.width, height=req.height
        )


def run(main: Coroutine[Any, Any, T]) -> T:
    # The deadline only turns a hang into a failure; nothing here depends on how fast it runs.
    return asyncio.run(asyncio.wait_for(main, timeout=60))


def manager(service: FakeService, **jobs: Any) -> JobManager:
    spec = JobsSpec(**jobs)
    return JobManager(service, open_job_store(spec), spec)  # type: ignore[arg-type]  # a stand-in service


async def outcome(jobs: JobManager, job_id: str) -> tuple[list[dict[str, Any]], JobRecord]:
    """Every event of the job until its last, and the finished job."""
    events = [item[1] async for item in jobs.events(job_id) if item is not None]
    return events, await jobs.get(job_id)


async def refused(jobs: JobManager, body: JobRequest, key: str | None = None) -> ApiError:
    with pytest.raises(ApiError) as raised:
        await jobs.submit(body, key)
    return raised.value


def test_accepted_jobs_wait_their_turn_and_only_a_full_queue_refuses() -> None:
    async def main() -> None:
        service = FakeService(AppConfig.model_validate({"limits": {"retry_after_s": 3}}))
        jobs = manager(service, max_running=1, max_queued=2)
        accepted = [(await jobs.submit(JobRequest(prompt=f"job {i}")))[0] for i in range(3)]
        error = await refused(jobs, JobRequest(prompt="job 3"))
        assert (error.status, error.code, error.headers) == (503, "overloaded", {"Retry-After": "3"})
        assert [(await jobs.get(job.id)).state for job in accepted] == [JobState.QUEUED] * 3

        service.release.set()
        results = [await outcome(jobs, job.id) for job in accepted]
        assert [job.state for _, job in results] == [JobState.SUCCEEDED] * 3
        assert [events[0] for events, _ in results] == [{"type": "queued", "position": i} for i in range(3)]
        assert service.calls == ["job 0", "job 1", "job 2"]  # first come, first served
        assert service.peak == 1  # never more than max_running jobs at the stages
        await jobs.stop()

    run(main())


def test_cancelling_a_queued_job_frees_its_place() -> None:
    async def main() -> None:
        service = FakeService(AppConfig())
        jobs = manager(service, max_running=1, max_queued=1)
        first, _ = await jobs.submit(JobRequest(prompt="first"))
        waiting, _ = await jobs.submit(JobRequest(prompt="waiting"))
        assert (await refused(jobs, JobRequest(prompt="late"))).code == "overloaded"

        assert (await jobs.cancel(waiting.id)).state is JobState.CANCELLED
        late, _ = await jobs.submit(JobRequest(prompt="late"))  # the cancelled job's place
        service.release.set()
        assert (await outcome(jobs, first.id))[1].state is JobState.SUCCEEDED
        assert (await outcome(jobs, late.id))[1].state is JobState.SUCCEEDED
        events, cancelled = await outcome(jobs, waiting.id)
        assert cancelled.state is JobState.CANCELLED and events[-1]["type"] == "cancelled"
        assert service.calls == ["first", "late"]  # the cancelled job never reached the stages
        await jobs.stop()

    run(main())


def test_idempotent_replays_take_no_place_and_a_refused_key_stays_free() -> None:
    async def main() -> None:
        service = FakeService(AppConfig())
        jobs = manager(service, max_running=1, max_queued=1)
        body = JobRequest(prompt="kept", seed=1)
        first, created = await jobs.submit(body, "key-1")
        await jobs.submit(JobRequest(prompt="filler"))
        replay, replayed_created = await jobs.submit(body, "key-1")  # the queue is full, yet this is no new job
        assert created and not replayed_created and replay.id == first.id

        other = JobRequest(prompt="other")
        assert (await refused(jobs, other, "key-2")).code == "overloaded"
        service.release.set()
        await outcome(jobs, first.id)
        retried, created = await jobs.submit(other, "key-2")  # the refused submit did not keep the key
        assert created and (await outcome(jobs, retried.id))[1].state is JobState.SUCCEEDED
        await jobs.stop()

    run(main())


def test_an_accepted_job_waits_out_full_stage_queues() -> None:
    async def main() -> None:
        service = FakeService(AppConfig())
        service.refusals = 2
        service.release.set()
        jobs = manager(service)
        job, _ = await jobs.submit(JobRequest(prompt="patient"))
        events, done = await outcome(jobs, job.id)
        assert done.state is JobState.SUCCEEDED and events[-1]["type"] == "done"
        assert service.calls == ["patient"] * 3
        await jobs.stop()

    run(main())


def test_a_job_whose_stages_stay_full_fails_by_its_deadline() -> None:
    async def main() -> None:
        service = FakeService(AppConfig.model_validate({"limits": {"request_timeout_s": 0.5}}))
        service.refusals = 10**9
        jobs = manager(service)
        job, _ = await jobs.submit(JobRequest(prompt="never"))
        _, failed = await outcome(jobs, job.id)
        assert failed.state is JobState.FAILED and failed.error is not None and failed.error.code == "overloaded"
        await jobs.stop()

    run(main())


def test_memory_store_holds_its_byte_bound_by_dropping_finished_jobs() -> None:
    async def main() -> None:
        cap = 2**20
        service = FakeService(AppConfig(), image_bytes=100_000)
        service.release.set()
        jobs = manager(service, memory_max_bytes=cap)
        ids = []
        for i in range(30):  # 3 MB of images: three times the bound
            job, _ = await jobs.submit(JobRequest(prompt=f"job {i}"))
            await outcome(jobs, job.id)
            ids.append(job.id)
        kept = [job_id for job_id in ids if await jobs.store.get(job_id) is not None]
        assert kept == ids[-len(kept) :] and 0 < len(kept) < len(ids)  # the earliest went first
        held = [image for job_id in kept for image in await jobs.images(await jobs.get(job_id))]
        assert len(held) == len(kept) and sum(map(len, held)) <= cap
        with pytest.raises(ApiError) as gone:
            await jobs.get(ids[0])
        assert gone.value.code == "job_not_found"
        assert f"{len(kept)}/1000 jobs" in jobs.store.description and "/1 MiB" in jobs.store.description
        await jobs.stop()

    run(main())


def test_memory_store_drops_the_earliest_finished_never_an_unfinished_job() -> None:
    async def main() -> None:
        store = MemoryJobStore(ttl_s=3600, max_jobs=100, max_bytes=12_000)

        async def add(name: str, state: JobState) -> JobRecord:
            now = time.time()
            job = JobRecord(id=name, created_at=now, updated_at=now, request={}, request_hash="", state=state)
            await store.create(job)
            return job

        async def finish(job: JobRecord) -> None:
            await store.put_images(job, [b"x" * 3000])
            job.state = JobState.SUCCEEDED
            await store.save(job)
            await store.append_event(job, {"type": "done"})

        async def present(*names: str) -> list[str]:
            return [name for name in names if await store.get(name) is not None]

        running = await add("running", JobState.RUNNING)
        slow, quick = await add("slow", JobState.RUNNING), await add("quick", JobState.RUNNING)
        await finish(quick)
        await finish(slow)  # created before "quick", finished after it
        await finish(await add("last", JobState.RUNNING))  # over the bound: one finished job has to go
        assert await present("running", "slow", "quick", "last") == ["running", "slow", "last"]
        assert await store.get_image("quick", 0) is None and await store.get_image("slow", 0) is not None

        await store.put_images(running, [b"y" * 3000])  # an unfinished job growing over the bound stays
        assert await present("running", "slow", "last") == ["running", "last"]
        assert await store.get_image("running", 0) == b"y" * 3000

    run(main())


def test_memory_store_refuses_a_job_rather_than_drop_an_unfinished_one() -> None:
    async def main() -> None:
        service = FakeService(AppConfig.model_validate({"limits": {"retry_after_s": 5}}))
        jobs = manager(service, memory_max_jobs=2, max_running=4, max_queued=4)
        live = [(await jobs.submit(JobRequest(prompt=f"live {i}")))[0] for i in range(2)]
        error = await refused(jobs, JobRequest(prompt="third"))
        assert (error.status, error.code, error.headers) == (503, "overloaded", {"Retry-After": "5"})
        assert [(await jobs.get(job.id)).state for job in live] == [JobState.QUEUED] * 2

        service.release.set()
        for job in live:
            await outcome(jobs, job.id)
        later, _ = await jobs.submit(JobRequest(prompt="third"))  # finished jobs make room now
        assert (await outcome(jobs, later.id))[1].state is JobState.SUCCEEDED
        await jobs.stop()

    run(main())


def test_memory_store_create_raises_when_only_unfinished_jobs_remain() -> None:
    async def main() -> None:
        store = MemoryJobStore(ttl_s=3600, max_jobs=1)
        now = time.time()
        await store.create(JobRecord(id="a", created_at=now, updated_at=now, request={}, request_hash=""))
        with pytest.raises(JobStoreFull):
            await store.create(JobRecord(id="b", created_at=now, updated_at=now, request={}, request_hash=""))
        assert await store.get("a") is not None and await store.get("b") is None

    run(main())
