"""The stage table: every stage of the pipeline, declared once.

A row says what a stage is called (its config section, replica kind and metrics label), which Serve deployment
runs it, which class does its torch work, what it loads (components of a model snapshot, or a registry artifact
of its own kind), which catalog section names what it loads, and which worker group of the chart hosts it.
Everything that lists stages reads this table: ``build_app`` and ``render_serve_config``, the ingress's stage
clients, readiness and ``/v1/status``, rollouts, CPU reservation in local mode, the CLI's ``--stage`` choices,
and the chart (through ``charts/sdserve/files/stages.yaml``, generated from it; a test fails when stale).

Adding a stage is a row here plus its own files: a deployment in ``serving/deployments/``, its compute in
``models/``, its config section and, when a request can ask for it, a plan step (``serving/plans.py``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.config import AppConfig

INGRESS_DEPLOYMENT = "Ingress"


@dataclass(frozen=True)
class Stage:
    """One row of the stage table."""

    name: str  # config section, replica kind, metrics `stage` label
    deployment: str  # Serve deployment name
    deployment_class: str  # "module:Class" of the Serve deployment (imported lazily: it needs Ray)
    compute: str  # "module:Class" of the torch-side stage a replica holds (imported in the replica only)
    catalog: str  # catalog section whose entries this stage loads: models, upscalers, safety_checkers
    worker_group: str  # chart worker group (`workerGroups.<name>`) whose pods host its replicas
    components: tuple[str, ...] = ()  # snapshot subfolders it reads (pipeline stages)
    artifact: str | None = None  # registry artifact kind it loads instead of snapshot components
    optional: bool = False  # deployed only when its catalog section names something
    plan_step: str | None = None  # "module:function": the StageCall a request adds for this stage, or None
    description: str = ""

    def deployed(self, config: AppConfig) -> bool:
        """Whether this config runs the stage: as ``config.stages`` lists, else (an optional stage) when its
        catalog section names something."""
        if config.stages is not None:
            return self.name in config.stages
        return not self.optional or bool(getattr(config, self.catalog))

    def deployment_cls(self) -> Any:
        return _load(self.deployment_class)

    def compute_cls(self) -> Any:
        return _load(self.compute)


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            name="text_encoder",
            deployment="TextEncoder",
            deployment_class="serving.deployments.text_encoder:TextEncoderDeployment",
            compute="models.text_encoder:TextEncoderStage",
            catalog="models",
            worker_group="encoder",
            components=("tokenizer", "text_encoder"),
            description="Text encoding: tokenizer + CLIP, batched across requests, embedding cache.",
        ),
        Stage(
            name="denoiser",
            deployment="Denoiser",
            deployment_class="serving.deployments.denoiser:DenoiserDeployment",
            compute="models.denoiser:DenoiserStage",
            catalog="models",
            worker_group="denoiser",
            components=("unet", "scheduler"),
            description="Denoising: UNet + scheduler loop with step-level batching.",
        ),
        Stage(
            name="decoder",
            deployment="Decoder",
            deployment_class="serving.deployments.decoder:DecoderDeployment",
            compute="models.decoder:DecoderStage",
            catalog="models",
            worker_group="decoder",
            components=("vae",),
            description="VAE decoding, batched across requests.",
        ),
        Stage(
            name="safety",
            deployment="Safety",
            deployment_class="serving.deployments.safety:SafetyDeployment",
            compute="models.safety:SafetyCheckerStage",
            catalog="safety_checkers",
            worker_group="safety",
            artifact="safety_checker",
            optional=True,
            plan_step="serving.deployments.safety:safety_call",
            description="Safety check of the generated images (flag, or withhold), before any upscale.",
        ),
        Stage(
            name="upscaler",
            deployment="Upscaler",
            deployment_class="serving.deployments.upscaler:UpscalerDeployment",
            compute="models.upscaler:UpscalerStage",
            catalog="upscalers",
            worker_group="upscaler",
            artifact="upscaler",
            optional=True,
            plan_step="serving.deployments.upscaler:upscale_call",
            description="Upscaling: Real-ESRGAN (RRDBNet, SRVGGNetCompact) in tiles.",
        ),
    )
}

# Adapters are not a stage's own artifact: the ingress resolves their names to pinned references, and the text
# encoder and the denoiser load what a request names (``models/adapters``).
ADAPTER_CATALOG = "loras"
# Catalog sections a deployment's `user_config` carries (each stage reads its own).
CATALOG_SECTIONS: tuple[str, ...] = (
    *dict.fromkeys(stage.catalog for stage in STAGES.values()),
    ADAPTER_CATALOG,
)


def deployed_stages(config: AppConfig) -> list[Stage]:
    """The stages this config runs, in table order."""
    return [stage for stage in STAGES.values() if stage.deployed(config)]


def pipeline_stages() -> list[Stage]:
    """Stages that load components of a model snapshot (the ones a model rollout goes through)."""
    return [stage for stage in STAGES.values() if stage.components]


def chart_table() -> dict[str, Any]:
    """What the Helm chart needs to know of the table (``charts/sdserve/files/stages.yaml``)."""
    return {
        "catalogs": list(CATALOG_SECTIONS),
        "stages": [
            {
                "name": stage.name,
                "deployment": stage.deployment,
                "workerGroup": stage.worker_group,
                "catalog": stage.catalog,
                "optional": stage.optional,
            }
            for stage in STAGES.values()
        ],
    }
