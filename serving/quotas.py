"""Per-tenant rate limits and quotas, checked before a generation reaches any stage.

Rates and daily budgets are the ``limits`` library's moving-window limiter over its storage: Redis when the job
store is Redis (one count shared by every ingress replica), else this process's memory. Each request is charged
on every limit at once: 1 request, its images, and its compute in megapixel-steps (width x height x steps x
images / 1e6). The check comes first on all limits, so a refused request consumes none. Concurrent generations
are a counter in the same storage, released when the generation ends.

A refusal is a 429 (``rate_limited``) naming the limit, with ``Retry-After`` and ``X-RateLimit-Limit`` /
``-Remaining`` / ``-Reset`` (gRPC: ``RESOURCE_EXHAUSTED``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from limits import RateLimitItem, RateLimitItemPerDay, RateLimitItemPerMinute
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from serving.config import QuotaSpec, QuotasSpec
from serving.errors import ApiError

if TYPE_CHECKING:
    from serving.resolver import GenerationRequest

_INFLIGHT_EXPIRY_S = 24 * 3600  # a counter a crashed replica left behind does not outlive a day


def compute_cost(req: GenerationRequest) -> float:
    """Megapixel-steps of a request over all its passes."""
    steps = int(req.steps * req.init.strength) if req.init else req.steps
    cost = req.width * req.height * steps
    if req.hires is not None:
        cost += req.hires.width * req.hires.height * int(req.hires.steps * req.hires.strength)
    return cost * req.num_images / 1e6


class Quotas:
    """The quota checks of one ingress replica (``store_url``: ``redis://...`` to share counts, else memory)."""

    def __init__(self, spec: QuotasSpec, store_url: str | None = None) -> None:
        self.spec = spec
        url = store_url if store_url and store_url.startswith(("redis://", "rediss://")) else "memory://"
        self.storage: Any = storage_from_string(url)
        self.limiter = MovingWindowRateLimiter(self.storage)
        self.shared = url != "memory://"

    def limits_of(self, tenant: str) -> QuotaSpec:
        return self.spec.tenants.get(tenant, self.spec.default)

    @property
    def active(self) -> bool:
        """Whether any limit is configured at all (else every check is skipped)."""
        return any(
            value is not None
            for q in (self.spec.default, *self.spec.tenants.values())
            for value in q.model_dump().values()
        )

    @asynccontextmanager
    async def admit(self, tenant: str, req: GenerationRequest, charge: bool = True) -> AsyncIterator[None]:
        """Charge ``req`` to ``tenant`` (unless already charged, e.g. a job at submit) and hold one of its
        concurrent-generation slots while the body runs; a 429 ``ApiError`` when a limit is reached."""
        if not self.active:
            yield
            return
        if charge:
            await asyncio.to_thread(self.charge, tenant, req)
        slot = await asyncio.to_thread(self._acquire, tenant)
        try:
            yield
        finally:
            if slot:
                await asyncio.to_thread(self._release, tenant)

    def charge(self, tenant: str, req: GenerationRequest) -> None:
        """Count ``req`` on the tenant's rates and daily budgets, or refuse it (charging nothing)."""
        q = self.limits_of(tenant)
        cost = max(1, math.ceil(compute_cost(req)))
        checks: list[tuple[str, RateLimitItem, int]] = []
        if q.requests_per_minute is not None:
            checks.append(("requests_per_minute", RateLimitItemPerMinute(q.requests_per_minute), 1))
        if q.images_per_day is not None:
            checks.append(("images_per_day", RateLimitItemPerDay(q.images_per_day), req.num_images))
        if q.compute_per_day is not None:
            checks.append(("compute_per_day", RateLimitItemPerDay(math.ceil(q.compute_per_day)), cost))
        for name, item, amount in checks:
            if not self.limiter.test(item, "sdserve", tenant, name, cost=amount):
                raise self._refusal(name, item, tenant)
        for name, item, amount in checks:
            if not self.limiter.hit(item, "sdserve", tenant, name, cost=amount):  # lost a race since the test
                raise self._refusal(name, item, tenant)

    def _refusal(self, name: str, item: RateLimitItem, tenant: str) -> ApiError:
        stats = self.limiter.get_window_stats(item, "sdserve", tenant, name)
        retry = max(1, math.ceil(stats.reset_time - time.time()))
        return ApiError(
            429,
            "rate_limited",
            f"quota `{name}` ({item.amount} per {item.GRANULARITY.name}) is used up; retry in {retry} s",
            headers={
                "Retry-After": str(retry),
                "X-RateLimit-Limit": str(item.amount),
                "X-RateLimit-Remaining": str(max(0, stats.remaining)),
                "X-RateLimit-Reset": str(math.ceil(stats.reset_time)),
            },
        )

    def _key(self, tenant: str) -> str:
        return f"sdserve/inflight/{tenant}"

    def _acquire(self, tenant: str) -> bool:
        limit = self.limits_of(tenant).concurrent_requests
        if limit is None:
            return False
        running = int(self.storage.incr(self._key(tenant), _INFLIGHT_EXPIRY_S, 1))
        if running > limit:
            self.storage.incr(self._key(tenant), _INFLIGHT_EXPIRY_S, -1)
            raise ApiError(
                429,
                "rate_limited",
                f"quota `concurrent_requests` ({limit}) is used up; retry when one of your generations ends",
                headers={"Retry-After": "1", "X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": "0"},
            )
        return True

    def _release(self, tenant: str) -> None:
        self.storage.incr(self._key(tenant), _INFLIGHT_EXPIRY_S, -1)
