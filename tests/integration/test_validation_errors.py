"""Every bad-input class gets the one JSON error shape with the right status; nothing hangs."""

from __future__ import annotations

import pytest

from tests.integration.conftest import LiveService

pytestmark = pytest.mark.integration


def assert_error(response, status: int, code: str, param: str | None = None) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error"}
    assert set(body["error"]) == {"code", "message", "param"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    return body


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"size": "100x64"}, "size"),  # not a multiple of 8
        ({"size": "1024x1024"}, "size"),  # above the configured maximum (512)
        ({"size": "32x32"}, "size"),  # below the minimum
        ({"size": "big"}, "size"),
        ({"steps": 0}, "steps"),
        ({"steps": 151}, "steps"),
        ({"guidance_scale": 30.5}, "guidance_scale"),
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"n": 0}, "n"),
        ({"n": 9}, "n"),
        ({"scheduler": "nope"}, "scheduler"),
        ({"output_format": "gif"}, "output_format"),
        ({"response_format": "xml"}, "response_format"),
        ({"seed": -1}, "seed"),
        ({"prompt": ""}, "prompt"),
        ({"stpes": 4}, "stpes"),  # unknown fields are refused, not silently ignored
    ],
)
def test_invalid_fields_are_422(live: LiveService, body: dict, param: str) -> None:
    with live.client() as client:
        response = client.post("/v1/images/generations", json={"prompt": "a cat", **body})
    assert_error(response, 422, "invalid_request", param)


def test_missing_prompt_is_422(live: LiveService) -> None:
    with live.client() as client:
        response = client.post("/v1/images/generations", json={"n": 1})
    assert_error(response, 422, "invalid_request", "prompt")


def test_malformed_json_is_422(live: LiveService) -> None:
    with live.client() as client:
        response = client.post(
            "/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"}
        )
    assert_error(response, 422, "invalid_request")


def test_prompt_over_the_token_limit_is_422(live: LiveService) -> None:
    prompt = " ".join(["astronaut"] * (live.config.limits.max_prompt_tokens + 10))
    with live.client() as client:
        response = client.post("/v1/images/generations", json={"prompt": prompt})
        assert_error(response, 422, "invalid_request", "prompt")
        negative = client.post("/v1/images/generations", json={"prompt": "a cat", "negative_prompt": prompt})
        assert_error(negative, 422, "invalid_request", "negative_prompt")
        # The service is unharmed.
        assert client.post("/v1/images/generations", json={"prompt": "a cat"}).status_code == 200


def test_unknown_model_is_404(live: LiveService) -> None:
    with live.client() as client:
        response = client.post("/v1/images/generations", json={"prompt": "a cat", "model": "sdxl"})
    assert_error(response, 404, "model_not_found", "model")


def test_unknown_route_uses_the_error_shape(live: LiveService) -> None:
    with live.client() as client:
        assert_error(client.get("/v1/nothing-here"), 404, "not_found")
        assert_error(client.delete("/v1/models"), 405, "method_not_allowed")
