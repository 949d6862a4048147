"""Models served from the registry through the REST API, and version rollouts on a running application."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from models.registry import MANIFEST_NAME, parse_ref
from models.registry.manifest import content_id
from models.registry.sources import publish
from serving.config import AppConfig
from tests.integration.conftest import LiveService, tiny_config
from tests.servers import HubServer, S3Server

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def deploy_from_config(live: LiveService, config: AppConfig) -> str:
    """Deploy ``config`` the way `serve deploy` and KubeRay do: a Serve config applied by the controller.

    Applying it again with only the model catalog changed updates the deployments' user_config in place.
    """
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from serving.app import render_serve_config

    app = render_serve_config(config)["applications"][0]
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}), _blocking=True)
    return f"{live.url}{config.route_prefix}"


def roll_to(live: LiveService, config: AppConfig, source: str) -> AppConfig:
    """Re-apply ``config`` with its (single) model pointing at ``source``: a rollout; return the new config."""
    changed = config.model_copy(update={"models": [config.models[0].model_copy(update={"source": source})]})
    deploy_from_config(live, changed)
    return changed


def wait_degraded(url: str) -> dict[str, Any]:
    ready: dict[str, Any] = wait_for(lambda: httpx.get(f"{url}/readyz").json(), lambda r: r.get("status") == "degraded")
    return ready


@contextmanager
def config_app(live: LiveService, config: AppConfig) -> Iterator[str]:
    from ray import serve

    url = deploy_from_config(live, config)
    try:
        yield url
    finally:
        serve.delete(config.app_name)


def published(model_dir: Path, tmp_path: Path, ref: str, seed: int | None = None) -> str:
    """Publish a copy of the tiny model (or a new one from ``seed``) at ``ref``; return its content id."""
    if seed is None:
        copy = Path(shutil.copytree(model_dir, tmp_path / ref.replace("/", "_").replace(":", "")))
    else:
        from models.testmodels import create_test_model

        copy = create_test_model(tmp_path / f"seed{seed}", size="tiny", seed=seed)
    _, version = publish(copy, parse_ref(ref))
    return version


def generate(url: str, model: str, timeout: float = 120) -> httpx.Response:
    body = {"model": model, "prompt": "a red bicycle", "size": "64x64", "steps": 2, "seed": 3}
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=timeout)


def test_models_from_s3_and_the_hub_are_served_by_name(
    live: LiveService, s3: S3Server, hub: HubServer, tmp_path: Path
) -> None:
    s3_version = published(live.model_dir, tmp_path, "s3://models/served@v1")
    copy = Path(shutil.copytree(live.model_dir, tmp_path / "hub-copy"))
    commit = hub.publish(copy, "acme/served")
    hub_version = content_id((copy / MANIFEST_NAME).read_bytes())
    config = tiny_config(
        live.model_dir, tmp_path / "outputs", app_name="registry", route_prefix="/registry",
        models=[
            {"name": "from-s3", "source": "s3://models/served@v1"},
            {"name": "from-hub", "source": "hf://acme/served@main"},
        ],
        registry={"cache_dir": str(tmp_path / "cache")},
    )  # fmt: skip
    with config_app(live, config) as url:
        for name, version in (("from-s3", s3_version), ("from-hub", hub_version)):
            response = generate(url, name)
            assert response.status_code == 200, response.text
            assert response.json()["model_version"] == version
            assert response.headers["x-sdserve-model-version"] == version
        cards = {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert cards["from-hub"]["serving"] == f"hf://acme/served@{commit}"  # the branch, pinned
        assert cards["from-s3"]["serving"] == "s3://models/served@v1"
        # Each stage replica fetched only its own components.
        stages = httpx.get(f"{url}/readyz").json()["stages"]
        fetched = {stage: info["models"]["from-s3"]["fetch"]["components"] for stage, info in stages.items()}
        assert fetched == {
            "text_encoder": ["text_encoder", "tokenizer"],
            "denoiser": ["scheduler", "unet"],
            "decoder": ["vae"],
        }


def test_a_corrupt_model_never_serves(live: LiveService, s3: S3Server, tmp_path: Path) -> None:
    published(live.model_dir, tmp_path, "s3://models/broken@v1")
    key = "broken/v1/unet/diffusion_pytorch_model.safetensors"
    client = s3.client()
    data = bytearray(client.get_object(Bucket="models", Key=key)["Body"].read())
    data[100] ^= 0x01
    client.put_object(Bucket="models", Key=key, Body=bytes(data))
    config = tiny_config(
        live.model_dir, tmp_path / "outputs", app_name="broken", route_prefix="/broken",
        models=[{"name": "tiny", "source": str(live.model_dir)}],
        registry={"cache_dir": str(tmp_path / "cache")},
    )  # fmt: skip
    with config_app(live, config) as url:
        # Roll the running app over to the tampered version: the denoiser refuses it, the old one keeps serving.
        roll_to(live, config, "s3://models/broken@v1")
        ready = wait_degraded(url)
        assert "does not match" in ready["errors"]["tiny"]
        response = generate(url, "tiny")
        assert response.status_code == 200
        old = ready["stages"]["decoder"]["loaded_versions"][f"file://{live.model_dir}"]
        assert response.json()["model_version"] == old
        assert ready["models"]["tiny"]["serving"] == f"file://{live.model_dir}"


def wait_for(fetch: Any, done: Any, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; last value: {value}")
        time.sleep(0.5)


def test_rollout_under_load_drops_nothing(live: LiveService, s3: S3Server, tmp_path: Path) -> None:
    v1 = published(live.model_dir, tmp_path, "s3://models/rolling@v1")
    v2 = published(live.model_dir, tmp_path, "s3://models/rolling@v2", seed=7)
    assert v1 != v2
    config = tiny_config(
        live.model_dir, tmp_path / "outputs", app_name="rolling", route_prefix="/rolling",
        models=[{"name": "m", "source": "s3://models/rolling@v1"}],
        registry={"cache_dir": str(tmp_path / "cache"), "keep_previous_s": 1},
    )  # fmt: skip
    with config_app(live, config) as url:
        pids = {s: i["pid"] for s, i in httpx.get(f"{url}/readyz").json()["stages"].items()}
        results: list[tuple[int, str | None]] = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                response = generate(url, "m")
                version = response.json().get("model_version") if response.status_code == 200 else None
                results.append((response.status_code, version))

        threads = [threading.Thread(target=client) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: len(results), lambda n: n >= 6)
            roll_to(live, config, "s3://models/rolling@v2")
            wait_for(lambda: [v for _, v in results[-6:]], lambda last: len(last) == 6 and set(last) == {v2})
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=120)
        statuses = {status for status, _ in results}
        assert statuses == {200}, results
        versions = [v for _, v in results]
        assert versions[0] == v1 and versions[-1] == v2
        # In place: the same replica processes, now holding only the new version once the old one idled out.
        after = httpx.get(f"{url}/readyz").json()
        assert {s: i["pid"] for s, i in after["stages"].items()} == pids
        assert after["models"]["m"]["serving"] == "s3://models/rolling@v2"
        loaded = wait_for(
            lambda: httpx.get(f"{url}/readyz").json()["stages"]["denoiser"]["loaded_versions"],
            lambda versions: list(versions.values()) == [v2],
        )
        assert list(loaded) == ["s3://models/rolling@v2"]

        # A version that does not exist: the old one keeps serving and /readyz says why.
        roll_to(live, config, "s3://models/rolling@v404")
        ready = wait_degraded(url)
        assert "v404" in ready["errors"]["m"]
        response = generate(url, "m")
        assert response.status_code == 200 and response.json()["model_version"] == v2


def test_images_stored_in_s3_come_back_as_presigned_urls(live: LiveService, s3: S3Server, tmp_path: Path) -> None:
    s3.client().create_bucket(Bucket="images")
    base = tiny_config(live.model_dir, tmp_path / "outputs", app_name="s3out", route_prefix="/s3out")
    config = AppConfig.model_validate({**base.to_args(), "outputs": {"store": "s3://images/generated", "ttl_s": 600}})
    with config_app(live, config) as url:
        body = {"prompt": "a kite", "size": "64x64", "steps": 2, "n": 2, "response_format": "url"}
        response = httpx.post(f"{url}/v1/images/generations", json=body, timeout=120)
        assert response.status_code == 200, response.text
        urls = [d["url"] for d in response.json()["data"]]
        assert all(u.startswith(s3.url + "/images/generated/") and "Signature=" in u for u in urls)
        for image_url in urls:
            image = httpx.get(image_url, timeout=30)
            assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
        # The presigned url is what grants access: the same object without a signature is refused.
        assert httpx.get(urls[0].split("?", 1)[0], timeout=30).status_code == 403
