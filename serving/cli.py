"""The ``sdserve`` command line."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from models.registry.errors import RegistryError
from serving.config import AppConfig
from serving.env import SDSERVE_LOG_LEVEL

logger = logging.getLogger("sdserve")


def _load_config(path: str | None) -> AppConfig:
    return AppConfig.from_yaml(path) if path else AppConfig()


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.local import ensure_default_model, start_local, stop_local

    config = ensure_default_model(_load_config(args.config))
    url = start_local(config, host=args.host, port=args.port)
    logger.info("sdserve is serving on %s (docs at %s/docs); Ctrl-C stops it", url, url)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    logger.info("shutting down")
    stop_local()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Start the service, generate one image through the OpenAI-compatible endpoint, a variation of it (image to
    image), its centre inpainted, the same seed with the first two LoRA adapters (when adapters are served) and
    (with an upscaler) the image upscaled x4; save them, stop."""
    import httpx

    from serving.local import ensure_default_model, free_port, start_local, stop_local

    config = ensure_default_model(_load_config(args.config))
    started = time.perf_counter()
    url = start_local(config, host="127.0.0.1", port=args.port or free_port())
    startup_s = time.perf_counter() - started
    try:
        body = {"prompt": args.prompt, "response_format": "b64_json", "seed": args.seed}
        if args.size:
            body["size"] = args.size
        if args.steps:
            body["steps"] = args.steps
        t0 = time.perf_counter()
        result = _generate_to_file(url, body, args.out)
        if result is None:
            return 1
        print(f"wrote {result['path']} ({result['size']}, model {result['model']}@{result['model_version']}, "
              f"seed {result['seed']}, {result['steps']} steps)")  # fmt: skip
        print(f"generation took {time.perf_counter() - t0:.2f} s (service start {startup_s:.1f} s)")
        # Image to image from that image, then inpainting its centre (on the inpainting model when one is served).
        init = base64.b64encode(Path(result["path"]).read_bytes()).decode("ascii")
        t0 = time.perf_counter()
        variation = _generate_to_file(url, {**body, "init_image": init, "strength": 0.6}, args.out)
        if variation is None:
            return 1
        print(f"wrote {variation['path']} (image to image, strength 0.6) in {time.perf_counter() - t0:.2f} s")
        models = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=60).json()["data"]]
        inpaint_model = next((m for m in models if m.endswith("-inpaint")), result["model"])
        t0 = time.perf_counter()
        edit = {**body, "model": inpaint_model, "init_image": init, "mask": _centre_mask(result["size"])}
        inpainted = _generate_to_file(url, edit, args.out)
        if inpainted is None:
            return 1
        print(f"wrote {inpainted['path']} (centre inpainted by {inpaint_model}) in {time.perf_counter() - t0:.2f} s")
        adapters = [a["name"] for a in httpx.get(f"{url}/v1/loras", timeout=60).json()["data"] if a["ref"]][:2]
        if adapters:  # the same seed with adapters: what a per-request LoRA changes
            t0 = time.perf_counter()
            loras = [{"name": name, "scale": 0.8} for name in adapters]
            styled = _generate_to_file(url, {**body, "loras": loras}, args.out)
            if styled is None:
                return 1
            print(f"wrote {styled['path']} (LoRA {', '.join(adapters)} at 0.8) in {time.perf_counter() - t0:.2f} s")
        upscalers = httpx.get(f"{url}/v1/upscalers", timeout=60).json()["data"]
        if upscalers:  # the same image again, upscaled x4 by the first upscaler
            t0 = time.perf_counter()
            result = _generate_to_file(url, {**body, "upscale": {"factor": 4}}, args.out)
            if result is None:
                return 1
            print(f"wrote {result['path']} ({result['size']}, upscaled x4 by {upscalers[0]['id']}) in "
                  f"{time.perf_counter() - t0:.2f} s")  # fmt: skip
    finally:
        stop_local()
    return 0


