"""Request resolution: the configured limits are the only bounds, defaults come from the config."""

from __future__ import annotations

import pytest

from serving.a1111 import A1111Api, Txt2ImgRequest
from serving.config import AppConfig, ModelSpec
from serving.errors import ApiError
from serving.resolver import CHARS_PER_TOKEN, RequestResolver
from serving.rollout import ModelCatalogState
from serving.schemas import ImageGenerationRequest
from serving.service import GenerationService


def resolver(**limits: object) -> RequestResolver:
    defaults = {"steps": 4, "guidance_scale": 5.0}  # within every limit these tests set
    config = AppConfig.model_validate(
        {"limits": limits, "defaults": defaults, "models": [{"name": "m", "source": "/models/m"}]}
    )
    models = ModelCatalogState(specs={"m": ModelSpec(name="m", source="/models/m")}, default="m")
    models.active["m"] = "/models/m"
    return RequestResolver(config, models)


def refused(r: RequestResolver, **fields: object) -> ApiError:
    with pytest.raises(ApiError) as info:
        r.resolve(ImageGenerationRequest.model_validate({"prompt": "a cat", **fields}))
    return info.value


@pytest.mark.parametrize(
    ("limit", "field", "allowed", "over"),
    [
        ("max_steps", "steps", 300, 301),
        ("max_images", "n", 12, 13),
        ("max_guidance_scale", "guidance_scale", 45.0, 45.5),
    ],
)
def test_raising_a_limit_in_the_config_raises_it_on_the_wire(limit: str, field: str, allowed: float, over: float):
    r = resolver(**{limit: allowed})
    req = r.resolve(ImageGenerationRequest.model_validate({"prompt": "a cat", field: allowed}))
    assert {"steps": req.steps, "n": req.num_images, "guidance_scale": req.guidance_scale}[field] == allowed
    err = refused(r, **{field: over})
    assert (err.status, err.code, err.param) == (422, "invalid_request", field)
    assert str(allowed).rstrip("0").rstrip(".") in err.message


def test_lowering_a_limit_lowers_it():
    err = refused(resolver(max_steps=10), steps=11)
    assert (err.status, err.param) == (422, "steps")


def test_size_bounds_come_from_the_config():
    r = resolver(max_size=2048)
    assert r.resolve(ImageGenerationRequest(prompt="x", size="2048x64")).width == 2048
    assert refused(r, size="2056x64").param == "size"
    assert refused(resolver(min_size=128), size="64x128").param == "size"


def test_prompt_length_is_checked_before_tokenizing():
    r = resolver(max_prompt_tokens=75)
    limit = 75 * CHARS_PER_TOKEN
    assert r.resolve(ImageGenerationRequest(prompt="a" * limit)).prompt
    for field in ("prompt", "negative_prompt"):
        err = refused(r, **{field: "a" * (limit + 1)})
        assert (err.status, err.param) == (422, field)


def test_whitespace_runs_count_once_as_clip_collapses_them():
    limit = 75 * CHARS_PER_TOKEN
    r = resolver(max_prompt_tokens=75)
    assert r.resolve(ImageGenerationRequest(prompt="a cat" + " " * (2 * limit))).prompt.startswith("a cat")
    assert refused(r, prompt="a " * limit).param == "prompt"


def test_empty_prompt_samples_unconditionally():
    assert resolver().resolve(ImageGenerationRequest(prompt="")).prompt == ""


def test_a1111_errors_name_a1111_fields():
    service = GenerationService(
        AppConfig.model_validate({"models": [{"name": "m", "source": "/models/m"}], "limits": {"max_images": 4}}), {}
    )
    service.models.specs = {"m": ModelSpec(name="m", source="/models/m")}
    service.models.default = "m"
    service.models.active["m"] = "/models/m"
    api = A1111Api(service)
    for body, param in (
        ({"batch_size": 5}, "batch_size"),
        ({"cfg_scale": 31.0}, "cfg_scale"),
        ({"width": 63}, "width"),
        ({"height": 4096}, "height"),
        ({"width": 2048}, "width"),
        ({"prompt": "a" * (225 * CHARS_PER_TOKEN + 1)}, "prompt"),
    ):
        with pytest.raises(ApiError) as info:
            api.prepare(Txt2ImgRequest.model_validate(body))
        assert (info.value.status, info.value.param) == (422, param), body
        assert info.value.message.startswith(param) or param == "prompt", info.value.message
    assert api.prepare(Txt2ImgRequest.model_validate({"batch_size": 4})).num_images == 4


