"""``build_app``: the Ray Serve import path target (``serving.app:build_app``).

Pure: it validates the config and returns a bound application; nothing is loaded or started here.
"""

from __future__ import annotations

from typing import Any, cast

from ray.serve import Application

from serving.config import AppConfig, DeploymentSpec
from serving.stages import INGRESS_DEPLOYMENT, deployed_stages


def deployment_options(name: str, spec: DeploymentSpec) -> dict[str, Any]:
    """Serve ``.options()`` for one deployment from its config section."""
    res = spec.resources
    actor: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.memory:
        actor["memory"] = res.memory
    if res.resources:
        actor["resources"] = dict(res.resources)
    if spec.env:
        actor["runtime_env"] = {"env_vars": dict(spec.env)}
    options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": actor,
        "max_ongoing_requests": spec.max_ongoing_requests,
        "max_queued_requests": spec.max_queued_requests,
        "health_check_period_s": spec.health_check_period_s,
        "graceful_shutdown_timeout_s": spec.graceful_shutdown_timeout_s,
    }
    scale = spec.autoscaling
    if scale.min_replicas == scale.max_replicas:
        options["num_replicas"] = scale.max_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": scale.min_replicas,
            "max_replicas": scale.max_replicas,
            "initial_replicas": scale.initial_replicas,
            "target_ongoing_requests": scale.target_ongoing_requests,
            "upscale_delay_s": scale.upscale_delay_s,
            "downscale_delay_s": scale.downscale_delay_s,
            "look_back_period_s": scale.look_back_period_s,
        }
    return options


def build_app(args: dict[str, Any] | AppConfig) -> Application:
    """Bind the ingress and every stage deployment the config runs (the stage table's rows) for ``args``.

    The catalog reaches every deployment as its ``user_config``, never as a constructor argument, so a changed
    catalog is applied by ``reconfigure`` on the running replicas (a rollout) instead of restarting them. From a
    Serve config file the catalog comes in each deployment's ``user_config`` override (see
    ``render_serve_config``) and ``args`` carries no catalog.
    """
    from serving.deployments.ingress import IngressDeployment

    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args)
    catalog_given = isinstance(args, AppConfig) or "models" in args
    if catalog_given and not config.models:
        raise ValueError("the config has no models; add at least one to `models`")
    if catalog_given and config.safety.mode != "off" and not config.safety_checkers:
        raise ValueError(f"safety.mode is {config.safety.mode} but safety_checkers is empty; add a checker")
    data = config.to_args()
    for section in config.catalog():
        data.pop(section)

    def opts(section: str, name: str) -> dict[str, Any]:
        spec: DeploymentSpec = getattr(config, section)
        options = deployment_options(name, spec)
        if catalog_given:
            options["user_config"] = config.catalog()
        return options

    # serve.deployment returns a Deployment at runtime; the class type seen by mypy lacks .options().
    # Serve finds the bound stages inside the dict and hands the ingress a DeploymentHandle for each.
    stages = {
        stage.name: cast(Any, stage.deployment_cls()).options(**opts(stage.name, stage.deployment)).bind(data)
        for stage in deployed_stages(config)
    }
    ingress = cast(Any, IngressDeployment).options(**opts("ingress", INGRESS_DEPLOYMENT))
    app: Application = ingress.bind(data, stages)
    return app


def grpc_options(config: AppConfig) -> dict[str, Any] | None:
    """Serve's ``grpc_options`` for ``config`` (None when gRPC is off): the proxy port and the servicer
    functions it registers (sdserve.v1.ImageGeneration and grpc.health.v1.Health; reflection is Serve's own)."""
    from serving.grpc_api import SERVICER_FUNCTIONS

    if not config.grpc.enabled:
        return None
    return {"port": config.grpc.port, "grpc_servicer_functions": list(SERVICER_FUNCTIONS)}


def render_serve_config(config: AppConfig) -> dict[str, Any]:
    """The Ray Serve config file (``serve run`` / ``serve deploy`` / RayService ``serveConfigV2``).

    The catalog goes into each deployment's ``user_config`` and not into ``args``: Serve restarts every replica
    when ``args`` change, but applies a changed ``user_config`` in place, which is how model versions roll out.
    """
    if config.safety.mode != "off" and not config.safety_checkers:
        raise ValueError(f"safety.mode is {config.safety.mode} but safety_checkers is empty; add a checker")
    args = config.to_args()
    catalog = {section: args.pop(section) for section in config.catalog()}
    # Without the catalog in args, build_app learns which optional stages to bind from this list.
    args["stages"] = [stage.name for stage in deployed_stages(config)]
    names = [INGRESS_DEPLOYMENT] + [stage.deployment for stage in deployed_stages(config)]
    grpc = grpc_options(config)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": config.http.host, "port": config.http.port},
        **({"grpc_options": grpc} if grpc else {}),
        "applications": [
            {
                "name": config.app_name,
                "route_prefix": config.route_prefix,
                "import_path": "serving.app:build_app",
                "args": args,
                "deployments": [{"name": name, "user_config": catalog} for name in names],
            }
        ],
    }
