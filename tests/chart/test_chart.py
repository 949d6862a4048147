"""The Helm chart, proven without a cluster: lint, render, schema validation, security invariants, and
agreement of its serveConfigV2 with `sdserve render-serve-config`."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path, PurePosixPath

import jsonschema
import kubernetes_validate
import pytest
import yaml

from serving.app import render_serve_config
from serving.config import AppConfig
from serving.stages import STAGES, Stage, chart_table, deployed_stages
from tests.chart.helpers import (
    CHART,
    CHART_DEFAULTS,
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
SHAPE_ONLY_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "HTTPRoute"}


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
    defaults = ("-f", str(CHART_DEFAULTS))  # so that the schema, not the missing key Secret, is what refuses
    bad = helm("template", "x", str(CHART), *defaults, "--set", "workerGroups.denoiser.gpus=-1", check=False)
    assert bad.returncode != 0 and "gpus" in bad.stderr
    bad = helm("template", "x", str(CHART), *defaults, "--set", "rayService.upgradeStrategy=Sometimes", check=False)
    assert bad.returncode != 0 and "upgradeStrategy" in bad.stderr
    bad = helm("template", "x", str(CHART), *defaults, "--set", "nosuchvalue=1", check=False)
    assert bad.returncode != 0 and "nosuchvalue" in bad.stderr
    bad = helm("template", "x", str(CHART), *defaults, "--set", "auth.nosuchvalue=1", check=False)
    assert bad.returncode != 0 and "nosuchvalue" in bad.stderr


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


def chart_values(values_files: list[Path]) -> dict:
    """The chart's values with these values files laid over them."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for path in values_files:
        values = merged(values, yaml.safe_load(path.read_text()))
    return values


def group_enabled(values: dict, stage: Stage) -> bool:
    """Whether the stage's worker group runs: `workerGroups.<group>` laid over `workerGroupDefaults`."""
    group = merged(values["workerGroupDefaults"], values["workerGroups"].get(stage.worker_group, {}))
    return bool(group["enabled"])


AUTH_KEYS_FILE = "/etc/sdserve/auth/keys.yaml"


def deployed_config(values_files: list[Path]) -> AppConfig:
    """The AppConfig a release with these values files deploys: the values' `config`, plus what the chart pins
    (HTTP on 0.0.0.0:service.httpPort, gRPC per `grpc.enabled`, images under /tmp, which the read-only root
    filesystem leaves writable, each deployed stage on its group's custom resource, the ingress on the
    head's, and API keys per `auth.enabled`)."""
    values = chart_values(values_files)
    pins: dict = {
        "http": {"host": "0.0.0.0", "port": values["service"]["httpPort"]},
        "grpc": {"enabled": values["grpc"]["enabled"], "port": values["service"]["grpcPort"]},
        "outputs": {"directory": "/tmp/sdserve/outputs"},
        "ingress": {"resources": {"resources": {"sdserve_head": 1}}},
    }
    for stage in deployed_stages(AppConfig.model_validate(values["config"])):
        if group_enabled(values, stage):
            pins[stage.name] = {"resources": {"resources": {f"sdserve_{stage.worker_group}": 1}}}
    styles = values["stylePresets"]
    if styles["presets"] or styles["existingConfigMap"]:  # the preset ConfigMap, mounted in every pod
        pins["styles"] = {"directory": "/etc/sdserve/styles"}
    # API keys: the key file of the Secret mounted in every pod, or off (a render with auth on and no Secret fails).
    pins["auth"] = {"enabled": True, "keys_file": AUTH_KEYS_FILE} if values["auth"]["enabled"] else {"enabled": False}
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


def test_stage_table_is_current() -> None:
    """The chart reads the stage table from files/stages.yaml; it must follow serving/stages.py."""
    text = (CHART / "files" / "stages.yaml").read_text()
    assert yaml.safe_load(text) == chart_table(), (
        "regenerate: sdserve render-stage-table -o charts/sdserve/files/stages.yaml"
    )


