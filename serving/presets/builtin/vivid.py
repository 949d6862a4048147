"""OpenAI's ``style: "vivid"``: hyper-real, dramatic images."""

from serving.config import PresetSpec
from serving.presets import preset


@preset
def vivid() -> PresetSpec:
    return PresetSpec(
        name="vivid",
        description="OpenAI's vivid style: hyper-real and dramatic.",
        prompt="{prompt}, vivid colors, dramatic lighting, high contrast, highly detailed",
        negative_prompt="dull, washed out, flat lighting, lowres",
        guidance_scale=8.0,
    )
