"""A burst absorbed by scale-up: the plot in the README's scaling section.

Starts sdserve on a local Ray that advertises fake GPUs, with the denoiser autoscaling between 1 and 3
replicas (one GPU each), sends a Poisson burst, keeps watching while it drains and scales back down, and
writes docs/scaling-burst.png and docs/scaling-burst.json.

    .venv/bin/python -m benchmarks.scaling_demo
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from benchmarks.loadgen import parse_mix, run_load, write
from serving.config import AppConfig
from serving.local import ensure_default_model, free_port, local_ray_env, start_local, stop_local

DOCS = Path(__file__).resolve().parents[1] / "docs"
RATE, SECONDS, STEPS = 4.0, 25, 50


def main() -> int:
    import ray

    os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
    os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
    config = ensure_default_model(
        AppConfig.model_validate(
            {
                "denoiser": {
                    "resources": {"num_cpus": 0.25, "num_gpus": 1},
                    "max_ongoing_requests": 4,
                    "max_queued_requests": -1,
                    "max_batch_size": 4,
                    "autoscaling": {
                        "min_replicas": 1,
                        "max_replicas": 3,
                        "target_ongoing_requests": 2,
                        "upscale_delay_s": 2,
                        "downscale_delay_s": 10,
                        "look_back_period_s": 2,
                    },
                },
            }
        )
    )
    local_ray_env()
    ray.init(num_cpus=8, num_gpus=3, include_dashboard=False, configure_logging=False)
    url = start_local(config, host="127.0.0.1", port=free_port())
    try:
        result = asyncio.run(
            run_load(
                url, mode="open", rate=RATE, duration_s=SECONDS, mix=parse_mix([f"steps={STEPS}:1"]), observe_after_s=30
            )
        )
    finally:
        stop_local()
    peak = max((r["replicas"].get("Denoiser", 0) for r in result.replicas), default=0)
    title = f"Poisson burst ({RATE:g} req/s for {SECONDS} s, {STEPS} steps): Denoiser 1 -> {peak} -> 1 replicas"
    summary = write(result, DOCS, "scaling-burst", title)
    (DOCS / "scaling-burst.json").write_text(json.dumps({"summary": summary}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
