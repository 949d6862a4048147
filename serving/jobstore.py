"""Where asynchronous jobs live: their records, event logs and result images, all expiring after a TTL.

A store is chosen by the scheme of ``jobs.store_url`` from ``JOB_STORES`` (one row per kind):

- ``memory://`` (the default) keeps everything in the ingress replica's process: nothing to run, but jobs
  are lost when the replica restarts and are not visible to other ingress replicas. It holds at most
  ``jobs.memory_max_jobs`` jobs and ``jobs.memory_max_bytes`` bytes, dropping the jobs that finished earliest.
- ``redis://`` / ``rediss://`` keeps everything in Redis: every ingress replica sees every job, and jobs and
  their images survive ingress restarts until they expire.

The store is passive: ``serving.jobs.JobManager`` decides what is written when.
"""

from __future__ import annotations

import asyncio
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from serving.config import JobsSpec


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobResult(BaseModel):
    """What a succeeded job made (the images themselves are stored beside the record)."""

    images: int
    media_type: str
    model: str
    model_version: str
    seed: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str
    output_format: str
    timings_ms: dict[str, float] = Field(default_factory=dict)
    flagged: list[bool | None] = Field(default_factory=list, description="Safety verdict per stored image.")
    upscale: dict[str, Any] | None = None
    safety: dict[str, Any] | None = None
    strength: float | None = None
    inpainting: bool | None = None
    hires: dict[str, Any] | None = None

    def settings(self) -> dict[str, Any]:
        """The settings block every API reports (``GenerationSettings``), as ``GenerationResult.settings`` gives it."""
        fields = ("model", "model_version", "seed", "steps", "guidance_scale", "scheduler", "output_format")
        return {
            **{name: getattr(self, name) for name in fields},
            "size": f"{self.width}x{self.height}",
            "timings_ms": self.timings_ms,
            "upscale": self.upscale,
            "safety": self.safety,
            "strength": self.strength,
            "inpainting": self.inpainting,
            "hires": self.hires,
        }


class JobRecord(BaseModel):
    """One job as stored."""

    id: str
    tenant: str = Field(default="", description="The tenant whose key submitted it; only it can see the job.")
    state: JobState = JobState.QUEUED
    created_at: float
    updated_at: float
    request: dict[str, Any] = Field(description="The request as submitted (only the fields that were set).")
    request_hash: str = Field(description="Hash of `request`, to tell a retried submit from a different one.")
    idempotency_key: str | None = None
    preview: bool = False
    step: int = 0
    total_steps: int = 0
    result: JobResult | None = None
    error: JobError | None = None


Event = tuple[str, dict[str, Any]]  # (event id, event)


class JobStoreFull(Exception):
    """The store cannot take another job without dropping one that has not finished."""


