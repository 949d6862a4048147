"""Safety-checker stage: diffusers' ``StableDiffusionSafetyChecker`` flags decoded images, one verdict each.

An artifact is laid out as the public ``CompVis/stable-diffusion-safety-checker`` repo (``config.json``,
``model.safetensors``, ``preprocessor_config.json`` in one folder) or as a pipeline snapshot's
``safety_checker/`` + ``feature_extractor/`` subfolders. Preprocessing and the flag decision are diffusers'
own (``StableDiffusionPipeline.run_safety_checker`` and the checker's ``forward``), so a served checker flags
exactly what the diffusers pipeline would.

``create_test_safety_checker`` writes a tiny random-weight checker in the real layout whose one live concept
points at chosen images, so tests can make it flag one image and pass another.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from models.snapshot import UNSAFE_WEIGHT_SUFFIXES, ArtifactSnapshot, SnapshotError

# The tiny test checker: a 2-layer CLIP vision tower on 32x32 crops (the real one is ViT-L/14 on 224x224).
TINY_IMAGE_SIZE = 32
TINY_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": TINY_IMAGE_SIZE,
    "patch_size": 8,
}
TINY_PROJECTION_DIM = 16
# The published checker (CompVis/stable-diffusion-safety-checker's config.json): a CLIP ViT-L/14 vision tower on
# 224x224 crops, 768-d projection.
VIT_L14_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
}
VIT_L14_PROJECTION_DIM = 768

# A cosine is at most 1, so a concept with this threshold scores at most -1 + 0.01 and never fires.
INERT_THRESHOLD = 2.0
# Smallest score margin the factory leaves on each side of a live concept's threshold: diffusers rounds scores
# to 3 decimals, and fp16 / another device moves embeddings a little.
MIN_MARGIN = 0.005

PATTERN_KINDS = ("magenta", "gradient", "checkerboard")


@dataclass(frozen=True)
class SafetyVerdict:
    """One image's result: ``flagged`` is diffusers' ``has_nsfw_concept``.

    ``score`` is the largest concept score as diffusers computes it (cosine - threshold + special-care
    adjustment, rounded to 3 decimals), so ``flagged == (score > 0)``; it says how close an image came.
    """

    flagged: bool
    score: float


def artifact_dirs(path: Path) -> tuple[Path, Path]:
    """(checker folder, image-processor folder) of a safety-checker artifact in either supported layout."""
    if (path / "config.json").is_file():
        checker_dir, processor_dir = path, path
    elif (path / "safety_checker" / "config.json").is_file():
        checker_dir, processor_dir = path / "safety_checker", path / "feature_extractor"
    else:
        raise SnapshotError(
            f"{path} is not a safety checker: no config.json, and no safety_checker/config.json (pipeline layout)"
        )
    if not (processor_dir / "preprocessor_config.json").is_file():
        raise SnapshotError(f"{path} is not a safety checker: no {processor_dir.name}/preprocessor_config.json")
    return checker_dir, processor_dir


def _check_weight_files(checker_dir: Path, allow_pickle: bool) -> None:
    # transformers' own error for a pickle-only folder under use_safetensors=True names no remedy.
    files = [p for p in checker_dir.iterdir() if p.is_file()]
    if any(p.suffix == ".safetensors" for p in files):
        return
    pickles = [p.name for p in files if p.suffix in UNSAFE_WEIGHT_SUFFIXES]
    if not pickles:
        raise SnapshotError(f"{checker_dir} holds no weights (expected model.safetensors)")
    if not allow_pickle:
        raise SnapshotError(
            f"{checker_dir} holds only pickle-based weights ({pickles[0]}); convert them to safetensors "
            "(model.safetensors) or set the artifact's unsafe allow_pickle option"
        )


def concept_scores(checker: Any, image_embeds: torch.Tensor) -> list[list[float]]:
    """Every concept's score per image, computed step for step as ``StableDiffusionSafetyChecker.forward``.

    Same cosine function, same float32 numpy values, same Python-float thresholds and 3-decimal rounding:
    a score is > 0 exactly when diffusers counts the concept as bad.
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    special_cos = cosine_distance(image_embeds, checker.special_care_embeds).cpu().float().numpy()
    cos = cosine_distance(image_embeds, checker.concept_embeds).cpu().float().numpy()
    special_thresholds = checker.special_care_embeds_weights.tolist()
    thresholds = checker.concept_embeds_weights.tolist()
    scores = []
    for i in range(image_embeds.shape[0]):
        # Any special-care concept firing raises every concept score by 0.01; the first one to fire does so
        # with no adjustment yet, so "any fires" needs no running adjustment.
        special_fires = any(round(special_cos[i][k] - t, 3) > 0 for k, t in enumerate(special_thresholds))
        adjustment = 0.01 if special_fires else 0.0
        scores.append([float(round(cos[i][k] - t + adjustment, 3)) for k, t in enumerate(thresholds)])
    return scores


