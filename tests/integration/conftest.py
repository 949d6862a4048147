"""A real local Ray Serve instance running the whole application on the tiny test model, once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serving.config import AppConfig
from tests.servers import HubServer, S3Server


@dataclass
class LiveService:
    url: str
    config: AppConfig
    model_dir: Path
    metrics_url: str
    grpc_target: str  # host:port of Serve's gRPC proxy
    upscaler_dir: Path
    checker_dir: Path
    lora_files: dict[str, Path]  # catalog name -> adapter file

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def grpc_metadata(self, app_name: str | None = None) -> tuple[tuple[str, str], ...]:
        """Serve's gRPC proxy routes by the `application` metadata when several applications run."""
        return (("application", app_name or self.config.app_name),)


# The live app's safety checker flags the first image of this request (and not the second).
FLAGGED_REQUEST = {"prompt": "a flagged fox", "seed": 4242, "n": 2}


def flagged_images(model_dir: Path) -> tuple[list, list]:
    """(images the test checker must flag, images it must pass): ``FLAGGED_REQUEST``'s images, made in-process
    by the same stages the service runs (its first image alone, as n=1 makes it, is flagged too)."""
    import torch

    from models.contracts import DenoiseParams, EncodeRequest
    from models.decoder import DecoderStage
    from models.denoiser import DenoiserStage
    from models.snapshot import open_snapshot
    from models.text_encoder import TextEncoderStage

    snap = open_snapshot(str(model_dir))
    cpu = torch.device("cpu")
    (emb,) = TextEncoderStage("tiny", snap, cpu, torch.float32).encode(
        [EncodeRequest("tiny", FLAGGED_REQUEST["prompt"], None, True)]
    )
    denoiser, decoder = DenoiserStage("tiny", snap, cpu, torch.float32), DecoderStage("tiny", snap, cpu, torch.float32)

    def images(n: int) -> list:
        params = DenoiseParams("tiny", 64, 64, 4, 7.5, "euler", FLAGGED_REQUEST["seed"], num_images=n)
        return list(decoder.decode_pixels(denoiser.run(params, emb).tensor))

    pair, alone = images(2), images(1)
    return [pair[0], alone[0]], [pair[1]]


def unusable_loras(root: Path) -> dict[str, Path]:
    """Adapters every request naming them must be refused for (and only those requests): a corrupt file, and a
    LoRA for SDXL (a second text encoder, 2048-wide cross-attention)."""
    import torch
    from safetensors.torch import save_file

    (root / "broken").mkdir()
    broken = root / "broken" / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    (root / "xl").mkdir()
    xl = root / "xl" / "xl.safetensors"
    layers = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (2048, 640),
    }
    tensors = {}
    for key, (fan_in, fan_out) in layers.items():
        tensors |= {f"{key}.lora_down.weight": torch.zeros(4, fan_in), f"{key}.lora_up.weight": torch.zeros(fan_out, 4)}
    save_file(tensors, str(xl))
    return {"broken": broken, "xl": xl}


def tiny_config(model_dir: Path, outputs: Path, **overrides: object) -> AppConfig:
    data: dict[str, object] = {
        "models": [{"name": "tiny", "source": str(model_dir), "description": "tiny random test model"}],
        "defaults": {"size": "64x64", "steps": 4},
        "limits": {"max_size": 512, "request_timeout_s": 120},
        "outputs": {"directory": str(outputs)},
        "text_encoder": {"torch_threads": 1},
        "denoiser": {"torch_threads": 2},
        "decoder": {"torch_threads": 1},
    }
    data.update(overrides)
    return AppConfig.model_validate(data)


@pytest.fixture(scope="session")
def live(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, s3: S3Server, hub: HubServer
) -> Iterator[LiveService]:
    import ray

    from models.safety import create_test_safety_checker
    from models.testmodels import create_test_lora
    from models.upscaler import create_test_upscaler
    from serving.local import free_port, local_ray_env, start_local, stop_local

    upscaler_dir = create_test_upscaler(tmp_path_factory.mktemp("upscaler") / "x4", seed=0)
    lora_root = tmp_path_factory.mktemp("loras")
    lora_files = {
        "ink": create_test_lora(tiny_model_dir, lora_root / "ink", "kohya", rank=4, alpha=2.0, seed=1),
        "paper": create_test_lora(tiny_model_dir, lora_root / "paper", "diffusers", rank=4, seed=2),
        "grain": create_test_lora(tiny_model_dir, lora_root / "grain", "kohya", 8, None, text_encoder=False, seed=3),
        **unusable_loras(lora_root),
    }
    flag, clear = flagged_images(tiny_model_dir)
    checker_dir = create_test_safety_checker(
        tmp_path_factory.mktemp("checker") / "c", flag_images=flag, clear_images=clear
    )
    config = tiny_config(
        tiny_model_dir,
        tmp_path_factory.mktemp("outputs"),
        upscalers=[{"name": "x4", "source": str(upscaler_dir)}],
        upscaler={"torch_threads": 1},
        safety_checkers=[{"name": "checker", "source": str(checker_dir)}],
        safety={"mode": "flag", "torch_threads": 1},
        loras=[{"name": name, "source": str(path.parent)} for name, path in lora_files.items()],
    )
    # Replicas reach the registry servers the way they would in a cluster: through the client libraries'
    # environment, which Ray workers inherit from this process.
    os.environ.update({**s3.env, "HF_ENDPOINT": hub.url})
    # Autoscaling decisions in seconds rather than tens of seconds (Serve reads these at start).
    os.environ["RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    local_ray_env()
    metrics_port = free_port()
    # Logical CPUs and fake GPUs: room for this app and the ones some tests deploy beside it.
    ray.init(
        num_cpus=16, num_gpus=4, include_dashboard=False, configure_logging=False, _metrics_export_port=metrics_port
    )
    grpc_port = free_port()
    url = start_local(config, host="127.0.0.1", port=free_port(), grpc_port=grpc_port)
    try:
        yield LiveService(
            url=url,
            config=config,
            model_dir=tiny_model_dir,
            metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
            grpc_target=f"127.0.0.1:{grpc_port}",
            upscaler_dir=upscaler_dir,
            checker_dir=checker_dir,
            lora_files=lora_files,
        )
    finally:
        stop_local()


@contextmanager
def extra_app(live: LiveService, name: str, outputs: Path, **overrides: object) -> Iterator[str]:
    """Deploy another application (own deployments, own settings) beside the live one; yield its URL."""
    from ray import serve

    from serving.app import build_app

    config = tiny_config(live.model_dir, outputs, app_name=name, route_prefix=f"/{name}", **overrides)
    serve.run(build_app(config), name=name, route_prefix=f"/{name}", blocking=False)
    try:
        yield f"{live.url}/{name}"
    finally:
        serve.delete(name)
