"""Scheduler registry: a request names a sampler; each row says which diffusers class and settings it means.

Importing this module does not import torch or diffusers (the ingress validates names with it); the class is
resolved only when a scheduler is built. Adding a sampler is one row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SchedulerSpec:
    """One registry row."""

    class_name: str  # attribute of the ``diffusers`` package
    label: str  # the name AUTOMATIC1111 users know it by
    overrides: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()  # AUTOMATIC1111's other names for it (k-diffusion style)


SCHEDULERS: dict[str, SchedulerSpec] = {
    "euler": SchedulerSpec("EulerDiscreteScheduler", "Euler", aliases=("k_euler",)),
    "euler_a": SchedulerSpec("EulerAncestralDiscreteScheduler", "Euler a", aliases=("k_euler_a", "k_euler_ancestral")),
    "heun": SchedulerSpec("HeunDiscreteScheduler", "Heun", aliases=("k_heun",)),
    "ddim": SchedulerSpec("DDIMScheduler", "DDIM"),
    "pndm": SchedulerSpec("PNDMScheduler", "PLMS", {"skip_prk_steps": True}, aliases=("plms",)),
    "dpmpp_2m": SchedulerSpec(
        "DPMSolverMultistepScheduler",
        "DPM++ 2M",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        aliases=("k_dpmpp_2m",),
    ),
    "dpmpp_2m_karras": SchedulerSpec(
        "DPMSolverMultistepScheduler",
        "DPM++ 2M Karras",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        aliases=("k_dpmpp_2m_ka",),
    ),
    "unipc": SchedulerSpec("UniPCMultistepScheduler", "UniPC"),
    "lcm": SchedulerSpec("LCMScheduler", "LCM", aliases=("k_lcm",)),
}

DEFAULT_SCHEDULER = "euler"


def create_scheduler(name: str, base_config: dict[str, Any]) -> Any:
    """Build a fresh scheduler instance from a model's ``scheduler_config.json``.

    Every request gets its own instance: schedulers keep per-run state (step index, solver history).
    """
    import diffusers

    spec = SCHEDULERS[name]
    cls = getattr(diffusers, spec.class_name)
    return cls.from_config(base_config, **spec.overrides)
