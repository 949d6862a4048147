"""Style presets and prompt weighting through the served APIs."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import LiveService

pytestmark = pytest.mark.integration


def test_styles_are_listed_and_applied_on_rest_and_a1111(live: LiveService) -> None:
    with live.client() as http:
        listed = http.get("/v1/styles").json()
        names = {p["name"] for p in listed["data"]}
        assert {"vivid", "natural"} <= names
        styled = http.post("/v1/images/generations", json={"prompt": "a fox", "style": "vivid", "steps": 2})
        assert styled.status_code == 200, styled.text
        assert styled.json()["styles"] == ["vivid"]
        unknown = http.post("/v1/images/generations", json={"prompt": "a fox", "style": "nope"})
        assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "style_not_found")

        a1111 = http.get("/sdapi/v1/prompt-styles").json()
        assert {s["name"] for s in a1111} == names and all("{prompt}" in s["prompt"] for s in a1111)
        body = {"prompt": "a (fox:1.3) BREAK in snow", "steps": 2, "width": 64, "height": 64, "styles": ["natural"]}
        txt2img = http.post("/sdapi/v1/txt2img", json=body)
        assert txt2img.status_code == 200, txt2img.text
        assert json.loads(txt2img.json()["info"])["styles"] == ["natural"]


def test_openai_sdk_style_is_a_preset(live: LiveService) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{live.url}/v1", api_key="unused")
    result = client.images.generate(
        prompt="a [quiet] harbour", style="natural", size="64x64", response_format="b64_json",  # type: ignore[arg-type]
        extra_body={"steps": 2, "seed": 1},
    )  # fmt: skip
    assert result.data and result.data[0].b64_json
