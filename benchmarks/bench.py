"""Side-by-side benchmark: (a) bare diffusers, (b) lock server, (c) Ray monolith, (d) sdserve.

One run, one machine, one model, one request mix; writes BENCHMARKS.md, results JSON and PNG plots.

    python -m benchmarks.bench                # the full run (`make bench`), bench-size model, ~15 min here
    python -m benchmarks.bench --quick        # tiny model, seconds per phase: checks the harness runs
    python -m benchmarks.bench --gpu          # sd15 architecture, 512x512, fp16 on CUDA (`make bench-gpu`)

A run can be split: `--systems bare,lock_server` then `--systems monolith,sdserve --resume` measure the same
four systems in two invocations (the rates of the Poisson phases come from (b), so (b) runs first).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from benchmarks.loadgen import parse_mix, run_load
from benchmarks.processes import stop_process_group

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclass
class Settings:
    model_size: str = "bench"
    size: str = "256x256"
    steps: int = 20
    mixed: tuple[int, int, float] = (4, 30, 0.25)  # short steps, long steps, share of short requests
    c1_requests: int = 4
    saturation_concurrency: int = 4
    saturation_s: float = 30.0
    poisson_s: float = 35.0
    bare_batches: tuple[int, ...] = (1, 2, 4)
    gpu: bool = False

    @classmethod
    def quick(cls, gpu: bool = False) -> Settings:
        return cls("tiny", "64x64", 4, (2, 6, 0.25), 2, 2, 3.0, 3.0, (1, 2), gpu=gpu)

    @classmethod
    def on_gpu(cls) -> Settings:
        """The exact SD1.5 architecture at 512x512, 25 steps, fp16 on CUDA. Saturation keeps 32 requests in
        flight, twice sdserve's denoiser batch limit: with 16, part of them are always in the other stages, so
        the denoiser never ran a full batch (3.3 img/s at 16 in flight, 4.8 at 32 on an H100)."""
        return cls("sd15", "512x512", 25, (4, 30, 0.25), 8, 32, 25.0, 30.0, (1, 2, 4, 8, 16), gpu=True)


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def free_port() -> int:
    from serving.local import free_port as pick

    return pick()


def model_dir(size: str) -> Path:
    from models.testmodels import create_test_model
    from serving.env import SDSERVE_HOME

    path = SDSERVE_HOME / "test-models" / f"{size}-seed0"
    if not (path / "model_index.json").exists():
        create_test_model(path, size=size, seed=0)
    return path


# -- (a) bare: in a child process, so its memory is its own ------------------------------------------------


def bare_main(model: str, settings: Settings) -> dict[str, Any]:
    import torch

    from benchmarks.baselines.common import load_pipeline

    pipe = load_pipeline(model)
    width, height = (int(v) for v in settings.size.split("x"))

    def run(batch: int, steps: int) -> float:
        t0 = time.perf_counter()
        pipe(["a photo of a cat"] * batch, height=height, width=width, num_inference_steps=steps)
        return time.perf_counter() - t0

    def unet_its(batch: int) -> float:
        """Denoising iterations per second (latents out, no VAE), the figure GPU comparisons quote."""
        t0 = time.perf_counter()
        pipe(["a photo of a cat"] * batch, height=height, width=width, num_inference_steps=settings.steps,
             output_type="latent")  # fmt: skip
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the latents come back before the device has finished computing them
        return settings.steps / (time.perf_counter() - t0)

    run(1, 2)  # warm-up
    c1 = [run(1, settings.steps) for _ in range(max(2, settings.c1_requests - 1))]
    throughput = {}
    for batch in settings.bare_batches:
        if batch > 1:
            run(batch, 2)  # warm-up at this batch size (allocator, kernel selection)
        throughput[batch] = batch / (statistics.median(c1) if batch == 1 else run(batch, settings.steps))
    best = max(throughput, key=lambda b: throughput[b])
    extra: dict[str, Any] = {}
    if settings.gpu:
        extra = {"unet_its_batch1": unet_its(1), f"unet_its_batch{best}": unet_its(best)}
        extra["unet_forward"] = {str(b): unet_forward_its(pipe.unet, b, height, width) for b in sorted({1, best})}
    return {
        **extra,
        "latency_c1_s": statistics.median(c1),
        "throughput_ips": throughput[best],
        "best_batch": best,
        "throughput_by_batch": {str(b): round(v, 4) for b, v in throughput.items()},
        "peak_rss_mb": psutil.Process().memory_info().rss / 2**20,
    }


def unet_forward_its(unet: Any, batch: int, height: int, width: int, iters: int = 30) -> dict[str, float]:
    """UNet forward passes per second at ``batch`` images (2x rows under guidance): eager, and replayed from
    a CUDA graph the way sdserve's denoiser runs it; plus the largest difference between the two outputs."""
    import torch

    from models.cudagraphs import GraphedUNet

    rows, c = 2 * batch, unet.config
    g = torch.Generator("cpu").manual_seed(0)
    sample = torch.randn((rows, c.in_channels, height // 8, width // 8), generator=g).to("cuda", unet.dtype)
    steps = torch.full((rows,), 500.0, device="cuda")
    hidden = torch.randn((rows, 77, c.cross_attention_dim), generator=g).to("cuda", unet.dtype)
    graphed = GraphedUNet(unet)

    def eager() -> Any:
        return unet(sample, steps, encoder_hidden_states=hidden, return_dict=False)[0]

    def replay() -> Any:
        return graphed(sample, steps, hidden, None)

    def rate(fn: Any) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        return iters / (time.perf_counter() - t0)

    with torch.inference_mode():
        eager_its, graph_its = rate(eager), rate(replay)
        diff = (eager().float() - replay().float()).abs().max().item()
    return {"eager_its": eager_its, "cuda_graph_its": graph_its, "max_abs_diff": diff}


def run_bare(model: Path, settings: Settings) -> dict[str, Any]:
    out = subprocess.run(
        [PY, "-m", "benchmarks.bench", "--bare-child", str(model), json.dumps(asdict(settings))],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=ROOT,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# -- (b), (c), (d): servers in their own process trees -----------------------------------------------------


def wait_until_quiet(busy_below: float = 20.0, max_wait_s: float = 90.0) -> float:
    """Wait until the machine is idle (the previous system's processes gone, this one's start-up done).

    Without this, the first phase of a system overlapped the previous system's shutdown and its own
    warm-up on this 2-core machine. Returns the CPU percentage last seen.
    """
    deadline = time.monotonic() + max_wait_s
    busy = psutil.cpu_percent(interval=1.0)
    while busy >= busy_below and time.monotonic() < deadline:
        busy = psutil.cpu_percent(interval=1.0)
    return busy


@contextmanager
def server(cmd: list[str], port: int, log: Path) -> Iterator[tuple[str, dict[str, float]]]:
    """Start a server, wait for /readyz, sample the RSS of its whole process tree; stop it afterwards."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    handle = log.open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    memory: dict[str, Any] = {"peak_rss_mb": 0.0}
    peaks: dict[int, tuple[str, float]] = {}  # pid -> (what it is, peak RSS in MB)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                root = psutil.Process(proc.pid)
                total = 0.0
                for p in [root, *root.children(recursive=True)]:
                    with suppress(psutil.Error):
                        rss = p.memory_info().rss / 2**20
                        total += rss
                        # The latest label: Ray workers take their actor's title after they start.
                        peaks[p.pid] = (process_label(p), max(rss, peaks.get(p.pid, ("", 0.0))[1]))
                memory["peak_rss_mb"] = max(memory["peak_rss_mb"], total)
            except psutil.Error:
                pass
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[:3]} exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise RuntimeError(f"{cmd[:3]} never became ready")
        wait_until_quiet()
        yield url, memory
    finally:
        stop.set()
        sampler.join()
        memory["processes_peak_rss_mb"] = by_label(peaks)
        stop_process_group(proc)
        handle.close()


def process_label(p: psutil.Process) -> str:
    """What a process is: Ray's title (``ray::ServeReplica:sdserve:Denoiser``), the module run with ``-m``, the
    script run, or the executable's name (``raylet``, ``gcs_server``)."""
    cmd = p.cmdline()
    if not cmd:
        return p.name()
    if cmd[0].startswith("ray::"):
        return cmd[0].split()[0].removeprefix("ray::").split(".")[0]  # no method name (".handle_request")
    if "-m" in cmd[:-1]:
        return cmd[cmd.index("-m") + 1]
    script = next((arg for arg in cmd[1:] if arg.endswith(".py")), None)
    return Path(script or cmd[0]).name


def by_label(peaks: dict[int, tuple[str, float]]) -> dict[str, float]:
    """Peak RSS per process, largest first; several processes of one kind are numbered."""
    out: dict[str, float] = {}
    for label, rss in sorted(peaks.values(), key=lambda item: -item[1]):
        name, n = label, 1
        while name in out:
            n += 1
            name = f"{label} #{n}"
        out[name] = round(rss, 1)
    return out


def measure(url: str, settings: Settings, rates: dict[str, float] | None) -> dict[str, Any]:
    """Latency at concurrency 1, saturation throughput and (given rates) Poisson and mixed loads."""
    base = {"size": settings.size, "steps": settings.steps}
    one = parse_mix([f"steps={settings.steps}:1"])
    asyncio.run(run_load(url, "closed", concurrency=1, max_requests=1, mix=one, base=base, duration_s=600))
    c1 = asyncio.run(
        run_load(url, "closed", concurrency=1, max_requests=settings.c1_requests, mix=one, base=base, duration_s=600)
    ).summary()
    sat_run = asyncio.run(
        run_load(
            url, "closed", concurrency=settings.saturation_concurrency, duration_s=settings.saturation_s,
            mix=one, base=base,
        )
    )  # fmt: skip
    sat = sat_run.summary()
    if not sat["succeeded"]:
        raise RuntimeError(f"{url}: no request succeeded at saturation: {sat['by_status']}")
    result: dict[str, Any] = {
        "latency_c1_s": c1["latency_s"]["p50"],
        "throughput_ips": sat["succeeded"] / sat["duration_s"],
        "saturation": sat,
    }
    if rates is not None:
        result.update(measure_open(url, settings, rates))
    return result


def sdserve_config(model: Path, settings: Settings, path: Path, port: int, cuda_graphs: bool = True) -> Path:
    from models.devices import available_cpus

    cpus = available_cpus()
    config = {
        "models": [{"name": "bench", "source": str(model)}],
        "http": {"host": "127.0.0.1", "port": port},
        "defaults": {"size": settings.size, "steps": settings.steps, "scheduler": "euler"},
        "limits": {"max_size": 1024, "request_timeout_s": 900},
        # Every core for the denoiser, one thread each for the light stages (same thread budget as (a)-(c)).
        "denoiser": {
            "max_batch_size": 16 if settings.gpu else 4,
            "max_queued_requests": -1,
            "torch_threads": cpus,
            "cuda_graphs": cuda_graphs,
        },
        "text_encoder": {"max_queued_requests": -1, "torch_threads": 1},
        "decoder": {"max_queued_requests": -1, "torch_threads": 1},
    }
    if settings.gpu:  # one GPU shared by the three stages, most of it for the denoiser
        for stage, share in (("text_encoder", 0.1), ("denoiser", 0.6), ("decoder", 0.3)):
            config[stage]["resources"] = {"num_gpus": share}
    path.write_text(yaml.safe_dump(config))
    return path


def poisson_rates(settings: Settings, capacity: float) -> dict[str, float]:
    """Open-loop rates: 50 % and 80 % of (b)'s capacity, and the mixed workload at 80 % of it in step terms."""
    short, long_, share = settings.mixed
    mean_steps = share * short + (1 - share) * long_
    return {
        "poisson_50": 0.5 * capacity,
        "poisson_80": 0.8 * capacity,
        "mixed_80": 0.8 * capacity * settings.steps / mean_steps,
    }


def measure_server(name: str, cmd: list[str], port: int, settings: Settings, out: Path,
                   rates: dict[str, float] | None) -> dict[str, Any]:  # fmt: skip
    with server(cmd, port, out / f"{name}.log") as (url, memory):
        result = measure(url, settings, rates)
        if rates is None:  # (b): its saturation throughput sets the rates of every open-loop phase
            result.update(measure_open(url, settings, poisson_rates(settings, result["throughput_ips"])))
    return {**result, **memory}


def run_system(
    name: str, model: Path, settings: Settings, out: Path, rates: dict[str, float] | None, cuda_graphs: bool = True
) -> dict[str, Any]:
    if name == "bare":
        return run_bare(model, settings)
    port = free_port()
    if name == "sdserve":
        config = sdserve_config(model, settings, out / "sdserve.yaml", port, cuda_graphs)
        cmd = [PY, "-m", "serving.cli", "serve", "--config", str(config)]
    else:
        cmd = [PY, "-m", f"benchmarks.baselines.{name}", str(model), str(port)]
    return measure_server(name, cmd, port, settings, out, rates)


def run_all(
    settings: Settings, out: Path, systems: list[str], resume: bool = False, cuda_graphs: bool = True
) -> dict[str, Any]:
    """Measure ``systems`` (in SYSTEMS order); with ``resume``, keep what OUT/results.json already holds."""
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "results.json"
    results: dict[str, Any] = json.loads(saved.read_text()) if resume and saved.exists() else {}
    if results and results["meta"]["settings"] != json.loads(json.dumps(asdict(settings))):
        raise SystemExit(f"{saved} was measured with other settings; run without --resume")
    started = time.perf_counter()
    for name in SYSTEMS:
        if name not in systems or name in results:
            continue
        model = model_dir(settings.model_size)
        rates = poisson_rates(settings, results["lock_server"]["throughput_ips"]) if "lock_server" in results else None
        if name in ("monolith", "sdserve") and rates is None:
            raise SystemExit(f"{name} needs (b)'s capacity for its Poisson rates: include lock_server")
        results[name] = run_system(name, model, settings, out, rates, cuda_graphs)
        print(f"{name}: c1 {results[name]['latency_c1_s']:.3f}s, {results[name]['throughput_ips']:.3f} img/s",
              flush=True)  # fmt: skip
        results["meta"] = {
            "settings": asdict(settings),
            "rates": poisson_rates(settings, results["lock_server"]["throughput_ips"])
            if "lock_server" in results
            else {},
            "wall_s": round(results.get("meta", {}).get("wall_s", 0) + time.perf_counter() - started, 1),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB",
            "commit": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
            ).stdout.strip(),
            "torch_threads": "one per core for (a)-(c) and for sdserve's denoiser; 1 each for sdserve's text encoder "
            "and decoder",
            "gpu": gpu_name(),
            "sdserve_cuda_graphs": cuda_graphs,
        }
        started = time.perf_counter()
        saved.write_text(json.dumps(results, indent=2))
    return results


def measure_open(url: str, settings: Settings, rates: dict[str, float]) -> dict[str, Any]:
    short, long_, share = settings.mixed
    one = parse_mix([f"steps={settings.steps}:1"])
    mix = parse_mix([f"steps={short}:{share}", f"steps={long_}:{1 - share}"])
    result = {}
    for name, rate in rates.items():
        summary = asyncio.run(
            run_load(
                url, "open", rate=rate, duration_s=settings.poisson_s, mix=mix if name == "mixed_80" else one,
                base={"size": settings.size},
            )
        ).summary()  # fmt: skip
        result[name] = {"rate_rps": rate, **summary}
    return result


SYSTEMS = {"bare": "(a) bare diffusers", "lock_server": "(b) lock server", "monolith": "(c) Ray monolith",
           "sdserve": "(d) sdserve"}  # fmt: skip


def plots(results: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in SYSTEMS if n in results]
    labels = [SYSTEMS[n] for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar(labels, [results[n]["latency_c1_s"] for n in names], color="tab:blue")
    ax1.set_ylabel("seconds")
    ax1.set_title("latency at concurrency 1 (lower is better)")
    ax2.bar(labels, [results[n]["throughput_ips"] for n in names], color="tab:green")
    ax2.set_ylabel("images / s")
    ax2.set_title("saturation throughput (higher is better)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelrotation=15)
    fig.tight_layout()
    fig.savefig(out / "bench-latency-throughput.png", dpi=110)
    plt.close(fig)

    served = [n for n in names if n != "bare"]
    phases = ["poisson_50", "poisson_80", "mixed_80"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=False)
    for ax, phase in zip(axes, phases, strict=True):
        for i, name in enumerate(served):
            lat = results[name].get(phase, {}).get("latency_s", {})
            values = [lat.get("p50", 0), lat.get("p95", 0), lat.get("p99", 0)]
            ax.bar([x + i * 0.25 for x in range(3)], values, width=0.25, label=SYSTEMS[name])
        ax.set_xticks([x + 0.25 for x in range(3)], ["p50", "p95", "p99"])
        ax.set_title(phase.replace("_", " at ") + " % of (b)'s capacity".replace("mixed at", "mixed"))
        ax.set_ylabel("seconds")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bench-percentiles.png", dpi=110)
    plt.close(fig)
    return ["bench-latency-throughput.png", "bench-percentiles.png"]


def unet_table(bare: dict[str, Any]) -> str:
    """UNet iterations per second (GPU runs): diffusers' own loop, and the bare forward pass eager vs graphed."""
    if "unet_forward" not in bare:
        return ""
    best = bare["best_batch"]
    rows = [
        f"| diffusers pipeline loop, eager (denoising steps/s, `output_type=\"latent\"`) | "
        f"{bare['unet_its_batch1']:.1f} | {bare[f'unet_its_batch{best}']:.1f} |",
        "| UNet forward pass, eager | " + " | ".join(f"{bare['unet_forward'][str(b)]['eager_its']:.1f}"
                                                 for b in (1, best)) + " |",
        "| UNet forward pass, replayed from a CUDA graph (as sdserve's denoiser runs it) | "
        + " | ".join(f"{bare['unet_forward'][str(b)]['cuda_graph_its']:.1f}" for b in (1, best)) + " |",
    ]  # fmt: skip
    diff = max(v["max_abs_diff"] for v in bare["unet_forward"].values())
    return f"""
| UNet iterations / s (one iteration = one guided step: 2 rows per image) | batch 1 | batch {best} |
|---|---|---|
{chr(10).join(rows)}

Largest difference between the eager and the graphed UNet output on the same input: {diff:g}.
"""


def memory_table(results: dict[str, Any]) -> str:
    """Peak RSS of every process of each served system (runs from before this was recorded have none)."""
    rows = []
    for name in SYSTEMS:
        processes = results[name].get("processes_peak_rss_mb")
        if processes:
            listed = ", ".join(f"{label} {rss:.0f}" for label, rss in processes.items())
            rows.append(f"| {SYSTEMS[name]} | {len(processes)} | {listed} |")
    if not rows:
        return ""
    return f"""
Peak RSS of every process, in MB (the table's figure is the peak of their sum; (a) is one process):

| system | processes | each process's peak RSS (MB), largest first |
|---|---|---|
{chr(10).join(rows)}
"""


def report(results: dict[str, Any], images: list[str], image_dir: str) -> str:
    meta = results["meta"]
    s = meta["settings"]
    bare, lock, mono, sd = (results[n] for n in ("bare", "lock_server", "monolith", "sdserve"))
    rows = []
    for name in SYSTEMS:
        r = results[name]
        p80 = r.get("poisson_80", {}).get("latency_s", {})
        p50 = r.get("poisson_50", {}).get("latency_s", {})
        mixed = r.get("mixed_80", {}).get("latency_s", {})
        fmt = lambda d: f"{d['p50']:.2f} / {d['p95']:.2f} / {d['p99']:.2f}" if d else "—"  # noqa: E731
        rows.append(
            f"| {SYSTEMS[name]} | {r['latency_c1_s']:.2f} | {r['throughput_ips']:.3f} | {fmt(p50)} | {fmt(p80)} "
            f"| {fmt(mixed)} | {r['peak_rss_mb']:.0f} |"
        )
    c1_ratio = sd["latency_c1_s"] / bare["latency_c1_s"]
    tp_bare = sd["throughput_ips"] / bare["throughput_ips"]
    p99_sd = sd["poisson_80"]["latency_s"]["p99"]
    p99_lock = lock["poisson_80"]["latency_s"]["p99"]

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    targets = [
        f"| latency at concurrency 1 ≤ 1.10 × bare | {c1_ratio:.2f} × | {verdict(c1_ratio <= 1.10)} |",
        f"| saturation throughput ≥ 0.95 × bare | {tp_bare:.2f} × | {verdict(tp_bare >= 0.95)} |",
        f"| saturation throughput ≥ lock server and ≥ monolith | {sd['throughput_ips'] / lock['throughput_ips']:.2f} × "
        f"/ {sd['throughput_ips'] / mono['throughput_ips']:.2f} × "
        f"| {verdict(sd['throughput_ips'] >= lock['throughput_ips'] and sd['throughput_ips'] >= mono['throughput_ips'])} |",
        f"| p99 at 80 % Poisson load ≤ lock server's p99 | {p99_sd:.2f} s vs {p99_lock:.2f} s "
        f"| {verdict(p99_sd <= p99_lock)} |",
    ]
    pics = "\n".join(f"![{i}]({image_dir}/{i})" for i in images)
    return f"""
| | |
|---|---|
| date | {meta["date"]} |
| machine | {meta["machine"]}{", " + meta["gpu"] if meta.get("gpu") else ", no GPU"} |
| commit | `{meta["commit"]}` |
| model | `{s["model_size"]}` test model, {s["size"]}, euler, {s["steps"]} steps, {"fp16 on CUDA" if s["gpu"] else "fp32 on CPU"}, guidance 7.5 |
| threads | {meta["torch_threads"]} |
| saturation | closed loop, {s["saturation_concurrency"]} requests in flight for {s["saturation_s"]:.0f} s; Poisson phases {s["poisson_s"]:.0f} s each |
| wall time of the run | {meta["wall_s"]:.0f} s |
| rates | 50 % / 80 % of (b)'s measured capacity: {meta["rates"]["poisson_50"]:.3f} / {meta["rates"]["poisson_80"]:.3f} req/s; mixed ({s["mixed"][2]:.0%} at {s["mixed"][0]} steps, the rest at {s["mixed"][1]}) at 80 %: {meta["rates"]["mixed_80"]:.3f} req/s |

| system | latency c=1 (s) | saturation (img/s) | Poisson 50 %: p50 / p95 / p99 (s) | Poisson 80 % | mixed 80 % | peak RSS (MB) |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

(a) runs in-process at its best batch size ({bare["best_batch"]}; images/s by batch: {bare["throughput_by_batch"]}), so it has no
Poisson rows: it is the compute limit, not a server.
{memory_table(results)}{unet_table(bare)}
| target | measured (same run) | verdict |
|---|---|---|
{chr(10).join(targets)}

{pics}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model and seconds-long phases (harness check)")
    parser.add_argument("--gpu", action="store_true", help="sd15 architecture, 512x512, 25 steps, fp16 on CUDA")
    parser.add_argument("--out", default="benchmarks/results", help="folder for results.json, logs and plots")
    parser.add_argument("--report", help="write the results section into this Markdown file (BENCHMARKS.md)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ",".join(SYSTEMS))
    parser.add_argument("--eager-unet", action="store_true", help="sdserve with denoiser.cuda_graphs off (GPU)")
    parser.add_argument("--report-only", action="store_true", help="plots and report from OUT/results.json")
    parser.add_argument("--resume", action="store_true", help="keep the systems OUT/results.json already holds")
    parser.add_argument("--bare-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare_child:
        model, raw = args.bare_child
        settings = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(raw).items()})
        print(json.dumps(bare_main(model, settings)))
        return 0
    settings = Settings.quick(args.gpu) if args.quick else Settings.on_gpu() if args.gpu else Settings()
    marker = "gpu-results" if settings.gpu else "results"
    out = Path(args.out)
    if args.report_only:  # re-render plots and report from a finished run
        results = json.loads((out / "results.json").read_text())
        marker = "gpu-results" if results["meta"]["settings"]["gpu"] else "results"
    else:
        results = run_all(settings, out, args.systems.split(","), resume=args.resume, cuda_graphs=not args.eager_unet)
    if not all(name in results for name in SYSTEMS):
        print(f"measured so far: {', '.join(n for n in SYSTEMS if n in results)}; results in {out / 'results.json'}")
        return 0
    images = plots(results, out)
    section = report(results, images, os.path.relpath(out, Path(args.report).parent) if args.report else str(out))
    (out / "report.md").write_text(section)
    if args.report:
        path = Path(args.report)
        start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
        text = path.read_text() if path.exists() else f"{start}\n{end}\n"
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        path.write_text(f"{head}{start}\n{section}\n{end}{tail}")
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
