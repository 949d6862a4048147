"""kustomize base and overlays: generated from the chart, in sync, buildable, valid and restricted."""

from __future__ import annotations

import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.chart.helpers import KUBERNETES_VERSION, ROOT, crd_schema, pod_templates, render, tool

K8S = ROOT / "k8s"
TARGETS = ["base", "overlays/dev-cpu", "overlays/prod-gpu"]


def build(target: str) -> list[dict]:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_generated_files_are_in_sync(tmp_path: Path) -> None:
    from k8s.generate import generate

    for path in generate(tmp_path):
        committed = K8S / path.relative_to(tmp_path)
        assert committed.read_text() == path.read_text(), f"{committed} is stale; run `make k8s`"


@pytest.mark.parametrize("target", TARGETS)
def test_builds_validate_and_are_restricted(target: str) -> None:
    docs = build(target)
    assert {d["kind"] for d in docs} >= {"RayService", "Service", "NetworkPolicy", "ServiceAccount"}
    for obj in docs:
        if obj["apiVersion"] == "ray.io/v1":
            jsonschema.validate(obj, crd_schema(obj["kind"]))
        elif obj["kind"] in ("PodMonitor", "ServiceMonitor"):
            assert obj["spec"]["selector"]
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        for template in pod_templates(obj):
            for container in template["spec"]["containers"]:
                assert container["securityContext"]["readOnlyRootFilesystem"] is True
                assert container["resources"]["limits"]
    if target != "base":
        assert all(d["metadata"].get("namespace") for d in docs)


@pytest.mark.parametrize("overlay", ["dev-cpu", "prod-gpu"])
def test_overlay_rayservice_equals_the_chart_rendering(overlay: str) -> None:
    (built,) = [d for d in build(f"overlays/{overlay}") if d["kind"] == "RayService"]
    (expected,) = [d for d in render([K8S / "overlays" / overlay / "values.yaml"]) if d["kind"] == "RayService"]
    assert built["spec"] == expected["spec"]


def test_dev_cpu_asks_for_no_gpu() -> None:
    text = yaml.safe_dump_all(build("overlays/dev-cpu"))
    assert "nvidia.com/gpu" not in text
    (service,) = [d for d in build("overlays/dev-cpu") if d["kind"] == "RayService"]
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert all(args[s]["resources"]["num_gpus"] == 0 for s in ("text_encoder", "denoiser", "decoder"))
