"""Safety deployment: diffusers' ``StableDiffusionSafetyChecker`` (a registry artifact of kind ``safety_checker``)
on its own replicas.

Deployed only when the catalog names a checker (``safety_checkers``). ``safety.mode`` (and, where the operator
allows it, the request) decides per request: ``flag`` marks each image, ``block`` also withholds flagged images
(their pixels are zeroed and never encoded). It runs right after the decoder, before any upscale: the checker
looks at a 224x224 resize either way, so an upscale adds nothing it could see, and a withheld image is zeros by
the time it reaches the upscaler. On an uploaded image (A1111 extras) it checks the upload.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from ray import serve

from models.contracts import DecodeParams, EncodedImages, Pixels, SafetyParams
from models.images import finish
from serving import tracing
from serving.deployments.common import StageReplica
from serving.plans import StageCall

if TYPE_CHECKING:
    from serving.resolver import GenerationRequest


def safety_call(req: GenerationRequest) -> StageCall | None:
    """The plan step a request adds when its safety mode is not ``off``."""
    if req.safety is None:
        return None
    return StageCall("safety", "check", (req.safety,), encodes=True)


@serve.deployment(name="Safety")
class SafetyDeployment(StageReplica):
    kind = "safety"

    def _check(self, stage: Any, pixels: Pixels, block: bool, output: DecodeParams | None) -> Pixels | EncodedImages:
        self.metrics.observe_batch(len(pixels.array))
        flagged = tuple(verdict.flagged for verdict in stage.check(pixels.array))
        if not block:
            return finish(Pixels(pixels.array, pixels.model_version, flagged, pixels.withheld), output)
        array = pixels.array.copy()
        array[np.array(flagged, dtype=bool)] = 0  # a withheld image never leaves this replica
        return finish(Pixels(array, pixels.model_version, flagged, flagged), output)

    async def check(
        self,
        pixels: Pixels,
        params: SafetyParams,
        output: DecodeParams | None = None,
        trace: Mapping[str, str] | None = None,
    ) -> Pixels | EncodedImages:
        """Check a request's images; encode them when this call ends the plan."""
        with self.traced("check", trace) as span:
            ref = await self.resolve(params.checker, params.ref)
            self.annotate_model(span, params.checker, ref)
            tracing.annotate(span, batch_size=len(pixels.array), mode=params.mode)
            stage = self.runtime.get(params.checker, ref)
            with self.metrics.request():
                result: Pixels | EncodedImages = await self.run_traced(
                    span, self._check, stage, pixels, params.mode == "block", output
                )
                return result
