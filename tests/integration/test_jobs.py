"""Asynchronous jobs over REST: submit, Server-Sent Events, cancel, idempotency, and Redis-backed survival."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse
from PIL import Image

from serving.jobstore import JobRecord, RedisJobStore
from tests.integration.conftest import LiveService, extra_app
from tests.integration.test_grpc import denoiser_running_jobs

pytestmark = pytest.mark.integration


def events(client: httpx.Client, job_id: str, **headers: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(id, event, data) of every event until the stream ends."""
    with connect_sse(client, "GET", f"/v1/jobs/{job_id}/events", headers=headers) as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        return [(e.id, e.event, json.loads(e.data)) for e in source.iter_sse()]


def wait_state(client: httpx.Client, job_id: str, states: set[str], timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


def test_job_lifecycle_with_live_events(live: LiveService) -> None:
    with live.client() as client:
        submitted = client.post("/v1/jobs", json={"prompt": "a fox", "steps": 4, "seed": 9, "preview": True})
        assert submitted.status_code == 202, submitted.text
        job = submitted.json()
        assert job["state"] in ("queued", "running") and submitted.headers["location"] == f"/v1/jobs/{job['id']}"
        seen = events(client, job["id"])
        kinds = [kind for _, kind, _ in seen]
        assert kinds == ["queued", "step", "step", "step", "step", "done"]
        assert seen[0][2]["position"] >= 0
        assert [(d["step"], d["total_steps"]) for _, k, d in seen if k == "step"] == [(i, 4) for i in range(1, 5)]
        preview = Image.open(io.BytesIO(base64.b64decode(seen[1][2]["preview"])))
        assert preview.format == "JPEG" and preview.size == (8, 8)
        # Reconnecting with Last-Event-ID resumes after it.
        assert [k for _, k, _ in events(client, job["id"], **{"Last-Event-ID": seen[2][0]})] == ["step", "step", "done"]
        done = client.get(f"/v1/jobs/{job['id']}").json()
        assert done["state"] == "succeeded" and done["progress"] == {"step": 4, "total_steps": 4}
        assert done["result"]["seed"] == 9 and done["result"]["size"] == "64x64"
        image = httpx.get(done["result"]["data"][0]["url"], timeout=30)
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        sync = client.post("/v1/images/generations", json={"prompt": "a fox", "steps": 4, "seed": 9}).json()
        assert base64.b64decode(sync["data"][0]["b64_json"]) == image.content


def test_cancel_stops_the_denoiser_at_its_next_step(live: LiveService) -> None:
    with live.client() as client:
        job = client.post("/v1/jobs", json={"prompt": "slow", "size": "256x256", "steps": 150}).json()
        with connect_sse(client, "GET", f"/v1/jobs/{job['id']}/events") as source:
            kinds = []
            for event in source.iter_sse():
                kinds.append(event.event)
                if kinds.count("step") == 2:
                    cancelled = client.delete(f"/v1/jobs/{job['id']}")
                    assert cancelled.status_code == 200
        assert kinds[-1] == "cancelled"
        final = client.get(f"/v1/jobs/{job['id']}").json()
        assert final["state"] == "cancelled" and final["progress"]["step"] < 150
        assert denoiser_running_jobs(live) == 0
        again = client.delete(f"/v1/jobs/{job['id']}").json()  # cancelling a finished job changes nothing
        assert again["state"] == "cancelled"


def test_idempotency_key(live: LiveService) -> None:
    body = {"prompt": "an idempotent cat", "steps": 2, "seed": 1}
    with live.client() as client:
        first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "key-1"})
        retry = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "key-1"})
        assert first.status_code == retry.status_code == 202
        assert retry.json()["id"] == first.json()["id"] and retry.headers["idempotent-replayed"] == "true"
        other = client.post("/v1/jobs", json={**body, "seed": 2}, headers={"Idempotency-Key": "key-1"})
        assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
        fresh = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "key-2"})
        assert fresh.json()["id"] != first.json()["id"]


def test_bad_requests_and_unknown_jobs(live: LiveService) -> None:
    with live.client() as client:
        bad = client.post("/v1/jobs", json={"prompt": "x", "steps": 1000})
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "steps"
        for method, path in (("GET", "/v1/jobs/job_x"), ("DELETE", "/v1/jobs/job_x"), ("GET", "/v1/jobs/job_x/events")):
            response = client.request(method, path)
            assert response.status_code == 404 and response.json()["error"]["code"] == "job_not_found"
        assert "memory" in client.get("/v1/status").json()["job_store"]


def _kill_ingress(app_name: str) -> None:
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if f":{app_name}#Ingress#" in a["name"]]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)


def test_redis_jobs_survive_an_ingress_restart(live: LiveService, redis_url: str, tmp_path: Path) -> None:
    jobs = {"store_url": redis_url, "lease_s": 2.0, "key_prefix": "survival"}
    with extra_app(live, "jobsredis", tmp_path, jobs=jobs) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/v1/status").json()["job_store"].startswith("redis:")
        done = client.post("/v1/jobs", json={"prompt": "kept", "steps": 3}, headers={"Idempotency-Key": "k"}).json()
        done = wait_state(client, done["id"], {"succeeded"})
        image = httpx.get(done["result"]["data"][0]["url"], timeout=30).content
        running = client.post("/v1/jobs", json={"prompt": "lost", "size": "256x256", "steps": 150}).json()
        wait_state(client, running["id"], {"running"})

        _kill_ingress("jobsredis")
        deadline = time.monotonic() + 90
        while True:  # the controller replaces the ingress replica
            try:
                if client.get("/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the ingress did not come back"
            time.sleep(0.5)

        after = client.get(f"/v1/jobs/{done['id']}").json()
        assert after["state"] == "succeeded"
        assert httpx.get(after["result"]["data"][0]["url"], timeout=30).content == image
        assert [k for _, k, _ in events(client, done["id"])][-1] == "done"
        retry = client.post("/v1/jobs", json={"prompt": "kept", "steps": 3}, headers={"Idempotency-Key": "k"})
        assert retry.json()["id"] == done["id"]
        lost = wait_state(client, running["id"], {"failed"}, timeout_s=30)
        assert lost["state"] == "failed" and lost["error"]["code"] == "job_lost"
        assert [k for _, k, _ in events(client, running["id"])][-1] == "failed"


def test_redis_store_gives_back_only_its_own_idempotency_key(redis_url: str) -> None:
    """A submit refused as overloaded unbinds its Idempotency-Key, so that a retry creates the job; a key that
    names another job stays bound."""

    async def main() -> None:
        store = RedisJobStore(redis_url, ttl_s=60, prefix="release")
        now = time.time()
        first, second = (
            JobRecord(id=name, created_at=now, updated_at=now, request={}, request_hash="") for name in ("a", "b")
        )
        try:
            assert await store.claim_key("k", first) == "a"
            await store.release_key("k", second)
            assert await store.claim_key("k", second) == "a"
            await store.release_key("k", first)
            assert await store.claim_key("k", second) == "b"
        finally:
            await store.close()

    asyncio.run(main())
