"""Anime key visual."""

from serving.config import PresetSpec
from serving.presets import preset


@preset
def anime() -> PresetSpec:
    return PresetSpec(
        name="anime",
        description="Anime key visual: cel shading, vibrant.",
        prompt="anime artwork of {prompt}, anime style, key visual, vibrant, studio anime, highly detailed",
        negative_prompt="photo, photorealistic, realism, lowres, blurry",
        scheduler="euler_a",
    )