class JobStore(ABC):
    """Records, per-job event logs, result images, idempotency keys, cancel flags and ownership leases."""

    shared: bool  # do other ingress replicas (and a restarted one) see these jobs?

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s

    @property
    @abstractmethod
    def description(self) -> str:
        """One line for logs and GET /v1/status."""

    def expires_at(self, job: JobRecord) -> float:
        return job.created_at + self.ttl_s

    @abstractmethod
    async def create(self, job: JobRecord) -> None:
        """Add a new job; raises ``JobStoreFull`` when there is no room for it."""

    @abstractmethod
    async def get(self, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    async def save(self, job: JobRecord) -> None: ...

    @abstractmethod
    async def claim_key(self, key: str, job: JobRecord) -> str:
        """Bind an idempotency key to ``job`` unless it is bound already; return the id of the job it names."""

    @abstractmethod
    async def release_key(self, key: str, job: JobRecord) -> None:
        """Unbind an idempotency key from ``job`` (which was refused, not created); a key bound to another
        job stays."""

    @abstractmethod
    async def append_event(self, job: JobRecord, event: dict[str, Any]) -> str:
        """Add an event to the job's log; return its id (ids increase, and are opaque to callers)."""

    @abstractmethod
    async def read_events(self, job_id: str, after: str | None, wait_s: float) -> list[Event]:
        """Events after ``after`` (all when None), waiting up to ``wait_s`` for the first one."""

    @abstractmethod
    async def put_images(self, job: JobRecord, images: list[bytes]) -> None: ...

    @abstractmethod
    async def get_image(self, job_id: str, index: int) -> bytes | None: ...

    @abstractmethod
    async def request_cancel(self, job: JobRecord) -> None: ...

    @abstractmethod
    async def cancel_requested(self, job_id: str) -> bool: ...

    @abstractmethod
    async def renew_leases(self, job_ids: list[str], lease_s: float) -> None:
        """Say that the calling replica still runs these jobs, for ``lease_s`` more seconds."""

    @abstractmethod
    async def lease_alive(self, job_id: str) -> bool: ...

    @abstractmethod
    async def queue_position(self, job: JobRecord) -> int:
        """Jobs submitted before ``job`` that are still waiting for their first denoising step."""

    async def close(self) -> None:
        return None


class MemoryJobStore(JobStore):
    """Jobs in this process. Its lease is the process itself: a job is never reported lost, because a lost
    replica takes its jobs with it.

    Bounded by a job count and a byte count (result images, events with their previews, requests): when a job
    would cross a bound, the jobs that finished earliest are dropped; an unfinished job never is, so when only
    unfinished jobs fill the store, ``create`` refuses the new one."""

    shared = False

    def __init__(self, ttl_s: float, max_jobs: int = 1000, max_bytes: int = 512 * 2**20) -> None:
        super().__init__(ttl_s)
        self.max_jobs = max_jobs
        self.max_bytes = max_bytes
        self._jobs: dict[str, JobRecord] = {}
        self._events: dict[str, list[dict[str, Any]]] = {}
        self._images: dict[str, list[bytes]] = {}
        self._keys: dict[str, str] = {}
        self._cancelled: set[str] = set()
        self._changed: dict[str, asyncio.Event] = {}
        self._sizes: dict[str, int] = {}  # bytes held per job
        self._bytes = 0
        self._finished: dict[str, None] = {}  # finished jobs, earliest finished first: the order they are dropped

    @classmethod
    def from_spec(cls, spec: JobsSpec) -> MemoryJobStore:
        return cls(spec.ttl_s, spec.memory_max_jobs, spec.memory_max_bytes)

    @property
    def description(self) -> str:
        return (
            "memory: jobs live in this ingress replica and are lost when it restarts (set jobs.store_url); "
            f"holds {len(self._jobs)}/{self.max_jobs} jobs, {self._bytes / 2**20:.1f}/{self.max_bytes / 2**20:.0f} "
            "MiB, dropping the earliest finished first"
        )

    def _grow(self, job_id: str, size: int) -> None:
        self._sizes[job_id] = self._sizes.get(job_id, 0) + size
        self._bytes += size

    def _drop(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            for table in (self._jobs, self._events, self._images, self._finished):
                table.pop(job_id, None)
            changed = self._changed.pop(job_id, None)
            if changed is not None:
                changed.set()  # a reader waiting for its next event finds the job gone
            self._cancelled.discard(job_id)
            self._bytes -= self._sizes.pop(job_id, 0)
        if job_ids:
            self._keys = {k: v for k, v in self._keys.items() if v in self._jobs}

    def _expire(self) -> None:
        now = time.time()
        self._drop([j.id for j in self._jobs.values() if self.expires_at(j) < now])

    def _over(self, jobs: int, used: int) -> bool:
        return jobs > self.max_jobs or used > self.max_bytes

    def _evict(self, keep: str) -> None:
        """Drop the jobs that finished earliest (but not ``keep``, being written) until within the bounds."""
        jobs, used, victims = len(self._jobs), self._bytes, []
        for job_id in self._finished:
            if not self._over(jobs, used):
                break
            if job_id != keep:
                victims.append(job_id)
                jobs, used = jobs - 1, used - self._sizes.get(job_id, 0)
        self._drop(victims)

    async def create(self, job: JobRecord) -> None:
        self._jobs[job.id] = job.model_copy()  # before expiring: an idempotency key may already name it
        self._events[job.id] = []
        self._grow(job.id, _RECORD_BYTES + len(json.dumps(job.request)))
        self._expire()
        self._evict(keep=job.id)
        if self._over(len(self._jobs), self._bytes):
            self._drop([job.id])
            raise JobStoreFull(
                f"{len(self._jobs)} unfinished jobs fill the memory job store "
                f"({self.max_jobs} jobs, {self.max_bytes} bytes at most)"
            )

    async def get(self, job_id: str) -> JobRecord | None:
        job = self._jobs.get(job_id)
        if job is None or self.expires_at(job) < time.time():
            return None
        return job.model_copy()

    async def save(self, job: JobRecord) -> None:
        if job.id in self._jobs:
            self._jobs[job.id] = job.model_copy()
            if job.state.finished:
                self._finished.setdefault(job.id, None)

    async def claim_key(self, key: str, job: JobRecord) -> str:
        self._expire()
        return self._keys.setdefault(key, job.id)

    async def release_key(self, key: str, job: JobRecord) -> None:
        if self._keys.get(key) == job.id:
            del self._keys[key]

    async def append_event(self, job: JobRecord, event: dict[str, Any]) -> str:
        log = self._events.get(job.id)
        if log is None:  # expired while it ran: nobody can read it any more
            return "0"
        log.append(event)
        self._grow(job.id, len(json.dumps(event)))
        self._evict(keep=job.id)
        changed = self._changed.pop(job.id, None)
        if changed is not None:
            changed.set()
        return str(len(log))

    async def read_events(self, job_id: str, after: str | None, wait_s: float) -> list[Event]:
        start = int(after) if after and after.isdigit() else 0
        log = self._events.get(job_id, [])
        if len(log) <= start and wait_s > 0:
            changed = self._changed.setdefault(job_id, asyncio.Event())
            try:
                await asyncio.wait_for(changed.wait(), timeout=wait_s)
            except TimeoutError:
                return []
            log = self._events.get(job_id, [])
        return [(str(i + 1), event) for i, event in enumerate(log) if i >= start]

    async def put_images(self, job: JobRecord, images: list[bytes]) -> None:
        if job.id in self._jobs:
            self._images[job.id] = list(images)
            self._grow(job.id, sum(map(len, images)))
            self._evict(keep=job.id)

    async def get_image(self, job_id: str, index: int) -> bytes | None:
        images = self._images.get(job_id, [])
        return images[index] if 0 <= index < len(images) else None

    async def request_cancel(self, job: JobRecord) -> None:
        self._cancelled.add(job.id)

    async def cancel_requested(self, job_id: str) -> bool:
        return job_id in self._cancelled

    async def renew_leases(self, job_ids: list[str], lease_s: float) -> None:
        return None

    async def lease_alive(self, job_id: str) -> bool:
        return True

    async def queue_position(self, job: JobRecord) -> int:
        return sum(
            1
            for other in self._jobs.values()
            if other.state is JobState.QUEUED and (other.created_at, other.id) < (job.created_at, job.id)
        )


class RedisJobStore(JobStore):
    """Jobs in Redis, shared by every ingress replica. Keys (under ``jobs.key_prefix``): ``job:<id>`` (JSON),
    ``events:<id>`` (a stream), ``image:<id>:<n>``, ``idem:<key>``, ``cancel:<id>``, ``lease:<id>`` and the
    ``queued`` sorted set. Everything of a job expires ``ttl_s`` after it was submitted."""

    shared = True

    def __init__(self, url: str, ttl_s: float, prefix: str, password: str | None = None) -> None:
        import redis.asyncio as redis

        super().__init__(ttl_s)
        options: dict[str, Any] = {} if password is None or urlsplit(url).password else {"password": password}
        self.redis: Any = redis.from_url(url, **options)  # redis-py types its replies loosely
        self.prefix = prefix
        shown = urlsplit(url)
        self._description = f"redis: {shown.scheme}://{shown.hostname}:{shown.port or 6379}{shown.path}"

    @classmethod
    def from_spec(cls, spec: JobsSpec) -> RedisJobStore:
        from serving.env import SDSERVE_REDIS_PASSWORD

        return cls(spec.store_url, spec.ttl_s, spec.key_prefix, SDSERVE_REDIS_PASSWORD)

    @property
    def description(self) -> str:
        return self._description

    def _key(self, *parts: object) -> str:
        return ":".join([self.prefix, *map(str, parts)])

    def _pxat(self, job: JobRecord) -> int:
        return int(self.expires_at(job) * 1000)

    async def create(self, job: JobRecord) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key("job", job.id), job.model_dump_json(), pxat=self._pxat(job))
            pipe.zadd(self._key("queued"), {job.id: job.created_at})
            await pipe.execute()

    async def get(self, job_id: str) -> JobRecord | None:
        data = await self.redis.get(self._key("job", job_id))
        return None if data is None else JobRecord.model_validate_json(data)

    async def save(self, job: JobRecord) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key("job", job.id), job.model_dump_json(), pxat=self._pxat(job), xx=True)
            if job.state is not JobState.QUEUED:
                pipe.zrem(self._key("queued"), job.id)
            await pipe.execute()

    async def claim_key(self, key: str, job: JobRecord) -> str:
        name = self._key("idem", key)
        if await self.redis.set(name, job.id, pxat=self._pxat(job), nx=True):
            return job.id
        owner = await self.redis.get(name)
        return job.id if owner is None else owner.decode()

    async def release_key(self, key: str, job: JobRecord) -> None:
        await self.redis.eval(_DELETE_IF_EQUAL, 1, self._key("idem", key), job.id)

    async def append_event(self, job: JobRecord, event: dict[str, Any]) -> str:
        name = self._key("events", job.id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(name, {"data": json.dumps(event)})
            pipe.pexpireat(name, self._pxat(job))
            event_id, _ = await pipe.execute()
        return str(event_id.decode())

    async def read_events(self, job_id: str, after: str | None, wait_s: float) -> list[Event]:
        block = int(wait_s * 1000) if wait_s > 0 else None
        found = await self.redis.xread({self._key("events", job_id): after or "0"}, count=1000, block=block)
        return [
            (event_id.decode(), json.loads(fields[b"data"]))
            for _, entries in found or []
            for event_id, fields in entries
        ]

    async def put_images(self, job: JobRecord, images: list[bytes]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for i, data in enumerate(images):
                pipe.set(self._key("image", job.id, i), data, pxat=self._pxat(job))
            await pipe.execute()

    async def get_image(self, job_id: str, index: int) -> bytes | None:
        data: bytes | None = await self.redis.get(self._key("image", job_id, index))
        return data

    async def request_cancel(self, job: JobRecord) -> None:
        await self.redis.set(self._key("cancel", job.id), b"1", pxat=self._pxat(job))

    async def cancel_requested(self, job_id: str) -> bool:
        return bool(await self.redis.exists(self._key("cancel", job_id)))

    async def renew_leases(self, job_ids: list[str], lease_s: float) -> None:
        if not job_ids:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.set(self._key("lease", job_id), b"1", px=int(lease_s * 1000))
            await pipe.execute()

    async def lease_alive(self, job_id: str) -> bool:
        return bool(await self.redis.exists(self._key("lease", job_id)))

    async def queue_position(self, job: JobRecord) -> int:
        name = self._key("queued")
        await self.redis.zremrangebyscore(name, "-inf", time.time() - self.ttl_s)
        rank = await self.redis.zrank(name, job.id)
        return int(rank or 0)

    async def close(self) -> None:
        await self.redis.aclose()


_RECORD_BYTES = 1024  # a job record and its bookkeeping in the memory store, besides the request itself
# Compare-and-delete in one step, so a key that another job claimed in between stays.
_DELETE_IF_EQUAL = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"

# Store kinds by URL scheme: adding a kind is one row.
JOB_STORES: dict[str, Callable[[JobsSpec], JobStore]] = {
    "memory": MemoryJobStore.from_spec,
    "redis": RedisJobStore.from_spec,
    "rediss": RedisJobStore.from_spec,
}


def open_job_store(spec: JobsSpec) -> JobStore:
    """The store ``spec.store_url`` names."""
    scheme = urlsplit(spec.store_url).scheme
    factory = JOB_STORES.get(scheme)
    if factory is None:
        raise ValueError(f"jobs.store_url: unknown scheme {scheme!r}; use one of {sorted(JOB_STORES)}")
    return factory(spec)
