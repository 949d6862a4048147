"""gRPC adapter pieces that need no Ray: status mapping, request translation, the Serve config's grpc_options."""

from __future__ import annotations

import base64

import grpc
import pytest

from serving.app import render_serve_config
from serving.config import AppConfig
from serving.errors import ApiError
from serving.generated.sdserve.v1 import sdserve_pb2 as pb
from serving.grpc_api import SERVICER_FUNCTIONS, grpc_status, to_request, uploads


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ApiError(422, "invalid_request", "bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (ApiError(404, "model_not_found", "no"), grpc.StatusCode.NOT_FOUND),
        (ApiError(503, "overloaded", "full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ApiError(503, "stage_unavailable", "down"), grpc.StatusCode.UNAVAILABLE),
        (ApiError(504, "timeout", "slow"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (ApiError(500, "internal_error", "boom"), grpc.StatusCode.INTERNAL),
    ],
)
def test_error_codes_map_to_grpc_status(error: ApiError, status: grpc.StatusCode) -> None:
    assert grpc_status(error) == status


def test_request_translation_uses_the_rest_validators() -> None:
    body = to_request(pb.GenerateRequest(prompt="x", width=96, height=64, guidance_scale=5.3, quality=80, n=2))
    assert (body.size, body.guidance_scale, body.output_compression, body.n, body.steps) == ("96x64", 5.3, 80, 2, None)
    with pytest.raises(ApiError) as raised:
        to_request(pb.GenerateRequest(prompt="x", width=100, height=64))
    assert raised.value.code == "invalid_request" and "multiples of 8" in raised.value.message


def test_image_fields_reach_the_request() -> None:
    msg = pb.GenerateRequest(prompt="x", init_image=b"\x89PNG init", mask=b"mask", strength=0.3, resize_mode="crop")
    body = to_request(msg)
    # 0.3 crosses the wire as float32 (0.30000001) and reaches the request as 0.3; the files stay bytes.
    assert (body.strength, body.resize_mode, body.init_image, body.mask) == (0.3, "crop", None, None)
    assert uploads(msg) == (b"\x89PNG init", b"mask")
    # A job stores its request as JSON: the files go in as base64.
    job = to_request(msg, embed_images=True)
    assert (base64.b64decode(job.init_image or ""), base64.b64decode(job.mask or "")) == (b"\x89PNG init", b"mask")
    plain = pb.GenerateRequest(prompt="x")
    assert uploads(plain) == (None, None)
    assert to_request(plain, embed_images=True).model_dump(exclude_unset=True) == {
        "prompt": "x",
        "n": 1,
        "preview": False,
    }


def test_an_unknown_resize_mode_is_refused_naming_it() -> None:
    with pytest.raises(ApiError) as raised:
        to_request(pb.GenerateRequest(prompt="x", resize_mode="stretch"))
    assert (raised.value.code, raised.value.param) == ("invalid_request", "resize_mode")


def test_serve_config_carries_grpc_options() -> None:
    rendered = render_serve_config(AppConfig.model_validate({"grpc": {"port": 9100}}))
    assert rendered["grpc_options"] == {"port": 9100, "grpc_servicer_functions": SERVICER_FUNCTIONS}
    assert "grpc_options" not in render_serve_config(AppConfig.model_validate({"grpc": {"enabled": False}}))
