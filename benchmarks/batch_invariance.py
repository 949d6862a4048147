"""How far an image made inside a batch can be from the same seed run alone.

The denoiser and the VAE batch rows of different requests into one call. Floating-point kernels pick their
blocking by shape, so a row's result can differ in the last bits with the batch it ran in, and the sampler
carries those bits through every step. This measures the largest 8-bit pixel difference between each image
run alone and the same request run in batches of every composition, exactly as the stages compute them
(one UNet call per step for the whole batch, one VAE call for all latents), and prints it per setting.

    python -m benchmarks.batch_invariance                       # tiny test model, as the tests use it
    python -m benchmarks.batch_invariance --size bench --steps 25
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from models.contracts import DenoiseParams, EncodeRequest
from models.decoder import DecoderStage
from models.denoiser import DenoiserStage
from models.snapshot import open_snapshot
from models.testmodels import create_test_model
from models.text_encoder import TextEncoderStage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=("tiny", "bench"))
    parser.add_argument("--steps", type=int, nargs="+", default=[3, 20])
    parser.add_argument("--seeds", type=int, default=16, help="lone images per setting")
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 3, 4, 8], help="images per batch")
    parser.add_argument("--scheduler", default="euler_a")
    parser.add_argument("--resolution", default="64x96", help="WIDTHxHEIGHT")
    args = parser.parse_args()
    width, height = (int(v) for v in args.resolution.split("x"))
    cpu = torch.device("cpu")
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory() as tmp:
        snap = open_snapshot(str(create_test_model(Path(tmp) / "m", size=args.size, seed=0)))
        encoder = TextEncoderStage("m", snap, cpu, torch.float32)
        denoiser = DenoiserStage("m", snap, cpu, torch.float32)
        decoder = DecoderStage("m", snap, cpu, torch.float32)
        (emb,) = encoder.encode([EncodeRequest("m", "a cozy cabin", "blurry", True)])

        def pixels(latents: list[torch.Tensor]) -> np.ndarray:
            return decoder.decode_pixels(torch.cat(latents)).astype(np.int16)

        report = []
        for steps in args.steps:
            params = [DenoiseParams("m", height, width, steps, 6.5, args.scheduler, seed) for seed in range(args.seeds)]
            lone = {}
            for p in params:
                job = denoiser.start(p, emb)
                while not job.done:
                    denoiser.step([job])
                lone[p.seed] = job.latents
            lone_pixels = {seed: pixels([lat])[0] for seed, lat in lone.items()}
            for size in args.batches:
                worst, differing, latent_diff = 0, 0, 0.0
                for start in range(0, len(params) - size + 1, size):
                    jobs = [denoiser.start(p, emb) for p in params[start : start + size]]
                    while not jobs[0].done:
                        denoiser.step(jobs)
                    batched = pixels([j.latents for j in jobs])
                    for job, image in zip(jobs, batched, strict=True):
                        diff = int(np.abs(image - lone_pixels[job.params.seed]).max())
                        latent_diff = max(latent_diff, float((job.latents - lone[job.params.seed]).abs().max()))
                        worst = max(worst, diff)
                        differing += diff > 0
                row = {
                    "steps": steps,
                    "batch": size,
                    "images": (len(params) // size) * size,
                    "images_differing": differing,
                    "max_level_diff": worst,
                    "max_latent_diff": latent_diff,
                }
                report.append(row)
                print(json.dumps(row))
        print("worst over all settings:", max(r["max_level_diff"] for r in report), "levels of 255")


if __name__ == "__main__":
    main()
