"""The gRPC API through Serve's gRPC proxy, with a real gRPC client over loopback."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from serving.generated.sdserve.v1 import sdserve_pb2 as pb
from serving.generated.sdserve.v1 import sdserve_pb2_grpc as pb_grpc
from tests.images import b64, init_png, mask_png
from tests.integration.conftest import LiveService

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def channel(live: LiveService) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(live.grpc_target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.ImageGenerationStub:
    return pb_grpc.ImageGenerationStub(channel)


def test_generate_returns_images_and_settings(live: LiveService, stub: pb_grpc.ImageGenerationStub) -> None:
    request = pb.GenerateRequest(prompt="a red apple", width=96, height=64, n=2, steps=3, seed=11, scheduler="euler_a")
    response = stub.Generate(request, metadata=live.grpc_metadata(), timeout=120)
    assert len(response.images) == 2
    for image in response.images:
        assert image.media_type == "image/png"
        assert Image.open(io.BytesIO(image.data)).size == (96, 64)
    assert (response.model, response.seed, response.steps, response.scheduler) == ("tiny", 11, 3, "euler_a")
    assert not response.HasField("strength") and not response.HasField("inpainting")  # text to image
    # The same request over REST gives the same bytes: one service layer under both transports.
    with live.client() as client:
        rest = client.post(
            "/v1/images/generations",
            json={"prompt": "a red apple", "size": "96x64", "n": 2, "steps": 3, "seed": 11, "scheduler": "euler_a"},
        ).json()
    assert base64.b64decode(rest["data"][0]["b64_json"]) == response.images[0].data


@pytest.mark.parametrize(
    ("request_fields", "code", "detail"),
    [
        ({"prompt": "x", "steps": 1000}, grpc.StatusCode.INVALID_ARGUMENT, "steps"),
        ({"prompt": "a" * 10_000}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),  # over the prompt bound
        ({"prompt": "x", "width": 64}, grpc.StatusCode.INVALID_ARGUMENT, "height"),
        ({"prompt": "x", "scheduler": "nope"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown scheduler"),
        ({"prompt": "x", "model": "nope"}, grpc.StatusCode.NOT_FOUND, "model_not_found"),
        ({"prompt": "x", "init_image": b"not an image"}, grpc.StatusCode.INVALID_ARGUMENT, "init_image"),
        ({"prompt": "x", "init_image": init_png(), "strength": 0.0}, grpc.StatusCode.INVALID_ARGUMENT, "strength"),
        ({"prompt": "x", "mask": mask_png()}, grpc.StatusCode.INVALID_ARGUMENT, "need an init image"),
        ({"prompt": "x", "resize_mode": "stretch"}, grpc.StatusCode.INVALID_ARGUMENT, "resize_mode"),
    ],
)
def test_errors_map_to_status_codes(
    live: LiveService, stub: pb_grpc.ImageGenerationStub, request_fields: dict, code: grpc.StatusCode, detail: str
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        stub.Generate(pb.GenerateRequest(**request_fields), metadata=live.grpc_metadata(), timeout=60)
    assert raised.value.code() == code
    assert detail in raised.value.details()


def test_img2img_from_init_image_bytes_reports_strength(live: LiveService, stub: pb_grpc.ImageGenerationStub) -> None:
    init = init_png(80, 72)  # not the default 64x64: the output takes the init image's size
    request = pb.GenerateRequest(prompt="a lighthouse", init_image=init, strength=0.5, steps=4, seed=5)
    response = stub.Generate(request, metadata=live.grpc_metadata(), timeout=120)
    assert Image.open(io.BytesIO(response.images[0].data)).size == (80, 72)
    assert (response.width, response.height, response.strength, response.inpainting) == (80, 72, 0.5, False)
    assert response.HasField("inpainting")
    # The same image sent to REST as base64 gives the same bytes.
    with live.client() as client:
        rest = client.post(
            "/v1/images/generations",
            json={"prompt": "a lighthouse", "init_image": b64(init), "strength": 0.5, "steps": 4, "seed": 5},
        ).json()
    assert base64.b64decode(rest["data"][0]["b64_json"]) == response.images[0].data


def test_a_streamed_inpainting_job_keeps_its_image_and_mask(
    live: LiveService, stub: pb_grpc.ImageGenerationStub
) -> None:
    request = pb.GenerateRequest(prompt="a boat", init_image=init_png(), mask=mask_png(), steps=3, seed=2)
    events = list(stub.GenerateStream(request, metadata=live.grpc_metadata(), timeout=120))
    result = events[-1].result
    assert Image.open(io.BytesIO(result.images[0].data)).size == (64, 64)
    assert (result.strength, result.inpainting) == (1.0, True)  # a mask repaints fully unless told otherwise
    job = stub.GetJob(pb.GetJobRequest(job_id=events[0].job_id), metadata=live.grpc_metadata(), timeout=30)
    assert job.state == pb.JOB_STATE_SUCCEEDED and (job.result.strength, job.result.inpainting) == (1.0, True)
    # The job stored the files as base64; the unary call passed the bytes as they came: one picture.
    unary = stub.Generate(request, metadata=live.grpc_metadata(), timeout=120)
    assert unary.images[0].data == result.images[0].data


def test_stream_refuses_a_bad_init_image_before_queueing(live: LiveService, stub: pb_grpc.ImageGenerationStub) -> None:
    init = init_png()
    request = pb.GenerateRequest(prompt="x", init_image=init[: len(init) // 2])  # truncated
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.GenerateStream(request, metadata=live.grpc_metadata(), timeout=60))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "init_image" in raised.value.details()


def test_list_models(live: LiveService, stub: pb_grpc.ImageGenerationStub) -> None:
    response = stub.ListModels(pb.ListModelsRequest(), metadata=live.grpc_metadata(), timeout=30)
    assert [(m.id, m.description) for m in response.models] == [("tiny", "tiny random test model")]


def test_stream_reports_queue_every_step_previews_and_the_result(
    live: LiveService, stub: pb_grpc.ImageGenerationStub
) -> None:
    request = pb.GenerateRequest(prompt="a lighthouse", width=64, height=96, steps=5, seed=3, preview=True)
    events = list(stub.GenerateStream(request, metadata=live.grpc_metadata(), timeout=120))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["queued"] + ["progress"] * 5 + ["result"]
    assert len({e.job_id for e in events}) == 1
    assert [(e.progress.step, e.progress.total_steps) for e in events[1:-1]] == [(i, 5) for i in range(1, 6)]
    preview = Image.open(io.BytesIO(events[1].progress.preview))
    assert preview.format == "JPEG" and preview.size == (64 // 8, 96 // 8)
    result = events[-1].result
    assert Image.open(io.BytesIO(result.images[0].data)).size == (64, 96)
    job = stub.GetJob(pb.GetJobRequest(job_id=events[0].job_id), metadata=live.grpc_metadata(), timeout=30)
    assert job.state == pb.JOB_STATE_SUCCEEDED and (job.step, job.total_steps) == (5, 5)
    assert job.result.images[0].data == result.images[0].data
    unary = stub.Generate(
        pb.GenerateRequest(prompt="a lighthouse", width=64, height=96, steps=5, seed=3),
        metadata=live.grpc_metadata(),
        timeout=120,
    )
    assert unary.images[0].data == result.images[0].data  # streaming does not change the picture


def test_cancel_job_stops_the_stream_mid_run(live: LiveService, stub: pb_grpc.ImageGenerationStub) -> None:
    # 150 steps at 256x256 take many seconds on the tiny model; the job is cancelled after a few.
    request = pb.GenerateRequest(prompt="a long one", width=256, height=256, steps=150, seed=1)
    stream = stub.GenerateStream(request, metadata=live.grpc_metadata(), timeout=300)
    steps: list[int] = []
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        for event in stream:
            if event.HasField("progress"):
                steps.append(event.progress.step)
                if len(steps) == 3:
                    job = stub.CancelJob(
                        pb.CancelJobRequest(job_id=event.job_id), metadata=live.grpc_metadata(), timeout=30
                    )
                    job_id = event.job_id
    assert raised.value.code() == grpc.StatusCode.CANCELLED
    assert time.monotonic() - started < 20
    assert 3 <= max(steps) < 150
    job = stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=live.grpc_metadata(), timeout=30)
    assert job.state == pb.JOB_STATE_CANCELLED and job.step < 150
    assert denoiser_running_jobs(live) == 0  # the denoiser dropped it and freed its slot


def test_get_and_cancel_unknown_job_are_not_found(live: LiveService, stub: pb_grpc.ImageGenerationStub) -> None:
    for call, msg in ((stub.GetJob, pb.GetJobRequest), (stub.CancelJob, pb.CancelJobRequest)):
        with pytest.raises(grpc.RpcError) as raised:
            call(msg(job_id="job_missing"), metadata=live.grpc_metadata(), timeout=30)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_service(live: LiveService, channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    response = health.Check(health_pb2.HealthCheckRequest(), metadata=live.grpc_metadata(), timeout=30)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    named = health_pb2.HealthCheckRequest(service="sdserve.v1.ImageGeneration")
    assert health.Check(named, metadata=live.grpc_metadata(), timeout=30).status == response.SERVING
    with pytest.raises(grpc.RpcError) as raised:
        health.Check(health_pb2.HealthCheckRequest(service="other"), metadata=live.grpc_metadata(), timeout=30)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    watch = health.Watch(health_pb2.HealthCheckRequest(), metadata=live.grpc_metadata(), timeout=30)
    assert next(watch).status == response.SERVING
    watch.cancel()


def test_reflection_lists_the_services(live: LiveService, channel: grpc.Channel) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="sdserve.v1.ImageGeneration"),
    ]
    responses = list(reflection.ServerReflectionInfo(iter(requests), timeout=30))
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"sdserve.v1.ImageGeneration", "grpc.health.v1.Health"} <= names
    files = responses[1].file_descriptor_response.file_descriptor_proto
    assert files and b"GenerateStream" in files[0]


def denoiser_running_jobs(live: LiveService, timeout_s: float = 10.0) -> int:
    """Jobs in the denoiser's batch, from /readyz (waits briefly for a cancel to reach it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        running = httpx.get(f"{live.url}/readyz", timeout=30).json()["stages"]["denoiser"]["running_jobs"]
        if running == 0 or time.monotonic() > deadline:
            return int(running)
        time.sleep(0.2)
