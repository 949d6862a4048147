"""Upscaler throughput and safety-check cost, side by side, on the current device.

Two questions about the pixel stages after the VAE, measured in one run on one machine:

- **Upscaler throughput, tiled.** RealESRGAN_x4plus (RRDBNet) and realesr-general-x4v3 (SRVGGNetCompact) with
  random weights in the published shapes, through ``UpscalerStage.upscale`` at x4 with the stage's default
  tiles (192 px, overlap 16, 4 tiles per forward): input and output megapixels per second. CPU: 256x256 ->
  1024x1024 in fp32; CUDA: 512x512 -> 2048x2048 in fp16.
- **Safety-check cost per image** against a 25-step generation of the same size on the in-process stages
  (text encoder, denoiser, VAE decoder; euler, guidance 7.5): ``SafetyCheckerStage.check`` with a
  ViT-L/14-size random-weight checker (the published checker's shapes) on batches of 1 and 4, the VAE decode
  alone, and pickle dumps + loads of one (1, H, W, 3) uint8 image, the lower bound of the extra object-store
  hop a separately deployed checker costs. CPU: the ``bench`` test model at 256x256 in fp32; CUDA: ``sd15``
  at 512x512 in fp16.

Every figure is the median of N timed runs after one warm-up run.

    python -m benchmarks.upscale_safety                              # about 4 minutes on 2 CPU cores
    python -m benchmarks.upscale_safety --out benchmarks/results --report BENCHMARKS.md   # `make bench`
    python -m benchmarks.upscale_safety --quick                      # tiny models, seconds: harness check
    python -m benchmarks.upscale_safety --report-only --report BENCHMARKS.md  # re-render from the JSON
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pickle
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
UPSCALERS = ("RealESRGAN_x4plus", "realesr-general-x4v3")
GUIDANCE = 7.5
SCHEDULER = "euler"
MARKER = "upscale-safety"

CLIP_CROP = 224


@dataclass
class Settings:
    upscale_input: int = 256  # px, square
    tile: int = 192
    overlap: int = 16
    max_tile_batch: int = 4
    upscaler_size: str = "full"  # create_test_upscaler size
    upscale_repeats: dict[str, int] | None = None  # per layout; the default below when None
    model_size: str = "bench"
    resolution: int = 256  # generation px, square
    steps: int = 25
    generation_repeats: int = 3
    checker: str = "vit-l14"  # or "tiny" (models.safety.create_test_safety_checker)
    check_repeats: int = 5
    hop_repeats: int = 200
    dtype: str = "float32"

    def repeats(self, layout: str) -> int:
        return (self.upscale_repeats or {}).get(layout, 3)

    @classmethod
    def cpu(cls) -> Settings:
        # RRDBNet x4plus at 256x256 is ~40 s an image on 2 cores: 2 timed runs keep the script near 4 minutes.
        return cls(upscale_repeats={"RealESRGAN_x4plus": 2, "realesr-general-x4v3": 3})

    @classmethod
    def gpu(cls) -> Settings:
        return cls(
            upscale_input=512,
            upscale_repeats={"RealESRGAN_x4plus": 5, "realesr-general-x4v3": 10},
            model_size="sd15",
            resolution=512,
            generation_repeats=5,
            check_repeats=20,
            hop_repeats=500,
            dtype="float16",
        )

    @classmethod
    def quick(cls, gpu: bool) -> Settings:
        """Tiny models and small inputs (still tiled 2x2): checks the harness runs, figures mean nothing."""
        return cls(
            upscale_input=128,
            tile=96,
            upscaler_size="tiny",
            upscale_repeats={layout: 1 for layout in UPSCALERS},
            model_size="tiny",
            resolution=64,
            steps=4,
            generation_repeats=1,
            checker="tiny",
            check_repeats=1,
            hop_repeats=20,
            dtype="float16" if gpu else "float32",
        )


def timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after one untimed warm-up call."""

    def once() -> float:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    once()
    return [once() for _ in range(repeats)]


def summary(times: list[float], per: int = 1) -> dict[str, Any]:
    """Median and range of ``times`` (seconds for ``per`` items), per item."""
    return {
        "median_s": statistics.median(times) / per,
        "min_s": min(times) / per,
        "max_s": max(times) / per,
        "runs": len(times),
    }


# -- upscalers ------------------------------------------------------------------------------------------------


