"""The chart's alerts and Grafana dashboard without a cluster: the PrometheusRule passes `promtool check rules`, each
alert fires on the condition it names (`promtool test rules` on synthetic series) and stays quiet otherwise, the
dashboard JSON is what its generator writes, and the operator kinds render only when asked for.

tests/integration/test_prometheus.py runs the same rules and every dashboard query on a real Prometheus scraping
a running service."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path
from types import ModuleType

import yaml

from tests.chart.helpers import CHART, VALUES_SETS, helm, render, tool

WITH_ALERTS = ['metrics={"prometheusRule": {"enabled": true}, "grafanaDashboard": {"enabled": true}}']
OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def rule_groups(sets: list[str] | None = None) -> list[dict]:
    """The `spec.groups` of the chart's PrometheusRule (the format of a Prometheus rule file)."""
    docs = render(VALUES_SETS["default"], sets=WITH_ALERTS + (sets or []))
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    groups: list[dict] = rule["spec"]["groups"]
    return groups


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=60)


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dashboard_generate", CHART / "dashboards" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_operator_kinds_and_dashboard_render_only_when_enabled() -> None:
    """A default install needs no Prometheus Operator CRDs; enabled, each object comes once, with its labels."""
    default = render(VALUES_SETS["default"])
    assert not {d["kind"] for d in default} & OPERATOR_KINDS
    assert not [d for d in default if d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert not [d for d in default if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]

    docs = render(
        VALUES_SETS["default"],
        sets=[
            'metrics={"prometheusRule": {"enabled": true, "labels": {"release": "prom"}}, "grafanaDashboard": '
            '{"enabled": true, "namespace": "grafana", "labels": {"dashboards": "sdserve"}, '
            '"annotations": {"grafana_folder": "Serving"}}}'
        ],
    )
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["labels"]["release"] == "prom"
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    assert configmap["metadata"]["namespace"] == "grafana"
    # Helm merges maps: given labels come beside the sidecar's default one (`grafana_dashboard: null` drops it).
    assert configmap["metadata"]["labels"]["dashboards"] == "sdserve"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Serving"}

    (default_map,) = [
        d
        for d in render(VALUES_SETS["default"], sets=WITH_ALERTS)
        if d["kind"] == "ConfigMap" and "dashboard" in d["metadata"]["name"]
    ]
    assert default_map["metadata"]["labels"]["grafana_dashboard"] == "1"  # the sidecar's default label
    assert json.loads(default_map["data"]["sdserve.json"]) == json.loads(
        (CHART / "dashboards" / "sdserve.json").read_text()
    )


def test_rules_pass_promtool(tmp_path: Path) -> None:
    for sets in ([], ['metrics.prometheusRule.selector="namespace=\\"images\\", application=\\"sdserve\\""']):
        path = tmp_path / "rules.yaml"
        path.write_text(yaml.safe_dump({"groups": rule_groups(sets)}))
        result = promtool("check", "rules", str(path))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS: 5 rules found" in result.stdout, result.stdout
    groups = rule_groups(['metrics.prometheusRule.selector="namespace=\\"images\\""'])
    for rule in groups[0]["rules"]:
        assert 'namespace="images"' in rule["expr"], rule["alert"]


LABELS = 'namespace="images", application="sdserve"'
STAGE = {"namespace": "images", "application": "sdserve"}


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    extra = "".join(f', {k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{LABELS}{extra}}}", "values": values}


def test_each_alert_fires_on_its_condition(tmp_path: Path) -> None:
    """Synthetic series at one-minute steps, the chart's default thresholds: each alert fires for the stage, route
    or deployment in trouble (after its `for`) and for nothing else."""
    groups = rule_groups()
    for rule in groups[0]["rules"]:
        rule.pop("annotations")  # their templates are checked by promtool check rules; here: when alerts fire
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    bucket = "ray_sdserve_http_request_latency_seconds_bucket"
    slow, fast = {"route": "/v1/images/generations"}, {"route": "/v1/models"}
    input_series = [
        # Denoiser: 20 waiting on its one replica; decoder: 2 waiting.
        series("ray_sdserve_stage_queue_depth", "20x20", stage="denoiser", replica="d1"),
        series("ray_sdserve_stage_replicas", "1x20", stage="denoiser", replica="d1"),
        series("ray_sdserve_stage_queue_depth", "2x20", stage="decoder", replica="v1"),
        series("ray_sdserve_stage_replicas", "1x20", stage="decoder", replica="v1"),
        # One in three responses is a 500.
        series("ray_sdserve_http_requests_total", "0+10x20", route="/v1/images/generations", status="200"),
        series("ray_sdserve_http_requests_total", "0+5x20", route="/v1/images/generations", status="500"),
        # Generations take 60 to 120 s; model listings under a second.
        series(bucket, "0x20", le="60", **slow),
        series(bucket, "0+10x20", le="120", **slow),
        series(bucket, "0+10x20", le="+Inf", **slow),
        series(bucket, "0+10x20", le="1", **fast),
        series(bucket, "0+10x20", le="+Inf", **fast),
        # Five text-encoder replicas came and went in the first minutes; one stays.
        *[series("ray_sdserve_stage_replicas", "1 1", stage="text_encoder", replica=f"t{i}") for i in range(5)],
        series("ray_sdserve_stage_replicas", "1x20", stage="text_encoder", replica="t-last"),
        # The Denoiser deployment cannot start replicas (DEPLOY_FAILED); the Decoder is HEALTHY.
        series("ray_serve_deployment_status", "1x20", deployment="Denoiser"),
        series("ray_serve_deployment_status", "6x20", deployment="Decoder"),
        # An upscaler replica failed to load one of its artifacts (the others serve); the decoder's loaded all.
        series("ray_sdserve_model_load_errors", "1x20", stage="upscaler", replica="u1"),
        series("ray_sdserve_model_load_errors", "0x20", stage="decoder", replica="v1"),
    ]
    warning = {"severity": "warning"}
    alerts = [
        ("SdserveStageQueueDepthHigh", [STAGE | {"stage": "denoiser"}]),
        ("SdserveHttpErrorRatioHigh", [STAGE]),
        ("SdserveLatencyP99High", [STAGE | slow]),
        ("SdserveReplicasFlapping", [STAGE | {"stage": "text_encoder"}]),
        ("SdserveModelVersionDegraded", [STAGE | {"deployment": "Denoiser"}, STAGE | {"stage": "upscaler"}]),
    ]
    assert sorted(name for name, _ in alerts) == sorted(rule["alert"] for rule in groups[0]["rules"])
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": input_series,
                "alert_rule_test": [
                    {
                        "eval_time": "15m",
                        "alertname": name,
                        "exp_alerts": [{"exp_labels": labels | warning} for labels in expected],
                    }
                    for name, expected in alerts
                ]
                # Before their `for` has passed, the slower alerts are not firing yet.
                + [
                    {"eval_time": "2m", "alertname": name, "exp_alerts": []}
                    for name in ("SdserveStageQueueDepthHigh", "SdserveLatencyP99High", "SdserveModelVersionDegraded")
                ],
            },
            {
                # Requests refused with model_unavailable (an artifact with no loaded version) fire it too.
                "interval": "1m",
                "input_series": [series("ray_sdserve_errors_total", "0+2x20", code="model_unavailable")],
                "alert_rule_test": [
                    {
                        "eval_time": "15m",
                        "alertname": "SdserveModelVersionDegraded",
                        "exp_alerts": [{"exp_labels": STAGE | warning}],
                    }
                ],
            },
        ],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = promtool("test", "rules", str(tmp_path / "tests.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_json_is_current() -> None:
    """The committed dashboard is what the generator (grafana-foundation-sdk) writes."""
    committed = (CHART / "dashboards" / "sdserve.json").read_text()
    assert committed == generator().render(), "regenerate: python charts/sdserve/dashboards/generate.py"


def test_dashboard_covers_what_operators_watch() -> None:
    """Per-stage queue depth, replicas and batch size, latency percentiles, images/s and errors by code; every
    panel reads Prometheus through the datasource variable."""
    board = json.loads((CHART / "dashboards" / "sdserve.json").read_text())
    panels = [p for p in board["panels"] if p["type"] != "row"]
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in panels}
    wanted = {
        "ray_sdserve_stage_queue_depth": "stage",
        "ray_sdserve_stage_replicas": "stage",
        "ray_sdserve_stage_batch_size": "stage",
        "ray_sdserve_stage_latency_seconds_bucket": "stage",
        "ray_sdserve_http_request_latency_seconds_bucket": "route",
        "ray_sdserve_images_generated_total": "model",
        "ray_sdserve_errors_total": "code",
    }
    for metric, label in wanted.items():
        assert any(metric in e and f"by ({label}" in e for e in exprs.values()), metric
    assert all(f"histogram_quantile({q}" in " ".join(exprs.values()) for q in (0.5, 0.95, 0.99))
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "namespace", "application"}


