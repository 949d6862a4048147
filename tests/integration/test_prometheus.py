"""A real Prometheus (Debian's, `make prometheus`) scrapes the running service's metrics port, evaluates the chart's
alert rules and runs every query of the chart's Grafana dashboard: each series they name is one the service
exports, each rule evaluates without error, and an alert with its threshold at zero fires."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import yaml

from tests.chart.helpers import CHART, VALUES_SETS, render
from tests.integration.conftest import LiveService

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The chart's rules with their defaults, and a second group whose latency alert has a zero threshold and no `for`:
# it fires as soon as Prometheus has two scrapes of a request's latency, which proves the rules see live data.
PROBE = {"latencyP99": {"seconds": 0, "for": "0m"}, "alertLabels": {"probe": "zero-threshold"}}
STAGES = {"text_encoder", "denoiser", "decoder", "safety", "upscaler"}  # the live app deploys all five
DEADLINE_S = 45.0  # Ray's metrics agent re-exports every few seconds; Prometheus scrapes and evaluates every 1 s


@dataclass
class Prometheus:
    url: str
    rules: list[dict]  # the rule groups it evaluates

    def get(self, path: str, **params: str) -> Any:
        response = httpx.get(f"{self.url}{path}", params=params, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        result: list[dict] = self.get("/api/v1/query", query=expr)["result"]
        return result


def chart_rules(name: str, overrides: dict) -> dict:
    sets = [f"metrics.prometheusRule={json.dumps({'enabled': True, **overrides})}"]
    (rule,) = [d for d in render(VALUES_SETS["default"], sets=sets) if d["kind"] == "PrometheusRule"]
    (group,) = rule["spec"]["groups"]
    return group | {"name": name}


def wait_until(check: Callable[[], bool], what: Callable[[], object], timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what()}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def prometheus(live: LiveService, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    from serving.local import free_port

    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed; run `make prometheus`"
    folder = tmp_path_factory.mktemp("prometheus")
    groups = [chart_rules("sdserve", {}), chart_rules("sdserve-probe", PROBE)]
    (folder / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    target = httpx.URL(live.metrics_url)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(folder / "rules.yaml")],
        "scrape_configs": [
            {
                "job_name": "sdserve",
                "metrics_path": target.path,
                "static_configs": [{"targets": [f"{target.host}:{target.port}"]}],
            }
        ],
    }
    (folder / "prometheus.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={folder / 'prometheus.yaml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(folder / "prometheus.log").open("w"),
    )

    def ready() -> bool:
        assert process.poll() is None, (folder / "prometheus.log").read_text()[-3000:]
        try:
            return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, lambda: "prometheus did not become ready", timeout=30)
        yield Prometheus(url=url, rules=groups)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}


def series_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left once strings, label matchers, ranges, grouping
    clauses, function and aggregation names and keywords are taken out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = {m.group(1) for m in re.finditer(r"(?<![\w$.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", text)}
    return names - KEYWORDS


def scraped_names(live: LiveService) -> set[str]:
    text = httpx.get(live.metrics_url, timeout=10).text
    return {line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def traffic(live: LiveService) -> None:
    """A generation (latency, images, stage series) and a refused request (an error code)."""
    with live.client() as client:
        assert client.post("/v1/images/generations", json={"prompt": "a metered fox"}).status_code == 200
        assert client.post("/v1/images/generations", json={"prompt": "x", "steps": 0}).status_code == 422


def test_series_names_reads_metric_names() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (route, le) (rate(ray_a_bucket{x="by (y)", le!="1"}[5m]))) > 60 '
        "or max by (d) (ray_b) > 0 <= 2 or sum(rate(ray_c_total[$__rate_interval])) / count(ray_d offset 5m)"
    )
    assert series_names(expr) == {"ray_a_bucket", "ray_b", "ray_c_total", "ray_d"}


def test_metrics_are_not_on_the_public_port(live: LiveService) -> None:
    response = httpx.get(f"{live.url}/metrics", timeout=10)
    assert response.status_code == 404 and "ray_sdserve" not in response.text


def test_rules_evaluate_on_the_scraped_service(live: LiveService, prometheus: Prometheus) -> None:
    """Every series the alerts name is in the scrape and in Prometheus, every rule evaluates without error, and
    the zero-threshold latency alert fires on the service's own latency histogram."""
    names = {n for group in prometheus.rules for rule in group["rules"] for n in series_names(rule["expr"])}
    assert names and all(n.startswith("ray_") for n in names), names
    traffic(live)

    def in_prometheus() -> set[str]:
        return {n for n in names if prometheus.query(f'count({{__name__="{n}"}})')}

    wait_until(lambda: in_prometheus() == names, lambda: f"missing in Prometheus: {names - in_prometheus()}")
    assert names <= scraped_names(live)

    # Every stage replica reports how many of its models and artifacts failed to load (none here): the degraded
    # alert reads zeros, not missing series. (Other tests' applications, some degraded on purpose, may be there.)
    def load_errors() -> dict[str, str]:
        query = f'ray_sdserve_model_load_errors{{application="{live.config.app_name}"}}'
        return {r["metric"]["stage"]: r["value"][1] for r in prometheus.query(query)}

    wait_until(lambda: set(load_errors()) == STAGES, load_errors)
    assert set(load_errors().values()) == {"0"}

    def rules() -> list[dict]:
        return [r for g in prometheus.get("/api/v1/rules")["groups"] for r in g["rules"]]

    def evaluated() -> bool:
        found = rules()
        return len(found) == sum(len(g["rules"]) for g in prometheus.rules) and all(
            not r["lastEvaluation"].startswith("0001-") for r in found
        )

    wait_until(evaluated, lambda: [(r["name"], r["lastEvaluation"]) for r in rules()])
    assert [(r["name"], r["health"], r.get("lastError")) for r in rules() if r["health"] != "ok"] == []

    firing = 'ALERTS{alertname="SdserveLatencyP99High", alertstate="firing", probe="zero-threshold"}'

    def fired() -> bool:
        if prometheus.query(firing):
            return True
        traffic(live)  # each request moves the histogram on, so rate() over two scrapes is above zero
        return False

    wait_until(fired, lambda: prometheus.get("/api/v1/alerts"))
    (alert,) = [a for a in prometheus.query(firing) if a["metric"]["route"] == "/v1/images/generations"]
    assert alert["metric"]["application"] == live.config.app_name
    assert [r["health"] for r in rules()] == ["ok"] * len(rules())