def test_stages_are_pinned_to_their_groups(rendering: tuple[str, list[dict]]) -> None:
    name, docs = rendering
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    args = serve_config_of(docs)["applications"][0]["args"]
    groups = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"].get("workerGroupSpecs", [])}
    values = chart_values(VALUES_SETS[name])
    deployed = deployed_stages(deployed_config(VALUES_SETS[name]))
    assert {s.worker_group for s in deployed if group_enabled(values, s)} <= set(groups)
    for stage in STAGES.values():
        resource = f"sdserve_{stage.worker_group}"
        if stage in deployed and stage.worker_group in groups:
            assert args[stage.name]["resources"]["resources"] == {resource: 1}
            advertised = json.loads(json.loads(groups[stage.worker_group]["rayStartParams"]["resources"]))
            assert set(advertised) == {resource}
        else:
            assert resource not in json.dumps(args.get(stage.name, {}))
    head_resources = json.loads(
        json.loads(service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["resources"])
    )
    assert set(head_resources) == {"sdserve_head"}
    assert args["ingress"]["resources"]["resources"] == {"sdserve_head": 1}


def test_gpu_limits_follow_values() -> None:
    docs = render(VALUES_SETS["default"])
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


def pdb_groups(docs: list[dict]) -> set[str]:
    return {
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"].removeprefix("worker-")
        for d in docs
        if d["kind"] == "PodDisruptionBudget"
    }


def worker_groups(docs: list[dict]) -> dict[str, dict]:
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    return {g["groupName"]: g for g in service["spec"]["rayClusterConfig"].get("workerGroupSpecs", [])}


def test_worker_groups_and_pdbs_follow_the_stage_table(rendering: tuple[str, list[dict]]) -> None:
    """One worker group (and PDB, when enabled) per enabled group of a deployed stage, in table order."""
    name, docs = rendering
    values = chart_values(VALUES_SETS[name])
    deployed = deployed_stages(deployed_config(VALUES_SETS[name]))
    expected = list(dict.fromkeys(s.worker_group for s in deployed if group_enabled(values, s)))
    extra = [g for g, spec in sorted(values["additionalWorkerGroups"].items()) if not spec.get("disabled")]
    assert list(worker_groups(docs)) == expected + extra
    assert pdb_groups(docs) == (set(expected) if values["podDisruptionBudget"]["enabled"] else set())
    names = [d["name"] for d in serve_config_of(docs)["applications"][0]["deployments"]]
    assert names == ["Ingress"] + [s.deployment for s in deployed]


def test_a_worker_group_entry_naming_no_stage_fails() -> None:
    defaults = ("-f", str(CHART_DEFAULTS))
    bad = helm("template", "x", str(CHART), *defaults, "--set", "workerGroups.encodr.gpus=0", check=False)
    assert bad.returncode != 0 and "workerGroups.encodr" in bad.stderr and "additionalWorkerGroups" in bad.stderr
    bad = helm("template", "x", str(CHART), *defaults, "--set", "additionalWorkerGroups.denoiser.gpus=0", check=False)
    assert bad.returncode != 0 and "additionalWorkerGroups.denoiser" in bad.stderr


UPSCALER = {"name": "upscaler", "deployment": "Upscaler", "workerGroup": "upscaler", "catalog": "upscalers"}