def measure_upscalers(settings: Settings, device: torch.device, dtype: torch.dtype, tmp: Path) -> list[dict]:
    side = settings.upscale_input
    image = np.random.default_rng(0).integers(0, 256, (1, side, side, 3), dtype=np.uint8)
    rows = []
    for layout in UPSCALERS:
        row = measure_upscaler(layout, image, settings, device, dtype, tmp)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def measure_upscaler(
    layout: str, image: np.ndarray, settings: Settings, device: torch.device, dtype: torch.dtype, tmp: Path
) -> dict[str, Any]:
    from models.snapshot import ArtifactSnapshot
    from models.upscaler import UpscalerStage, create_test_upscaler

    path = create_test_upscaler(tmp / layout, layout, seed=0, size=settings.upscaler_size)
    stage = UpscalerStage(
        layout,
        ArtifactSnapshot(path, "bench", "upscaler"),
        device,
        dtype,
        tile_size=settings.tile,
        tile_overlap=settings.overlap,
        max_tile_batch=settings.max_tile_batch,
    )
    out: list[np.ndarray] = []
    times = timed(lambda: out.append(stage.upscale(image, float(stage.scale))), settings.repeats(layout), device)
    _, in_h, in_w, _ = image.shape
    out_h, out_w = out[-1].shape[1:3]
    rows, cols = (tiles_per_side(side, settings.tile, settings.overlap) for side in (in_h, in_w))
    stats = summary(times)
    return {
        "layout": layout,
        "architecture": stage.architecture,
        "parameters": sum(p.numel() for p in stage.model.parameters()),
        "input": f"{in_w}x{in_h}",
        "output": f"{out_w}x{out_h}",
        "tiles": rows * cols,
        "tiles_grid": f"{rows}×{cols}",
        **stats,
        "input_mp_per_s": in_h * in_w / 1e6 / stats["median_s"],
        "output_mp_per_s": out_h * out_w / 1e6 / stats["median_s"],
    }


def tiles_per_side(length: int, tile: int, overlap: int) -> int:
    """How many tiles ``upscale_tensor`` cuts one side into (equal tiles sharing at least ``overlap`` px)."""
    return 1 if length <= tile else math.ceil((length - overlap) / (tile - overlap))


# -- safety check against a generation ------------------------------------------------------------------------


