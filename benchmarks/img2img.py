"""Image to image, inpainting and the hires fix against text to image, side by side, on the current device.

Measured in one run on the in-process stages (text encoder, denoiser, VAE; euler, guidance 7.5), each figure
the median of N timed runs after one warm-up, the variants interleaved run by run so machine noise hits all:

- **img2img at strength 0.5 vs txt2img at the same steps**: img2img adds a VAE encode and runs
  int(steps * 0.5) denoising steps, so it should take a bit over half the time.
- **Inpainting** (ordinary UNet: mask blending every step) at strength 1.0 vs txt2img.
- **Hires fix** (txt2img at S, latents upscaled x2, an img2img pass at 2S with denoising strength 0.5) vs
  txt2img straight at 2S.
- **Mixed load**: txt2img and img2img jobs submitted together to one ``StepBatcher``: images per UNet call
  (the ``sdserve_denoiser_batch_images`` histogram reports the same in service).

CPU: the ``bench`` test model at 256x256 (hires 256 -> 512) in fp32. CUDA: ``sd15`` at 512x512 (hires
512 -> 1024) in fp16.

    python -m benchmarks.img2img                                  # about 3 minutes on 2 CPU cores
    python -m benchmarks.img2img --out benchmarks/results --report BENCHMARKS.md   # `make bench`
    python -m benchmarks.img2img --quick                          # tiny model, seconds: harness check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.upscale_safety import generation_model, run_meta, summary, write_section

ROOT = Path(__file__).resolve().parents[1]
MARKER = "img2img"
GUIDANCE = 7.5
SCHEDULER = "euler"


@dataclass
class Settings:
    model_size: str = "bench"
    resolution: int = 256
    steps: int = 25
    strength: float = 0.5
    hires_strength: float = 0.5
    repeats: int = 3
    mixed_jobs: int = 4  # of each kind
    dtype: str = "float32"

    @classmethod
    def gpu(cls) -> Settings:
        return cls(model_size="sd15", resolution=512, repeats=5, mixed_jobs=4, dtype="float16")

    @classmethod
    def quick(cls, gpu: bool) -> Settings:
        return cls(
            model_size="tiny", resolution=64, steps=4, repeats=1, mixed_jobs=2, dtype="float16" if gpu else "float32"
        )


def init_image(side: int) -> np.ndarray:
    y, x = np.mgrid[0:side, 0:side]
    return np.stack([x * 255 // side, y * 255 // side, np.full_like(x, 128)], axis=-1).astype(np.uint8)[None]


def measure(settings: Settings, device: torch.device, dtype: torch.dtype, tmp: Path) -> dict[str, Any]:
    from models.contracts import DenoiseParams, EncodeRequest, ImageEncodeParams, Pixels
    from models.decoder import DecoderStage
    from models.denoiser import DenoiserStage
    from models.snapshot import open_snapshot
    from models.stepbatcher import StepBatcher
    from models.text_encoder import TextEncoderStage

    snap = open_snapshot(str(generation_model(settings.model_size, settings.dtype, tmp)))
    encoder = TextEncoderStage("m", snap, device, dtype)
    denoiser = DenoiserStage("m", snap, device, dtype)
    decoder = DecoderStage("m", snap, device, dtype)
    side, steps = settings.resolution, settings.steps
    pixels = Pixels(init_image(side), "")
    mask = np.zeros((side, side), np.float32)
    mask[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 1.0
    prompts = iter(range(10**6))

    def embeddings() -> Any:
        # A new prompt each run: the text encoder caches embeddings by text, a served request may miss.
        return encoder.encode([EncodeRequest("m", f"a lighthouse at dusk {next(prompts)}", None, True)])[0]

    def txt2img(size: int = side) -> None:
        decoder.decode_pixels(
            denoiser.run(DenoiseParams("m", size, size, steps, GUIDANCE, SCHEDULER, 0), embeddings()).tensor
        )

    def img2img() -> None:
        latents = decoder.encode_image(pixels, ImageEncodeParams("m"))
        params = DenoiseParams("m", side, side, steps, GUIDANCE, SCHEDULER, 0, strength=settings.strength)
        decoder.decode_pixels(denoiser.run(params, embeddings(), latents).tensor)

    def inpaint() -> None:
        latents = decoder.encode_image(pixels, ImageEncodeParams("m", mask=mask))
        params = DenoiseParams("m", side, side, steps, GUIDANCE, SCHEDULER, 0, strength=1.0)
        decoder.decode_pixels(denoiser.run(params, embeddings(), latents).tensor)

    def hires() -> None:
        emb = embeddings()
        first = denoiser.run(DenoiseParams("m", side, side, steps, GUIDANCE, SCHEDULER, 0), emb)
        second = DenoiseParams("m", 2 * side, 2 * side, steps, GUIDANCE, SCHEDULER, 0, strength=settings.hires_strength)
        decoder.decode_pixels(denoiser.run(second, emb, first).tensor)

    variants = {"txt2img": txt2img, "img2img": img2img, "inpaint": inpaint, "hires": hires,
                "txt2img_2x": lambda: txt2img(2 * side)}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(settings.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    timings = {name: summary(values) for name, values in times.items()}
    print(json.dumps(timings), flush=True)

    async def mixed() -> tuple[list[int], float]:
        batcher = StepBatcher(ThreadPoolExecutor(1), max_batch_size=2 * settings.mixed_jobs)
        emb = embeddings()
        latents = decoder.encode_image(pixels, ImageEncodeParams("m"))
        jobs = []
        for seed in range(settings.mixed_jobs):
            jobs.append(batcher.submit(denoiser, DenoiseParams("m", side, side, steps, GUIDANCE, SCHEDULER, seed), emb))
            img = DenoiseParams("m", side, side, steps, GUIDANCE, SCHEDULER, seed, strength=settings.strength)
            jobs.append(batcher.submit(denoiser, img, emb, image=latents))
        start = time.perf_counter()
        await asyncio.gather(*jobs)
        return batcher.batch_sizes, time.perf_counter() - start

    sizes, wall = asyncio.run(mixed())
    return {
        "timings": timings,
        "mixed": {
            "jobs": 2 * settings.mixed_jobs,
            "unet_calls": len(sizes),
            "images_per_call_mean": statistics.mean(sizes),
            "images_per_call_max": max(sizes),
            "wall_s": wall,
        },
    }


def report(results: dict[str, Any]) -> str:
    meta, t, mixed = results["meta"], results["timings"], results["mixed"]
    s = meta["settings"]
    side, steps = s["resolution"], s["steps"]
    where = meta["gpu"] or meta["machine"]
    base = t["txt2img"]["median_s"]

    def row(name: str, label: str, against: float = base) -> str:
        m = t[name]
        return (
            f"| {label} | {m['median_s']:.2f} s | {m['min_s']:.2f}-{m['max_s']:.2f} s | {m['median_s'] / against:.2f} |"
        )

    lines = [
        f"### Image to image, inpainting, hires fix ({meta['device']}: {where})",
        "",
        f"`python -m benchmarks.img2img` at commit `{meta['commit']}`, {meta['date']}: the `{s['model_size']}` test "
        f"model, {s['dtype']}, {SCHEDULER}, guidance {GUIDANCE}, {steps} steps; median of {s['repeats']} runs after a "
        "warm-up, the variants interleaved run by run. End to end on the in-process stages (prompt encoding, VAE "
        "encode when there is an init image, denoising, VAE decode).",
        "",
        "| request | median | range | ratio to txt2img |",
        "|---|---|---|---|",
        row("txt2img", f"txt2img {side}x{side}"),
        row("img2img", f"img2img {side}x{side}, strength {s['strength']} ({int(steps * s['strength'])} steps run)"),
        row("inpaint", f"inpaint {side}x{side} (ordinary UNet, mask blending), strength 1.0"),
        row("hires", f"hires fix {side} -> {2 * side} (latent x2, strength {s['hires_strength']})"),
        row("txt2img_2x", f"txt2img straight at {2 * side}x{2 * side}"),
        "",
        f"Mixed load: {mixed['jobs']} jobs (half txt2img, half img2img at strength {s['strength']}) submitted together "
        f"to one step batcher ran in {mixed['unet_calls']} UNet calls, **{mixed['images_per_call_mean']:.2f} images "
        f"per call** on average (max {mixed['images_per_call_max']}): img2img jobs share UNet calls with txt2img "
        f"jobs of the same shape. In service, `sdserve_denoiser_batch_images` shows the same.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, one run each (harness check)")
    parser.add_argument("--cpu", action="store_true", help="measure on the CPU even when CUDA is available")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads on the CPU")
    parser.add_argument("--out", default="benchmarks/results", help="folder for img2img.json")
    parser.add_argument("--report", help="write the results section into this Markdown file (BENCHMARKS.md)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    settings = Settings.quick(cuda) if args.quick else Settings.gpu() if cuda else Settings()
    dtype = {"float32": torch.float32, "float16": torch.float16}[settings.dtype]
    if not cuda:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="img2img-") as name:
        measured = measure(settings, device, dtype, Path(name))
    results = {
        "meta": run_meta(device, settings, started),
        **measured,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ("img2img-quick.json" if args.quick else "img2img.json")).write_text(json.dumps(results, indent=2) + "\n")
    section = report(results)
    if args.report:
        write_section(Path(args.report), section, MARKER)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
