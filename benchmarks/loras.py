"""Per-request LoRA: mixed-adapter batches against no adapters, grouping by adapter and diffusers' fuse per request,
and what activating an adapter costs from each tier. One run, side by side, on the current device.

Rows (the in-process denoiser and ``StepBatcher``, euler, guidance 7.5; N requests of one image each, submitted
together; median of R runs, variants interleaved run by run):

- (a) **N requests with N different adapters** in mixed UNet calls vs **the same N requests without adapters**
  (images/s, and the ratio: target >= 0.85).
- (b) the same adapter load **grouped by adapter set** (requests with different adapters never share a call: one
  batch per adapter), and **diffusers' ``load_lora_weights`` + ``fuse_lora``** before each request (unfused and
  unloaded after), what people do with one pipeline today.
- (c) **activation time** of an adapter: already resident in a slot, copied from host memory into a slot, read
  from the local snapshot cache (read + convert + copy), against diffusers' ``load_lora_weights`` +
  ``fuse_lora``; at rank 16 and 64.

CPU: the ``bench`` test model at 128x128, 10 steps. CUDA: ``sd15`` at 512x512, 25 steps, fp16.

    python -m benchmarks.loras --out benchmarks/results --report BENCHMARKS.md   # `make bench`, a few minutes
    python -m benchmarks.loras --quick                                          # tiny model: harness check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.upscale_safety import generation_model, run_meta, summary, write_section

ROOT = Path(__file__).resolve().parents[1]
MARKER = "loras"
GUIDANCE = 7.5


@dataclass
class Settings:
    model_size: str = "bench"
    resolution: int = 128
    steps: int = 10
    requests: int = 8
    rank: int = 16
    repeats: int = 3
    dtype: str = "float32"

    @classmethod
    def gpu(cls) -> Settings:
        return cls(model_size="sd15", resolution=512, steps=25, dtype="float16")

    @classmethod
    def quick(cls) -> Settings:
        return cls(model_size="tiny", resolution=64, steps=2, requests=3, rank=4, repeats=1)


def measure(settings: Settings, device: torch.device, dtype: torch.dtype, tmp: Path) -> dict[str, Any]:
    from models.adapters import read_lora
    from models.contracts import DenoiseParams, EncodeRequest
    from models.denoiser import DenoiserStage
    from models.snapshot import open_snapshot
    from models.stepbatcher import StepBatcher
    from models.testmodels import create_test_lora
    from models.text_encoder import TextEncoderStage

    model = generation_model(settings.model_size, settings.dtype, tmp)
    snap = open_snapshot(str(model))
    n = settings.requests
    files = [create_test_lora(model, tmp / f"lora{i}", "kohya", settings.rank, None, False, seed=i) for i in range(n)]
    big = create_test_lora(model, tmp / "lora-r64", "kohya", 64, None, False, seed=99)
    loras = [read_lora(f) for f in files]
    denoiser = DenoiserStage(
        "m", snap, device, dtype, cuda_graphs=device.type == "cuda", lora_slots=n + 2, lora_max_rank=64,
        loras_per_request=1, max_rows=2 * n,
    )  # fmt: skip
    assert denoiser.loras is not None
    encoder = TextEncoderStage("m", snap, device, dtype)
    side = settings.resolution
    params = [DenoiseParams("m", side, side, settings.steps, GUIDANCE, "euler", seed=i) for i in range(n)]
    embs = encoder.encode([EncodeRequest("m", f"a lantern, variation {i}", None, True) for i in range(n)])
    slots = [denoiser.loras.acquire(str(f), w.unet) for f, w in zip(files, loras, strict=True)]
    executor = ThreadPoolExecutor(max_workers=1)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    async def batched(adapters: list[tuple[tuple[int, float], ...]]) -> list[int]:
        batcher = StepBatcher(executor, max_batch_size=n)
        await asyncio.gather(
            *(batcher.submit(denoiser, p, e, adapters=a) for p, e, a in zip(params, embs, adapters, strict=True))
        )
        return batcher.batch_sizes

    def run_batched(with_adapters: bool) -> tuple[float, list[int]]:
        adapters = [((slot, 1.0),) if with_adapters else () for slot in slots]
        started = time.perf_counter()
        sizes = asyncio.run(batched(adapters))
        sync()
        return time.perf_counter() - started, sizes

    def run_grouped() -> float:
        started = time.perf_counter()
        for p, e, slot in zip(params, embs, slots, strict=True):  # one adapter set per batch: batch size 1
            denoiser.run(p, e, adapters=((slot, 1.0),))
        sync()
        return time.perf_counter() - started

    pipe = diffusers_pipeline(model, device, dtype)

    def run_fused() -> float:
        started = time.perf_counter()
        for p, f in zip(params, files, strict=True):
            pipe.load_lora_weights(str(f.parent), weight_name=f.name, adapter_name="x")
            pipe.fuse_lora(lora_scale=1.0)
            pipe(
                f"a lantern, variation {p.seed}", height=side, width=side, num_inference_steps=p.steps,
                guidance_scale=GUIDANCE, generator=torch.Generator("cpu").manual_seed(p.seed), output_type="latent",
            )  # fmt: skip
            pipe.unfuse_lora()
            pipe.unload_lora_weights()
        sync()
        return time.perf_counter() - started

    run_batched(True)  # warm-up (and graph capture on CUDA)
    times: dict[str, list[float]] = {"none": [], "mixed": [], "grouped": [], "fused": []}
    calls: dict[str, list[int]] = {}
    for _ in range(settings.repeats):
        t, calls["none"] = run_batched(False)
        times["none"].append(t)
        t, calls["mixed"] = run_batched(True)
        times["mixed"].append(t)
        times["grouped"].append(run_grouped())
        times["fused"].append(run_fused())
    throughput = {k: {**summary(v, n), "images_per_s": n / statistics.median(v)} for k, v in times.items()}
    base = throughput["none"]["images_per_s"]
    for row in throughput.values():
        row["ratio_to_no_adapters"] = row["images_per_s"] / base
    for name in ("none", "mixed"):
        throughput[name]["images_per_unet_call"] = statistics.mean(calls[name])
    for slot in slots:
        denoiser.loras.release(slot)
    return {
        "throughput": throughput,
        "activation": activation(
            denoiser, pipe, {f"rank {settings.rank}": files[0], "rank 64": big}, device, settings.repeats
        ),
    }


def diffusers_pipeline(model: Path, device: torch.device, dtype: torch.dtype) -> Any:
    from diffusers import StableDiffusionPipeline
    from diffusers.schedulers import EulerDiscreteScheduler

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, torch_dtype=dtype).to(device)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def activation(denoiser: Any, pipe: Any, files: dict[str, Path], device: torch.device, repeats: int) -> dict[str, Any]:
    """Seconds to make an adapter usable by the next UNet call, from each tier."""
    from models.adapters import read_lora

    bank = denoiser.loras
    out: dict[str, Any] = {}

    def timed(fn: Any) -> float:
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    for label, path in files.items():
        layers = read_lora(path).unet
        rows: dict[str, list[float]] = {"resident": [], "host": [], "local_cache": [], "diffusers_load_fuse": []}
        for i in range(repeats):
            key = f"{label}-{i}"

            def use(key: str, layers: dict[str, Any]) -> None:
                bank.release(bank.acquire(key, layers))

            def fuse(path: Path, name: str) -> None:
                pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
                pipe.fuse_lora(lora_scale=1.0)

            rows["local_cache"].append(timed(lambda: use(key, read_lora(path).unet)))  # noqa: B023 (called at once)
            rows["resident"].append(timed(lambda: use(key, layers)))  # noqa: B023
            del bank.resident[key]  # evicted: the next acquire copies from host memory
            rows["host"].append(timed(lambda: use(key, layers)))  # noqa: B023
            del bank.resident[key]
            rows["diffusers_load_fuse"].append(timed(lambda: fuse(path, f"a{i}")))  # noqa: B023
            pipe.unfuse_lora()
            pipe.unload_lora_weights()
        out[label] = {k: {"median_ms": statistics.median(v) * 1000} for k, v in rows.items()}
    return out


def report(results: dict[str, Any]) -> str:
    meta, tp, act = results["meta"], results["throughput"], results["activation"]
    s = meta["settings"]
    lines = [
        f"### Per-request LoRA ({meta['device']}: {meta['gpu'] or meta['machine']})",
        "",
        f"Measured {meta['date']} on {meta['gpu'] or meta['machine']} ({meta['device']}, torch {meta['torch']}, "
        f"commit {meta['commit']}): `{s['model_size']}` model, {s['resolution']}x{s['resolution']}, "
        f"{s['steps']} steps, {s['requests']} requests of one image submitted together, adapters of rank "
        f"{s['rank']} (UNet), median of {s['repeats']} runs interleaved. `python -m benchmarks.loras`.",
        "",
        "| load | images/s | vs no adapters | images per UNet call |",
        "|---|---|---|---|",
    ]
    names = {
        "none": "no adapters (mixed batches)",
        "mixed": f"**{s['requests']} different adapters, mixed in one batch**",
        "grouped": "grouped by adapter set (one batch per adapter)",
        "fused": "diffusers `load_lora_weights` + `fuse_lora` per request",
    }
    for key, label in names.items():
        row = tp[key]
        per_call = f"{row['images_per_unet_call']:.1f}" if "images_per_unet_call" in row else "1"
        lines.append(f"| {label} | {row['images_per_s']:.2f} | {row['ratio_to_no_adapters']:.2f}x | {per_call} |")
    lines += ["", "Activation (time until the next UNet call can use the adapter):", ""]
    lines += ["| adapter | resident | host memory | local cache | diffusers load + fuse |", "|---|---|---|---|---|"]
    for label, row in act.items():
        cells = [f"{row[k]['median_ms']:.1f} ms" for k in ("resident", "host", "local_cache", "diffusers_load_fuse")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, seconds: checks the harness")
    parser.add_argument("--gpu", action="store_true", help="sd15 in fp16 on CUDA")
    parser.add_argument("--out", type=Path, help="folder for loras.json")
    parser.add_argument("--report", type=Path, help="Markdown file whose LoRA section is rewritten")
    args = parser.parse_args(argv)
    settings = Settings.quick() if args.quick else Settings.gpu() if args.gpu else Settings()
    device = torch.device("cuda" if args.gpu else "cpu")
    dtype = torch.float16 if settings.dtype == "float16" else torch.float32
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = measure(settings, device, dtype, Path(tmp))
    results["meta"] = run_meta(device, settings, started)
    text = report(results)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / ("loras-gpu.json" if args.gpu else "loras.json")).write_text(json.dumps(results, indent=2))
    if args.report:
        write_section(args.report, text, MARKER + ("-gpu" if args.gpu else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
