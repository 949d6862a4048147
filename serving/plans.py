"""Plans: the stage calls a request needs, in order, as data.

A resolved request becomes a ``Plan``; ``ChainRunner`` executes any plan. The core of every generation is text
encoding, denoising and VAE decoding; after that each post-processing stage of the stage table whose row names
a ``plan_step`` adds its call when the request asks for it (upscaling, the safety check). Pixels stay pixels
between post-processing calls: only the plan's last call encodes the image files (``output``).

Plain Python, no Ray cluster (a plan step lives beside its deployment, so its module imports ray.serve, but
nothing starts): unit tests build plans and run them with in-process stage clients.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from models.contracts import DecodeParams, DenoiseParams, EncodeRequest

if TYPE_CHECKING:
    from serving.resolver import GenerationRequest


@dataclass(frozen=True)
class StageCall:
    """One call of a plan: ``clients[stage].<method>(previous output, *args[, output])``.

    Args:
        stage: the stage table row that answers the call.
        method: the deployment method.
        args: inputs beyond the previous call's output.
        progress: the method has a streaming twin (``<method>_stream``) that reports progress as it goes.
        encodes: the method takes a last ``output: DecodeParams | None`` argument: with one it returns encoded
            image files (``EncodedImages``), without one pixels (``Pixels``) for the next call.
        output: set by the plan on its last encoding call.
    """

    stage: str
    method: str
    args: tuple[Any, ...] = ()
    progress: bool = False
    encodes: bool = False
    output: DecodeParams | None = None

    def arguments(self, previous: Any) -> tuple[Any, ...]:
        head = () if previous is None else (previous,)
        return (*head, *self.args, *((self.output,) if self.encodes else ()))


@dataclass(frozen=True)
class Plan:
    calls: tuple[StageCall, ...]
    input: Any = None  # the first call's first argument, when the plan starts from data (an uploaded image)

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(call.stage for call in self.calls)


def _post_processing(req: GenerationRequest) -> list[StageCall]:
    """The calls post-processing stages add for ``req``, in stage-table order."""
    from serving.stages import STAGES

    calls = []
    for stage in STAGES.values():
        if stage.plan_step:
            module, _, name = stage.plan_step.partition(":")
            call = getattr(importlib.import_module(module), name)(req)
            if call is not None:
                calls.append(call)
    return calls


def _finish(calls: list[StageCall], req: GenerationRequest, input: Any = None) -> Plan:
    if not calls or not calls[-1].encodes:
        raise ValueError("a plan must end with a call that encodes images")
    calls[-1] = replace(calls[-1], output=DecodeParams(req.output_format, req.quality))
    return Plan(tuple(calls), input)


def plan_generation(req: GenerationRequest) -> Plan:
    """Text to image: encode the prompt, denoise, decode, then whatever post-processing ``req`` asks for."""
    encode = EncodeRequest(
        req.model, req.prompt, req.negative_prompt, with_negative=req.guidance_scale > 1.0, ref=req.ref
    )
    params = DenoiseParams(
        model=req.model,
        height=req.height,
        width=req.width,
        steps=req.steps,
        guidance_scale=req.guidance_scale,
        scheduler=req.scheduler,
        seed=req.seed,
        num_images=req.num_images,
        ref=req.ref,
    )
    calls = [
        StageCall("text_encoder", "encode", (encode,)),
        StageCall("denoiser", "denoise", (params,), progress=True),
        StageCall("decoder", "decode", encodes=True),
        *_post_processing(req),
    ]
    return _finish(calls, req)


def plan_postprocess(req: GenerationRequest, pixels: Any) -> Plan:
    """Post-processing only, starting from an image the client sent (``Pixels``): e.g. an upscale."""
    calls = _post_processing(req)
    if not calls:
        raise ValueError("the request asks for no post-processing")
    return _finish(calls, req, pixels)
