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
        ({"stpes": 4}, "stpes"),  # unknown fields are refused, not silently ignored
        # Strict types: a JSON boolean is not a number and a string is not an integer.
        ({"n": True}, "n"),
        ({"steps": "2"}, "steps"),
        ({"guidance_scale": "7"}, "guidance_scale"),
        ({"output_compression": False}, "output_compression"),
        ({"seed": 1.5}, "seed"),
        ({"prompt": 5}, "prompt"),
    ],
)
def test_invalid_fields_are_422(live: LiveService, body: dict, param: str) -> None:
    with live.client() as client:
        response = client.post("/v1/images/generations", json={"prompt": "a cat", **body})
    assert_error(response, 422, "invalid_request", param)


def test_job_fields_have_strict_types(live: LiveService) -> None:
    with live.client() as client:
        for body, param in (({"preview": 0}, "preview"), ({"steps": "2"}, "steps"), ({"n": True}, "n")):
            response = client.post("/v1/jobs", json={"prompt": "a cat", **body})
            assert_error(response, 422, "invalid_request", param)


def test_missing_prompt_is_422(live: LiveService) -> None:
    with live.client() as client:
        response = client.post("/v1/images/generations", json={"n": 1})
    assert_error(response, 422, "invalid_request", "prompt")


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"prompt": "a", "n": 1,,}', b"\xff\xfe\x00garbage", b"[" * 100_000 + b"]" * 100_000],
    ids=["malformed", "trailing-comma", "undecodable", "nested-100k-deep"],
)
def test_unparseable_bodies_are_422(live: LiveService, content: bytes) -> None:
    with live.client() as client:
        response = client.post("/v1/images/generations", content=content, headers={"content-type": "application/json"})
    # The error names no field (a character offset is not a parameter).
    assert assert_error(response, 422, "invalid_request")["error"]["param"] is None


def test_an_oversized_body_is_413_before_it_is_read(live: LiveService) -> None:
    limit = live.config.limits.max_body_bytes
    prompt = "a" * (limit + 1)
    with live.client() as client:
        assert_error(client.post("/v1/images/generations", json={"prompt": prompt}), 413, "payload_too_large")

        def chunks():  # no Content-Length: counted as it arrives
            yield b'{"prompt": "'
            for _ in range(limit // 65536 + 2):
                yield b"a" * 65536
            yield b'"}'

        chunked = client.post("/v1/images/generations", content=chunks(), headers={"content-type": "application/json"})
        assert_error(chunked, 413, "payload_too_large")
        assert client.post("/v1/images/generations", json={"prompt": "a cat"}).status_code == 200


def test_an_over_long_prompt_is_refused_without_tokenizing_it(live: LiveService) -> None:
    from serving.resolver import CHARS_PER_TOKEN

    max_chars = live.config.limits.max_prompt_tokens * CHARS_PER_TOKEN
    with live.client() as client:
        response = client.post("/v1/images/generations", json={"prompt": "a" * (max_chars + 1)})
        assert_error(response, 422, "invalid_request", "prompt")
        # The refusal comes from the ingress: the text encoder never saw the prompt.
        assert "characters" in response.json()["error"]["message"]


def test_method_not_allowed_says_what_is(live: LiveService) -> None:
    with live.client() as client:
        response = client.get("/v1/images/generations")
        assert_error(response, 405, "method_not_allowed")
        assert response.headers["allow"] == "POST"
        assert client.delete("/v1/models").headers["allow"] == "GET"


def test_openapi_declares_what_image_routes_return(live: LiveService) -> None:
    with live.client() as client:
        paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/images/{image_id}", "/v1/jobs/{job_id}/images/{index}"):
        content = paths[path]["get"]["responses"]["200"]["content"]
        assert set(content) == {"image/png", "image/jpeg", "image/webp"}, path
    assert set(paths["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]) == {"text/event-stream"}


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