def _pil_images(pixels: Iterable[np.ndarray]) -> list[Any]:
    from PIL import Image

    return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]


class SafetyCheckerStage:
    """Holds one safety checker and its CLIP image processor."""

    def __init__(self, name: str, snapshot: ArtifactSnapshot, device: torch.device, dtype: torch.dtype) -> None:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        self.name = name
        self.snapshot = snapshot
        self.device = device
        self.dtype = dtype
        checker_dir, processor_dir = artifact_dirs(snapshot.path)
        _check_weight_files(checker_dir, snapshot.allow_pickle)
        # The checker is a transformers model: its from_pretrained takes `dtype` (`torch_dtype` is deprecated).
        checker = StableDiffusionSafetyChecker.from_pretrained(
            checker_dir, dtype=dtype, use_safetensors=snapshot.use_safetensors
        )
        self.checker: Any = cast(Any, checker).to(device).eval()
        # The class diffusers' pipeline loads for `feature_extractor`, so resizing matches it in this environment.
        self.feature_extractor: Any = CLIPImageProcessor.from_pretrained(processor_dir)

    @property
    def version(self) -> str:
        return self.snapshot.version

    def loaded_modules(self) -> dict[str, str]:
        return {"safety_checker": type(self.checker).__name__}

    @torch.inference_mode()
    def check(self, pixels: np.ndarray) -> list[SafetyVerdict]:
        """uint8 images (n, h, w, 3) -> one verdict each, all images in one forward pass."""
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (n, h, w, 3), got {pixels.dtype} {pixels.shape}")
        if len(pixels) == 0:
            return []
        # run_safety_checker hands the processor PIL images made from uint8 pixels, as these are.
        clip_input = self.feature_extractor(_pil_images(pixels), return_tensors="pt").pixel_values
        clip_input = clip_input.to(self.device, self.dtype)
        captured: list[torch.Tensor] = []
        hook = self.checker.visual_projection.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            # forward blacks out flagged entries of `images` in place; a placeholder takes that.
            _, has_nsfw_concepts = self.checker(clip_input=clip_input, images=torch.zeros(len(pixels)))
        finally:
            hook.remove()
        scores = concept_scores(self.checker, captured[0])
        return [
            # The float32 score printed as diffusers rounded it (0.016, not 0.01600000075995922); sign unchanged.
            SafetyVerdict(flagged=bool(flag), score=round(max(row), 3))
            for flag, row in zip(has_nsfw_concepts, scores, strict=True)
        ]


