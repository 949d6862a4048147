"""The safety-checker stage loads the real artifact layout and flags exactly what diffusers' pipeline flags;
the test-checker factory writes that layout and points a concept at chosen images."""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from models.safety import (
    INERT_THRESHOLD,
    VIT_L14_PROJECTION_DIM,
    VIT_L14_VISION_CONFIG,
    SafetyCheckerStage,
    create_test_safety_checker,
    pattern_image,
    published_key,
)
from models.snapshot import ArtifactSnapshot, SnapshotError

CPU = torch.device("cpu")
FLAG = pattern_image("magenta", 64)
CLEAR = pattern_image("gradient", 64)
OTHER = pattern_image("checkerboard", 64)

THRESHOLDS = ("concept_embeds_weights", "special_care_embeds_weights")
# The checker's own tensors, as named in the published checkpoint.
CHECKER_KEYS = {
    "concept_embeds",
    "concept_embeds_weights",
    "special_care_embeds",
    "special_care_embeds_weights",
    "visual_projection.weight",
}
# A few tower tensors by their published names (transformers 4 nested the tower as vision_model.vision_model).
PUBLISHED_KEYS = CHECKER_KEYS | {
    "vision_model.vision_model.embeddings.class_embedding",
    "vision_model.vision_model.embeddings.patch_embedding.weight",
    "vision_model.vision_model.pre_layrnorm.weight",
    "vision_model.vision_model.encoder.layers.1.self_attn.q_proj.weight",
    "vision_model.vision_model.post_layernorm.bias",
}


def stage_for(path: Path, allow_pickle: bool = False) -> SafetyCheckerStage:
    snapshot = ArtifactSnapshot(path=path, version="v1", kind="safety_checker", allow_pickle=allow_pickle)
    return SafetyCheckerStage("checker", snapshot, CPU, torch.float32)


def digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def flagging_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("safety") / "flagging"
    return create_test_safety_checker(directory, flag_images=[FLAG], clear_images=[CLEAR])


@pytest.fixture(scope="module")
def flagging(flagging_dir: Path) -> SafetyCheckerStage:
    return stage_for(flagging_dir)


def diffusers_flags(path: Path, pixels: np.ndarray) -> list[bool]:
    """What StableDiffusionPipeline.run_safety_checker says for decoded (output_type="np") images."""
    from diffusers import StableDiffusionPipeline
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    pipe = SimpleNamespace(
        safety_checker=StableDiffusionSafetyChecker.from_pretrained(path),
        feature_extractor=CLIPImageProcessor.from_pretrained(path),
        image_processor=VaeImageProcessor(),
    )
    images = pixels.astype(np.float32) / 255
    _, flags = StableDiffusionPipeline.run_safety_checker(pipe, images, CPU, torch.float32)
    return [bool(f) for f in flags]


