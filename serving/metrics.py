"""Prometheus metrics of the API and of every stage.

They are Ray Serve metrics (``ray.serve.metrics``): each process records its own, Ray's metrics agent on
every node exports them on the node's metrics port (8080 in the chart, ``metrics-export-port``) with a
``ray_`` prefix and the deployment, replica and application as labels. Names are listed in the README.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any, cast

from ray.serve.metrics import Counter, Gauge, Histogram

LATENCY_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0]
GAUGE_REFRESH_S = 5.0  # well inside the ~20 s after which Ray's agent drops a gauge that was not re-reported
BATCH_BUCKETS = [1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0]


class StageMetrics:
    """Queue depth, ongoing requests, replica presence, models that failed to load, batch sizes and latency of one
    stage replica."""

    def __init__(self, stage: str) -> None:
        self.tags = {"stage": stage}
        self.queue_depth = Gauge(
            "sdserve_stage_queue_depth", description="Requests in the replica waiting for compute.", tag_keys=("stage",)
        )
        self.ongoing = Gauge(
            "sdserve_stage_ongoing_requests",
            description="Requests in the replica (waiting or computing).",
            tag_keys=("stage",),
        )
        self.replicas = Gauge(
            "sdserve_stage_replicas", description="1 per live replica; sum by stage for the count.", tag_keys=("stage",)
        )
        self.load_errors = Gauge(
            "sdserve_model_load_errors",
            description="Configured models or artifacts the replica failed to load (a previous version, if any, "
            "still serves; /readyz lists the errors).",
            tag_keys=("stage",),
        )
        self.batch_size = Histogram(
            "sdserve_stage_batch_size",
            description="Items per compute call (images per UNet step for the denoiser).",
            boundaries=BATCH_BUCKETS,
            tag_keys=("stage",),
        )
        self.latency = Histogram(
            "sdserve_stage_latency_seconds",
            description="Time a request spends in the stage replica.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("stage",),
        )
        self._ongoing = 0
        self._queue_depth = 0
        self._load_errors = 0
        self.refresh()

    def refresh(self) -> None:
        """Report every gauge again. Ray's metrics agent drops a gauge that was not reported for about two
        export intervals, so a replica that is idle (or too busy to change a value) would vanish from
        /metrics; the replica calls this every ``GAUGE_REFRESH_S``."""
        self.replicas.set(1, tags=self.tags)
        self.ongoing.set(self._ongoing, tags=self.tags)
        self.queue_depth.set(self._queue_depth, tags=self.tags)
        self.load_errors.set(self._load_errors, tags=self.tags)

    def set_load_errors(self, count: int) -> None:
        self._load_errors = count
        self.load_errors.set(count, tags=self.tags)

    def set_queue_depth(self, depth: int) -> None:
        self._queue_depth = depth
        self.queue_depth.set(depth, tags=self.tags)

    def observe_batch(self, size: int) -> None:
        self.batch_size.observe(size, tags=self.tags)

    @contextmanager
    def request(self) -> Iterator[None]:
        """Count a request as ongoing and record its latency in the stage."""
        self._ongoing += 1
        self.ongoing.set(self._ongoing, tags=self.tags)
        started = time.perf_counter()
        try:
            yield
        finally:
            self._ongoing -= 1
            self.ongoing.set(self._ongoing, tags=self.tags)
            self.latency.observe(time.perf_counter() - started, tags=self.tags)


class ApiMetrics:
    """Requests by route and status, end-to-end latency, images generated and errors by code."""

    def __init__(self) -> None:
        self.requests = Counter(
            "sdserve_http_requests",
            description="HTTP requests by route and status.",
            tag_keys=cast(Any, ("route", "status")),  # the stub says tuple[str]; any tuple of names works
        )
        self.latency = Histogram(
            "sdserve_http_request_latency_seconds",
            description="End-to-end latency of HTTP requests by route.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("route",),
        )
        self.images = Counter("sdserve_images_generated", description="Images returned.", tag_keys=("model",))
        self.errors = Counter("sdserve_errors", description="Error responses by error code.", tag_keys=("code",))

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(1, tags={"route": route, "status": str(status)})
        self.latency.observe(seconds, tags={"route": route})

    def observe_error(self, code: str) -> None:
        self.errors.inc(1, tags={"code": code})

    def observe_images(self, model: str, count: int) -> None:
        self.images.inc(count, tags={"model": model})


@cache
def api_metrics() -> ApiMetrics:
    """One set of API metrics per process (metric objects must not be created per request)."""
    return ApiMetrics()
