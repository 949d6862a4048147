"""Scaling on queue depth, backpressure, surviving replica loss, and metrics — on a real local Ray Serve.

GPUs are fake (the session's Ray advertises four), so the denoiser's `num_gpus: 1` is scheduled the way it
would be on a cluster. Replica counts are read from Serve's status API, never assumed.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import LiveService, extra_app

pytestmark = [pytest.mark.integration, pytest.mark.slow]


# A replica that starts while others compute (the scale-up case) takes longer than the app's own start, when
# all four deployments start at once on idle Ray workers; this factor covers that on a shared 2-core machine.
START_TIME_FACTOR = 4


def replica_states(app: str, deployment: str) -> dict[str, int]:
    """Replicas of a deployment by state (RUNNING, STARTING, STOPPING, ...), from Serve's status API."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return {}
    states = status.deployments[deployment].replica_states  # ReplicaState (a str enum) -> count
    return {getattr(state, "value", state): n for state, n in states.items() if n}


def running_replicas(app: str, deployment: str) -> int:
    return replica_states(app, deployment).get("RUNNING", 0)


def wait_for(predicate, timeout: float, interval: float = 0.5) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@contextmanager
def timed_app(live: LiveService, name: str, outputs: Path, **overrides: object) -> Iterator[tuple[str, float]]:
    """``extra_app``, plus the seconds it took to be RUNNING: this machine's replica start time, right now.

    Deadlines for later replica starts scale from it, so they stretch with the CPU contention of the run.
    """
    started = time.monotonic()
    with extra_app(live, name, outputs, **overrides) as url:  # serve.run returns once every replica runs
        yield url, time.monotonic() - started


async def burst(url: str, bodies: list[dict], timeout: float = 180) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=timeout) as client:
        return await asyncio.gather(*(client.post(f"{url}/v1/images/generations", json=b) for b in bodies))


async def load_until_scaled(url: str, app: str, clients: int, deadline_s: float) -> tuple[int, list[int]]:
    """Keep ``clients`` requests in flight until the denoiser runs more than one replica or the deadline passes.

    Returns the most RUNNING denoiser replicas seen, and the status of every request sent (all of them finish).
    """
    stop = asyncio.Event()
    statuses: list[int] = []

    async def client(http: httpx.AsyncClient, index: int) -> None:
        for seed in itertools.count(index * 10_000):
            if stop.is_set():
                return
            body = {"prompt": f"sustained {index}", "steps": 100, "seed": seed}
            statuses.append((await http.post(f"{url}/v1/images/generations", json=body)).status_code)

    async with httpx.AsyncClient(timeout=120) as http:
        load = asyncio.gather(*(client(http, i) for i in range(clients)))
        peak = 1
        deadline = time.monotonic() + deadline_s
        while peak < 2 and time.monotonic() < deadline and not load.done():
            await asyncio.sleep(0.5)
            peak = max(peak, await asyncio.to_thread(running_replicas, app, "Denoiser"))
        stop.set()
        await load
    return peak, statuses


def test_denoiser_scales_up_under_sustained_load_and_back_down(live: LiveService, tmp_path: Path) -> None:
    from ray.serve.config import AutoscalingConfig

    scaling = {
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 1,
        "upscale_delay_s": 0.5,
        "downscale_delay_s": 3,
        "look_back_period_s": 1,
    }
    denoiser = {
        "resources": {"num_cpus": 0.25, "num_gpus": 1},
        "max_ongoing_requests": 2,
        "max_queued_requests": -1,
        "max_batch_size": 2,
        "autoscaling": scaling,
    }
    with timed_app(live, "autoscale", tmp_path, denoiser=denoiser) as (url, start_s):
        assert replica_states("autoscale", "Denoiser") == {"RUNNING": 1}
        # Six requests in flight want three replicas (target 1 each). The controller hears of them when the
        # ingress's handle next reports (every metrics_interval_s, a Ray default the app does not set), decides
        # after its look-back and upscale delays, and the new replicas then start beside one that is computing.
        report_s = AutoscalingConfig().metrics_interval_s
        up_deadline = (
            report_s + scaling["look_back_period_s"] + scaling["upscale_delay_s"] + START_TIME_FACTOR * start_s
        )
        started = time.monotonic()
        peak, statuses = asyncio.run(load_until_scaled(url, "autoscale", clients=6, deadline_s=up_deadline))
        assert peak > 1, (
            f"the denoiser never scaled above its minimum in {time.monotonic() - started:.0f}s under sustained "
            f"load (deadline {up_deadline:.0f}s: {START_TIME_FACTOR} x the {start_s:.1f}s the app took to start)"
        )
        assert peak <= scaling["max_replicas"]
        assert statuses and set(statuses) == {200}, statuses
        # Idle again: back to the minimum, replicas that were still starting included (they stop mid-load).
        down_deadline = (
            report_s + scaling["look_back_period_s"] + scaling["downscale_delay_s"] + START_TIME_FACTOR * start_s
        )
        assert wait_for(lambda: replica_states("autoscale", "Denoiser") == {"RUNNING": 1}, timeout=down_deadline), (
            replica_states("autoscale", "Denoiser")
        )


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
    with timed_app(live, "chaos", tmp_path, denoiser=denoiser) as (url, start_s):
        assert replica_states("chaos", "Denoiser") == {"RUNNING": 2}
        named = [a for a in ray.util.list_named_actors(all_namespaces=True) if "chaos#Denoiser" in a["name"]]
        replicas = [ray.get_actor(a["name"], namespace=a["namespace"]) for a in named]
        assert len(replicas) == 2
        bodies = [{"prompt": f"survive {i}", "steps": 80, "seed": i} for i in range(8)]

        async def run() -> list[httpx.Response]:
            task = asyncio.ensure_future(burst(url, bodies))
            ongoing = [0, 0]
            while not task.done() and not all(ongoing):  # until requests are mid-denoise on both replicas
                await asyncio.sleep(0.1)
                ongoing = await asyncio.gather(*(r.get_num_ongoing_requests.remote() for r in replicas))
            assert not task.done(), f"the burst ended before both replicas held requests ({ongoing})"
            ray.kill(replicas[0], no_restart=True)
            return await task

        responses = asyncio.run(run())
        assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses]
        # Serve notices the dead replica at its next health check and starts a replacement.
        recover_s = live.config.denoiser.health_check_period_s + START_TIME_FACTOR * start_s
        assert wait_for(lambda: replica_states("chaos", "Denoiser") == {"RUNNING": 2}, timeout=recover_s), (
            replica_states("chaos", "Denoiser")
        )


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

    assert wait_for(lambda: all(found().values()), timeout=60, interval=2), [n for n, ok in found().items() if not ok]
