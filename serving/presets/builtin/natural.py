"""OpenAI's ``style: "natural"``: more natural, less hyper-real images."""

from serving.config import PresetSpec
from serving.presets import preset


@preset
def natural() -> PresetSpec:
    return PresetSpec(
        name="natural",
        description="OpenAI's natural style: natural light and colours, less hyper-real.",
        prompt="{prompt}, natural lighting, realistic colors, soft details",
        negative_prompt="oversaturated, overexposed, cartoon, lowres",
        guidance_scale=6.0,
    )
