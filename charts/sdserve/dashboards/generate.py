"""Generate the chart's Grafana dashboard (dashboards/sdserve.json) with grafana-foundation-sdk.

Run `python charts/sdserve/dashboards/generate.py` after changing a panel; a test fails when the committed JSON
differs from what this writes. Every query reads series the service exports on Ray's metrics port (the
`ray_sdserve_*` series of serving/metrics.py and Ray Serve's own `ray_serve_*`); another test runs each query
against a real Prometheus scraping a running service.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common, dashboard, prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import LegendDisplayMode, LegendPlacement, TooltipDisplayMode
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableOption, VariableRefresh, VariableSort

OUTPUT = Path(__file__).with_name("sdserve.json")
UID = "sdserve-overview"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
# Every query is narrowed to the chosen namespaces and Serve applications (both "All" by default; the local
# service has no namespace label, which `.*` matches too).
SELECT = 'namespace=~"$namespace", application=~"$application"'
PERCENTILES = (0.5, 0.95, 0.99)


def query(expr: str, legend: str, ref: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)


def panel(title: str, description: str, unit: str, *queries: tuple[str, str]) -> timeseries.Panel:
    """A time-series panel, half the dashboard wide, with one query per (expression, legend)."""
    built = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .height(8)
        .span(12)
        .min(0)
        .legend(common.VizLegendOptions().display_mode(LegendDisplayMode.TABLE).placement(LegendPlacement.BOTTOM))
        .tooltip(common.VizTooltipOptions().mode(TooltipDisplayMode.MULTI))
    )
    for index, (expr, legend) in enumerate(queries):
        built = built.with_target(query(expr, legend, chr(ord("A") + index)))
    return built


def percentiles(histogram: str, by: str) -> list[tuple[str, str]]:
    return [
        (
            f"histogram_quantile({q}, sum by ({by}, le) (rate({histogram}_bucket{{{SELECT}}}[$__rate_interval])))",
            f"p{round(q * 100)} {{{{{by}}}}}",
        )
        for q in PERCENTILES
    ]


def variable(name: str, label: str, metric: str) -> dashboard.QueryVariable:
    return (
        dashboard.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query({"query": f"label_values({metric}, {name})", "refId": f"{name}-values"})
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(VariableOption(text="All", value="$__all", selected=True))
    )


def build() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model."""
    board = (
        dashboard.Dashboard("sdserve")
        .uid(UID)
        .description("Stable Diffusion serving: per-stage queues, replicas and batches; API latency, images, errors.")
        .tags(["sdserve", "ray-serve"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .with_variable(dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_variable(variable("namespace", "Namespace", "ray_sdserve_stage_replicas"))
        .with_variable(variable("application", "Application", "ray_sdserve_stage_replicas"))
        .with_row(dashboard.Row("Stages"))
        .with_panel(
            panel(
                "Queue depth by stage",
                "Requests in the stage's replicas waiting for compute (ray_sdserve_stage_queue_depth).",
                "short",
                (f"sum by (stage) (ray_sdserve_stage_queue_depth{{{SELECT}}})", "{{stage}}"),
            )
        )
        .with_panel(
            panel(
                "Replicas by stage",
                "Live replicas per stage, and the replicas Serve's autoscaler is aiming for per deployment.",
                "short",
                (f"sum by (stage) (ray_sdserve_stage_replicas{{{SELECT}}})", "{{stage}}"),
                (
                    f"max by (deployment) (ray_serve_autoscaling_target_replicas{{{SELECT}}})",
                    "target {{deployment}}",
                ),
            )
        )
        .with_panel(
            panel(
                "Ongoing requests by stage",
                "Requests in the stage's replicas, waiting or computing (what Serve's autoscaling compares with "
                "target_ongoing_requests).",
                "short",
                (f"sum by (stage) (ray_sdserve_stage_ongoing_requests{{{SELECT}}})", "{{stage}}"),
            )
        )
        .with_panel(
            panel(
                "Mean batch size by stage",
                "Items per compute call: images per UNet step in the denoiser, prompts per text-encoder call.",
                "short",
                (
                    f"sum by (stage) (rate(ray_sdserve_stage_batch_size_sum{{{SELECT}}}[$__rate_interval]))"
                    f" / sum by (stage) (rate(ray_sdserve_stage_batch_size_count{{{SELECT}}}[$__rate_interval]))",
                    "{{stage}}",
                ),
            )
        )
        .with_panel(
            panel(
                "Stage latency percentiles",
                "Time a request spends in a stage replica (queue and compute).",
                "s",
                *percentiles("ray_sdserve_stage_latency_seconds", "stage"),
            )
        )
        .with_row(dashboard.Row("API"))
        .with_panel(
            panel(
                "Request latency percentiles by route",
                "End-to-end HTTP latency of the ingress, by route.",
                "s",
                *percentiles("ray_sdserve_http_request_latency_seconds", "route"),
            )
        )
        .with_panel(
            panel(
                "Images per second",
                "Images returned, by model (withheld ones not counted).",
                "short",
                (
                    f"sum by (model) (rate(ray_sdserve_images_generated_total{{{SELECT}}}[$__rate_interval]))",
                    "{{model}}",
                ),
            )
        )
        .with_panel(
            panel(
                "Requests per second by status",
                "HTTP requests answered by the ingress, by status code.",
                "reqps",
                (
                    f"sum by (status) (rate(ray_sdserve_http_requests_total{{{SELECT}}}[$__rate_interval]))",
                    "{{status}}",
                ),
            )
        )
        .with_panel(
            panel(
                "Errors per second by code",
                "Error responses by the error code of the JSON error shape (invalid_request, overloaded, timeout, "
                "model_unavailable, unauthorized, ...).",
                "reqps",
                (f"sum by (code) (rate(ray_sdserve_errors_total{{{SELECT}}}[$__rate_interval]))", "{{code}}"),
            )
        )
        .with_panel(
            panel(
                "Unhealthy replicas by deployment",
                "Serve replicas failing their health check (ray_serve_deployment_replica_healthy is 0 for them).",
                "short",
                (
                    f"sum by (deployment) (1 - ray_serve_deployment_replica_healthy{{{SELECT}}})",
                    "{{deployment}}",
                ),
            )
        )
    )
    built: dict[str, Any] = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    return built


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else OUTPUT
    out.write_text(render())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
