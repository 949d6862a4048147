"""Plans: the stage calls a request needs, in order, as data.

A resolved request becomes a ``Plan``; ``ChainRunner`` executes any plan. The core of every generation is text
encoding, denoising and VAE decoding; image to image and inpainting start with the VAE stage encoding the init
image, and the hires fix is text to image, an upscale (of the latents, or of the pixels by an upscaler) and an
image-to-image pass at the larger size. After that each post-processing stage of the stage table whose row names
a ``plan_step`` adds its call when the request asks for it (upscaling, the safety check). Pixels stay pixels
between post-processing calls: only the plan's last call encodes the image files (``output``).

A call gets the previous call's output as its first argument unless it says otherwise (``chained=False``); an
argument ``Use(label)`` is the output of the earlier call with that ``label`` (the hires pass reuses the prompt's
embeddings; the denoiser takes the init image's latents beside them).

Plain Python, no Ray cluster (a plan step lives beside its deployment, so its module imports ray.serve, but
nothing starts): unit tests build plans and run them with in-process stage clients.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from models.contracts import DecodeParams, DenoiseParams, EncodeRequest, ImageEncodeParams, Pixels, UpscaleParams

if TYPE_CHECKING:
    from serving.resolver import GenerationRequest


@dataclass(frozen=True)
class Use:
    """A call argument that is the output of the plan's earlier call labelled ``label``."""

    label: str


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
        label: names the call's output for later ``Use(label)`` arguments.
        chained: the previous call's output comes first (False: only ``args``).
        steps: the denoising steps a ``progress`` call runs (progress counts on across a plan's passes).
        route: replica affinity (the request's adapter set, ``adapter_route``): replicas holding it are preferred.
    """

    stage: str
    method: str
    args: tuple[Any, ...] = ()
    progress: bool = False
    encodes: bool = False
    output: DecodeParams | None = None
    label: str = ""
    chained: bool = True
    steps: int = 0
    route: str = ""

    def arguments(self, previous: Any, outputs: dict[str, Any] | None = None) -> tuple[Any, ...]:
        head = () if previous is None or not self.chained else (previous,)
        args = tuple((outputs or {})[a.label] if isinstance(a, Use) else a for a in self.args)
        return (*head, *args, *((self.output,) if self.encodes else ()))


@dataclass(frozen=True)
class Plan:
    calls: tuple[StageCall, ...]
    input: Any = None  # the first call's first argument, when the plan starts from data (an uploaded image)

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(call.stage for call in self.calls)

    @property
    def total_steps(self) -> int:
        """Denoising steps over every pass (the hires fix has two), as progress reports count them."""
        return sum(call.steps for call in self.calls if call.progress)


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


ROUTE_SEPARATOR = "|"  # pinned references hold no "|" (serving/deployments/adapters.py splits on it)
# The stages whose replicas hold adapter slots (their calls carry a request's adapter route).
ADAPTER_STAGES = ("text_encoder", "denoiser")


def adapter_route(req: GenerationRequest) -> str:
    """The replica-affinity key of a request's adapters: their pinned references, sorted (empty: none)."""
    return ROUTE_SEPARATOR.join(sorted(a.ref for a in req.loras))


def _encode(req: GenerationRequest) -> EncodeRequest:
    return EncodeRequest(
        req.model, req.prompt, req.negative_prompt, with_negative=req.guidance_scale > 1.0, ref=req.ref, loras=req.loras
    )


def _denoise(req: GenerationRequest, width: int, height: int, steps: int, strength: float = 1.0) -> DenoiseParams:
    return DenoiseParams(
        model=req.model,
        height=height,
        width=width,
        steps=steps,
        guidance_scale=req.guidance_scale,
        scheduler=req.scheduler,
        seed=req.seed,
        num_images=req.num_images,
        ref=req.ref,
        strength=strength,
        loras=req.loras,
    )


def _steps_run(params: DenoiseParams) -> int:
    """Steps a denoise call from an init image runs: diffusers' int(steps * strength)."""
    return min(int(params.steps * params.strength), params.steps)


def plan_generation(req: GenerationRequest) -> Plan:
    """The plan ``req`` needs: text to image, image to image / inpainting (``req.init``), or the hires fix
    (``req.hires``), then whatever post-processing it asks for. Calls of the stages that apply adapters carry the
    request's adapter route."""
    plan = _image_to_image(req) if req.init is not None else _text_to_image(req)
    route = adapter_route(req)
    if not route:
        return plan
    routed = tuple(replace(c, route=route) if c.stage in ADAPTER_STAGES else c for c in plan.calls)
    return replace(plan, calls=routed)


def _text_to_image(req: GenerationRequest) -> Plan:
    first = _denoise(req, req.width, req.height, req.steps)
    calls = [
        StageCall("text_encoder", "encode", (_encode(req),), label="prompt"),
        StageCall("denoiser", "denoise", (first,), progress=True, label="latents", steps=req.steps),
    ]
    if req.hires is not None:
        calls += _hires_pass(req)
    calls += [StageCall("decoder", "decode", encodes=True), *_post_processing(req)]
    return _finish(calls, req)


def _image_to_image(req: GenerationRequest) -> Plan:
    """The VAE stage encodes the init image (and the masked image), then the denoiser starts from it."""
    assert req.init is not None
    encode_image = ImageEncodeParams(req.model, req.ref, req.init.mask)
    params = _denoise(req, req.width, req.height, req.steps, req.init.strength)
    calls = [
        StageCall("decoder", "encode_image", (encode_image,), label="image"),
        StageCall("text_encoder", "encode", (_encode(req),), chained=False),
        StageCall("denoiser", "denoise", (params, Use("image")), progress=True, steps=_steps_run(params)),
        StageCall("decoder", "decode", encodes=True),
        *_post_processing(req),
    ]
    return _finish(calls, req, Pixels(req.init.pixels[None], ""))


def _hires_pass(req: GenerationRequest) -> list[StageCall]:
    """A1111's hires fix after the first pass: upscale (the latents, or the decoded pixels with an upscaler and
    encode them again), then an image-to-image pass at the target size on the same prompt."""
    hires = req.hires
    assert hires is not None
    second = _denoise(req, hires.width, hires.height, hires.steps, hires.strength)
    calls = []
    if hires.upscaler is None:  # latent upscale: the denoiser resizes the latents it starts from
        start = Use("latents")
    else:
        factor = hires.width / req.width
        calls += [
            StageCall("decoder", "decode", encodes=True),
            StageCall("upscaler", "upscale", (UpscaleParams(hires.upscaler, factor),), encodes=True),
            StageCall(
                "decoder",
                "encode_image",
                (ImageEncodeParams(req.model, req.ref, width=hires.width, height=hires.height),),
                label="upscaled",
            ),
        ]
        start = Use("upscaled")
    calls.append(
        StageCall(
            "denoiser",
            "denoise",
            (Use("prompt"), second, start),
            progress=True,
            chained=False,
            steps=_steps_run(second),
        )
    )
    return calls


def plan_postprocess(req: GenerationRequest, pixels: Any) -> Plan:
    """Post-processing only, starting from an image the client sent (``Pixels``): e.g. an upscale."""
    calls = _post_processing(req)
    if not calls:
        raise ValueError("the request asks for no post-processing")
    return _finish(calls, req, pixels)
