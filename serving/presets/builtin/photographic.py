"""A photograph: lens, depth of field, film grain."""

from serving.config import PresetSpec
from serving.presets import preset


@preset
def photographic() -> PresetSpec:
    return PresetSpec(
        name="photographic",
        description="A photograph: 35mm, shallow depth of field, film grain.",
        prompt="cinematic photo of {prompt}, 35mm photograph, film grain, bokeh, professional, highly detailed",
        negative_prompt="drawing, painting, illustration, cartoon, anime, lowres, blurry",
    )
