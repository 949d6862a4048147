"""LoRA adapter files: read, converted with diffusers' own state-dict converters, into one layout.

People have LoRAs in two formats: diffusers / PEFT (``unet.<module>.lora_A.weight``, ``text_encoder.<module>...``,
what ``save_lora_weights`` writes) and the kohya / A1111 format of community files (``lora_unet_<module_path>
.lora_down.weight``, ``lora_te_...``, a ``.alpha`` per module). Both go through
``StableDiffusionPipeline.lora_state_dict`` (which converts kohya keys) and diffusers' PEFT key converters, exactly
what ``load_lora_weights`` does before it injects layers, and come out as ``LoraWeights``: per target module of the
UNet and of the text encoder, the down and up matrices with the module's ``alpha / rank`` folded into ``up``. The
effective scales follow diffusers' ``get_peft_kwargs`` (the most common alpha, per-module exceptions), so an image
made with an adapter equals diffusers' pipeline with the same file loaded.

Only ``.safetensors`` files are read: a pickle can run code when loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.errors import AdapterError

LORA_SUFFIX = ".safetensors"
_KOHYA_PREFIXES = ("lora_te_", "lora_unet_", "lora_te1_", "lora_te2_")
# CLIP-G's hidden size and SDXL's cross-attention width: an adapter with these shapes is for SDXL.
_SDXL_CROSS_ATTENTION = 2048


@dataclass(frozen=True)
class LoraLayer:
    """One adapted module: ``delta(x) = up @ (down @ x)``, with the file's ``alpha / rank`` already in ``up``."""

    down: torch.Tensor  # (rank, in_features)
    up: torch.Tensor  # (out_features, rank)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True)
class LoraWeights:
    """An adapter in one layout, on the CPU: module path -> layer, for the UNet and the text encoder."""

    family: str  # the base family it was trained for ("sd1", "sdxl")
    format: str  # "kohya" or "diffusers"
    unet: dict[str, LoraLayer]
    text_encoder: dict[str, LoraLayer]  # paths without "text_model." (transformers' flattened CLIP)

    @property
    def rank(self) -> int:
        return max((layer.rank for layer in (*self.unet.values(), *self.text_encoder.values())), default=0)

    @property
    def nbytes(self) -> int:
        layers = (*self.unet.values(), *self.text_encoder.values())
        return sum(t.numel() * t.element_size() for layer in layers for t in (layer.down, layer.up))

    def components(self) -> list[str]:
        return [name for name in ("unet", "text_encoder") if getattr(self, name)]


def lora_file(directory: Path) -> Path:
    """The one adapter file of an artifact folder (or the file itself)."""
    if directory.is_file():
        files = [directory]
    else:
        files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))
        files = [p for p in files if p.suffix == LORA_SUFFIX]
    if len(files) != 1 or files[0].suffix != LORA_SUFFIX:
        raise AdapterError(f"an adapter is one {LORA_SUFFIX} file; found {[p.name for p in files][:5]}", "loras")
    return files[0]


def is_kohya(keys: Any) -> bool:
    return all(str(k).startswith(_KOHYA_PREFIXES) for k in keys)


def read_lora(path: Path) -> LoraWeights:
    """Read and convert an adapter file (see the module docstring).

    Raises:
        AdapterError: not a safetensors adapter, a corrupt file, DoRA / bias / non-1x1 convolution layers, or
            a component this server does not adapt (a second text encoder).
    """
    from diffusers import StableDiffusionPipeline
    from safetensors import SafetensorError

    path = lora_file(path)
    try:
        raw = _header(path)  # names and shapes: the tensors are read once, by diffusers below
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{path.name} is not a readable safetensors file: {exc}", "loras") from exc
    if not raw:
        raise AdapterError(f"{path.name} holds no tensors", "loras")
    kohya = is_kohya(raw)
    family = detect_family(raw)
    from models.snapshot import MODEL_FAMILIES

    if family not in MODEL_FAMILIES:  # e.g. an SDXL LoRA: no model here it could apply to
        raise AdapterError(
            f"{path.name} is a LoRA for {family} models; this service serves {', '.join(sorted(MODEL_FAMILIES))} "
            "models",
            "loras",
        )
    try:
        state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
            str(path), use_safetensors=True, return_lora_metadata=True
        )
    except Exception as exc:  # diffusers raises ValueError / KeyError on keys it cannot place
        raise AdapterError(f"{path.name} is not a LoRA diffusers can read: {exc}", "loras") from exc
    if any("lora_magnitude_vector" in k or "dora_scale" in k for k in raw):
        raise AdapterError(f"{path.name} is a DoRA adapter; only LoRA is supported", "loras")
    by_prefix: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        by_prefix.setdefault(prefix, {})[rest] = value
    unknown = sorted(set(by_prefix) - {"unet", "text_encoder"})
    if unknown and family == "sd1":
        raise AdapterError(f"{path.name} adapts {unknown}: not part of an SD1 pipeline", "loras")
    try:
        unet = _layers(by_prefix.get("unet", {}), alphas, metadata, "unet", path.name)
        text = _layers(by_prefix.get("text_encoder", {}), alphas, metadata, "text_encoder", path.name)
    except AdapterError:
        raise
    except (KeyError, ValueError) as exc:  # diffusers' converters on key layouts they cannot place
        raise AdapterError(f"{path.name}: its layers cannot be converted: {exc}", "loras") from exc
    if not unet and not text:
        raise AdapterError(f"{path.name} adapts neither the UNet nor the text encoder", "loras")
    return LoraWeights(family=family, format="kohya" if kohya else "diffusers", unet=unet, text_encoder=text)