def test_a_new_stage_needs_no_template_change(tmp_path: Path) -> None:
    """A row appended to the chart's stage table (an optional upscaler stage with its own catalog section)
    deploys, pins, groups and budgets the stage from the table alone: the templates are the shipped ones."""
    chart = tmp_path / "sdserve"
    shutil.copytree(CHART, chart)
    table = yaml.safe_load((chart / "files" / "stages.yaml").read_text())
    # The table as it would be without such a stage (the real one may have it already), plus the fake row.
    table["stages"] = [row for row in table["stages"] if row["name"] != UPSCALER["name"]]
    table["catalogs"] = [c for c in table["catalogs"] if c != UPSCALER["catalog"]] + [UPSCALER["catalog"]]
    table["stages"].append(UPSCALER | {"optional": True})
    (chart / "files" / "stages.yaml").write_text(yaml.safe_dump(table, sort_keys=False))
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["workerGroupDefaults"]
    always = [row["deployment"] for row in table["stages"] if not row["optional"]]
    always_groups = list(dict.fromkeys(row["workerGroup"] for row in table["stages"] if not row["optional"]))

    # No upscaler in the catalog: no Upscaler deployment, group or PDB; the empty section is still user_config.
    docs = render(VALUES_SETS["default"], sets=["config.upscalers=[]"], chart=chart)
    app = serve_config_of(docs)["applications"][0]
    assert [d["name"] for d in app["deployments"]] == ["Ingress", *always]
    assert all(d["user_config"]["upscalers"] == [] for d in app["deployments"])
    assert "upscalers" not in app["args"] and "sdserve_upscaler" not in json.dumps(app["args"])
    assert "upscaler" not in worker_groups(docs) and "upscaler" not in pdb_groups(docs)

    # One upscaler: its deployment, a group from workerGroupDefaults, its PDB, and the pin.
    docs = render(
        VALUES_SETS["default"], sets=['config.upscalers=[{"name": "x4", "source": "/models/x4"}]'], chart=chart
    )
    app = serve_config_of(docs)["applications"][0]
    assert [d["name"] for d in app["deployments"]] == ["Ingress", *always, "Upscaler"]
    for deployment in app["deployments"]:
        assert deployment["user_config"]["upscalers"] == [{"name": "x4", "source": "/models/x4", "description": ""}]
        assert [m["name"] for m in deployment["user_config"]["models"]] == ["sd15"]
    assert "upscalers" not in app["args"] and "models" not in app["args"]
    assert app["args"]["upscaler"]["resources"]["resources"] == {"sdserve_upscaler": 1}
    groups = worker_groups(docs)
    assert list(groups) == [*always_groups, "upscaler"]
    group = groups["upscaler"]
    assert json.loads(json.loads(group["rayStartParams"]["resources"])) == {"sdserve_upscaler": defaults["slots"]}
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (
        defaults["replicas"],
        defaults["minReplicas"],
        defaults["maxReplicas"],
    )
    pod = group["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == defaults["gpus"]
    assert pod["tolerations"] == defaults["tolerations"]
    assert group["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "worker-upscaler"
    assert "upscaler" in pdb_groups(docs)
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    jsonschema.validate(service, crd_schema("RayService"))

    # Its group takes values like any other, and off it is neither rendered nor pinned.
    docs = render(
        VALUES_SETS["default"],
        sets=['config.upscalers=[{"name": "x4", "source": "/models/x4"}]', "workerGroups.upscaler.enabled=false"],
        chart=chart,
    )
    assert "upscaler" not in worker_groups(docs) and "upscaler" not in pdb_groups(docs)
    app = serve_config_of(docs)["applications"][0]
    assert "Upscaler" in [d["name"] for d in app["deployments"]]
    assert "sdserve_upscaler" not in json.dumps(app["args"])


def test_additional_worker_groups() -> None:
    """Extra groups render when not disabled, over workerGroupDefaults, and advertise no stage resource."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    (example,) = values["additionalWorkerGroups"]
    assert values["additionalWorkerGroups"][example]["disabled"] is True
    assert example not in worker_groups(render(VALUES_SETS["default"]))

    docs = render(
        VALUES_SETS["default"],
        sets=[f"additionalWorkerGroups.{example}.disabled=false", 'additionalWorkerGroups.spot={"gpus": 0}'],
    )
    groups = worker_groups(docs)
    stage_groups = [g for g in groups if g not in (example, "spot")]
    assert stage_groups and list(groups) == [*stage_groups, example, "spot"]
    advertised = json.loads(json.loads(groups[example]["rayStartParams"]["resources"]))
    assert advertised == json.loads(
        json.loads(values["additionalWorkerGroups"][example]["rayStartParams"]["resources"])
    )
    assert not any(k.startswith("sdserve_") for k in advertised)
    assert "resources" not in groups["spot"]["rayStartParams"]
    spot = groups["spot"]["template"]["spec"]
    assert spot["containers"][0]["resources"]["requests"] == values["workerGroupDefaults"]["resources"]["requests"]
    assert "nvidia.com/gpu" not in spot["containers"][0]["resources"]["limits"]
    assert groups["spot"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "worker-spot"
    assert pdb_groups(docs) == set(stage_groups)
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    jsonschema.validate(service, crd_schema("RayService"))
    defaults = ("-f", str(CHART_DEFAULTS))
    bad = helm("template", "x", str(CHART), *defaults, "--set", "additionalWorkerGroups.bad_name.gpus=0", check=False)
    assert bad.returncode != 0 and "bad_name" in bad.stderr


def test_style_presets_are_files_of_a_mounted_configmap() -> None:
    """Each preset of `stylePresets.presets` is one `<name>.yaml` of the ConfigMap, a valid PresetSpec; every
    Ray pod mounts it where the config's `styles.directory` points."""
    from serving.config import PresetSpec

    docs = render(VALUES_SETS["full-values"])
    values = chart_values(VALUES_SETS["full-values"])
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-styles")]
    assert set(configmap["data"]) == {f"{name}.yaml" for name in values["stylePresets"]["presets"]}
    for name, text in configmap["data"].items():
        assert PresetSpec.model_validate(yaml.safe_load(text)).name == name.removesuffix(".yaml")
    assert deployed_config(VALUES_SETS["full-values"]).styles.directory == "/etc/sdserve/styles"
    pods = [pod for doc in docs for pod in pod_templates(doc)]
    assert pods
    for pod in pods:
        (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "styles"]
        assert volume["configMap"]["name"] == configmap["metadata"]["name"]
        mounts = [m for c in pod["spec"]["containers"] for m in c.get("volumeMounts", []) if m["name"] == "styles"]
        assert mounts and all(m["mountPath"] == "/etc/sdserve/styles" and m["readOnly"] for m in mounts)
    minimal = render(VALUES_SETS["minimal-values"])
    assert not [d for d in minimal if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-styles")]


def test_bare_render_asks_for_api_keys() -> None:
    """Auth is on by default: without the key file's Secret the chart does not render, and the error says how to
    make keys, how to store them, and how to choose an open service instead; off, it renders. (`helm lint` lets
    a template's `fail` through by design, so only rendering is checked.)"""
    bare = helm("template", "x", str(CHART), "--namespace", "images", check=False)
    assert bare.returncode != 0
    for advice in (
        "auth.existingSecret is empty",
        "sdserve keys create --tenant <name>",
        "kubectl -n images create secret generic sdserve-api-keys --from-file=keys.yaml=keys.yaml",
        "--set auth.existingSecret=sdserve-api-keys",
        "auth.enabled=false",
    ):
        assert advice in bare.stderr, bare.stderr
    docs = render(sets=['auth={"enabled": false}'])
    assert serve_config_of(docs)["applications"][0]["args"]["auth"]["enabled"] is False


def test_value_sets_cover_auth_on_and_off() -> None:
    """test_api_keys_come_from_the_mounted_secret sees both cases, and a non-default Secret item."""
    auths = [chart_values(files)["auth"] for files in VALUES_SETS.values()]
    assert {a["enabled"] for a in auths} == {True, False}
    assert any(a["enabled"] and a["key"] != "keys.yaml" for a in auths)


def test_api_keys_come_from_the_mounted_secret(rendering: tuple[str, list[dict]]) -> None:
    """With `auth.existingSecret`, every Ray pod mounts the Secret's key file (item `auth.key`) read-only where the
    served config's `auth.keys_file` points, as a directory (a subPath mount would never see a rotated Secret),
    and auth is on; with `auth.enabled: false` nothing is mounted and auth is off. No environment variable
    promises keys that no code reads."""
    name, docs = rendering
    auth = chart_values(VALUES_SETS[name])["auth"]
    served = serve_config_of(docs)["applications"][0]["args"]["auth"]
    assert served["enabled"] is auth["enabled"]
    pods = [pod for doc in docs for pod in pod_templates(doc)]
    assert pods
    for pod in pods:
        secrets = [v for v in pod["spec"]["volumes"] if "secret" in v]
        containers = pod["spec"]["containers"]
        assert containers
        assert not [e for c in containers for e in c.get("env", []) if e["name"] == "SDSERVE_API_KEYS"]
        if not auth["enabled"]:
            assert not secrets
            continue
        (volume,) = secrets
        assert volume["secret"]["secretName"] == auth["existingSecret"]
        (item,) = volume["secret"]["items"]
        assert item["key"] == auth["key"]
        for container in containers:
            (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
            assert mount["readOnly"] is True and "subPath" not in mount
            assert PurePosixPath(mount["mountPath"]) / item["path"] == PurePosixPath(served["keys_file"])


def test_notes_warn_when_the_service_is_open() -> None:
    """NOTES.txt says a release without API keys is open to anyone who reaches it; with keys, it shows the header."""

    def notes(values: list[Path]) -> str:
        args = ["install", "x", str(CHART), "--dry-run=client"] + [a for v in values for a in ("-f", str(v))]
        out = helm(*args).stdout
        return out[out.index("NOTES:") :]

    open_notes = notes(VALUES_SETS["ci-values"])
    assert "API keys are off" in open_notes and "open to anyone who reaches it" in open_notes
    assert "Authorization" not in open_notes
    keyed = notes(VALUES_SETS["minimal-values"])
    assert "Authorization: Bearer" in keyed and "sdserve-api-keys" in keyed and "open to anyone" not in keyed


def test_tracing_values_become_otel_env_of_every_ray_container() -> None:
    """`tracing.endpoint` set: every Ray container (head and each worker group) gets the standard OTEL_* variables;
    unset (the default): none, so the service records no spans."""

    def ray_containers(docs: list[dict]) -> list[dict]:
        (service,) = [d for d in docs if d["kind"] == "RayService"]
        cluster = service["spec"]["rayClusterConfig"]
        specs = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        return [c for spec in specs for c in spec["template"]["spec"]["containers"]]

    def otel(container: dict) -> dict[str, object]:
        return {
            e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"] if e["name"].startswith("OTEL_")
        }

    assert all(otel(c) == {} for c in ray_containers(render(VALUES_SETS["default"])))
    tracing = {
        "endpoint": "http://otel-collector.observability:4318",
        "sampler": "parentbased_traceidratio",
        "samplerArg": "0.25",
        "resourceAttributes": {"deployment.environment": "prod", "team": "images"},
        "existingSecret": "otlp-auth",
    }
    containers = ray_containers(render(VALUES_SETS["default"], sets=[f"tracing={json.dumps(tracing)}"]))
    assert len(containers) >= 2
    for container in containers:
        assert otel(container) == {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability:4318",
            "OTEL_SERVICE_NAME": "sdserve",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,team=images",
            "OTEL_EXPORTER_OTLP_HEADERS": {"secretKeyRef": {"name": "otlp-auth", "key": "headers"}},
        }
    # Not a URL: the schema refuses it before anything renders.
    refused = helm(
        "template", "x", str(CHART), "-f", str(CHART_DEFAULTS), "--set", "tracing.endpoint=c:4318", check=False
    )
    assert refused.returncode != 0 and "tracing" in refused.stderr


def test_lora_catalog_is_every_deployments_user_config() -> None:
    """`config.loras` travels as user_config (changed without restarts), like the other catalog sections; the
    adapter settings are args."""
    lora = {"name": "ink", "source": "s3://models/loras/ink@v3"}
    docs = render(VALUES_SETS["default"], sets=[f"config.loras=[{json.dumps(lora)}]", "config.lora.slots=4"])
    app = serve_config_of(docs)["applications"][0]
    assert all(d["user_config"]["loras"] == [lora | {"description": ""}] for d in app["deployments"])
    assert "loras" not in app["args"] and app["args"]["lora"]["slots"] == 4
