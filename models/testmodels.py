"""Randomly initialised Stable Diffusion models in the standard diffusers layout.

No weights can be downloaded in tests or CI, so models are built in code: the real SD1.5 classes and file
layout (``model_index.json``, one subfolder per component, safetensors, a CLIP tokenizer), with random
weights that are a pure function of the seed. The loader that serves these serves a real SD1.5 snapshot
unchanged.

Sizes:
- ``tiny``: for tests; a 64x64 image at a few steps takes well under a second on two CPU cores.
- ``bench``: for CPU benchmarks; the same block structure as SD1.5, narrower, so compute dominates.
- ``sd15``: the exact SD1.5 UNet / VAE / CLIP-L configuration, for GPU timing.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.snapshot import MODEL_FAMILIES
from models.tokenizer_vocab import BOS_TOKEN, EOS_TOKEN, build_vocab

# SD1.5's scheduler config (PNDM with the scaled-linear schedule it was trained with).
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}

_SD15_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD15_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
_VAE_DOWN = ("DownEncoderBlock2D",) * 4
_VAE_UP = ("UpDecoderBlock2D",) * 4


@dataclass(frozen=True)
class TestModelSize:
    """Architecture hyper-parameters of one test-model size."""

    text: dict[str, Any]
    unet: dict[str, Any]
    vae: dict[str, Any]
    default_resolution: int
    default_dtype: str = "float32"
    max_merges: int = 2000
    vocab_size: int | None = None  # None: the tokenizer's size; SD1.5 keeps CLIP's 49,408 rows
    notes: str = field(default="")


TEST_MODEL_SIZES: dict[str, TestModelSize] = {
    "tiny": TestModelSize(
        text={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
        unet={
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        vae={"block_out_channels": (16, 16, 32, 32), "layers_per_block": 1, "norm_num_groups": 16},
        default_resolution=64,
        notes="tests: 64x64 in well under a second",
    ),
    "bench": TestModelSize(
        text={"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4},
        unet={
            "block_out_channels": (64, 128, 256, 256),
            "layers_per_block": 2,
            "down_block_types": _SD15_DOWN,
            "up_block_types": _SD15_UP,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        vae={"block_out_channels": (32, 64, 128, 128), "layers_per_block": 2, "norm_num_groups": 32},
        default_resolution=256,
        notes="CPU benchmarks: SD1.5 block structure at a quarter of the width",
    ),
    "sd15": TestModelSize(
        text={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
        unet={
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "down_block_types": _SD15_DOWN,
            "up_block_types": _SD15_UP,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        vae={"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32},
        default_resolution=512,
        default_dtype="float16",
        vocab_size=49408,
        notes="the exact SD1.5 architecture, for GPU timing",
    ),
}


def _write_tokenizer(directory: Path, max_merges: int) -> int:
    """Write CLIP tokenizer files; return the vocabulary size."""
    vocab, merges = build_vocab(max_merges)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        **specials,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return len(vocab)


def create_test_model(
    directory: str | Path,
    size: str = "tiny",
    seed: int = 0,
    dtype: str | None = None,
    inpainting: bool = False,
) -> Path:
    """Write a randomly initialised SD1.5-layout model to ``directory`` and return its path.

    Args:
        directory: target folder; created, and must not already hold a model.
        size: one of ``TEST_MODEL_SIZES``.
        seed: weights are a pure function of (size, seed).
        dtype: weight dtype on disk (``float32`` / ``float16``); the size's default when None.
        inpainting: the SD1.5 inpainting layout: a UNet with 9 input channels (latents, mask, masked-image
            latents) and ``StableDiffusionInpaintPipeline`` as the pipeline class.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if size not in TEST_MODEL_SIZES:
        raise ValueError(f"unknown test model size {size!r}; choose from {sorted(TEST_MODEL_SIZES)}")
    spec = TEST_MODEL_SIZES[size]
    target = Path(directory)
    if (target / "model_index.json").exists():
        raise FileExistsError(f"{target} already holds a model")
    torch_dtype = {"float32": torch.float32, "float16": torch.float16}[dtype or spec.default_dtype]
    target.mkdir(parents=True, exist_ok=True)
    # Write into a sibling temp dir and rename: a half-written model is never visible.
    staging = Path(tempfile.mkdtemp(prefix=".create-", dir=target.parent))
    vocab_size = _write_tokenizer(staging / "tokenizer", spec.max_merges)
    vocab, _ = build_vocab(spec.max_merges)

    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        vocab_size=spec.vocab_size or vocab_size,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=spec.text["hidden_size"],
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[EOS_TOKEN],
        **spec.text,
    )
    text_encoder: Any = CLIPTextModel(text_config)
    text_encoder.to(torch_dtype).save_pretrained(staging / "text_encoder", safe_serialization=True)

    latent_size = spec.default_resolution // 8
    torch.manual_seed(seed + 1)
    unet: Any = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=9 if inpainting else 4,
        out_channels=4,
        cross_attention_dim=spec.text["hidden_size"],
        **spec.unet,
    )
    unet.to(torch_dtype).save_pretrained(staging / "unet", safe_serialization=True)

    torch.manual_seed(seed + 2)
    vae: Any = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=MODEL_FAMILIES["sd1"].latent_channels,
        down_block_types=_VAE_DOWN,
        up_block_types=_VAE_UP,
        sample_size=spec.default_resolution,
        scaling_factor=0.18215,
        **spec.vae,
    )
    vae.to(torch_dtype).save_pretrained(staging / "vae", safe_serialization=True)

    (staging / "scheduler").mkdir()
    (staging / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER_CONFIG, indent=2))
    model_index = {
        "_class_name": "StableDiffusionInpaintPipeline" if inpainting else "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (staging / "model_index.json").write_text(json.dumps(model_index, indent=2))
    # model_index.json moves last: its presence marks a complete model.
    for child in sorted(staging.iterdir(), key=lambda c: c.name == "model_index.json"):
        child.rename(target / child.name)
    staging.rmdir()
    return target


LORA_FORMATS = ("kohya", "diffusers")


def create_test_lora(
    model: str | Path,
    target: str | Path,
    lora_format: str = "kohya",
    rank: int = 4,
    alpha: float | None = None,
    text_encoder: bool = True,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Write a random LoRA adapter for the model at ``model`` into the folder ``target`` and return the file.

    The file has the real key layout of its format: kohya / A1111 (``lora_unet_<path>.lora_down.weight``,
    ``.lora_up.weight``, ``.alpha``; ``lora_te_text_model_...`` for the text encoder) or diffusers / PEFT
    (``unet.<path>.lora_A.weight``, ``text_encoder.text_model.<path>.lora_B.weight``, no alphas: scale 1). It
    adapts what both formats' trainers adapt: the UNet's attention projections, feed-forward layers and 1x1
    in / out projections, and CLIP's attention and MLP layers (``text_encoder=False``: the UNet only).

    Args:
        model: a diffusers-layout model folder (only its configs are read).
        lora_format: one of ``LORA_FORMATS``.
        alpha: kohya's network alpha (the delta is scaled by alpha / rank); None: the rank (scale 1).
        seed: weights are a pure function of (model shapes, format, rank, seed).
    """
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.adapters.slots import TEXT_ENCODER_TARGETS, UNET_TARGETS

    if lora_format not in LORA_FORMATS:
        raise ValueError(f"unknown LoRA format {lora_format!r}; choose from {LORA_FORMATS}")
    model = Path(model)
    with torch.device("meta"):  # shapes only: no weights are allocated or read
        unet: Any = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model / "unet"))
        clip: Any = CLIPTextModel(CLIPTextConfig.from_pretrained(model / "text_encoder"))
    torch_dtype = {"float32": torch.float32, "float16": torch.float16}[dtype]
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}

    def add(kohya_name: str, diffusers_name: str, module: Any) -> None:
        conv = isinstance(module, torch.nn.Conv2d)
        fan_in = module.in_channels if conv else module.in_features
        fan_out = module.out_channels if conv else module.out_features
        down = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
        up = torch.randn(fan_out, rank, generator=generator) / rank**0.5
        if conv:
            down, up = down[:, :, None, None], up[:, :, None, None]
        if lora_format == "kohya":
            tensors[f"{kohya_name}.lora_down.weight"] = down.to(torch_dtype)
            tensors[f"{kohya_name}.lora_up.weight"] = up.to(torch_dtype)
            tensors[f"{kohya_name}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
        else:
            tensors[f"{diffusers_name}.lora_A.weight"] = down.to(torch_dtype)
            tensors[f"{diffusers_name}.lora_B.weight"] = up.to(torch_dtype)

    import re

    linear = (torch.nn.Linear, torch.nn.Conv2d)
    for name, module in unet.named_modules():
        if re.fullmatch(rf"(.*\.)?{UNET_TARGETS}", name) and isinstance(module, linear):
            add("lora_unet_" + name.replace(".", "_"), f"unet.{name}", module)
    if text_encoder:
        for name, module in clip.named_modules():
            if re.fullmatch(rf"(.*\.)?{TEXT_ENCODER_TARGETS}", name) and isinstance(module, torch.nn.Linear):
                path = name if name.startswith("text_model.") else f"text_model.{name}"
                add("lora_te_" + path.replace(".", "_"), f"text_encoder.{path}", module)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    out = target / f"{target.name}.safetensors"
    partial = out.with_suffix(".partial")
    save_file(tensors, str(partial))
    partial.replace(out)  # never a half-written adapter under the real name
    return out
