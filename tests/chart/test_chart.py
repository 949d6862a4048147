"""The Helm chart, proven without a cluster: lint, render, schema validation, security invariants, and
agreement of its serveConfigV2 with `sdserve render-serve-config`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from serving.app import render_serve_config
from serving.config import AppConfig
from tests.chart.helpers import (
    CHART,
    KUBERAY_SCHEMAS,
    KUBERNETES_VERSION,
    VALUES_SETS,
    crd_schema,
    helm,
    pod_templates,
    render,
)

VALUE_SET_IDS = sorted(VALUES_SETS)
# Kinds from CRDs whose schemas are not available here: checked for shape only.
SHAPE_ONLY_KINDS = {"ServiceMonitor", "PodMonitor", "HTTPRoute"}


@pytest.fixture(scope="module", params=VALUE_SET_IDS)
def rendering(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    return request.param, render(VALUES_SETS[request.param])


@pytest.mark.parametrize("name", VALUE_SET_IDS)
def test_helm_lint(name: str) -> None:
    args = ["lint", "--strict", str(CHART)]
    for v in VALUES_SETS[name]:
        args += ["-f", str(v)]
    result = helm(*args, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_object_validates(rendering: tuple[str, list[dict]]) -> None:
    if not KUBERAY_SCHEMAS.is_dir():
        pytest.fail(f"KubeRay CRD schemas not found at {KUBERAY_SCHEMAS} (set SDSERVE_KUBERAY_SCHEMAS)")
    _, docs = rendering
    for obj in docs:
        if obj["apiVersion"] == "ray.io/v1":
            jsonschema.validate(obj, crd_schema(obj["kind"]))
        elif obj["kind"] in SHAPE_ONLY_KINDS:
            assert obj["metadata"]["name"] and isinstance(obj["spec"], dict)
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_values_schema_rejects_bad_values() -> None:
    bad = helm("template", "x", str(CHART), "--set", "workerGroups.denoiser.gpus=-1", check=False)
    assert bad.returncode != 0 and "gpus" in bad.stderr
    bad = helm("template", "x", str(CHART), "--set", "rayService.upgradeStrategy=Sometimes", check=False)
    assert bad.returncode != 0
    bad = helm("template", "x", str(CHART), "--set", "nosuchvalue=1", check=False)
    assert bad.returncode != 0


def test_pods_are_restricted_and_sized(rendering: tuple[str, list[dict]]) -> None:
    _, docs = rendering
    templates = [t for obj in docs for t in pod_templates(obj)]
    assert templates
    for template in templates:
        spec = template["spec"]
        assert spec["automountServiceAccountToken"] is False
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
        mounts_needed = {"/tmp", "/dev/shm"}
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert sc["runAsNonRoot"] is True
            assert container["resources"]["requests"] and container["resources"]["limits"]
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert mounts_needed <= mounts and any("cache" in m for m in mounts)


def test_no_service_exposes_ray_internal_ports(rendering: tuple[str, list[dict]]) -> None:
    _, docs = rendering
    for obj in docs:
        if obj["kind"] == "Service":
            ports = {p["port"] for p in obj["spec"]["ports"]} | {p.get("targetPort") for p in obj["spec"]["ports"]}
            assert not ports & {8265, 10001, 6379, "dashboard", "client", "gcs"}


SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|ACCESS_KEY|API_KEY)", re.IGNORECASE)


def test_no_secret_literals(rendering: tuple[str, list[dict]]) -> None:
    _, docs = rendering
    assert not [obj for obj in docs if obj["kind"] == "Secret"]
    for obj in docs:
        for template in pod_templates(obj):
            for container in template["spec"]["containers"]:
                for env in container.get("env", []):
                    if SECRET_NAME.search(env["name"]):
                        assert "value" not in env and "secretKeyRef" in env["valueFrom"], env


def test_network_policy_admits_only_api_metrics_and_operator() -> None:
    docs = render(VALUES_SETS["full-values"])
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    external_ports = set()
    for rule in policy["spec"]["ingress"]:
        peers = rule.get("from", [])
        from_own_pods = peers and all("podSelector" in p and "namespaceSelector" not in p for p in peers)
        if from_own_pods:
            continue
        ports = {p["port"] for p in rule.get("ports", [])}
        assert ports, "every rule from outside the release names its ports"
        external_ports |= ports
    assert external_ports == {8000, 9000, 8080, 8265}
    (operator_rule,) = [r for r in policy["spec"]["ingress"] if {p["port"] for p in r.get("ports", [])} == {8265}]
    assert operator_rule["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "kuberay-system"
    }
    assert all(p["port"] != 10001 for r in policy["spec"]["ingress"] for p in r.get("ports", []))


def serve_config_of(docs: list[dict]) -> dict:
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    parsed: dict = yaml.safe_load(service["spec"]["serveConfigV2"])
    return parsed


def merged(base: dict, override: dict) -> dict:
    """``override`` laid over ``base`` the way Helm coalesces values: maps merge, anything else replaces."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deployed_config(values_files: list[Path]) -> AppConfig:
    """The AppConfig a release with these values files deploys: the values' `config`, plus what the chart pins
    (HTTP on 0.0.0.0:service.httpPort, gRPC per `grpc.enabled`, images under /tmp, which the read-only root
    filesystem leaves writable, and each stage on its group's custom resource, the ingress on the head's)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for path in values_files:
        values = merged(values, yaml.safe_load(path.read_text()))
    pins: dict = {
        "http": {"host": "0.0.0.0", "port": values["service"]["httpPort"]},
        "grpc": {"enabled": values["grpc"]["enabled"], "port": values["service"]["grpcPort"]},
        "outputs": {"directory": "/tmp/sdserve/outputs"},
        "ingress": {"resources": {"resources": {"sdserve_head": 1}}},
    }
    for stage, group in (("text_encoder", "encoder"), ("denoiser", "denoiser"), ("decoder", "decoder")):
        if values["workerGroups"][group]["enabled"]:
            pins[stage] = {"resources": {"resources": {f"sdserve_{group}": 1}}}
    return AppConfig.model_validate(merged(values["config"], pins))


def test_serve_config_matches_the_renderer(rendering: tuple[str, list[dict]]) -> None:
    """The chart's serveConfigV2 is exactly what `sdserve render-serve-config` writes for the settings its
    values describe: a setting the chart drops, renames or changes shows up as a difference."""
    name, docs = rendering
    chart_config = serve_config_of(docs)
    expected = render_serve_config(deployed_config(VALUES_SETS[name]))
    assert chart_config == expected
    assert "runtime_env" not in json.dumps(chart_config)


def test_chart_serve_config_base_is_current() -> None:
    """The chart renders onto the renderer's output for an empty AppConfig; it must follow serving/config.py."""
    base = yaml.safe_load((CHART / "files" / "serve-config-defaults.yaml").read_text())
    assert base == render_serve_config(AppConfig()), (
        "regenerate: sdserve render-serve-config /dev/null -o charts/sdserve/files/serve-config-defaults.yaml"
    )