def test_config_refuses_a_default_size_outside_the_limits():
    with pytest.raises(ValueError, match=r"defaults\.size"):
        AppConfig.model_validate({"defaults": {"size": "100x64"}})
    with pytest.raises(ValueError, match=r"defaults\.size"):
        AppConfig.model_validate({"defaults": {"size": "2048x2048"}})
    with pytest.raises(ValueError, match=r"defaults\.steps"):
        AppConfig.model_validate({"defaults": {"steps": 30}, "limits": {"max_steps": 20}})
    with pytest.raises(ValueError, match=r"defaults\.guidance_scale"):
        AppConfig.model_validate({"defaults": {"guidance_scale": 9}, "limits": {"max_guidance_scale": 8}})


def with_artifacts(r: RequestResolver, **sections: list[str]) -> RequestResolver:
    from serving.config import ArtifactSpec

    r.models.artifacts = {
        section: {name: ArtifactSpec(name=name, source=f"/artifacts/{name}") for name in names}
        for section, names in sections.items()
    }
    return r


def test_upscale_is_checked_against_the_catalog_and_the_limits() -> None:
    none = refused(resolver(), upscale={"factor": 2})
    assert (none.status, none.param) == (422, "upscale") and "no upscaler" in none.message
    r = with_artifacts(resolver(max_output_pixels=256 * 256, max_upscale_factor=4), upscalers=["x4", "x2"])
    assert r.resolve(ImageGenerationRequest(prompt="a", size="64x64")).upscale is None
    ok = r.resolve(ImageGenerationRequest.model_validate({"prompt": "a", "size": "64x64", "upscale": {"factor": 4}}))
    assert ok.upscale is not None and (ok.upscale.upscaler, ok.upscale.factor) == ("x4", 4.0)  # the first
    unknown = refused(r, upscale={"model": "x8"})
    assert (unknown.status, unknown.code, unknown.param) == (404, "upscaler_not_found", "upscale.model")
    for factor in (1.0, 0.5, 4.5):
        assert refused(r, size="64x64", upscale={"factor": factor}).param == "upscale.factor"
    too_big = refused(r, size="128x128", upscale={"factor": 4})  # 512x512 > 256x256 pixels
    assert (too_big.status, too_big.param) == (422, "upscale.factor") and "max_output_pixels" in too_big.message


@pytest.mark.parametrize(
    ("mode", "allow", "asked", "expected"),
    [
        ("off", False, None, None),
        ("flag", False, None, "flag"),
        ("flag", False, "block", "block"),  # stricter: always allowed
        ("block", False, "flag", 422),  # less strict: refused ...
        ("block", True, "flag", "flag"),  # ... unless the operator allows it
        ("flag", True, "off", None),
    ],
)
def test_safety_mode_per_request(mode: str, allow: bool, asked: str | None, expected: object) -> None:
    r = with_artifacts(resolver(), safety_checkers=["checker"])
    r.config = r.config.model_copy(
        update={"safety": r.config.safety.model_copy(update={"mode": mode, "allow_request_off": allow})}
    )
    fields = {"safety": asked} if asked else {}
    if expected == 422:
        assert refused(r, **fields).param == "safety"
        return
    safety = r.resolve(ImageGenerationRequest.model_validate({"prompt": "a", **fields})).safety
    assert (safety.mode if safety else None) == expected
    if safety:
        assert safety.checker == "checker"


def png_b64(width: int, height: int, mode: str = "RGB", value: int = 128) -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (width, height), value).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_init_image_sets_the_size_rounded_down_and_the_default_strength():
    r = resolver()
    req = r.resolve(ImageGenerationRequest(prompt="x", init_image=png_b64(100, 70)))
    assert (req.width, req.height) == (96, 64)
    assert req.init is not None and req.init.pixels.shape == (64, 96, 3) and req.init.mask is None
    assert req.init.strength == 0.75
    masked = r.resolve(ImageGenerationRequest(prompt="x", init_image=png_b64(64, 64), mask=png_b64(64, 64, "L", 255)))
    assert masked.init is not None and masked.init.strength == 1.0 and masked.init.mask is not None
    sized = r.resolve(ImageGenerationRequest(prompt="x", size="128x64", init_image=png_b64(64, 64), strength=0.4))
    assert sized.init is not None and sized.init.pixels.shape == (64, 128, 3) and sized.init.strength == 0.4


def test_init_image_errors_name_the_field():
    r = resolver(max_upload_pixels=100 * 100)
    assert refused(r, init_image=png_b64(128, 128)).param == "init_image"  # over the pixel limit
    assert refused(r, init_image=png_b64(64, 64), mask=png_b64(32, 32, "L", 255)).param == "mask"
    assert refused(r, init_image=png_b64(64, 64), strength=1.2).param == "strength"
    assert refused(r, init_image=png_b64(64, 64), strength=0.2).param == "strength"  # int(4 * 0.2) = 0 steps
    assert refused(r, mask=png_b64(64, 64, "L", 255)).param == "init_image"
    assert refused(r, init_image="0123456789abcdef0123456789abcdef.png").param == "init_image"  # unknown id


