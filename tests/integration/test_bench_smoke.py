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


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--quick", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip


def test_bench_quick_run_in_two_parts(tmp_path: Path) -> None:
    """A run split in two invocations (as on a machine with a time limit per command) measures all four."""
    out, report = tmp_path / "out", tmp_path / "BENCH.md"
    report.write_text("# x\n<!-- results:start -->\n<!-- results:end -->\ntail\n")
    first = bench("--systems", "bare,lock_server", "--out", str(out), "--report", str(report))
    assert first.returncode == 0, first.stderr[-3000:]
    assert set(json.loads((out / "results.json").read_text())) == {"bare", "lock_server", "meta"}
    assert "<!-- results:end -->" in report.read_text() and "| target |" not in report.read_text()
    refused = bench("--systems", "monolith", "--out", str(tmp_path / "empty"))
    assert refused.returncode != 0 and "include lock_server" in refused.stderr

    second = bench("--systems", "monolith,sdserve", "--resume", "--out", str(out), "--report", str(report))
    assert second.returncode == 0, second.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    for system in ("bare", "lock_server", "monolith", "sdserve"):
        assert results[system]["throughput_ips"] > 0
        assert results[system]["peak_rss_mb"] > 0
    for system in ("lock_server", "monolith", "sdserve"):
        for phase in ("poisson_50", "poisson_80", "mixed_80"):
            assert results[system][phase]["succeeded"] == results[system][phase]["requests"] > 0
            assert results[system][phase]["rate_rps"] == results["meta"]["rates"][phase]
    text = report.read_text()
    assert text.startswith("# x") and text.rstrip().endswith("tail")
    assert "| target | measured (same run) | verdict |" in text
    assert (out / "bench-latency-throughput.png").read_bytes().startswith(b"\x89PNG")

    (out / "bench-latency-throughput.png").unlink()
    again = bench("--report-only", "--out", str(out), "--report", str(report))
    assert again.returncode == 0, again.stderr[-3000:]
    assert report.read_text() == text and (out / "bench-latency-throughput.png").exists()


def test_img2img_bench_quick_run_writes_its_section(tmp_path: Path) -> None:
    """benchmarks.img2img on the tiny model: every variant timed, mixed txt2img + img2img jobs batched."""
    report = tmp_path / "BENCH.md"
    report.write_text("# x\n")
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.img2img", "--quick", "--out", str(tmp_path), "--report", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "img2img-quick.json").read_text())
    assert set(results["timings"]) == {"txt2img", "img2img", "inpaint", "hires", "txt2img_2x"}
    assert results["mixed"]["unet_calls"] > 0
    assert "<!-- img2img:start -->" in report.read_text() and "ratio to txt2img" in report.read_text()