def test_stages_are_pinned_to_their_groups(rendering: tuple[str, list[dict]]) -> None:
    _, docs = rendering
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    args = serve_config_of(docs)["applications"][0]["args"]
    groups = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"].get("workerGroupSpecs", [])}
    for stage, group in (("text_encoder", "encoder"), ("denoiser", "denoiser"), ("decoder", "decoder")):
        resource = f"sdserve_{group}"
        if group in groups:
            assert args[stage]["resources"]["resources"] == {resource: 1}
            advertised = json.loads(json.loads(groups[group]["rayStartParams"]["resources"]))
            assert set(advertised) == {resource}
        else:
            assert resource not in json.dumps(args.get(stage, {}))
    head_resources = json.loads(
        json.loads(service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["resources"])
    )
    assert set(head_resources) == {"sdserve_head"}
    assert args["ingress"]["resources"]["resources"] == {"sdserve_head": 1}


def test_gpu_limits_follow_values() -> None:
    docs = render()
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    cluster = service["spec"]["rayClusterConfig"]
    head_limits = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits
    for group in cluster["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == 1
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["upscalingMode"] == "Default"
    assert service["spec"]["upgradeStrategy"]["type"] == "None"
    cpu = render(VALUES_SETS["ci-values"])
    (cpu_service,) = [d for d in cpu if d["kind"] == "RayService"]
    for group in cpu_service["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        assert "nvidia.com/gpu" not in group["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_chart_readme_documents_every_value() -> None:
    from tests.chart.values_doc import documented_values, values_table

    readme = (CHART / "README.md").read_text()
    start = readme.index("<!-- values:start -->") + len("<!-- values:start -->")
    end = readme.index("<!-- values:end -->")
    assert readme[start:end].strip() == values_table(), "regenerate with `python -m tests.chart.values_doc`"
    documented = {key for key, _, _ in documented_values()}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    # Every top-level value, and every value of each group, carries a `# --` comment.
    for key, node in values.items():
        if isinstance(node, dict) and key not in documented:
            for child, grand in node.items():
                if isinstance(grand, dict) and f"{key}.{child}" not in documented:
                    assert all(f"{key}.{child}.{g}" in documented for g in grand), f"{key}.{child}"
                else:
                    assert f"{key}.{child}" in documented or isinstance(grand, dict), f"{key}.{child}"
        else:
            assert key in documented, key


def test_dockerfile_passes_hadolint() -> None:
    import subprocess

    from tests.chart.helpers import ROOT, tool

    result = subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert "USER 1000" in text and "AS gpu" in text and "AS cpu" in text


def test_chart_is_self_contained(tmp_path: Path) -> None:
    result = helm("package", str(CHART), "-d", str(tmp_path))
    assert result.returncode == 0 and list(tmp_path.glob("sdserve-*.tgz"))
