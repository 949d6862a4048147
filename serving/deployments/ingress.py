"""Ingress deployment: the FastAPI app, built per replica around one ``GenerationService``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.api import create_api
from serving.config import AppConfig
from serving.outputs import open_output_store
from serving.service import GenerationService


@serve.deployment(name="Ingress")
@serve.ingress()
class IngressDeployment:
    def __init__(
        self,
        config: dict[str, Any],
        text_encoder: DeploymentHandle,
        denoiser: DeploymentHandle,
        decoder: DeploymentHandle,
    ) -> None:
        self.config = AppConfig.model_validate(config)
        self.service = GenerationService(self.config, text_encoder, denoiser, decoder)
        out = self.config.outputs
        self.outputs = open_output_store(out.directory, out.store, out.ttl_s)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """The model catalog (Serve ``user_config``): new references are rolled out in the background."""
        await self.service.apply_catalog(user_config)

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Called by Serve after __init__: routes close over this replica's service.
        from serving.metrics import api_metrics

        return create_api(self.service, self.outputs, api_metrics())
