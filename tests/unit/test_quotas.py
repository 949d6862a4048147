"""Per-tenant rate limits and quotas: charged on all limits or none, 429 with rate-limit headers, concurrency
slots, and one count shared by two ingress replicas through Redis."""

from __future__ import annotations

import asyncio

import pytest

from serving.config import QuotasSpec
from serving.errors import ApiError
from serving.quotas import Quotas, compute_cost
from serving.resolver import GenerationRequest, InitImage


def request(n: int = 1, size: int = 512, steps: int = 20) -> GenerationRequest:
    return GenerationRequest(
        model="m", prompt="x", negative_prompt=None, width=size, height=size, num_images=n, steps=steps,
        guidance_scale=7.0, scheduler="euler", seed=1, output_format="png",
    )  # fmt: skip


def quotas(store_url: str | None = None, **default: object) -> Quotas:
    return Quotas(QuotasSpec.model_validate({"default": default, "tenants": {"big": {}}}), store_url)


def refused(q: Quotas, tenant: str, req: GenerationRequest) -> ApiError:
    with pytest.raises(ApiError) as info:
        q.charge(tenant, req)
    return info.value


def test_requests_per_minute_with_headers_and_per_tenant() -> None:
    q = quotas(requests_per_minute=2)
    q.charge("a", request())
    q.charge("a", request())
    err = refused(q, "a", request())
    assert (err.status, err.code) == (429, "rate_limited") and "requests_per_minute" in err.message
    assert err.headers["X-RateLimit-Limit"] == "2" and err.headers["X-RateLimit-Remaining"] == "0"
    assert 1 <= int(err.headers["Retry-After"]) <= 60
    q.charge("b", request())  # another tenant has its own count
    for _ in range(5):
        q.charge("big", request())  # a tenant with its own (unlimited) quota


def test_daily_images_and_compute_are_charged_all_or_nothing() -> None:
    q = quotas(images_per_day=5, compute_per_day=30)  # 512x512x20 = 5.24 megapixel-steps per image
    assert compute_cost(request(n=2)) == pytest.approx(2 * 512 * 512 * 20 / 1e6)
    q.charge("a", request(n=2))  # 2 images, 11 MP-steps
    q.charge("a", request(n=2))  # 4 images, 21 MP-steps
    err = refused(q, "a", request(n=2))  # 6 images: over the image quota
    assert "images_per_day" in err.message
    q.charge("a", request(n=1))  # 5 images, 26 MP-steps: the refused one consumed nothing
    assert "images_per_day" in refused(q, "a", request(n=1)).message
    compute = quotas(compute_per_day=10)
    compute.charge("a", request(n=1))
    assert "compute_per_day" in refused(compute, "a", request(n=1)).message


def test_img2img_and_hires_cost_what_they_run() -> None:
    import numpy as np

    init = InitImage(np.zeros((512, 512, 3), np.uint8), None, 0.5)
    from dataclasses import replace

    assert compute_cost(replace(request(), init=init)) == pytest.approx(compute_cost(request()) / 2)


def test_concurrent_generations_are_slots() -> None:
    q = quotas(concurrent_requests=1)

    async def run() -> None:
        async with q.admit("a", request()):
            with pytest.raises(ApiError) as info:
                async with q.admit("a", request()):
                    pass
            assert "concurrent_requests" in info.value.message
            async with q.admit("b", request()):  # another tenant
                pass
        async with q.admit("a", request()):  # the slot came back
            pass

    asyncio.run(run())


def test_two_replicas_share_one_count_through_redis(redis_url: str) -> None:
    first, second = quotas(redis_url, requests_per_minute=3), quotas(redis_url, requests_per_minute=3)
    assert first.shared and second.shared
    first.charge("a", request())
    second.charge("a", request())
    first.charge("a", request())
    err = refused(second, "a", request())  # the fourth request of the minute, whichever replica gets it
    assert err.headers["X-RateLimit-Remaining"] == "0"
    assert "requests_per_minute" in refused(first, "a", request()).message