def test_init_image_by_id_uses_the_lookup():
    import base64

    r = resolver()
    image_id = "0123456789abcdef0123456789abcdef.png"
    r.lookup_image = {image_id: base64.b64decode(png_b64(72, 64))}.get
    req = r.resolve(ImageGenerationRequest(prompt="x", init_image=image_id))
    assert (req.width, req.height) == (72, 64)


@pytest.mark.parametrize(
    ("scale", "resize", "size"),
    [(2.0, (0, 0), (128, 192)), (1.5, (0, 0), (96, 144)), (2.0, (200, 0), (200, 296)), (2.0, (0, 100), (64, 96))],
)
def test_hires_fix_target_size(scale: float, resize: tuple[int, int], size: tuple[int, int]):
    r = resolver()
    base = r.resolve(ImageGenerationRequest(prompt="x", size="64x96"))
    req = r.hires_fix(base, scale, resize, None, 0, 0.5)
    assert req.hires is not None and (req.hires.width, req.hires.height) == size
    assert req.hires.steps == base.steps and req.hires.upscaler is None


def test_hires_fix_refusals():
    r = resolver(max_size=512)
    base = r.resolve(ImageGenerationRequest(prompt="x", size="64x64"))
    with pytest.raises(ApiError) as too_big:
        r.hires_fix(base, 9.0, (0, 0), None, 0, 0.5)
    assert too_big.value.param == "hr_scale"
    with pytest.raises(ApiError) as unknown:
        r.hires_fix(base, 2.0, (0, 0), "nope", 0, 0.5)
    assert (unknown.value.status, unknown.value.param) == (404, "hr_upscaler")
    with pytest.raises(ApiError) as weak:
        r.hires_fix(base, 2.0, (0, 0), None, 0, 0.1)
    assert weak.value.param == "denoising_strength"


def lora_resolver(**lora: object) -> RequestResolver:
    from serving.config import ArtifactSpec, PresetLora, PresetSpec

    r = resolver(max_loras=2)
    r.config = r.config.model_copy(update={"lora": r.config.lora.model_copy(update=lora)})
    r.models.artifacts["loras"] = {n: ArtifactSpec(name=n, source=f"/loras/{n}") for n in ("ink", "grain", "down")}
    r.models.adapters.update({"ink": "/loras/ink", "grain": "/loras/grain"})
    r.models.adapter_errors["down"] = "NotFoundError: gone"
    r.presets._fixed["inked"] = PresetSpec(name="inked", loras=[PresetLora(name="ink", scale=0.6)])
    return r


def test_adapters_resolve_to_pinned_references_with_their_scales() -> None:
    r = lora_resolver()
    req = r.resolve(ImageGenerationRequest.model_validate({"prompt": "x", "loras": [{"name": "ink", "scale": 0.5}]}))
    assert [(a.name, a.ref, a.scale) for a in req.loras] == [("ink", "/loras/ink", 0.5)]
    styled = r.resolve(ImageGenerationRequest(prompt="x", style="inked"))
    assert [(a.name, a.scale) for a in styled.loras] == [("ink", 0.6)]
    own = r.resolve(
        ImageGenerationRequest.model_validate({"prompt": "x", "style": "inked", "loras": [{"name": "grain"}]})
    )
    assert [a.name for a in own.loras] == ["grain"]  # the request's own adapters replace the preset's


@pytest.mark.parametrize(
    ("loras", "status", "code", "param"),
    [
        ([{"name": "nope"}], 404, "lora_not_found", "loras[0].name"),
        ([{"name": "ink", "scale": 2.5}], 422, "invalid_request", "loras[0].scale"),
        ([{"name": "ink", "scale": float("nan")}], 422, "invalid_request", "loras[0].scale"),
        ([{"name": "ink"}, {"name": "grain"}, {"name": "ink"}], 422, "invalid_request", "loras"),
        ([{"name": "ink"}, {"name": "ink"}], 422, "invalid_request", "loras[1].name"),
        ([{"name": "down"}], 503, "lora_unavailable", "loras"),
    ],
)
def test_bad_adapters_are_refused_before_any_stage(loras: list[dict[str, object]], status: int, code: str, param: str):
    err = refused(lora_resolver(), loras=loras)
    assert (err.status, err.code, err.param) == (status, code, param)


def test_a1111_lora_tags_leave_the_prompt_and_become_adapters() -> None:
    from serving.a1111 import lora_tags

    prompt, loras = lora_tags("a cat <lora:ink:0.7>, in snow <lora:grain>")
    assert prompt == "a cat , in snow"
    assert [(a.name, a.scale) for a in loras] == [("ink", 0.7), ("grain", 1.0)]
    assert lora_tags("no tags (here:1.2)") == ("no tags (here:1.2)", [])
    for bad in ("<lora:ink:x>", "<lora:ink:0.5:0.2>", "<hypernet:h:1>"):
        with pytest.raises(ApiError) as info:
            lora_tags(f"a cat {bad}")
        assert info.value.param == "prompt"