def pattern_image(kind: str, size: int = 64) -> np.ndarray:
    """A deterministic synthetic uint8 (size, size, 3) image; the kinds embed far apart in the tiny checker."""
    y, x = np.mgrid[0:size, 0:size]
    if kind == "magenta":
        noise = np.random.default_rng(0).integers(-20, 21, (size, size, 3))
        return np.clip(np.array([230, 20, 200]) + noise, 0, 255).astype(np.uint8)
    if kind == "gradient":
        top = max(size - 1, 1)
        return np.stack([x * 255 // top, y * 255 // top, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    if kind == "checkerboard":
        cell = max(size // 8, 1)
        board = ((x // cell + y // cell) % 2 * 255).astype(np.uint8)
        return np.stack([board] * 3, axis=-1)
    raise ValueError(f"unknown pattern {kind!r}; choose from {PATTERN_KINDS}")


def _tiny_processor() -> Any:
    from transformers import CLIPImageProcessor

    # The real checker's processor settings (bicubic shortest-edge resize, centre crop, CLIP mean / std) at
    # the tiny tower's input size.
    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": TINY_IMAGE_SIZE},
        resample=3,
        do_center_crop=True,
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        do_convert_rgb=True,
    )


def published_key(key: str) -> str:
    """The name a state-dict key has in the published checkpoint.

    transformers 5 flattened ``CLIPVisionModel`` (``vision_model.embeddings...``) and renames the published
    ``vision_model.vision_model.embeddings...`` on load; a freshly built model saves the new names.
    """
    if key.startswith("vision_model.") and not key.startswith("vision_model.vision_model."):
        return "vision_model." + key
    return key


def _publish_key_names(weights_file: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(weights_file)
    save_file({published_key(k): v for k, v in weights.items()}, weights_file, metadata={"format": "pt"})


def _unit_embeds(checker: Any, processor: Any, images: Sequence[np.ndarray]) -> torch.Tensor:
    clip_input = processor(_pil_images(images), return_tensors="pt").pixel_values
    embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
    return torch.nn.functional.normalize(embeds)


def create_test_safety_checker(
    directory: str | Path,
    seed: int = 0,
    flag_images: Sequence[np.ndarray] = (),
    clear_images: Sequence[np.ndarray] = (),
) -> Path:
    """Write a tiny random-weight safety checker in the real artifact layout and return its folder.

    Every concept is inert (flags nothing) unless ``flag_images`` are given: then concept 0 points at their
    mean embedding, with its threshold midway between the lowest cosine of a flag image and the highest of a
    clear image (or ``2 * MIN_MARGIN`` below the former when there are none). Thresholds live in the weights
    file, as in the real checker. Files are a pure function of (seed, images) on a given torch build.

    Raises:
        ValueError: the flag and clear images are not separated by at least ``2 * MIN_MARGIN`` in cosine.
        FileExistsError: ``directory`` already holds a checker.
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker, cosine_distance
    from transformers import CLIPConfig

    target = Path(directory)
    if (target / "config.json").exists():
        raise FileExistsError(f"{target} already holds a model")
    config = CLIPConfig(vision_config=TINY_VISION_CONFIG, projection_dim=TINY_PROJECTION_DIM)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        checker: Any = StableDiffusionSafetyChecker(config).eval()
    processor = _tiny_processor()

    with torch.no_grad():
        checker.concept_embeds_weights.fill_(INERT_THRESHOLD)
        checker.special_care_embeds_weights.fill_(INERT_THRESHOLD)
        if flag_images:
            flag_embeds = _unit_embeds(checker, processor, flag_images)
            concept = torch.nn.functional.normalize(flag_embeds.mean(0, keepdim=True))
            lowest_flag = cosine_distance(flag_embeds, concept).min().item()
            if clear_images:
                highest_clear = cosine_distance(_unit_embeds(checker, processor, clear_images), concept).max().item()
                if lowest_flag - highest_clear < 2 * MIN_MARGIN:
                    raise ValueError(
                        f"flag and clear images are not separable: lowest flag-image cosine {lowest_flag:.4f}, "
                        f"highest clear-image cosine {highest_clear:.4f} (need a gap of at least {2 * MIN_MARGIN})"
                    )
                threshold = (lowest_flag + highest_clear) / 2
            else:
                threshold = lowest_flag - 2 * MIN_MARGIN
            checker.concept_embeds[0] = concept[0]
            checker.concept_embeds_weights[0] = threshold

    target.mkdir(parents=True, exist_ok=True)
    # Write into a sibling temp dir and move config.json last: its presence marks a complete checker.
    staging = Path(tempfile.mkdtemp(prefix=".create-", dir=target.parent))
    checker.save_pretrained(staging)
    _publish_key_names(staging / "model.safetensors")
    processor.save_pretrained(staging)
    for child in sorted(staging.iterdir(), key=lambda c: c.name == "config.json"):
        child.rename(target / child.name)
    staging.rmdir()
    return target
