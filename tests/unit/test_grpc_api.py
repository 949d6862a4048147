"""gRPC adapter pieces that need no Ray: status mapping, request translation, the Serve config's grpc_options."""

from __future__ import annotations

import grpc
import pytest

from serving.app import render_serve_config
from serving.config import AppConfig
from serving.errors import ApiError
from serving.generated.sdserve.v1 import sdserve_pb2 as pb
from serving.grpc_api import SERVICER_FUNCTIONS, grpc_status, to_request


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


def test_serve_config_carries_grpc_options() -> None:
    rendered = render_serve_config(AppConfig.model_validate({"grpc": {"port": 9100}}))
    assert rendered["grpc_options"] == {"port": 9100, "grpc_servicer_functions": SERVICER_FUNCTIONS}
    assert "grpc_options" not in render_serve_config(AppConfig.model_validate({"grpc": {"enabled": False}}))
