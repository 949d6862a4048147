"""Environment variables sdserve reads, all in one place. They never change the deployment graph."""

from __future__ import annotations

import os
from pathlib import Path

# Where `sdserve serve` keeps the tiny test model it creates when no model is configured.
SDSERVE_HOME = Path(os.environ.get("SDSERVE_HOME", Path.home() / ".cache" / "sdserve")).expanduser()

# Log level of the sdserve loggers (DEBUG, INFO, WARNING, ...).
SDSERVE_LOG_LEVEL = os.environ.get("SDSERVE_LOG_LEVEL", "INFO").upper()

# Password of the Redis job store when jobs.store_url carries none (keep it out of the config).
SDSERVE_REDIS_PASSWORD = os.environ.get("SDSERVE_REDIS_PASSWORD") or None

# OpenTelemetry traces (see serving/tracing.py). They are off unless an OTLP endpoint is configured: the standard
# OTEL_EXPORTER_OTLP_ENDPOINT (base URL; spans go to <it>/v1/traces) or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (the
# full URL), or OTEL_TRACES_EXPORTER=otlp (the SDK's default endpoint, http://localhost:4318). OTEL_TRACES_EXPORTER
# =none or OTEL_SDK_DISABLED=true turn them off whatever else is set. The exporter is OTLP/HTTP with protobuf
# payloads; the SDK reads the other OTEL_* variables itself (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES,
# OTEL_EXPORTER_OTLP_HEADERS / _TIMEOUT / _COMPRESSION / _CERTIFICATE, OTEL_BSP_SCHEDULE_DELAY in ms,
# OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG).
OTEL_EXPORTER_OTLP_ENDPOINT = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
OTEL_TRACES_EXPORTER = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
OTEL_SDK_DISABLED = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
TRACING_ENABLED: bool = (
    not OTEL_SDK_DISABLED
    and OTEL_TRACES_EXPORTER != "none"
    and bool(OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_TRACES_EXPORTER == "otlp")
)
