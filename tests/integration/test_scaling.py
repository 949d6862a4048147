"""Scaling on queue depth, backpressure, surviving replica loss, and metrics — on a real local Ray Serve.

GPUs are fake (the session's Ray advertises four), so the denoiser's `num_gpus: 1` is scheduled the way it
would be on a cluster. Replica counts are read from Serve's status API, never assumed.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import LiveService, extra_app

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return 0
    return sum(n for state, n in status.deployments[deployment].replica_states.items() if state == "RUNNING")


def wait_for(predicate, timeout: float, interval: float = 0.5) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


async def burst(url: str, bodies: list[dict], timeout: float = 180) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=timeout) as client:
        return await asyncio.gather(*(client.post(f"{url}/v1/images/generations", json=b) for b in bodies))


def test_denoiser_scales_up_under_a_burst_and_back_down(live: LiveService, tmp_path: Path) -> None:
    denoiser = {
        "resources": {"num_cpus": 0.25, "num_gpus": 1},
        "max_ongoing_requests": 2,
        "max_queued_requests": -1,
        "max_batch_size": 2,
        "autoscaling": {
            "min_replicas": 1,
            "max_replicas": 3,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 0.5,
            "downscale_delay_s": 3,
            "look_back_period_s": 1,
        },
    }
    with extra_app(live, "autoscale", tmp_path, denoiser=denoiser) as url:
        assert running_replicas("autoscale", "Denoiser") == 1
        peak = 0
        done = threading.Event()

        def watch() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, running_replicas("autoscale", "Denoiser"))
                time.sleep(0.25)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        bodies = [{"prompt": f"burst {i}", "steps": 150, "seed": i} for i in range(16)]
        responses = asyncio.run(burst(url, bodies))
        done.set()
        watcher.join()
        assert [r.status_code for r in responses] == [200] * len(bodies)
        assert peak > 1, "the denoiser never scaled above its minimum"
        assert wait_for(lambda: running_replicas("autoscale", "Denoiser") == 1, timeout=90)


def test_full_queues_answer_503_at_once_and_nothing_hangs(live: LiveService, tmp_path: Path) -> None:
    denoiser = {"max_ongoing_requests": 1, "max_queued_requests": 1, "max_batch_size": 1}
    with extra_app(live, "saturate", tmp_path, denoiser=denoiser, limits={"retry_after_s": 3}) as url:
        # A handle learns the queue limit from the controller (by long poll) after its first request; on a
        # loaded machine that can take longer than one burst, so bursts repeat until the limit is in force.
        assert httpx.post(f"{url}/v1/images/generations", json={"prompt": "warm"}, timeout=60).status_code == 200
        time.sleep(3)
        bodies = [{"prompt": f"load {i}", "steps": 60, "seed": i} for i in range(20)]
        deadline = time.monotonic() + 120
        while True:
            started = time.monotonic()
            responses = asyncio.run(burst(url, bodies, timeout=120))
            assert time.monotonic() - started < 120
            statuses = [r.status_code for r in responses]
            assert set(statuses) <= {200, 503}, [r.text for r in responses]
            if 503 in statuses or time.monotonic() > deadline:
                break
        assert statuses.count(200) >= 1 and statuses.count(503) >= 1
        for r in responses:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "3", (r.headers, r.text)
                assert r.json()["error"]["code"] == "overloaded"
        # Healthy afterwards.
        after = httpx.post(f"{url}/v1/images/generations", json={"prompt": "after"}, timeout=60)
        assert after.status_code == 200, after.text


def test_requests_survive_a_killed_denoiser_replica(live: LiveService, tmp_path: Path) -> None:
    import ray

    denoiser = {"autoscaling": {"min_replicas": 2, "max_replicas": 2}, "max_batch_size": 4}
    with extra_app(live, "chaos", tmp_path, denoiser=denoiser) as url:
        assert wait_for(lambda: running_replicas("chaos", "Denoiser") == 2, timeout=60)
        victims = [a for a in ray.util.list_named_actors(all_namespaces=True) if "chaos#Denoiser" in a["name"]]
        assert len(victims) == 2
        bodies = [{"prompt": f"survive {i}", "steps": 80, "seed": i} for i in range(8)]

        async def run() -> list[httpx.Response]:
            task = asyncio.ensure_future(burst(url, bodies))
            await asyncio.sleep(2.0)  # requests are mid-denoise on both replicas
            ray.kill(ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"]), no_restart=True)
            return await task

        responses = asyncio.run(run())
        assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses]
        assert wait_for(lambda: running_replicas("chaos", "Denoiser") == 2, timeout=120)


def test_metrics_are_exported(live: LiveService) -> None:
    with live.client() as client:
        for i in range(3):
            assert client.post("/v1/images/generations", json={"prompt": f"m {i}", "n": 2}).status_code == 200
        assert client.post("/v1/images/generations", json={"prompt": "bad", "steps": 0}).status_code == 422

    wanted = {
        "ray_sdserve_http_requests_total": r'route="/v1/images/generations".*status="200"',
        "ray_sdserve_http_request_latency_seconds_bucket": r'route="/v1/images/generations"',
        "ray_sdserve_images_generated_total": r'model="tiny"',
        "ray_sdserve_errors_total": r'code="invalid_request"',
        "ray_sdserve_stage_latency_seconds_count": r'stage="denoiser"',
        "ray_sdserve_stage_batch_size_count": r'stage="decoder"',
        "ray_sdserve_stage_replicas": r'stage="text_encoder"',
        "ray_sdserve_stage_ongoing_requests": r'stage="denoiser"',
        "ray_sdserve_stage_queue_depth": r'stage="denoiser"',
    }

    def found() -> dict[str, bool]:
        text = httpx.get(live.metrics_url, timeout=10).text
        result = {}
        for name, labels in wanted.items():
            lines = [line for line in text.splitlines() if line.startswith(name + "{") and re.search(labels, line)]
            counters = name.endswith(("_total", "_count", "_bucket"))
            result[name] = bool(lines) and (not counters or any(float(line.rsplit(" ", 1)[1]) > 0 for line in lines))
        return result

    assert wait_for(lambda: all(found().values()), timeout=60, interval=2), found()
