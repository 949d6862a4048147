"""Load generator for sdserve's OpenAI-compatible endpoint.

Open loop (Poisson arrivals at a fixed rate, the way independent users arrive) or closed loop (N clients,
each sending its next request when the last one answers). Reports throughput, latency percentiles and
errors by status; writes the raw samples and summary as JSON and a PNG of latency over time with each
deployment's running replica count (polled from GET /v1/status) overlaid.

    python -m benchmarks.loadgen --url http://127.0.0.1:8000 --mode open --rate 2 --duration 60 \\
        --mix steps=4:0.25 --mix steps=30:0.75 --out out/load
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx


@dataclass
class Sample:
    sent_s: float  # seconds after the run started
    latency_s: float
    status: int
    error: str | None
    kind: str


@dataclass
class RunResult:
    mode: str
    duration_s: float
    samples: list[Sample] = field(default_factory=list)
    replicas: list[dict[str, Any]] = field(default_factory=list)  # {"t": s, "replicas": {deployment: n}}

    def summary(self) -> dict[str, Any]:
        ok = [s for s in self.samples if s.status == 200]
        latencies = sorted(s.latency_s for s in ok)
        by_status: dict[str, int] = {}
        for s in self.samples:
            by_status[str(s.status)] = by_status.get(str(s.status), 0) + 1
        by_kind: dict[str, dict[str, float]] = {}
        for kind in sorted({s.kind for s in ok}):
            lat = sorted(s.latency_s for s in ok if s.kind == kind)
            by_kind[kind] = {"count": len(lat), **percentiles(lat)}
        return {
            "mode": self.mode,
            "duration_s": round(self.duration_s, 2),
            "requests": len(self.samples),
            "succeeded": len(ok),
            "throughput_rps": round(len(ok) / self.duration_s, 4) if self.duration_s else 0.0,
            "latency_s": percentiles(latencies),
            "by_kind": by_kind,
            "by_status": by_status,
            "max_replicas": {
                name: max(r["replicas"].get(name, 0) for r in self.replicas)
                for name in sorted({n for r in self.replicas for n in r["replicas"]})
            },
        }


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "mean": 0.0}

    def pick(q: float) -> float:
        return round(values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))], 4)

    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99), "mean": round(statistics.fmean(values), 4)}


def parse_mix(items: list[str]) -> list[tuple[str, dict[str, Any], float]]:
    """`steps=4:0.25` -> ("steps=4", {"steps": 4}, 0.25); several `k=v` joined by commas."""
    mix = []
    for item in items or ["steps=25:1"]:
        spec, _, weight = item.rpartition(":")
        body: dict[str, Any] = {}
        for pair in spec.split(","):
            key, _, value = pair.partition("=")
            body[key] = int(value) if value.isdigit() else value
        mix.append((spec, body, float(weight)))
    return mix


async def _send(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], kind: str, t0: float, out: list[Sample]
) -> None:
    sent = time.perf_counter()
    status, error = 0, None
    try:
        response = await client.post(f"{url}/v1/images/generations", json=body)
        status = response.status_code
        if status != 200:
            try:
                error = response.json()["error"]["code"]
            except Exception:
                error = response.text[:100]
    except httpx.HTTPError as exc:
        error = type(exc).__name__
    out.append(Sample(round(sent - t0, 4), round(time.perf_counter() - sent, 4), status, error, kind))


async def _poll_replicas(client: httpx.AsyncClient, url: str, t0: float, stop: asyncio.Event, out: list) -> None:
    while not stop.is_set():
        try:
            data = (await client.get(f"{url}/v1/status", timeout=5)).json()
            out.append({"t": round(time.perf_counter() - t0, 3), "replicas": data.get("replicas", {})})
        except (httpx.HTTPError, ValueError):
            pass
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)


async def run_load(
    url: str,
    mode: str = "open",
    rate: float = 1.0,
    concurrency: int = 4,
    duration_s: float = 30.0,
    mix: list[tuple[str, dict[str, Any], float]] | None = None,
    base: dict[str, Any] | None = None,
    seed: int = 0,
    max_requests: int | None = None,
    drain_timeout_s: float = 300.0,
    observe_after_s: float = 0.0,
) -> RunResult:
    """Drive load for ``duration_s`` (or ``max_requests``), wait for answers (bounded), then keep
    recording replica counts for ``observe_after_s`` (to see scale-down)."""
    rng = random.Random(seed)
    mix = mix or parse_mix([])
    weights = [w for _, _, w in mix]
    samples: list[Sample] = []
    replicas: list[dict[str, Any]] = []
    stop = asyncio.Event()
    sent = 0

    def next_request() -> tuple[dict[str, Any], str]:
        nonlocal sent
        kind, body, _ = rng.choices(mix, weights=weights)[0]
        sent += 1
        return {"prompt": f"load test prompt {sent}", "seed": sent, **(base or {}), **body}, kind

    def more() -> bool:
        return time.perf_counter() - t0 < duration_s and (max_requests is None or sent < max_requests)

    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=drain_timeout_s, limits=limits) as client:
        t0 = time.perf_counter()
        poller = asyncio.create_task(_poll_replicas(client, url, t0, stop, replicas))
        tasks: list[asyncio.Task[None]] = []
        if mode == "open":
            next_at = t0
            while more():
                body, kind = next_request()
                tasks.append(asyncio.create_task(_send(client, url, body, kind, t0, samples)))
                next_at += rng.expovariate(rate)
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        else:

            async def worker() -> None:
                while more():
                    body, kind = next_request()
                    await _send(client, url, body, kind, t0, samples)

            tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        if tasks:
            await asyncio.wait(tasks, timeout=drain_timeout_s)
        elapsed = time.perf_counter() - t0
        await asyncio.sleep(observe_after_s)
        stop.set()
        await poller
    return RunResult(mode=mode, duration_s=elapsed, samples=sorted(samples, key=lambda s: s.sent_s), replicas=replicas)


def plot(result: RunResult, path: Path, title: str = "") -> None:
    """Latency of each request over time (by status), with running replicas per deployment overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    for ok, color, label in ((True, "tab:blue", "200"), (False, "tab:red", "error")):
        points = [(s.sent_s, s.latency_s) for s in result.samples if (s.status == 200) == ok]
        if points:
            ax.scatter(*zip(*points, strict=True), s=12, color=color, label=f"latency ({label})", alpha=0.7)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("latency (s)")
    if result.replicas:
        ax2 = ax.twinx()
        names = sorted({n for r in result.replicas for n in r["replicas"]})
        # Deployments whose count never changed would only hide each other's flat lines.
        changing = [n for n in names if len({r["replicas"].get(n, 0) for r in result.replicas}) > 1]
        for name in changing or names:
            xs = [r["t"] for r in result.replicas]
            ys = [r["replicas"].get(name, 0) for r in result.replicas]
            ax2.step(xs, ys, where="post", label=f"{name} replicas", linewidth=1.5)
        ax2.set_ylabel("running replicas")
        ax2.set_ylim(bottom=0, top=max(max(r["replicas"].values(), default=1) for r in result.replicas) + 1)
        ax2.legend(loc="upper right", fontsize=8)
    sending = max((s.sent_s for s in result.samples), default=0.0)
    ax.axvspan(0, sending, color="0.9", zorder=0, label="sending")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or f"{result.mode} loop: {len(result.samples)} requests")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: RunResult, out: Path, name: str = "loadgen", title: str = "") -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    data = {"summary": summary, "samples": [asdict(s) for s in result.samples], "replicas": result.replicas}
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))
    plot(result, out / f"{name}.png", title)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the service")
    parser.add_argument("--mode", choices=["open", "closed"], default="open")
    parser.add_argument("--rate", type=float, default=1.0, help="open loop: mean arrivals per second (Poisson)")
    parser.add_argument("--concurrency", type=int, default=4, help="closed loop: clients")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of sending")
    parser.add_argument("--max-requests", type=int, help="stop sending after this many")
    parser.add_argument("--mix", action="append", help="request kind and weight, e.g. steps=4:0.25 (repeatable)")
    parser.add_argument("--size", help="WIDTHxHEIGHT for every request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/loadgen", help="folder for the JSON and PNG")
    parser.add_argument("--name", default="loadgen", help="file name stem")
    args = parser.parse_args(argv)
    base = {"size": args.size} if args.size else {}
    result = asyncio.run(
        run_load(
            args.url,
            args.mode,
            args.rate,
            args.concurrency,
            args.duration,
            parse_mix(args.mix or []),
            base,
            args.seed,
            args.max_requests,
        )
    )
    summary = write(result, Path(args.out), args.name)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