def _header(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as meta tensors: names and shapes from its header, no tensor data read."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names: list[str] = list(f.keys())  # a safe_open handle is not a dict
        return {name: torch.empty(f.get_slice(name).get_shape(), device="meta") for name in names}


def header_family(directory: Path) -> str:
    """The base family of the adapter file in ``directory`` from its header alone (names and shapes, no tensor
    data); "" when it is not a readable adapter."""
    from safetensors import SafetensorError

    try:
        return detect_family(_header(lora_file(directory)))
    except (AdapterError, SafetensorError, OSError, ValueError):
        return ""


def detect_family(raw: dict[str, torch.Tensor]) -> str:
    """The base family an adapter's keys and shapes are for: a second text encoder or a 2048-wide
    cross-attention means SDXL, anything else SD1 (768-wide CLIP-L; the test models are narrower)."""
    for key, value in raw.items():
        if key.startswith(("lora_te2_", "lora_te1_", "text_encoder_2.")):
            return "sdxl"
        down = "attn2" in key and re.search(r"to_k.*(lora_A|lora\.down|lora_down|down)\.weight$", key)
        if down and value.ndim == 2 and value.shape[1] == _SDXL_CROSS_ATTENTION:
            return "sdxl"
    return "sd1"


def _layers(
    state: dict[str, torch.Tensor],
    alphas: dict[str, float] | None,
    metadata: dict[str, Any] | None,
    prefix: str,
    name: str,
) -> dict[str, LoraLayer]:
    """PEFT-named layers of one component (diffusers' converters), each with its effective scale folded in."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )
    from diffusers.utils.peft_utils import get_peft_kwargs

    if not state:
        return {}
    if prefix == "unet":
        if "lora_A" not in next(iter(state)):
            state = convert_unet_state_dict_to_peft(state)
    else:
        state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    if any("lora_B" in k and k.endswith(".bias") for k in state):
        raise AdapterError(f"{name}: LoRA layers with a bias are not supported", "loras")
    ranks = {f"^{k}": v.shape[1] for k, v in state.items() if "lora_B" in k and v.ndim > 1}
    if not ranks:
        return {}
    own_alphas = {k.removeprefix(f"{prefix}."): v for k, v in (alphas or {}).items() if k.startswith(f"{prefix}.")}
    own_metadata = {k.removeprefix(f"{prefix}."): v for k, v in (metadata or {}).items() if k.startswith(f"{prefix}.")}
    if own_metadata:  # a config saved with the file (diffusers' lora_adapter_metadata) wins, as in diffusers
        default_alpha = float(own_metadata.get("lora_alpha", own_metadata.get("r", 0)) or 0)
        patterns = dict(own_metadata.get("alpha_pattern") or {})
    else:
        kwargs = get_peft_kwargs(ranks, own_alphas or None, state, is_unet=prefix == "unet")
        default_alpha = float(kwargs["lora_alpha"])
        patterns = dict(kwargs["alpha_pattern"])
    layers: dict[str, LoraLayer] = {}
    for key in state:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        down, up = state[key], state.get(f"{module}.lora_B.weight")
        if up is None:
            raise AdapterError(f"{name}: {module} has lora_A but no lora_B", "loras")
        if down.ndim == 4:
            if down.shape[2:] != (1, 1) or up.shape[2:] != (1, 1):
                raise AdapterError(
                    f"{name}: {module} is a {down.shape[2]}x{down.shape[3]} convolution LoRA (LoCon); only linear "
                    "and 1x1 layers are supported",
                    "loras",
                )
            down, up = down.flatten(1), up.flatten(1)
        rank = down.shape[0]
        # peft's pattern match: a pattern names a module path suffix (a regular expression).
        alpha = next((float(v) for p, v in patterns.items() if re.fullmatch(rf"(.*\.)?({p})", module)), None)
        scale = (alpha if alpha is not None else default_alpha or rank) / rank
        layers[module] = LoraLayer(down=down.float().contiguous(), up=(up.float() * scale).contiguous())
    return layers