def test_dashboard_queries_run_on_the_scraped_service(live: LiveService, prometheus: Prometheus) -> None:
    """Each panel query of the chart's dashboard, with the dashboard's variables at "All", names only series the
    service exports and evaluates on Prometheus; the gauges' panels show every stage of the live app."""
    board = json.loads((CHART / "dashboards" / "sdserve.json").read_text())
    targets = [(p["title"], t["expr"]) for p in board["panels"] if p["type"] != "row" for t in p["targets"]]
    assert targets
    traffic(live)
    scraped = scraped_names(live)
    for title, expr in targets:
        assert series_names(expr) <= scraped, (title, series_names(expr) - scraped)

    def run(expr: str) -> list[dict]:
        for variable, value in (("$namespace", ".*"), ("$application", ".*"), ("$__rate_interval", "1m")):
            expr = expr.replace(variable, value)
        return prometheus.query(expr)

    stages = STAGES
    (queue_depth,) = [expr for title, expr in targets if title == "Queue depth by stage"]

    def stages_shown() -> set[str]:
        return {r["metric"].get("stage", "") for r in run(queue_depth)}

    wait_until(lambda: stages_shown() == stages, stages_shown)
    refused = []
    for title, expr in targets:
        try:
            run(expr)
        except AssertionError as error:
            refused.append((title, expr, str(error)))
    assert refused == []
    # The application variable's query (label_values) lists the live app.
    values = prometheus.get("/api/v1/label/application/values", **{"match[]": "ray_sdserve_stage_replicas"})
    assert live.config.app_name in values