def test_layout_is_the_real_checkers(flagging_dir: Path, flagging: SafetyCheckerStage) -> None:
    """The files and tensor names of the published checker, at ViT-L/14's structure, and every tensor loads."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from safetensors.torch import load_file
    from transformers import CLIPConfig

    assert sorted(p.name for p in flagging_dir.iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    written = load_file(flagging_dir / "model.safetensors")
    with torch.device("meta"):
        real = StableDiffusionSafetyChecker(
            CLIPConfig(vision_config=VIT_L14_VISION_CONFIG, projection_dim=VIT_L14_PROJECTION_DIM)
        )

    def layerless(keys: Iterable[str]) -> set[str]:
        return {re.sub(r"\.layers\.\d+\.", ".layers.N.", k) for k in keys}

    assert layerless(written) == layerless(published_key(k) for k in real.state_dict())
    assert set(written) >= PUBLISHED_KEYS
    assert all(k.startswith("vision_model.vision_model.") for k in set(written) - CHECKER_KEYS)
    assert written["concept_embeds"].shape[0] == 17 and written["special_care_embeds"].shape[0] == 3
    # transformers 5 renames the published names on load; a miss would leave random weights with a warning.
    loaded = {published_key(k): v for k, v in flagging.checker.state_dict().items()}
    assert loaded.keys() == written.keys()
    assert all(torch.equal(loaded[k], v) for k, v in written.items())
    assert flagging.loaded_modules() == {"safety_checker": "StableDiffusionSafetyChecker"}
    assert flagging.version == "v1"


def test_flags_what_diffusers_flags(flagging_dir: Path, flagging: SafetyCheckerStage) -> None:
    pixels = np.stack([FLAG, CLEAR, OTHER])
    verdicts = flagging.check(pixels)
    assert [v.flagged for v in verdicts] == [True, False, False]
    assert [v.flagged for v in verdicts] == diffusers_flags(flagging_dir, pixels)
    assert all(v.flagged == (v.score > 0) for v in verdicts)
    # One flag image: the concept is its own embedding (cosine 1), so its score is 1 - threshold.
    threshold = flagging.checker.concept_embeds_weights[0].item()
    assert verdicts[0].score == pytest.approx(1 - threshold, abs=1.5e-3)
    assert flagging.check(pixels[:0]) == []


def test_score_follows_diffusers_rounding_and_special_care(flagging: SafetyCheckerStage) -> None:
    """Thresholds a few ten-thousandths either side of the flag image's cosine, and of that plus the +0.01 a
    firing special-care concept adds: the score's sign tracks the module's own flag through the rounding."""
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    checker = flagging.checker
    pixels = np.stack([FLAG, CLEAR])
    clip_input = flagging.feature_extractor([Image.fromarray(p) for p in pixels], return_tensors="pt").pixel_values
    saved = {name: getattr(checker, name).detach().clone() for name in THRESHOLDS}
    seen = set()
    try:
        with torch.no_grad():
            embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
            cos = cosine_distance(embeds, checker.concept_embeds)[0, 0].item()
            for special_threshold in (INERT_THRESHOLD, -1.0):
                checker.special_care_embeds_weights[1] = special_threshold
                for offset in (-0.0006, -0.0004, 0.0, 0.0004, 0.0006, 0.0094, 0.0096, 0.0104, 0.0106):
                    checker.concept_embeds_weights[0] = cos + offset
                    verdict = flagging.check(pixels)[0]
                    _, module_flags = checker(clip_input=clip_input, images=torch.zeros(2))
                    assert verdict.flagged == module_flags[0] == (verdict.score > 0), (special_threshold, offset)
                    seen.add((special_threshold, verdict.flagged))
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                getattr(checker, name).copy_(value)
    # Both outcomes occur with and without the special-care adjustment.
    assert len(seen) == 4


def test_default_checker_flags_nothing(tmp_path: Path) -> None:
    stage = stage_for(create_test_safety_checker(tmp_path / "default"))
    verdicts = stage.check(np.stack([FLAG, CLEAR, OTHER])) + stage.check(pattern_image("magenta", 512)[None])
    assert [v.flagged for v in verdicts] == [False] * 4
    assert all(v.score < -0.9 for v in verdicts)


def test_factory_is_deterministic_and_refuses_bad_input(flagging_dir: Path, tmp_path: Path) -> None:
    again = create_test_safety_checker(tmp_path / "again", flag_images=[FLAG], clear_images=[CLEAR])
    assert digest(again) == digest(flagging_dir)
    other = create_test_safety_checker(tmp_path / "other", seed=1, flag_images=[FLAG], clear_images=[CLEAR])
    assert digest(other)["model.safetensors"] != digest(flagging_dir)["model.safetensors"]
    with pytest.raises(FileExistsError):
        create_test_safety_checker(again)
    with pytest.raises(ValueError, match="not separable"):
        create_test_safety_checker(tmp_path / "same", flag_images=[FLAG], clear_images=[FLAG])
    assert not (tmp_path / "same" / "config.json").exists()


def test_pipeline_layout_loads(flagging_dir: Path, tmp_path: Path) -> None:
    snapshot = tmp_path / "pipeline"
    (snapshot / "safety_checker").mkdir(parents=True)
    (snapshot / "feature_extractor").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(flagging_dir / name, snapshot / "safety_checker" / name)
    shutil.copy(flagging_dir / "preprocessor_config.json", snapshot / "feature_extractor")
    verdicts = stage_for(snapshot).check(np.stack([FLAG, CLEAR]))
    assert [v.flagged for v in verdicts] == [True, False]


def test_pickle_weights_need_allow_pickle(flagging_dir: Path, flagging: SafetyCheckerStage, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(flagging_dir / name, pickled)
    torch.save(load_file(flagging_dir / "model.safetensors"), pickled / "pytorch_model.bin")
    with pytest.raises(SnapshotError, match=r"pickle-based weights \(pytorch_model.bin\).*safetensors"):
        stage_for(pickled)
    pixels = np.stack([FLAG, CLEAR])
    assert stage_for(pickled, allow_pickle=True).check(pixels) == flagging.check(pixels)


def test_rejects_non_images(flagging: SafetyCheckerStage, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        flagging.check(np.zeros((1, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        flagging.check(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(SnapshotError, match="not a safety checker"):
        stage_for(tmp_path)
