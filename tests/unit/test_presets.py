"""Style presets: built-in plug-ins, inline and folder presets (reloaded without a restart), and how a request
combines with them."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.config import AppConfig, ModelSpec, StylesSpec
from serving.errors import ApiError
from serving.presets import PresetLibrary, builtin_presets
from serving.resolver import RequestResolver
from serving.rollout import ModelCatalogState
from serving.schemas import ImageGenerationRequest


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_builtin_presets_are_discovered_modules() -> None:
    builtin = builtin_presets()
    assert {"vivid", "natural"} <= set(builtin)  # OpenAI's two styles
    modules = {p.stem for p in (Path(__file__).parents[2] / "serving/presets/builtin").glob("*.py")} - {"__init__"}
    assert set(builtin) == modules  # one module each, no list to edit


def test_a_preset_file_dropped_in_is_served_without_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    library = PresetLibrary(StylesSpec(directory=str(tmp_path), reload_interval_s=5), clock=clock)
    assert library.get("noir") is None
    (tmp_path / "noir.yaml").write_text("prompt: 'film noir still of {prompt}'\nsteps: 30\n")
    assert library.get("noir") is None  # not checked again yet
    clock.now = 6
    noir = library.get("noir")
    assert noir is not None and noir.steps == 30 and noir.prompt.startswith("film noir")
    # A broken edit keeps the last good version and says why.
    (tmp_path / "noir.yaml").write_text("steps: [not a number\n")
    import os

    os.utime(tmp_path / "noir.yaml", (100, 100))
    clock.now = 12
    kept = library.get("noir")
    assert kept is not None and kept.steps == 30 and "noir.yaml" in library.errors
    (tmp_path / "noir.yaml").unlink()
    clock.now = 18
    assert library.get("noir") is None and "noir.yaml" not in library.errors


def resolver(**styles: object) -> RequestResolver:
    config = AppConfig.model_validate(
        {"defaults": {"steps": 4}, "models": [{"name": "m", "source": "/m"}, {"name": "n", "source": "/n"}],
         "styles": styles}
    )  # fmt: skip
    specs = {name: ModelSpec(name=name, source=f"/{name}") for name in ("m", "n")}
    models = ModelCatalogState(specs=specs, default="m")
    models.active.update({"m": "/m", "n": "/n"})
    return RequestResolver(config, models)


INLINE = {
    "name": "poster",
    "prompt": "poster of {prompt}, bold shapes",
    "negative_prompt": "{prompt}, blurry",
    "model": "n",
    "steps": 12,
    "size": "256x128",
    "scheduler": "ddim",
}


def test_a_preset_fills_what_the_request_leaves_out() -> None:
    r = resolver(presets=[INLINE])
    req = r.resolve(ImageGenerationRequest(prompt="a fox", negative_prompt="text", style="poster"))
    assert (req.prompt, req.negative_prompt) == ("poster of a fox, bold shapes", "text, blurry")
    assert (req.model, req.steps, req.width, req.height, req.scheduler) == ("n", 12, 256, 128, "ddim")
    assert req.styles == ("poster",)
    mine = r.resolve(ImageGenerationRequest(prompt="a fox", style="poster", steps=3, size="64x64", model="m"))
    assert (mine.model, mine.steps, mine.width) == ("m", 3, 64)  # request fields win


def test_openai_styles_and_a1111_style_lists() -> None:
    r = resolver()
    vivid = r.resolve(ImageGenerationRequest(prompt="a fox", style="vivid"))
    assert vivid.prompt.startswith("a fox, vivid") and vivid.negative_prompt
    both = r.resolve(ImageGenerationRequest(prompt="a fox"), styles=("photographic", "natural"))
    assert both.prompt.startswith("cinematic photo of a fox") and "natural lighting" in both.prompt
    assert both.styles == ("photographic", "natural")


def test_unknown_style_is_404_naming_it() -> None:
    with pytest.raises(ApiError) as info:
        resolver().resolve(ImageGenerationRequest(prompt="x", style="nope"))
    assert (info.value.status, info.value.code, info.value.param) == (404, "style_not_found", "style")
    with pytest.raises(ApiError) as a1111:
        resolver().resolve(ImageGenerationRequest(prompt="x"), styles=("nope",))
    assert a1111.value.param == "styles"


def test_a_bad_inline_preset_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="scheduler"):
        AppConfig.model_validate({"styles": {"presets": [{"name": "x", "scheduler": "nope"}]}})