def api_rule(policy: dict) -> dict:
    (rule,) = [r for r in policy["spec"]["ingress"] if 8000 in {p["port"] for p in r.get("ports", [])}]
    return rule


def network_policy(sets: list[str] | None = None) -> dict:
    (policy,) = [d for d in render(VALUES_SETS["default"], sets=sets) if d["kind"] == "NetworkPolicy"]
    return policy


def test_api_ports_admit_only_labelled_clients_by_default() -> None:
    """By default the API ports (8000, 9000) admit pods labelled sdserve.io/api-client=true (any namespace) and
    namespaces with that label (the ingress controller's), never any source; `apiFrom: []` is the explicit open
    choice, and a list of peers replaces the default."""
    rule = api_rule(network_policy())
    assert {p["port"] for p in rule["ports"]} == {8000, 9000}
    client = {"matchLabels": {"sdserve.io/api-client": "true"}}
    assert rule["from"] == [{"namespaceSelector": {}, "podSelector": client}, {"namespaceSelector": client}]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["networkPolicy"]["apiFrom"] == rule["from"]

    assert "from" not in api_rule(network_policy(["networkPolicy.apiFrom=[]"]))  # any source, asked for
    gateway = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway-system"}}}
    assert api_rule(network_policy([f"networkPolicy.apiFrom=[{json.dumps(gateway)}]"]))["from"] == [gateway]
    bad = render_fails(['networkPolicy.apiFrom=[{"namespace": "x"}]'])
    assert "apiFrom" in bad


def test_notes_say_who_may_reach_the_api() -> None:
    def notes(*sets: str) -> str:
        args = ["install", "x", str(CHART), "--dry-run=client", "-f", str(VALUES_SETS["default"][0])]
        out = helm(*args, *[a for s in sets for a in ("--set-json", s)]).stdout
        return out[out.index("NOTES:") :]

    assert "kubectl label namespace <namespace> sdserve.io/api-client=true" in notes()
    assert "sdserve.io/api-client" not in notes("networkPolicy.apiFrom=[]")
    assert "sdserve.io/api-client" not in notes('networkPolicy={"enabled": false}')


def render_fails(sets: list[str]) -> str:
    args = ["template", "x", str(CHART), "-f", str(VALUES_SETS["default"][0])]
    for s in sets:
        args += ["--set-json", s]
    result = helm(*args, check=False)
    assert result.returncode != 0
    return result.stderr
