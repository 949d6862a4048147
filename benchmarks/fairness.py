"""Small-request latency while a large request denoises: cost-weighted fair step batching against round robin.

Small requests arrive one after another at a fixed interval and are timed from submission to latents, in process
on one ``DenoiserStage`` behind a ``StepBatcher`` over a single compute thread (a denoiser replica's layout), in
three situations measured in the same run: alone; while one large request runs under the fair policy
(``StepBatcher(fair=True)``, the default); the same under round robin (``fair=False``). The large request is also
timed alone, for its own slowdown. Text encoding and VAE decoding are left out: only the denoising loop is shared.

    python -m benchmarks.fairness                       # bench model: under 2 minutes on 2 CPU cores
    python -m benchmarks.fairness --model-size tiny     # tiny model, seconds: harness check
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import tempfile
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.contracts import DenoiseParams, EncodeRequest, PromptEmbeddings
from models.denoiser import DenoiserStage
from models.snapshot import open_snapshot
from models.stepbatcher import StepBatcher
from models.testmodels import create_test_model
from models.text_encoder import TextEncoderStage

ROOT = Path(__file__).resolve().parents[1]
GUIDANCE = 7.5
SCHEDULER = "euler"


@dataclass(frozen=True)
class Workload:
    small: int = dataclasses.field(metadata={"help": "side of a small request, px"})
    small_steps: int = dataclasses.field(metadata={"help": "denoising steps of a small request"})
    requests: int = dataclasses.field(metadata={"help": "small requests per situation"})
    interval_s: float = dataclasses.field(metadata={"help": "seconds between small arrivals"})
    large: int = dataclasses.field(metadata={"help": "side of the large request, px"})
    large_steps: int = dataclasses.field(metadata={"help": "denoising steps of the large request"})


# One step on 2 CPU cores: bench 64x64 0.04 s, 512x512 1.7 s; tiny 64x64 0.01 s, 512x512 0.8 s. The large request
# runs longer than the small arrivals last, so every small request meets it.
WORKLOADS = {
    "bench": Workload(small=64, small_steps=4, requests=20, interval_s=0.5, large=512, large_steps=8),
    "tiny": Workload(small=64, small_steps=4, requests=20, interval_s=0.1, large=512, large_steps=6),
}


@dataclass(frozen=True)
class Situation:
    label: str
    smalls: bool  # the small requests arrive
    large: bool  # the large request runs
    fair: bool = True  # StepBatcher(fair=...)


SITUATIONS = {
    "alone": Situation("small requests alone", smalls=True, large=False),
    "large_fair": Situation("+ large request, fair", smalls=True, large=True),
    "large_round_robin": Situation("+ large request, round robin", smalls=True, large=True, fair=False),
    "large_alone": Situation("large request alone", smalls=False, large=True),
}


def params(side: int, steps: int, seed: int) -> DenoiseParams:
    return DenoiseParams("m", side, side, steps, GUIDANCE, SCHEDULER, seed)


def step_seconds(denoiser: DenoiserStage, emb: PromptEmbeddings, side: int) -> float:
    """One UNet step of a ``side`` x ``side`` request, after a warm-up step."""
    job = denoiser.start(params(side, 3, 0), emb)
    denoiser.step([job])
    started = time.perf_counter()
    denoiser.step([job])
    return time.perf_counter() - started


async def run_situation(
    executor: Executor,
    denoiser: DenoiserStage,
    emb: PromptEmbeddings,
    w: Workload,
    s: Situation,
) -> dict[str, Any]:
    """Latencies (s) of the small requests and of the large one, each timed from its own submission."""
    batcher = StepBatcher(executor, max_batch_size=8, fair=s.fair)
    t0 = time.perf_counter()

    async def request(p: DenoiseParams, at: float) -> float:
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))  # a fixed schedule: no drift
        submitted = time.perf_counter()
        await batcher.submit(denoiser, p, emb)
        return time.perf_counter() - submitted

    # The large request comes first; the first small one arrives one interval later, during its first step.
    large_task = asyncio.ensure_future(request(params(w.large, w.large_steps, 0), 0.0)) if s.large else None
    arrivals = [w.interval_s * (i + 1) for i in range(w.requests)] if s.smalls else []
    small = await asyncio.gather(*(request(params(w.small, w.small_steps, i + 1), at) for i, at in enumerate(arrivals)))
    row: dict[str, Any] = {"small_latency_s": small}
    if small:
        p50, p99 = np.percentile(small, [50, 99])
        row |= {"small_p50_s": float(p50), "small_p99_s": float(p99)}
    if large_task is not None:
        row["large_latency_s"] = await large_task
    return row


def load(model_size: str) -> tuple[DenoiserStage, PromptEmbeddings]:
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="fairness-") as tmp:
        snap = open_snapshot(str(create_test_model(Path(tmp) / "m", size=model_size, seed=0)))
        encoder = TextEncoderStage("m", snap, cpu, torch.float32)
        denoiser = DenoiserStage("m", snap, cpu, torch.float32)  # weights in memory: the folder can go
        (emb,) = encoder.encode([EncodeRequest("m", "a cozy cabin", None, True)])
    return denoiser, emb


def measure(w: Workload, model_size: str) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    # All torch work on the one compute thread, as a replica does it: each thread that runs torch gets its own
    # OpenMP team, and a second team left spinning on the same cores made every step ~2.5x slower here.
    executor = ThreadPoolExecutor(1, thread_name_prefix="denoiser-compute")
    denoiser, emb = executor.submit(load, model_size).result()
    steps = {
        f"{side}x{side}": executor.submit(step_seconds, denoiser, emb, side).result() for side in (w.small, w.large)
    }
    print("one UNet step:", ", ".join(f"{k} {v:.3f} s" for k, v in steps.items()), flush=True)
    rows = {}
    for name, s in SITUATIONS.items():
        rows[name] = asyncio.run(run_situation(executor, denoiser, emb, w, s))
        print(f"{name}: done", flush=True)
    executor.shutdown()
    alone_p99 = rows["alone"]["small_p99_s"]
    for row in rows.values():
        if "small_p99_s" in row:
            row["small_p99_over_alone"] = row["small_p99_s"] / alone_p99
    return steps, rows


def table(results: dict[str, Any]) -> str:
    w = results["workload"]
    rows = results["situations"]

    def seconds(row: dict[str, Any], key: str) -> str:
        return f"{row[key]:.2f} s" if key in row else "-"

    lines = [
        f"{w['requests']} small requests ({w['small']}x{w['small']}, {w['small_steps']} steps, one every "
        f"{w['interval_s']} s); large request {w['large']}x{w['large']}, {w['large_steps']} steps; "
        f"{results['model_size']} model, {results['torch_threads']} torch threads",
        "one UNet step: " + ", ".join(f"{k} {v:.3f} s" for k, v in results["step_s"].items()),
        "",
        f"{'':30} {'small p50':>10} {'small p99':>10} {'p99/alone':>10} {'large':>8}",
    ]
    for name, s in SITUATIONS.items():
        row = rows[name]
        ratio = f"{row['small_p99_over_alone']:.1f}x" if "small_p99_over_alone" in row else "-"
        lines.append(
            f"{s.label:30} {seconds(row, 'small_p50_s'):>10} {seconds(row, 'small_p99_s'):>10} {ratio:>10} "
            f"{seconds(row, 'large_latency_s'):>8}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-size", default="bench", choices=sorted(WORKLOADS))
    parser.add_argument("--out", default="benchmarks/results/fairness.json", help="JSON results path")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    for f in dataclasses.fields(Workload):
        kind = type(getattr(WORKLOADS["bench"], f.name))
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, help=f"{f.metadata['help']} (per model size)")
    args = parser.parse_args(argv)
    overrides = {f.name: v for f in dataclasses.fields(Workload) if (v := getattr(args, f.name)) is not None}
    workload = dataclasses.replace(WORKLOADS[args.model_size], **overrides)
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    steps, rows = measure(workload, args.model_size)
    results = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "model_size": args.model_size,
        "workload": asdict(workload),
        "step_s": steps,
        "situations": rows,
        "wall_s": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
