"""The embedded default: the same application on a local Ray started in this process, no cluster needed."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path

from serving.config import AppConfig, ArtifactSpec, ModelSpec
from serving.env import SDSERVE_HOME

logger = logging.getLogger(__name__)


# Ray Serve settings for Ray started on one machine, applied before Ray starts (its processes inherit them).
# Serve restarts an HTTP proxy that misses its 5 s readiness check (or three 10 s health checks); on a busy
# two-core machine a proxy can take longer than that just to import, so it was restarted over and over and
# never served. A local proxy that is slow to start is still the only proxy: give it time.
LOCAL_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
}


# Ray's switch for a Ray reachable from this machine only (its default on macOS and Windows). At 0 a Ray started
# here takes 127.0.0.1 as its node address (ray/_private/services.py:815), and with a loopback node address every
# Ray process binds to loopback: GCS, raylet (node and object manager), each worker's gRPC server, the dashboard
# agent (gRPC, HTTP, metrics export), the runtime env agent, the dashboard's and the autoscaler's metrics ports.
# Ray reads it once, when `ray` is first imported (ray/_private/ray_constants.py:658).
LOOPBACK_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an HTTP listen address) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name or an interface's address
        return False


def local_ray_env(loopback: bool = False) -> None:
    """Put ``LOCAL_RAY_ENV`` (and with ``loopback``, ``LOOPBACK_RAY_ENV``) into this process's environment
    (settings already there win); call before ``ray.init`` (for ``loopback``, before ``import ray``)."""
    for name, value in (LOCAL_RAY_ENV | (LOOPBACK_RAY_ENV if loopback else {})).items():
        os.environ.setdefault(name, value)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ensure_default_model(config: AppConfig) -> AppConfig:
    """With no model configured, serve small random-weight test artifacts (created once), and say so: the tiny
    test model and its inpainting variant, a tiny test upscaler unless upscalers are configured, and a tiny test
    safety checker when ``safety.mode`` is on without one (so that one setting turns the check on). With real
    models nothing is added (a safety mode without a checker is an error there)."""
    from models.safety import create_test_safety_checker
    from models.testmodels import TEST_MODEL_SIZES, create_test_lora, create_test_model
    from models.upscaler import create_test_upscaler

    data = config.model_dump()
    root = SDSERVE_HOME / "test-models"
    if not config.models:
        path = root / "tiny-seed0"
        if not (path / "model_index.json").exists():
            create_test_model(path, size="tiny", seed=0)
        resolution = TEST_MODEL_SIZES["tiny"].default_resolution
        logger.warning(
            "no model configured: serving the randomly initialised tiny test model from %s "
            "(its images are noise-like; configure `models` to serve real weights)",
            path,
        )
        inpaint = root / "tiny-inpaint-seed0"
        if not (inpaint / "model_index.json").exists():
            create_test_model(inpaint, size="tiny", seed=0, inpainting=True)
        data["models"] = [
            ModelSpec(name="sdserve-tiny", source=str(path), description="tiny random test model"),
            ModelSpec(
                name="sdserve-tiny-inpaint",
                source=str(inpaint),
                description="tiny random test model, inpainting layout (9-channel UNet)",
            ),
        ]
        data["defaults"]["size"] = f"{resolution}x{resolution}"
        if not config.loras:
            # One adapter in each format people have, random weights in the real layouts (UNet + text encoder).
            loras = []
            for lora_format, alpha in (("kohya", 2.0), ("diffusers", None)):
                folder = root / f"lora-{lora_format}-tiny"
                if not any(folder.glob("*.safetensors")):
                    create_test_lora(path, folder, lora_format, rank=4, alpha=alpha, seed=1)
                loras.append(
                    ArtifactSpec(
                        name=f"test-{lora_format}", source=str(folder), description=f"tiny random {lora_format} LoRA"
                    )
                )
            data["loras"] = loras
            logger.warning("no LoRA configured: serving random-weight test adapters test-kohya and test-diffusers")
    if config.models and config.safety.mode != "off" and not config.safety_checkers:
        # Real models with a safety mode but no checker: fail, rather than check with a random one.
        raise ValueError(f"safety.mode is {config.safety.mode} but safety_checkers is empty; add a checker")
    if not config.models and not config.upscalers:
        path = root / "upscaler-x4plus-tiny"
        if not any(path.glob("*.safetensors")):
            create_test_upscaler(path, layout="RealESRGAN_x4plus", seed=0, size="tiny")
        logger.warning("no upscaler configured: serving a random-weight tiny RealESRGAN_x4plus layout as `test-x4`")
        data["upscalers"] = [
            ArtifactSpec(name="test-x4", source=str(path), description="tiny random RealESRGAN_x4plus layout")
        ]
    if config.safety.mode != "off" and not config.safety_checkers:
        path = root / "safety-checker-tiny"
        if not (path / "config.json").exists():
            create_test_safety_checker(path, seed=0)
        logger.warning("safety.mode is %s without a checker: using a random-weight tiny checker that flags nothing",
                       config.safety.mode)  # fmt: skip
        data["safety_checkers"] = [ArtifactSpec(name="test-checker", source=str(path), description="tiny test")]
    return AppConfig.model_validate(data)


def reserved_cpus(config: AppConfig) -> float:
    """Logical CPUs the deployments reserve at their maximum replica counts."""
    from serving.stages import deployed_stages

    sections = [config.ingress] + [getattr(config, stage.name) for stage in deployed_stages(config)]
    return sum(s.resources.num_cpus * s.autoscaling.max_replicas for s in sections)


def start_local(
    config: AppConfig, host: str | None = None, port: int | None = None, grpc_port: int | None = None
) -> str:
    """Start Ray and Serve in this process and deploy the app; return its base URL once every stage is up.

    With gRPC enabled, Serve's gRPC proxy listens on ``grpc_port`` (default: the config's ``grpc.port``).

    With a loopback ``host``, the Ray started here listens on loopback only, as the HTTP proxy does. Serve binds
    two servers to all interfaces whatever it is asked: its gRPC proxy (``gRPCOptions`` has no host;
    ray/serve/_private/grpc_util.py:204) and each replica's inter-deployment gRPC server
    (ray/serve/_private/replica.py:1835).

    Ray's CPU count here is logical: replicas of all stages share the machine's cores, so at least as many
    logical CPUs as the deployments reserve are advertised.
    """
    host = host or config.http.host
    port = port or config.http.port
    # Only before Ray's first import: set later, the switch would not reach this Ray but every Ray started from
    # this process's children.
    local_ray_env(loopback=is_loopback(host) and "ray" not in sys.modules)

    import ray
    from ray import serve

    from serving.app import build_app, grpc_options

    if not ray.is_initialized():
        num_cpus = max(os.cpu_count() or 1, int(reserved_cpus(config) + 0.999) + 1)
        ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False)
        node_ip = ray.util.get_node_ip_address()
        if is_loopback(host) and not is_loopback(node_ip):
            logger.warning("Ray was imported before start_local: its node address is %s and it listens on all "
                           "interfaces, not on %s only (set %s=0 before importing Ray)",
                           node_ip, host, *LOOPBACK_RAY_ENV)  # fmt: skip
    grpc = grpc_options(config)
    if grpc is not None and grpc_port is not None:
        grpc["port"] = grpc_port
    serve.start(http_options={"host": host, "port": port}, grpc_options=grpc)
    serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix, blocking=False)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}"


def stop_local() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def output_path(directory: str | Path, suffix: str) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    existing = sorted(directory.glob(f"sdserve-*.{suffix}"))
    return directory / f"sdserve-{len(existing) + 1:04d}.{suffix}"
