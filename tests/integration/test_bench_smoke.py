"""The benchmark harness runs end to end (tiny model, seconds per phase): all four systems answer and the
report, results and plots are written. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_bench_quick_run(tmp_path: Path) -> None:
    report = tmp_path / "BENCH.md"
    report.write_text("# x\n<!-- results:start -->\n<!-- results:end -->\ntail\n")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--quick", "--out", str(tmp_path / "out"), "--report", str(report)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    for system in ("bare", "lock_server", "monolith", "sdserve"):
        assert results[system]["throughput_ips"] > 0
        assert results[system]["peak_rss_mb"] > 0
    for system in ("lock_server", "monolith", "sdserve"):
        for phase in ("poisson_50", "poisson_80", "mixed_80"):
            assert results[system][phase]["succeeded"] == results[system][phase]["requests"] > 0
    text = report.read_text()
    assert text.startswith("# x") and text.rstrip().endswith("tail")
    assert "| target | measured (same run) | verdict |" in text
    assert (tmp_path / "out" / "bench-latency-throughput.png").read_bytes().startswith(b"\x89PNG")