def real_size_checker(directory: Path) -> Path:
    """A random-weight checker with the published checker's shapes, saved as the published artifact is."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from safetensors.torch import load_file, save_file
    from transformers import CLIPConfig, CLIPImageProcessor

    from models.safety import INERT_THRESHOLD, VIT_L14_PROJECTION_DIM, VIT_L14_VISION_CONFIG, published_key

    config = CLIPConfig(vision_config=VIT_L14_VISION_CONFIG, projection_dim=VIT_L14_PROJECTION_DIM)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        checker: Any = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():  # no concept fires: every image passes, as most do
        checker.concept_embeds_weights.fill_(INERT_THRESHOLD)
        checker.special_care_embeds_weights.fill_(INERT_THRESHOLD)
    checker.save_pretrained(directory)
    weights = directory / "model.safetensors"
    save_file({published_key(k): v for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    # The published preprocessor_config.json: bicubic shortest-edge resize to 224, 224 centre crop, CLIP mean/std.
    CLIPImageProcessor(
        size={"shortest_edge": CLIP_CROP}, crop_size={"height": CLIP_CROP, "width": CLIP_CROP}, resample=3
    ).save_pretrained(directory)
    return directory


def generation_model(size: str, dtype: str, tmp: Path) -> Path:
    """The test model folder: cached under SDSERVE_HOME as ``benchmarks.bench`` caches it (fp32 only there)."""
    from models.testmodels import TEST_MODEL_SIZES, create_test_model

    if dtype == TEST_MODEL_SIZES[size].default_dtype:
        from benchmarks.bench import model_dir

        return model_dir(size)
    return create_test_model(tmp / f"{size}-{dtype}", size=size, seed=0, dtype=dtype)


def measure_generation(
    settings: Settings, device: torch.device, dtype: torch.dtype, tmp: Path
) -> tuple[dict[str, Any], dict[str, Any], np.ndarray]:
    """(generation timing, VAE decode timing, the last generated image) on the in-process stages."""
    from models.contracts import DenoiseParams, EncodeRequest
    from models.decoder import DecoderStage
    from models.denoiser import DenoiserStage
    from models.snapshot import open_snapshot
    from models.text_encoder import TextEncoderStage

    snap = open_snapshot(str(generation_model(settings.model_size, settings.dtype, tmp)))
    encoder = TextEncoderStage("m", snap, device, dtype)
    denoiser = DenoiserStage("m", snap, device, dtype)
    decoder = DecoderStage("m", snap, device, dtype)
    side = settings.resolution
    params = DenoiseParams("m", side, side, settings.steps, GUIDANCE, SCHEDULER, seed=0)
    prompts = iter(range(10**6))
    images: list[np.ndarray] = []

    def generate() -> None:
        # A new prompt each time: the text encoder caches embeddings by text, a served request may miss.
        (emb,) = encoder.encode([EncodeRequest("m", f"a cozy cabin in the woods {next(prompts)}", None, True)])
        images.append(decoder.decode_pixels(denoiser.run(params, emb).tensor))

    generation = summary(timed(generate, settings.generation_repeats, device))
    print(json.dumps({"generation": generation}), flush=True)
    (emb,) = encoder.encode([EncodeRequest("m", "a cozy cabin in the woods", None, True)])
    latents = denoiser.run(params, emb).tensor
    decode = summary(timed(lambda: decoder.decode_pixels(latents), settings.check_repeats, device))
    print(json.dumps({"vae_decode": decode}), flush=True)
    return generation, decode, images[-1]


def measure_safety(settings: Settings, device: torch.device, dtype: torch.dtype, tmp: Path) -> dict[str, Any]:
    from models.safety import VIT_L14_VISION_CONFIG, SafetyCheckerStage, create_test_safety_checker
    from models.snapshot import ArtifactSnapshot

    generation, decode, image = measure_generation(settings, device, dtype, tmp)
    if settings.checker == "tiny":
        checker_dir = create_test_safety_checker(tmp / "checker")
    else:
        checker_dir = real_size_checker(tmp / "checker")
    checker = SafetyCheckerStage("safety", ArtifactSnapshot(checker_dir, "bench", "safety_checker"), device, dtype)
    side = settings.resolution
    # The generated image plus three more of the same size (noise: preprocessing cost depends on size only).
    noise = np.random.default_rng(0).integers(0, 256, (3, side, side, 3), dtype=np.uint8)
    batch = np.concatenate([image, noise])
    check = {}
    for n in (1, 4):
        images = batch[:n]
        verdicts = checker.check(images)
        assert len(verdicts) == n and not any(v.flagged for v in verdicts)  # every concept is inert
        check[f"batch_{n}"] = summary(
            timed(lambda images=images: checker.check(images), settings.check_repeats, device), per=n
        )
        print(json.dumps({f"check_batch_{n}": check[f"batch_{n}"]}), flush=True)

    one = np.ascontiguousarray(image[:1])
    hop = summary(timed(lambda: pickle.loads(pickle.dumps(one, protocol=5)), settings.hop_repeats, torch.device("cpu")))
    print(json.dumps({"pickle_hop": hop}), flush=True)
    gen_s = generation["median_s"]
    return {
        "checker": {
            "kind": settings.checker,
            "parameters": sum(p.numel() for p in checker.checker.parameters()),
            "vision_config": VIT_L14_VISION_CONFIG if settings.checker != "tiny" else "tiny",
        },
        "image": f"{side}x{side}",
        "generation": {**generation, "model": settings.model_size, "steps": settings.steps},
        "vae_decode": decode,
        "check": check,
        "pickle_hop": {**hop, "array": [1, side, side, 3], "bytes": one.nbytes},
        "check_over_generation": {k: v["median_s"] / gen_s for k, v in check.items()},
        "check_over_decode": {k: v["median_s"] / decode["median_s"] for k, v in check.items()},
    }


# -- report ---------------------------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> str:
    meta, up, safety = results["meta"], results["upscalers"], results["safety"]
    s = meta["settings"]
    gen = safety["generation"]
    gen_s = gen["median_s"]

    def row(*cells: object) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"

    def share(d: dict[str, Any]) -> str:
        percent = 100 * d["median_s"] / gen_s
        return f"{percent:.1f} %" if percent >= 0.1 else f"{percent:.2g} %"

    up_rows = [
        row(
            f"{r['layout']} ({r['architecture']}, {r['parameters'] / 1e6:.1f} M params)",
            f"{r['input']} → {r['output']}",
            f"{r['tiles']} ({r['tiles_grid']})",
            f"{r['median_s']:.2f}",
            f"{r['input_mp_per_s']:.4f}",
            f"{r['output_mp_per_s']:.3f}",
            r["runs"],
        )
        for r in up
    ]
    checker = safety["checker"]
    if checker["kind"] == "tiny":
        checker_name = "tiny test checker"
    else:
        checker_name = f"ViT-L/14 size, {checker['parameters'] / 1e6:.0f} M params"
    hop = safety["pickle_hop"]
    shape = ", ".join(map(str, hop["array"]))
    timings = [
        (
            f"{gen['steps']}-step generation: text encode, {gen['steps']} steps {SCHEDULER} at guidance {GUIDANCE}, "
            f"VAE decode (`{gen['model']}` model)",
            gen,
        ),
        ("VAE decode alone", safety["vae_decode"]),
        *((f"safety check ({checker_name}), batch {n}, per image", safety["check"][f"batch_{n}"]) for n in (1, 4)),
        (f"pickle dumps + loads of one ({shape}) uint8 image, {hop['bytes'] / 1024:.0f} KiB", hop),
    ]
    safety_rows = [
        row(name, f"{d['median_s'] * 1000:.3f}" if d["median_s"] < 0.01 else f"{d['median_s'] * 1000:.1f}",
            share(d), d["runs"])
        for name, d in timings
    ]  # fmt: skip
    device = meta["gpu"] or f"CPU, {meta['torch_threads']} torch threads"
    quick = " (**--quick: tiny models, figures mean nothing**)" if meta["quick"] else ""
    tiles = f"{s['tile']} px tiles, overlap {s['overlap']}, up to {s['max_tile_batch']} per forward"
    lines = [
        "",
        "| | |",
        "|---|---|",
        row("date", meta["date"]),
        row("machine", meta["machine"] + (", " + meta["gpu"] if meta["gpu"] else ", no GPU")),
        row("commit", f"`{meta['commit']}`"),
        row("device", f"{device}, {s['dtype']}, torch {meta['torch']}"),
        row("timing", f"median of N runs after one warm-up run; random weights in the published shapes{quick}"),
        row("wall time of the run", f"{meta['wall_s']:.0f} s"),
        "",
        row(f"upscaler, x4 ({tiles})", "input → output", "tiles", "s / image", "input MP/s", "output MP/s", "N"),
        "|---|---|---|---|---|---|---|",
        *up_rows,
        "",
        row(f"per image, {safety['image'].replace('x', '×')}, {s['dtype']}", "ms", "share of a generation", "N"),
        "|---|---|---|---|",
        *safety_rows,
        "",
    ]
    return "\n".join(lines)


def write_section(path: Path, section: str, marker: str = MARKER) -> None:
    """Replace the text between a benchmark's markers in ``path`` (appended when they are missing)."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    text = path.read_text() if path.exists() else ""
    if start not in text:
        text = f"{text.rstrip()}\n\n{start}\n{end}\n"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{start}\n{section}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models and inputs, one run each (harness check)")
    parser.add_argument("--cpu", action="store_true", help="measure on the CPU even when CUDA is available")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads on the CPU")
    parser.add_argument("--out", default="benchmarks/results", help="folder for upscale_safety.json")
    parser.add_argument("--report", help="write the results section into this Markdown file (BENCHMARKS.md)")
    parser.add_argument("--report-only", action="store_true", help="the report from OUT/upscale_safety.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        return write_report(json.loads((out / "upscale_safety.json").read_text()), args.report)
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    settings = Settings.quick(cuda) if args.quick else Settings.gpu() if cuda else Settings.cpu()
    dtype = {"float32": torch.float32, "float16": torch.float16}[settings.dtype]
    if not cuda:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="upscale-safety-") as name:
        tmp = Path(name)
        upscalers = measure_upscalers(settings, device, dtype, tmp)
        safety = measure_safety(settings, device, dtype, tmp)
    results = {
        "meta": run_meta(device, settings, started, quick=args.quick),
        "upscalers": upscalers,
        "safety": safety,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "upscale_safety.json").write_text(json.dumps(results, indent=2) + "\n")
    return write_report(results, args.report)


def run_meta(device: torch.device, settings: Any, started: float, **extra: Any) -> dict[str, Any]:
    """Where and when a benchmark ran: date, machine, device, torch, commit, its settings and wall time."""
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": device.type,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        **extra,
        "settings": asdict(settings),
        "wall_s": time.perf_counter() - started,
    }


def write_report(results: dict[str, Any], markdown: str | None) -> int:
    section = report(results)
    if markdown:
        write_section(Path(markdown), section)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
