"""Upscaler deployment: Real-ESRGAN models (registry artifacts of kind ``upscaler``), tiled, on their own replicas.

Deployed only when the catalog names an upscaler (``upscalers``). A request asks for it with ``upscale``
(``upscale_call`` adds the call to its plan); it gets the pixels of the stage before it and hands on pixels,
or the encoded files when it ends the plan.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ray import serve

from models.contracts import DecodeParams, EncodedImages, Pixels, UpscaleParams
from models.images import finish
from serving import tracing
from serving.config import AppConfig
from serving.deployments.common import StageReplica
from serving.plans import StageCall

if TYPE_CHECKING:
    from serving.resolver import GenerationRequest


def upscale_call(req: GenerationRequest) -> StageCall | None:
    """The plan step a request adds when it asks for an upscale."""
    if req.upscale is None:
        return None
    return StageCall("upscaler", "upscale", (req.upscale,), encodes=True)


@serve.deployment(name="Upscaler")
class UpscalerDeployment(StageReplica):
    kind = "upscaler"

    @staticmethod
    def stage_options(config: AppConfig) -> dict[str, Any]:
        spec = config.upscaler
        return {"tile_size": spec.tile_size, "tile_overlap": spec.tile_overlap, "max_tile_batch": spec.max_batch_size}

    def _upscale(
        self, stage: Any, pixels: Pixels, factor: float, stop: threading.Event, output: DecodeParams | None
    ) -> Pixels | EncodedImages:
        self.metrics.observe_batch(len(pixels.array))
        array = stage.upscale(pixels.array, factor, stop.is_set, skip=pixels.withheld)  # withheld: not upscaled
        return finish(Pixels(array, pixels.model_version, pixels.flagged, pixels.withheld), output)

    async def upscale(
        self,
        pixels: Pixels,
        params: UpscaleParams,
        output: DecodeParams | None = None,
        trace: Mapping[str, str] | None = None,
    ) -> Pixels | EncodedImages:
        """Upscale a request's images by ``params.factor``; encode them when this call ends the plan."""
        with self.traced("upscale", trace) as span:
            ref = await self.resolve(params.upscaler, params.ref)
            self.annotate_model(span, params.upscaler, ref)
            tracing.annotate(span, batch_size=len(pixels.array), factor=params.factor)
            stage = self.runtime.get(params.upscaler, ref)
            # Cancelling this call does not stop the compute thread by itself: the event makes the upscale stop
            # before its next forward pass, so a request that went away frees the replica early.
            stop = threading.Event()
            with self.metrics.request():
                try:
                    result: Pixels | EncodedImages = await self.run_traced(
                        span, self._upscale, stage, pixels, params.factor, stop, output
                    )
                except asyncio.CancelledError:
                    stop.set()
                    raise
                return result