def _centre_mask(size: str) -> str:
    """A base64 PNG mask of ``size`` (WxH) whose centre half is white: the region to repaint."""
    import io

    from PIL import Image, ImageDraw

    width, height = (int(v) for v in size.split("x"))
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle((width // 4, height // 4, 3 * width // 4 - 1, 3 * height // 4 - 1), fill=255)
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _generate_to_file(url: str, body: dict[str, Any], out: str) -> dict[str, Any] | None:
    """POST /v1/images/generations and write the first image into ``out``; the response with its ``path``, or
    None (after saying why) when the request failed."""
    import httpx

    from serving.local import output_path

    response = httpx.post(f"{url}/v1/images/generations", json=body, timeout=600)
    if response.status_code != 200:
        print(f"generation failed ({response.status_code}): {response.text}", file=sys.stderr)
        return None
    result: dict[str, Any] = response.json()
    path = output_path(out, result["output_format"].replace("jpeg", "jpg"))
    path.write_bytes(base64.b64decode(result["data"][0]["b64_json"]))
    return {**result, "path": path}


def cmd_render(args: argparse.Namespace) -> int:
    from serving.app import render_serve_config

    config = AppConfig.from_yaml(args.config)
    text = yaml.safe_dump(render_serve_config(config), sort_keys=False)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_render_stages(args: argparse.Namespace) -> int:
    from serving.stages import chart_table

    header = "# The stage table (serving/stages.py) as the Helm chart reads it. Generated: sdserve render-stage-table\n"
    text = header + yaml.safe_dump(chart_table(), sort_keys=False)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    """A new key on stdout's first line; the entry to append to the key file after it (only the hash)."""
    import secrets as random

    from serving.auth import hash_key, new_key

    key = new_key()
    key_id = args.id or f"{args.tenant}-{random.token_hex(3)}"
    print(key)
    entry = {"id": key_id, "tenant": args.tenant, "sha256": hash_key(key)}
    print(yaml.safe_dump({"keys": [entry]}, sort_keys=False).strip())
    return 0


def cmd_config_defaults(args: argparse.Namespace) -> int:
    sys.stdout.write(yaml.safe_dump(AppConfig().to_args(), sort_keys=False))
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    from serving.config import config_reference

    lines = ["| setting | default | description |", "|---|---|---|"]
    lines += [f"| `{key}` | {default} | {text} |" for key, default, text in config_reference()]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    sys.stdout.write(json.dumps(AppConfig.model_json_schema(), indent=2) + "\n")
    return 0


def cmd_create_test(args: argparse.Namespace) -> int:
    from models.testmodels import create_test_model

    t0 = time.perf_counter()
    path = create_test_model(
        args.directory, size=args.size, seed=args.seed, dtype=args.dtype, inpainting=args.inpainting
    )
    print(f"wrote {args.size} test model (seed {args.seed}) to {path} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_create_test_lora(args: argparse.Namespace) -> int:
    from models.testmodels import create_test_lora

    path = create_test_lora(
        args.model, args.directory, args.format, rank=args.rank, alpha=args.alpha,
        text_encoder=not args.unet_only, seed=args.seed,
    )  # fmt: skip
    print(f"wrote a random {args.format} LoRA (rank {args.rank}) for {args.model} to {path}")
    return 0


def _cache(args: argparse.Namespace) -> Any:
    from serving.env import SDSERVE_HOME

    return _load_config(getattr(args, "config", None)).snapshot_cache(
        SDSERVE_HOME, args.cache_dir, getattr(args, "unsafe_allow_pickle_weights", False)
    )


def cmd_models_push(args: argparse.Namespace) -> int:
    from models.registry import parse_ref
    from models.registry.sources import publish

    pinned, version = publish(
        Path(args.directory), parse_ref(args.ref), allow_pickle=args.unsafe_allow_pickle_weights, kind=args.kind
    )
    print(json.dumps({"ref": args.ref, "pinned": str(pinned), "version": version}))
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from serving.stages import STAGES

    components = STAGES[args.stage].components if args.stage else None
    with tqdm(unit="B", unit_scale=True, desc="download", file=sys.stderr, disable=args.quiet) as bar:
        snap = _cache(args).materialize(args.ref, components, progress=bar.update)
    print(json.dumps({"path": str(snap.path), **snap.report.to_dict()}))
    return 0


def cmd_models_verify(args: argparse.Namespace) -> int:
    cache = _cache(args)
    snap = cache.materialize(args.ref)  # fetches what is missing, verifying each file as it lands
    problems = cache.verify(args.ref)
    for problem in problems:
        print(f"{args.ref}: {problem}", file=sys.stderr)
    print(json.dumps({"ref": args.ref, "pinned": snap.report.pinned, "version": snap.report.version,
                      "files": snap.report.files, "ok": not problems}))  # fmt: skip
    return 1 if problems else 0


def cmd_models_list(args: argparse.Namespace) -> int:
    if args.ref:
        from models.registry import parse_ref, source_for

        for version in source_for(parse_ref(args.ref)).versions(parse_ref(args.ref)):
            print(version)
        return 0
    for entry in _cache(args).entries():
        print(json.dumps(entry))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from models.registry.manifest import KNOWN_KINDS
    from models.testmodels import TEST_MODEL_SIZES
    from serving.stages import pipeline_stages

    parser = argparse.ArgumentParser(prog="sdserve", description="Stable Diffusion serving on Ray Serve.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the service on a local embedded Ray (no cluster needed)")
    serve.add_argument("--config", help="AppConfig YAML; with none, the tiny test model is served")
    serve.add_argument("--host", help="listen address (default: config http.host)")
    serve.add_argument("--port", type=int, help="listen port (default: config http.port)")
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="start, generate one image into --out, stop")
    demo.add_argument("--config", help="AppConfig YAML; with none, the tiny test model is served")
    demo.add_argument("--out", default="out", help="folder for the image")
    demo.add_argument("--prompt", default="a photo of an astronaut riding a horse on mars")
    demo.add_argument("--size", help="WIDTHxHEIGHT (default: the config's default size)")
    demo.add_argument("--steps", type=int, help="denoising steps (default: the config's)")
    demo.add_argument("--seed", type=int, default=42)
    demo.add_argument("--port", type=int, help="listen port (default: a free one)")
    demo.set_defaults(func=cmd_demo)

    render = sub.add_parser("render-serve-config", help="write the Ray Serve config file for an AppConfig YAML")
    render.add_argument("config", help="AppConfig YAML")
    render.add_argument("-o", "--output", help="file to write (default: stdout)")
    render.set_defaults(func=cmd_render)

    stages = sub.add_parser("render-stage-table", help="write the stage table as the Helm chart reads it")
    stages.add_argument("-o", "--output", help="file to write (default: stdout)")
    stages.set_defaults(func=cmd_render_stages)

    config = sub.add_parser("config", help="inspect the configuration model")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    config_sub.add_parser("defaults", help="print every setting with its default, as YAML").set_defaults(
        func=cmd_config_defaults
    )
    config_sub.add_parser("schema", help="print the JSON schema of AppConfig").set_defaults(func=cmd_config_schema)
    config_sub.add_parser("reference", help="print the settings table (Markdown)").set_defaults(
        func=cmd_config_reference
    )

    keys = sub.add_parser("keys", help="API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create_key = keys_sub.add_parser("create", help="print a new API key and its line for the key file")
    create_key.add_argument("--tenant", required=True, help="the tenant the key acts for")
    create_key.add_argument("--id", help="the key's name in logs (default: <tenant>-<random>)")
    create_key.set_defaults(func=cmd_keys_create)

    models = sub.add_parser("models", help="model utilities")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    create = models_sub.add_parser("create-test", help="write a randomly initialised model (diffusers layout)")
    create.add_argument("directory")
    create.add_argument("--size", choices=sorted(TEST_MODEL_SIZES), default="tiny")
    create.add_argument("--seed", type=int, default=0)
    create.add_argument("--dtype", choices=["float32", "float16"], help="weight dtype on disk (default: per size)")
    create.add_argument("--inpainting", action="store_true", help="the inpainting layout: a UNet with 9 input channels")
    create.set_defaults(func=cmd_create_test)
    lora = models_sub.add_parser("create-test-lora", help="write a random LoRA adapter file for a model's layout")
    lora.add_argument("model", help="diffusers-layout model folder whose shapes it adapts")
    lora.add_argument("directory", help="folder to write <folder name>.safetensors into")
    lora.add_argument("--format", choices=["kohya", "diffusers"], default="kohya")
    lora.add_argument("--rank", type=int, default=4)
    lora.add_argument("--alpha", type=float, help="kohya network alpha (default: the rank, scale 1)")
    lora.add_argument("--unet-only", action="store_true", help="no text-encoder layers")
    lora.add_argument("--seed", type=int, default=0)
    lora.set_defaults(func=cmd_create_test_lora)

    def registry_command(name: str, help: str, func: Any) -> argparse.ArgumentParser:
        cmd = models_sub.add_parser(name, help=help)
        cmd.add_argument("--config", help="AppConfig YAML (registry settings)")
        cmd.add_argument("--cache-dir", help="snapshot cache folder (default: registry.cache_dir)")
        cmd.set_defaults(func=func)
        return cmd

    push = models_sub.add_parser("push", help="write sdserve-manifest.json into DIR and publish DIR at REF")
    push.add_argument("directory")
    push.add_argument("ref", help="s3://bucket/prefix@<version>, hf://org/name[@branch] or file:///path")
    push.add_argument("--unsafe-allow-pickle-weights", action="store_true", help="UNSAFE: publish pickle weights")
    push.add_argument(
        "--kind", choices=sorted(KNOWN_KINDS), help="artifact kind (default: detected from the folder's files)"
    )
    push.set_defaults(func=cmd_models_push)
    pull = registry_command("pull", "download REF into the snapshot cache, verified", cmd_models_pull)
    pull.add_argument("ref")
    pull.add_argument(
        "--stage", choices=[s.name for s in pipeline_stages()], help="only the model files this stage reads"
    )
    pull.add_argument("--quiet", action="store_true", help="no progress bar")
    pull.add_argument("--unsafe-allow-pickle-weights", action="store_true", help="UNSAFE: accept pickle weights")
    verify = registry_command("verify", "pull REF if needed and re-hash every cached file", cmd_models_verify)
    verify.add_argument("ref")
    listing = registry_command("list", "cached snapshots, or the versions published at REF", cmd_models_list)
    listing.add_argument("ref", nargs="?")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=SDSERVE_LOG_LEVEL, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError, RegistryError) as exc:
        print(f"sdserve: error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
