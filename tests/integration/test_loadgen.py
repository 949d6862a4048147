"""The load generator runs against the live service and writes its JSON and plot."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest

from benchmarks.loadgen import parse_mix, run_load, write
from tests.integration.conftest import LiveService

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_loadgen_reports_and_plots(live: LiveService, tmp_path: Path, mode: str) -> None:
    result = asyncio.run(
        run_load(
            live.url,
            mode=mode,
            rate=4.0,
            concurrency=2,
            duration_s=30,
            max_requests=6,
            mix=parse_mix(["steps=2:0.5", "steps=6:0.5"]),
            seed=0,
        )
    )
    summary = write(result, tmp_path, "run")
    assert summary["requests"] == 6 and summary["succeeded"] == 6
    assert summary["by_status"] == {"200": 6}
    assert 0 < summary["latency_s"]["p50"] <= summary["latency_s"]["p99"]
    assert summary["max_replicas"].get("Denoiser", 0) >= 1
    data = json.loads((tmp_path / "run.json").read_text())
    assert len(data["samples"]) == 6
    # Every request is counted under the kind it was sent as, and seed 0 draws both kinds of the mix.
    sent = Counter(sample["kind"] for sample in data["samples"])
    assert {kind: stats["count"] for kind, stats in summary["by_kind"].items()} == sent
    assert set(sent) == {"steps=2", "steps=6"}
    assert (tmp_path / "run.png").read_bytes().startswith(b"\x89PNG")
