"""OpenTelemetry traces through a real OTLP/HTTP receiver on loopback that decodes the protobuf payloads.

A second application beside the live one runs with the standard ``OTEL_*`` variables in each deployment's replica
environment (``<section>.env``, Ray's runtime_env), so the live app keeps tracing off. One request with a client
``traceparent`` is one trace: spans from the ingress and every stage process it went through, the ingress span the
child of the client's span and each stage span the child of the ingress span; a failing stage call's span ends
with status ERROR and an exception event.
"""

from __future__ import annotations

import gzip
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from serving.generated.sdserve.v1 import sdserve_pb2 as pb
from serving.generated.sdserve.v1 import sdserve_pb2_grpc as pb_grpc
from tests.integration.conftest import LiveService, extra_app

pytestmark = pytest.mark.integration

APP = "traced"
DEADLINE_S = 30.0  # spans leave each process every 200 ms (OTEL_BSP_SCHEDULE_DELAY); this is for a loaded machine
STAGES = ("text_encoder", "denoiser", "decoder")


@dataclass
class ReceivedSpan:
    resource: dict[str, Any]
    span: Span

    @property
    def component(self) -> str:
        return str(self.resource.get("sdserve.component"))

    @property
    def attributes(self) -> dict[str, Any]:
        return {kv.key: value(kv.value) for kv in self.span.attributes}


def value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(item) for item in v.array_value.values]
    return getattr(v, kind) if kind else None


class Receiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces with an ExportTraceServiceRequest (protobuf)."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                ok = self.path == "/v1/traces" and self.headers.get("Content-Type") == "application/x-protobuf"
                if ok:
                    receiver.take(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def take(self, request: ExportTraceServiceRequest) -> None:
        with self.lock:
            for resource_spans in request.resource_spans:
                resource = {kv.key: value(kv.value) for kv in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    self.spans.extend(ReceivedSpan(resource, span) for span in scope.spans)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self.lock:
            return [s for s in self.spans if s.span.trace_id.hex() == trace_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_for(receiver: Receiver, trace_id: str, done: Callable[[list[ReceivedSpan]], bool]) -> list[ReceivedSpan]:
    deadline = time.monotonic() + DEADLINE_S
    while not done(spans := receiver.trace(trace_id)):
        assert time.monotonic() < deadline, [(s.component, s.span.name) for s in spans]
        time.sleep(0.2)
    return spans


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def components(spans: list[ReceivedSpan]) -> set[str]:
    return {s.component for s in spans}


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def traced_app(live: LiveService, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "200"}
    sections: dict[str, object] = {"ingress": {"env": env}}
    sections.update({stage: {"torch_threads": 1, "env": env} for stage in STAGES})
    with extra_app(live, APP, tmp_path_factory.mktemp("traced"), **sections) as url:
        yield url


def test_one_request_is_one_trace_across_processes(traced_app: str, receiver: Receiver) -> None:
    trace_id, client_span, header = traceparent()
    response = httpx.post(
        f"{traced_app}/v1/images/generations",
        json={"prompt": "a traced fox", "steps": 3, "seed": 5},
        headers={"traceparent": header},
        timeout=120,
    )
    assert response.status_code == 200, response.text

    spans = wait_for(receiver, trace_id, lambda found: components(found) >= {"ingress", *STAGES})
    assert len({s.resource["process.pid"] for s in spans}) >= 4
    assert {s.resource["service.name"] for s in spans} == {"sdserve"}
    (ingress,) = [s for s in spans if s.component == "ingress"]
    assert ingress.span.parent_span_id.hex() == client_span
    assert ingress.span.kind == Span.SPAN_KIND_SERVER and ingress.span.name == "POST /v1/images/generations"
    assert ingress.attributes["http.response.status_code"] == 200
    assert ingress.attributes["sdserve.model"] == "tiny" and ingress.attributes["sdserve.steps"] == 3
    version = ingress.attributes["sdserve.model_version"]
    for s in spans:
        if s.component != "ingress":
            assert s.span.parent_span_id == ingress.span.span_id, s.span.name
            assert s.attributes["sdserve.model"] == "tiny" and s.attributes["sdserve.model_version"] == version
            assert s.attributes["sdserve.batch_size"] >= 1 and s.attributes["sdserve.queue_ms"] >= 0
            assert s.span.status.code != Status.STATUS_CODE_ERROR
    (denoise,) = [s for s in spans if s.component == "denoiser"]
    assert denoise.attributes["sdserve.steps"] == 3 and denoise.attributes["sdserve.size"] == "64x64"
    assert denoise.attributes["sdserve.first_step_ms"] >= denoise.attributes["sdserve.queue_ms"]
    # The stage spans lie inside the ingress span.
    assert all(ingress.span.start_time_unix_nano <= s.span.start_time_unix_nano for s in spans)
    assert all(s.span.end_time_unix_nano <= ingress.span.end_time_unix_nano for s in spans)


def test_a_failing_stage_call_ends_its_span_with_an_error(traced_app: str, receiver: Receiver) -> None:
    trace_id, _, header = traceparent()
    # Under the ingress's character bound, over the text encoder's token bound: the stage refuses it.
    response = httpx.post(
        f"{traced_app}/v1/images/generations",
        json={"prompt": "fox " * 300},
        headers={"traceparent": header},
        timeout=120,
    )
    assert response.status_code == 422, response.text
    code = response.json()["error"]["code"]

    spans = wait_for(receiver, trace_id, lambda found: components(found) >= {"ingress", "text_encoder"})
    (encode,) = [s for s in spans if s.component == "text_encoder"]
    assert encode.span.status.code == Status.STATUS_CODE_ERROR
    (event,) = [e for e in encode.span.events if e.name == "exception"]
    assert {kv.key: value(kv.value) for kv in event.attributes}["exception.type"].endswith("PromptTooLongError")
    (ingress,) = [s for s in spans if s.component == "ingress"]
    # The caller's error (a 4xx) is no server failure: the ingress span says which error, without status ERROR.
    assert ingress.attributes["error.type"] == code and ingress.attributes["http.response.status_code"] == 422
    assert ingress.span.status.code != Status.STATUS_CODE_ERROR
    assert "denoiser" not in components(spans)  # the plan stopped at the failed call


def test_jobs_and_grpc_carry_the_client_trace(traced_app: str, live: LiveService, receiver: Receiver) -> None:
    """A job's stage calls (the denoiser streaming its progress) and a gRPC call's join the client's trace."""
    job_trace, _, header = traceparent()
    with httpx.Client(base_url=traced_app, timeout=60) as client:
        job = client.post("/v1/jobs", json={"prompt": "a traced job", "steps": 2}, headers={"traceparent": header})
        assert job.status_code == 202, job.text
    rpc_trace, rpc_span, rpc_header = traceparent()
    with grpc.insecure_channel(live.grpc_target) as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        metadata = (*live.grpc_metadata(APP), ("traceparent", rpc_header))
        stub.Generate(pb.GenerateRequest(prompt="a traced call", steps=2), metadata=metadata, timeout=120)

    # The job runs in the background: on a loaded machine it may finish long after the RPC; its spans leave the
    # replicas within the export delay once it has.
    with httpx.Client(base_url=traced_app, timeout=60) as client:
        deadline = time.monotonic() + 180
        while (state := client.get(f"/v1/jobs/{job.json()['id']}").json()["state"]) in ("queued", "running"):
            assert time.monotonic() < deadline, state
            time.sleep(0.2)
    assert state == "succeeded", state
    job_spans = wait_for(receiver, job_trace, lambda found: components(found) >= {"ingress", *STAGES})
    (denoise,) = [s for s in job_spans if s.component == "denoiser"]
    assert denoise.span.name == "denoiser denoise" and denoise.attributes["sdserve.steps"] == 2
    rpc_spans = wait_for(receiver, rpc_trace, lambda found: components(found) >= {"ingress", *STAGES})
    (ingress,) = [s for s in rpc_spans if s.component == "ingress"]
    assert ingress.span.parent_span_id.hex() == rpc_span
    assert ingress.span.name == "sdserve.v1.ImageGeneration/generate"
    assert ingress.attributes["rpc.grpc.status"] == "OK"
