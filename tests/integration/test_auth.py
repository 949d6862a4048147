"""API keys and tenants on a served application: REST (OpenAI SDK), A1111 (HTTP Basic) and gRPC."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import httpx
import pytest

from serving.auth import hash_key
from tests.integration.conftest import LiveService, extra_app

pytestmark = pytest.mark.integration

KEY_A, KEY_B, KEY_C = "sds_key-of-team-a", "sds_key-of-team-b", "sds_rotated-in"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def write_keys(path: Path, *entries: tuple[str, str, str]) -> None:
    lines = ["keys:"] + [f"  - {{id: {i}, tenant: {t}, sha256: {hash_key(k)}}}" for i, t, k in entries]
    path.write_text("\n".join(lines) + "\n")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def a1111_client(url: str, key: str, body: dict[str, object]) -> None:
    """The ``webuiapi`` library, as A1111 users script it: ``set_auth`` with the key as password; a wrong one is
    refused."""
    import webuiapi

    api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", sampler="Euler", steps=2)
    api.set_auth("user", key)
    result = api.txt2img(prompt=str(body["prompt"]), width=64, height=64, seed=5, cfg_scale=5)
    assert result.image is not None and result.image.size == (64, 64)
    assert result.info["seed"] == 5
    api.set_auth("user", "sds_wrong")
    with pytest.raises(RuntimeError) as refused:
        api.txt2img(prompt="x", width=64, height=64)
    assert refused.value.args[0] == 401


def test_keys_and_tenants(live: LiveService, tmp_path: Path) -> None:
    from openai import AuthenticationError, OpenAI

    keys = tmp_path / "keys.yaml"
    write_keys(keys, ("a", "team-a", KEY_A), ("b", "team-b", KEY_B))
    auth = {"enabled": True, "keys_file": str(keys), "reload_interval_s": 0.2}
    audit_file = tmp_path / "audit.jsonl"
    with (
        extra_app(
            live,
            "secured",
            tmp_path / "out",
            auth=auth,
            audit={"path": str(audit_file)},
            quotas={"tenants": {"team-c": {"requests_per_minute": 1}}},
        ) as url,
        httpx.Client(base_url=url, timeout=120) as http,
    ):
        deadline = time.monotonic() + 300
        while (ready := http.get("/readyz")).status_code != 200:  # probes stay open
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.5)
        assert http.get("/healthz").status_code == 200
        assert ready.json() == {"status": "ready"}  # no key: the status alone, no pids, paths or versions
        assert "stages" in http.get("/readyz", headers=bearer(KEY_A)).json()

        # REST: no key, a wrong key -> 401 in the error shape with a Bearer challenge; the OpenAI SDK's api_key works.
        for headers in ({}, bearer("sds_wrong"), {"Authorization": "Basic !!"}):
            refused = http.post("/v1/images/generations", json={"prompt": "x", "steps": 2}, headers=headers)
            assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
            assert refused.json()["error"]["code"] == "unauthorized"
        assert http.get("/v1/models").status_code == 401
        client = OpenAI(base_url=f"{url}/v1", api_key=KEY_A, default_headers={"traceparent": TRACEPARENT})
        made = client.images.generate(prompt="a fox", size="64x64", response_format="url", extra_body={"steps": 2})
        assert made.data and made.data[0].url
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=f"{url}/v1", api_key="sds_wrong").images.generate(prompt="x", extra_body={"steps": 2})

        # An image and a job of team A are not found for team B (404, never the data), and are for A.
        image = made.data[0].url.removeprefix(url)
        assert http.get(image, headers=bearer(KEY_A)).status_code == 200
        assert http.get(image, headers=bearer(KEY_B)).status_code == 404
        job = http.post("/v1/jobs", json={"prompt": "x", "steps": 2}, headers=bearer(KEY_A)).json()["id"]
        for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/events"), ("GET", "/images/0")):
            other = http.request(method, f"/v1/jobs/{job}{path}", headers=bearer(KEY_B))
            assert other.status_code == 404, (method, path, other.text)
        while http.get(f"/v1/jobs/{job}", headers=bearer(KEY_A)).json()["state"] in ("queued", "running"):
            http.get(f"/v1/jobs/{job}/events", headers=bearer(KEY_A)).read()
        assert http.get(f"/v1/jobs/{job}", headers=bearer(KEY_A)).json()["state"] == "succeeded"

        # A1111 clients: HTTP Basic with the key as password (webuiapi's set_auth, --api-auth).
        body = {"prompt": "x", "steps": 2, "width": 64, "height": 64}
        unauth = http.post("/sdapi/v1/txt2img", json=body)
        assert unauth.status_code == 401 and unauth.headers["www-authenticate"].startswith("Basic")
        assert http.post("/sdapi/v1/txt2img", json=body, auth=("user", KEY_B)).status_code == 200
        a1111_client(url, KEY_B, body)

        # Rotation without a restart: a new key works once the file changes, a removed one stops working.
        write_keys(keys, ("a", "team-a", KEY_A), ("c", "team-c", KEY_C))
        deadline = time.monotonic() + 60
        while http.get("/v1/models", headers=bearer(KEY_C)).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert http.get("/v1/models", headers=bearer(KEY_B)).status_code == 401

        # Quotas: team C may make one request a minute; the second is a 429 before any stage runs.
        body_c = {"prompt": "x", "steps": 2}
        assert http.post("/v1/images/generations", json=body_c, headers=bearer(KEY_C)).status_code == 200
        limited = http.post("/v1/images/generations", json=body_c, headers=bearer(KEY_C))
        assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
        assert limited.headers["X-RateLimit-Limit"] == "1" and int(limited.headers["Retry-After"]) >= 1
        assert http.post("/v1/jobs", json=body_c, headers=bearer(KEY_C)).status_code == 429  # jobs too, at submit
        assert http.post("/v1/images/generations", json=body_c, headers=bearer(KEY_A)).status_code == 200
        assert "api_keys" in http.get("/v1/status", headers=bearer(KEY_A)).json()["auth"]

        # gRPC: `authorization` metadata; without it UNAUTHENTICATED; a job of A is not found for B.
        from serving.generated.sdserve.v1 import sdserve_pb2 as pb
        from serving.generated.sdserve.v1 import sdserve_pb2_grpc as pb_grpc

        app = live.grpc_metadata("secured")
        with grpc.insecure_channel(live.grpc_target) as channel:
            stub = pb_grpc.ImageGenerationStub(channel)
            with pytest.raises(grpc.RpcError) as missing:
                stub.ListModels(pb.ListModelsRequest(), metadata=app, timeout=60)
            assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
            models = stub.ListModels(pb.ListModelsRequest(), metadata=(*app, ("authorization", f"Bearer {KEY_A}")))
            assert [m.id for m in models.models] == ["tiny"]
            with pytest.raises(grpc.RpcError) as foreign:
                stub.GetJob(pb.GetJobRequest(job_id=job), metadata=(*app, ("authorization", f"Bearer {KEY_C}")))
            assert foreign.value.code() == grpc.StatusCode.NOT_FOUND
            mine = stub.GetJob(pb.GetJobRequest(job_id=job), metadata=(*app, ("authorization", f"Bearer {KEY_A}")))
            assert mine.id == job

    # The audit log: one JSON line per call, with the tenant and key id (never the key), what was generated,
    # the status and the client's trace id.
    text = audit_file.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert all(key not in text for key in (KEY_A, KEY_B, KEY_C))
    traced = TRACEPARENT.split("-")[1]
    (made_line,) = [e for e in lines if e["route"] == "/v1/images/generations" and e["trace_id"] == traced]
    assert made_line["tenant"] == "team-a" and made_line["key_id"] == "a" and made_line["api"] == "http"
    assert (made_line["model"], made_line["size"], made_line["steps"], made_line["images"]) == ("tiny", "64x64", 2, 1)
    assert made_line["mode"] == "txt2img" and made_line["status"] == 200
    assert made_line["latency_ms"] > 0
    assert any(e["status"] == 429 and e["tenant"] == "team-c" for e in lines)
    refused_lines = [e for e in lines if e["status"] == 401]
    assert refused_lines and all(e["tenant"] is None and e["key_id"] is None for e in refused_lines)
    assert any(e["route"] == "/sdapi/v1/txt2img" and e["tenant"] == "team-b" for e in lines)
    rpcs = [e for e in lines if e["api"] == "grpc"]
    assert {e["status"] for e in rpcs} >= {"OK", "UNAUTHENTICATED", "NOT_FOUND"}
