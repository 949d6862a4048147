"""AppConfig: every field documented, YAML round trip, rendering of the Serve config, pure build_app."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from serving.app import deployment_options, render_serve_config
from serving.cli import main
from serving.config import AppConfig, AutoscalingSpec, DeploymentSpec
from serving.stages import CATALOG_SECTIONS


def all_models(model: type[BaseModel], seen: set[type[BaseModel]] | None = None) -> set[type[BaseModel]]:
    seen = seen if seen is not None else set()
    seen.add(model)
    for field in model.model_fields.values():
        for arg in [field.annotation, *getattr(field.annotation, "__args__", ())]:
            if isinstance(arg, type) and issubclass(arg, BaseModel) and arg not in seen:
                all_models(arg, seen)
    return seen


def test_every_config_field_has_a_description() -> None:
    missing = [
        f"{model.__name__}.{name}"
        for model in all_models(AppConfig)
        for name, field in model.model_fields.items()
        if not field.description
    ]
    assert missing == []


def test_yaml_round_trip_and_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "m", "source": "/x"}], "denoiser": {"max_batch_size": 4}}))
    config = AppConfig.from_yaml(path)
    assert config.denoiser.max_batch_size == 4 and config.default_model == "m"
    assert AppConfig.model_validate(config.to_args()) == config
    path.write_text(yaml.safe_dump({"denoiser": {"max_batch_sise": 4}}))
    with pytest.raises(ValidationError):
        AppConfig.from_yaml(path)


def test_inconsistent_settings_are_refused() -> None:
    with pytest.raises(ValidationError):
        AutoscalingSpec(min_replicas=3, max_replicas=2)
    with pytest.raises(ValidationError):
        AppConfig.model_validate({"models": [{"name": "a", "source": "/x"}, {"name": "a", "source": "/y"}]})
    with pytest.raises(ValidationError):
        AppConfig.model_validate({"defaults": {"scheduler": "nope"}})


def test_deployment_options_fixed_and_autoscaled() -> None:
    fixed = deployment_options("X", DeploymentSpec())
    assert fixed["num_replicas"] == 1 and "autoscaling_config" not in fixed
    spec = DeploymentSpec.model_validate(
        {"autoscaling": {"min_replicas": 0, "max_replicas": 4}, "resources": {"num_gpus": 1, "resources": {"g": 1}}}
    )
    scaled = deployment_options("X", spec)
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"]["min_replicas"] == 0
    assert scaled["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0, "resources": {"g": 1.0}}
    # A deployment's own environment variables reach its replicas through Ray's runtime_env.
    traced = deployment_options("X", DeploymentSpec.model_validate({"env": {"OTEL_SERVICE_NAME": "x"}}))
    assert traced["ray_actor_options"]["runtime_env"] == {"env_vars": {"OTEL_SERVICE_NAME": "x"}}


def test_render_serve_config_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "app.yaml"
    source.write_text(yaml.safe_dump({"models": [{"name": "m", "source": "/models/m"}], "http": {"port": 8123}}))
    out = tmp_path / "serve.yaml"
    assert main(["render-serve-config", str(source), "-o", str(out)]) == 0
    rendered = yaml.safe_load(out.read_text())
    app = rendered["applications"][0]
    assert app["import_path"] == "serving.app:build_app"
    assert rendered["http_options"]["port"] == 8123
    # The catalog travels as every deployment's user_config (changed in place), everything else as args.
    assert "models" not in app["args"]
    catalogs = {d["name"]: d["user_config"] for d in app["deployments"]}
    assert set(catalogs) == {"Ingress", "TextEncoder", "Denoiser", "Decoder"}
    assert all(set(c) == set(CATALOG_SECTIONS) for c in catalogs.values())  # each section, empty or not
    assert all(c["models"] == [{"name": "m", "source": "/models/m", "description": ""}] for c in catalogs.values())
    # The deployed stages are written out (build_app sees no catalog in args); the rest round-trips.
    assert app["args"]["stages"] == ["text_encoder", "denoiser", "decoder"]
    from_file = AppConfig.model_validate({**app["args"], **catalogs["Denoiser"]})
    assert from_file.model_copy(update={"stages": None}) == AppConfig.from_yaml(source)
    assert rendered == render_serve_config(AppConfig.from_yaml(source))


def test_build_app_is_pure() -> None:
    """Binding the application starts nothing: no Ray, no model loading."""
    code = (
        "import ray, sys; from serving.app import build_app; "
        "app = build_app({'models': [{'name': 'm', 'source': '/does/not/exist'}]}); "
        "assert not ray.is_initialized(); "
        "assert 'torch' not in sys.modules, 'the ingress side must not import torch'; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_build_app_needs_a_model() -> None:
    from serving.app import build_app

    with pytest.raises(ValueError, match="no models"):
        build_app({"models": []})
    with pytest.raises(ValueError, match="no models"):
        build_app(AppConfig())
    # From a Serve config file the catalog arrives as the deployments' user_config, not in args.
    build_app({"defaults": {"steps": 4}})
