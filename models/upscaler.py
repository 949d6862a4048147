"""Real-ESRGAN upscalers: the published architectures, recognised from their weights, run in blended tiles.

The two architectures are declared here with basicsr's module names (basicsr and spandrel need torchvision), so
the published weights converted to safetensors load unchanged with ``strict=True``. Which one a file holds, and
its hyperparameters, is read from the key names and tensor shapes: an artifact is just its ``.safetensors`` file.
Large images run in overlapping tiles, batched, with feathered blending; a CUDA OOM halves the tile and retries.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.errors import StageInputError
from models.images import resize_images
from models.snapshot import UNSAFE_WEIGHT_SUFFIXES, ArtifactSnapshot, SnapshotError

logger = logging.getLogger(__name__)

MAX_UPSCALE_FACTOR = 8.0  # A1111's upscaling_resize slider stops at 8
MIN_TILE = 32  # input px; OOM retries stop halving here (smaller tiles are mostly blended border)


# -- architectures (basicsr's definitions, same parameter names) ----------------------------------------------


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2, inplace=True)


class ResidualDenseBlock(nn.Module):
    """Five densely connected convs (each sees every earlier output), added back scaled by 0.2 as in ESRGAN."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = _lrelu(self.conv1(x))
        x2 = _lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = _lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = _lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks, the sum again scaled by 0.2."""

    def __init__(self, num_feat: int, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator (RealESRGAN_x4plus, _x2plus, _x4plus_anime_6B).

    The trunk always runs at a quarter of the output resolution, followed by two nearest x2 upsamplings: a x2
    model pixel-unshuffles its input by 2 (12 input channels), a x1 model by 4 (48).
    """

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        scale: int = 4,
        num_feat: int = 64,
        num_block: int = 23,
        num_grow_ch: int = 32,
    ) -> None:
        super().__init__()
        if scale not in (1, 2, 4):
            raise ValueError(f"RRDBNet supports scale 1, 2 or 4, not {scale}")
        self.scale = scale
        self.input_multiple = 4 // scale  # pixel-unshuffle factor: input sides must be multiples of it
        self.conv_first = nn.Conv2d(num_in_ch * self.input_multiple**2, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = F.pixel_unshuffle(x, self.input_multiple) if self.input_multiple > 1 else x
        feat = self.conv_first(feat)
        feat = feat + self.conv_body(self.body(feat))
        feat = _lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = _lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(_lrelu(self.conv_hr(feat)))


_ACTIVATIONS: dict[str, Callable[[int], nn.Module]] = {
    "prelu": lambda num_feat: nn.PReLU(num_parameters=num_feat),
    "relu": lambda num_feat: nn.ReLU(inplace=True),
    "leakyrelu": lambda num_feat: nn.LeakyReLU(negative_slope=0.1, inplace=True),
}


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact VGG-style net (realesr-general-x4v3, realesr-animevideov3).

    All convs run at the input resolution; the last one emits ``upscale**2`` sub-pixels per output channel,
    pixel-shuffled and added to a nearest upsampling of the input (so the net learns a residual).
    ``body`` is one flat list: conv, act, (conv, act) * num_conv, conv; only PReLU activations hold weights.
    """

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        num_feat: int = 64,
        num_conv: int = 16,
        upscale: int = 4,
        act_type: str = "prelu",
    ) -> None:
        super().__init__()
        if act_type not in _ACTIVATIONS:
            raise ValueError(f"unknown act_type {act_type!r}; choose from {sorted(_ACTIVATIONS)}")
        self.upscale = upscale
        self.input_multiple = 1
        activation = _ACTIVATIONS[act_type]
        self.body = nn.ModuleList([nn.Conv2d(num_in_ch, num_feat, 3, 1, 1), activation(num_feat)])
        for _ in range(num_conv):
            self.body.extend([nn.Conv2d(num_feat, num_feat, 3, 1, 1), activation(num_feat)])
        self.body.append(nn.Conv2d(num_feat, num_out_ch * upscale * upscale, 3, 1, 1))
        self.upsampler = nn.PixelShuffle(upscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        return self.upsampler(out) + F.interpolate(x, scale_factor=self.upscale, mode="nearest")


# -- recognising a state dict ---------------------------------------------------------------------------------

Shapes = Mapping[str, tuple[int, ...]]


def _block_indices(shapes: Shapes, prefix: str = "body.") -> list[int]:
    """The distinct N of ``body.N.*`` keys, sorted."""
    found = {key[len(prefix) :].split(".", 1)[0] for key in shapes if key.startswith(prefix)}
    return sorted(int(index) for index in found if index.isdigit())


def _detect_rrdbnet(shapes: Shapes) -> dict[str, Any] | None:
    if "conv_first.weight" not in shapes or "conv_last.weight" not in shapes:
        return None
    num_feat, in_channels = shapes["conv_first.weight"][:2]
    num_out_ch = shapes["conv_last.weight"][0]
    # Input and output have the same channels; conv_first sees them pixel-unshuffled by 4 // scale.
    scale = {1: 4, 4: 2, 16: 1}.get(in_channels // num_out_ch if in_channels % num_out_ch == 0 else 0)
    if scale is None:
        raise ValueError(f"RRDBNet with {num_out_ch} output channels but conv_first taking {in_channels}")
    blocks = _block_indices(shapes)
    grow = shapes.get("body.0.rdb1.conv1.weight", (32,))[0]
    return {
        "num_in_ch": num_out_ch,
        "num_out_ch": num_out_ch,
        "scale": scale,
        "num_feat": num_feat,
        "num_block": len(blocks),
        "num_grow_ch": grow,
    }


def _detect_srvgg(shapes: Shapes) -> dict[str, Any] | None:
    first = shapes.get("body.0.weight")
    if first is None or len(first) != 4 or "conv_first.weight" in shapes:
        return None
    if "body.1.weight" not in shapes:
        # relu and leakyrelu hold no weights, so the two cannot be told apart from the file.
        raise ValueError("SRVGGNetCompact without PReLU weights (body.1.weight): its activation is unknown")
    num_feat, num_in_ch = first[:2]
    last = max(_block_indices(shapes))
    sub_pixels = shapes[f"body.{last}.weight"][0] // num_in_ch  # upscale**2 per output channel
    upscale = math.isqrt(sub_pixels)
    if upscale * upscale * num_in_ch != shapes[f"body.{last}.weight"][0]:
        raise ValueError(f"SRVGGNetCompact last conv body.{last} has {shapes[f'body.{last}.weight'][0]} outputs")
    return {
        "num_in_ch": num_in_ch,
        "num_out_ch": num_in_ch,
        "num_feat": num_feat,
        "num_conv": (last - 2) // 2,  # body: conv, act, (conv, act) * num_conv, conv
        "upscale": upscale,
        "act_type": "prelu",
    }


@dataclass(frozen=True)
class Architecture:
    """How one architecture is recognised from a state dict's key names and shapes, and built."""

    module: Callable[..., nn.Module]  # called with the detected hyperparameters as keywords
    detect: Callable[[Shapes], dict[str, Any] | None]  # None: not this architecture's keys
    scale_param: str  # the hyperparameter that is the native scale
    depth_param: str  # the hyperparameter that counts repeated blocks
    residual: bool  # adds a plain upsampling of its input to the output
    tiny_width: Mapping[str, int]  # create_test_upscaler(size="tiny"): narrower layers, same key names


ARCHITECTURES: dict[str, Architecture] = {
    "RRDBNet": Architecture(
        RRDBNet, _detect_rrdbnet, "scale", "num_block", residual=False, tiny_width={"num_feat": 16, "num_grow_ch": 8}
    ),
    "SRVGGNetCompact": Architecture(
        SRVGGNetCompact, _detect_srvgg, "upscale", "num_conv", residual=True, tiny_width={"num_feat": 16}
    ),
}


@dataclass(frozen=True)
class PublishedLayout:
    """One published Real-ESRGAN model: its architecture and constructor arguments."""

    architecture: str
    kwargs: Mapping[str, Any]


# The constructor arguments Real-ESRGAN's inference script uses for each released model.
PUBLISHED_LAYOUTS: dict[str, PublishedLayout] = {
    "RealESRGAN_x4plus": PublishedLayout(
        "RRDBNet", {"num_in_ch": 3, "num_out_ch": 3, "scale": 4, "num_feat": 64, "num_block": 23, "num_grow_ch": 32}
    ),
    "RealESRGAN_x2plus": PublishedLayout(
        "RRDBNet", {"num_in_ch": 3, "num_out_ch": 3, "scale": 2, "num_feat": 64, "num_block": 23, "num_grow_ch": 32}
    ),
    "RealESRGAN_x4plus_anime_6B": PublishedLayout(
        "RRDBNet", {"num_in_ch": 3, "num_out_ch": 3, "scale": 4, "num_feat": 64, "num_block": 6, "num_grow_ch": 32}
    ),
    "realesr-general-x4v3": PublishedLayout(
        "SRVGGNetCompact",
        {"num_in_ch": 3, "num_out_ch": 3, "num_feat": 64, "num_conv": 32, "upscale": 4, "act_type": "prelu"},
    ),
    "realesr-animevideov3": PublishedLayout(
        "SRVGGNetCompact",
        {"num_in_ch": 3, "num_out_ch": 3, "num_feat": 64, "num_conv": 16, "upscale": 4, "act_type": "prelu"},
    ),
}


@dataclass(frozen=True)
class UpscalerInfo:
    """What a weights file holds, read from its keys and shapes."""

    architecture: str
    scale: int  # native factor: output side / input side
    hyperparameters: Mapping[str, Any]  # the architecture's constructor arguments
    layout: str | None = None  # the published model with these hyperparameters, if any


def strip_wrappers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a ``module.`` prefix shared by every key (weights saved from DataParallel / DDP).

    basicsr's ``params_ema`` / ``params`` nesting cannot survive a flat safetensors file, so only prefixes remain.
    """
    result = dict(state_dict)
    while result and all(key.startswith("module.") for key in result):
        result = {key.removeprefix("module."): value for key, value in result.items()}
    return result


def build_upscaler(info: UpscalerInfo) -> nn.Module:
    """The architecture with ``info``'s hyperparameters, default-initialised on the current default device."""
    return ARCHITECTURES[info.architecture].module(**info.hyperparameters)


def detect_upscaler(state_dict: Mapping[str, torch.Tensor]) -> UpscalerInfo:
    """Recognise the architecture and hyperparameters of an upscaler state dict.

    A detector proposes hyperparameters from a few keys; the proposal is then checked against every key and
    shape of the architecture so built, so a variant we cannot run fails here with a readable message rather
    than in ``load_state_dict``.
    """
    shapes = {key: tuple(value.shape) for key, value in strip_wrappers(state_dict).items()}
    for name, architecture in ARCHITECTURES.items():
        hyperparameters = architecture.detect(shapes)
        if hyperparameters is None:
            continue
        info = UpscalerInfo(
            architecture=name,
            scale=int(hyperparameters[architecture.scale_param]),
            hyperparameters=hyperparameters,
            layout=next(
                (k for k, v in PUBLISHED_LAYOUTS.items() if v.architecture == name and v.kwargs == hyperparameters),
                None,
            ),
        )
        with torch.device("meta"):  # shapes only, no memory
            expected = {key: tuple(value.shape) for key, value in build_upscaler(info).state_dict().items()}
        missing = sorted(expected.keys() - shapes.keys())
        unexpected = sorted(shapes.keys() - expected.keys())
        wrong = sorted(f"{k} {shapes[k]} (expected {expected[k]})" for k in expected.keys() & shapes.keys()
                       if shapes[k] != expected[k])  # fmt: skip
        if missing or unexpected or wrong:
            raise ValueError(
                f"weights look like {name}({hyperparameters}) but do not match it: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]} ({len(missing)}/{len(unexpected)}/"
                f"{len(wrong)} in all)"
            )
        return info
    sample = ", ".join(f"{key} {shape}" for key, shape in sorted(shapes.items())[:6])
    raise ValueError(
        f"unknown upscaler layout ({len(shapes)} tensors: {sample}{', ...' if len(shapes) > 6 else ''}); "
        f"supported architectures: {', '.join(ARCHITECTURES)}"
    )


def weights_file(path: Path) -> Path:
    """The one safetensors file of an artifact folder (or ``path`` itself when it is a file)."""
    if path.is_file():
        return path
    files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
    weights = [p for p in files if p.suffix == ".safetensors"]
    if len(weights) == 1:
        return weights[0]
    if weights:
        raise SnapshotError(f"{path} holds {len(weights)} safetensors files; an upscaler artifact holds one")
    if any(p.suffix in UNSAFE_WEIGHT_SUFFIXES for p in files):
        raise SnapshotError(f"{path} holds only pickle-based upscaler weights; convert them to safetensors")
    raise SnapshotError(f"{path} holds no .safetensors upscaler weights")


def load_upscaler(path: Path, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, UpscalerInfo]:
    """Read an upscaler's weights (folder or file), recognise its architecture and build it for inference."""
    from safetensors.torch import load_file

    state_dict = strip_wrappers(load_file(weights_file(Path(path))))
    info = detect_upscaler(state_dict)
    # Built on the meta device and given the loaded tensors: no throwaway random init of millions of weights.
    with torch.device("meta"):
        model = build_upscaler(info)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.requires_grad_(False).eval()
    return model.to(device, dtype), info


# -- tiled inference ------------------------------------------------------------------------------------------


def _forward(model: nn.Module, x: torch.Tensor, scale: int) -> torch.Tensor:
    """One forward pass. Sides are padded (bottom / right) to the model's pixel-unshuffle multiple, then cropped."""
    multiple = int(getattr(model, "input_multiple", 1))
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h or pad_w:
        # Replicate works for any side length (reflect needs sides longer than the pad); the strip is cropped.
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    return model(x)[..., : height * scale, : width * scale]


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets along one side: equal tiles, the last ending at the edge, neighbours overlapping >= overlap."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    # Spread evenly (floor division): every gap is at most tile - overlap, so no overlap is thinner than asked.
    return [i * (length - tile) // (count - 1) for i in range(count)]


def _crossfade(overlap: int) -> torch.Tensor:
    """Weights of the later tile across ``overlap`` output px it shares with the earlier one (that one: flipped).

    Zero over the outer quarter (a conv net's output is wrong near a tile edge, where it saw zero padding
    instead of the neighbouring pixels), a linear ramp over the middle half, one over the inner quarter. The
    two tiles' weights sum to 1 at every pixel, so the crossfade hides the seam without dimming it.
    """
    margin = overlap // 4
    ramp = overlap - 2 * margin
    return torch.cat([torch.zeros(margin), (torch.arange(ramp) + 0.5) / ramp, torch.ones(margin)])


def _tile_weights(starts: list[int], tile: int, scale: int, device: torch.device) -> list[torch.Tensor]:
    """Blend weights along one side of each output tile; image borders get none (no other tile covers them)."""
    weights = []
    for i, start in enumerate(starts):
        weight = torch.ones(tile * scale)
        if i > 0:
            shared = (starts[i - 1] + tile - start) * scale
            weight[:shared] *= _crossfade(shared)
        if i < len(starts) - 1:
            shared = (start + tile - starts[i + 1]) * scale
            weight[weight.numel() - shared :] *= _crossfade(shared).flip(0)
        weights.append(weight.to(device))
    return weights


class UpscaleCancelled(Exception):
    """The caller gave up: the upscale stopped between two forward passes."""


def _check(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise UpscaleCancelled()


def _upscale_once(
    model: nn.Module,
    image: torch.Tensor,
    scale: int,
    tile: int,
    overlap: int,
    max_tile_batch: int,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    n, _, height, width = image.shape
    if height <= tile and width <= tile:
        parts = []
        for i in range(0, n, max_tile_batch):
            _check(should_stop)
            parts.append(_forward(model, image[i : i + max_tile_batch], scale).float())
        return torch.cat(parts)
    tile_h, tile_w = min(tile, height), min(tile, width)
    rows, cols = _tile_starts(height, tile_h, overlap), _tile_starts(width, tile_w, overlap)
    row_weights = _tile_weights(rows, tile_h, scale, image.device)
    col_weights = _tile_weights(cols, tile_w, scale, image.device)
    # Accumulated in fp32 whatever the model dtype: sums of fp16 tiles would lose the low bits of the blend.
    out: torch.Tensor | None = None
    total = torch.zeros(height * scale, width * scale, device=image.device)
    tiles = [(b, i, j) for b in range(n) for i in range(len(rows)) for j in range(len(cols))]
    for start in range(0, len(tiles), max_tile_batch):
        _check(should_stop)  # between forward passes: a cancelled request frees the compute thread early
        chunk = tiles[start : start + max_tile_batch]
        batch = torch.stack([image[b, :, rows[i] : rows[i] + tile_h, cols[j] : cols[j] + tile_w] for b, i, j in chunk])
        result = _forward(model, batch, scale).float()
        if out is None:
            out = result.new_zeros(n, result.shape[1], height * scale, width * scale)
        for (b, i, j), tile_out in zip(chunk, result, strict=True):
            weight = row_weights[i][:, None] * col_weights[j][None, :]
            y, x = rows[i] * scale, cols[j] * scale
            out[b, :, y : y + tile_h * scale, x : x + tile_w * scale] += tile_out * weight
            if b == 0:  # every image has the same tiles
                total[y : y + tile_h * scale, x : x + tile_w * scale] += weight
    assert out is not None
    return out / total


@torch.inference_mode()
def upscale_tensor(
    model: nn.Module,
    image: torch.Tensor,
    scale: int,
    tile: int = 192,
    overlap: int = 16,
    max_tile_batch: int = 4,
    min_tile: int = MIN_TILE,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Run an upscaler over (n, c, h, w) images of any size; returns fp32 (n, c, h*scale, w*scale), unclamped.

    ``tile`` and ``overlap`` are input px. Images no larger than a tile run whole; larger ones run in equal
    overlapping tiles (sharing at least ``overlap``), up to ``max_tile_batch`` per forward, crossfaded linearly
    over the middle of each overlap (``_crossfade``). On a CUDA OOM the tile halves and the whole call reruns,
    down to ``min_tile``; then the error propagates. The result is on the model's device. ``should_stop`` is
    asked before every forward pass; when it says so, ``UpscaleCancelled`` is raised.
    """
    if tile < 1 or not 0 <= overlap < tile or max_tile_batch < 1:
        raise ValueError(
            f"need tile >= 1, 0 <= overlap < tile, max_tile_batch >= 1: {tile}, {overlap}, {max_tile_batch}"
        )
    parameter = next(model.parameters())
    image = image.to(parameter.device, parameter.dtype)
    while True:
        try:
            # A halved tile keeps the overlap below half its side, so tiles still advance by half a tile or more.
            return _upscale_once(model, image, scale, tile, min(overlap, tile // 2), max_tile_batch, should_stop)
        except torch.cuda.OutOfMemoryError:
            if tile // 2 < min_tile:
                raise
        # Outside the except block, so the failed attempt's tensors (held by the traceback) are already freed.
        tile //= 2
        logger.warning("upscaler out of memory; retrying with %d px tiles", tile)
        if parameter.is_cuda:
            torch.cuda.empty_cache()


# -- the stage ------------------------------------------------------------------------------------------------


class UpscalerStage:
    """Holds one upscaler artifact and upscales uint8 images by any factor > 1."""

    def __init__(
        self,
        name: str,
        snapshot: ArtifactSnapshot,
        device: torch.device,
        dtype: torch.dtype,
        tile_size: int = 192,
        tile_overlap: int = 16,
        max_tile_batch: int = 4,
    ) -> None:
        if tile_size < MIN_TILE or not 0 <= tile_overlap < tile_size or max_tile_batch < 1:
            raise ValueError(
                f"need tile_size >= {MIN_TILE}, 0 <= tile_overlap < tile_size, max_tile_batch >= 1: "
                f"{tile_size}, {tile_overlap}, {max_tile_batch}"
            )
        self.name = name
        self.snapshot = snapshot
        self.device = device
        self.dtype = dtype
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.max_tile_batch = max_tile_batch
        self.model, self.info = load_upscaler(snapshot.path, device, dtype)
        self.scale = self.info.scale
        self.architecture = self.info.architecture

    @property
    def version(self) -> str:
        return self.snapshot.version

    def loaded_modules(self) -> dict[str, str]:
        return {"upscaler": type(self.model).__name__}

    @torch.inference_mode()
    def upscale(
        self,
        pixels: np.ndarray,
        factor: float,
        should_stop: Callable[[], bool] | None = None,
        skip: Sequence[bool] = (),
    ) -> np.ndarray:
        """uint8 (n, h, w, 3) -> uint8 (n, round(h * factor), round(w * factor), 3).

        ``should_stop``: asked before every forward pass (``UpscaleCancelled`` when it says so). ``skip``: images
        not to upscale (withheld by the safety check); they come back black at the target size.

        Like A1111, the model runs as many times as it takes to reach the target size (a x4 model runs twice
        for 8x, once for 2.5x), then PIL's Lanczos resizes to the exact target; at the native factor the model
        output is returned as is.
        """
        if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
            raise ValueError(f"expected uint8 pixels shaped (n, h, w, 3), got {pixels.dtype} {pixels.shape}")
        if not 1 < factor <= MAX_UPSCALE_FACTOR:
            raise StageInputError(f"upscale factor must be > 1 and <= {MAX_UPSCALE_FACTOR:g}, got {factor:g}", "factor")
        n, height, width, _ = pixels.shape
        target_h, target_w = round(height * factor), round(width * factor)
        keep = [i for i in range(n) if not (skip and skip[i])]
        if len(keep) < n:
            out = np.zeros((n, target_h, target_w, 3), dtype=np.uint8)
            if keep:
                out[keep] = self.upscale(pixels[keep], factor, should_stop)
            return out
        # Moved as uint8 (4x fewer bytes than float), converted on the device.
        image = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device).permute(0, 3, 1, 2).float() / 255
        passes = 1
        while self.scale > 1 and self.scale**passes < factor:
            passes += 1
        for _ in range(passes):
            # Clamped between passes as well: the next pass sees a valid image, as A1111's uint8 round trip does.
            image = upscale_tensor(
                self.model,
                image,
                self.scale,
                self.tile_size,
                self.tile_overlap,
                self.max_tile_batch,
                should_stop=should_stop,
            ).clamp_(0, 1)
        out = (image * 255).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        if out.shape[1:3] == (target_h, target_w):
            return out
        return resize_images(out, target_w, target_h)


# -- random-weight test models --------------------------------------------------------------------------------

TEST_UPSCALER_SIZES = ("tiny", "full")
TINY_DEPTH_DIVISOR = 8  # tiny models keep 1/8 of the published blocks (x4plus 23 -> 3, anime_6B 6 -> 1)


@torch.no_grad()
def _init_test_weights(model: nn.Module, residual: bool, generator: torch.Generator) -> None:
    """Unit-gain random convs, then the output conv calibrated so the image is neither flat nor saturated.

    Random deep nets drift: the mean of a random RRDBNet's output depends on depth and scale, and often clips.
    So the last conv is rescaled per channel on a fixed smooth probe image: a plain output gets mean 0.5 and
    std 0.15 (mid-grey texture), a residual output (added to the upsampled input) mean 0 and std 0.05.
    """
    convs = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    for conv in convs:
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) / math.sqrt(conv.weight[0].numel()))
        assert conv.bias is not None
        conv.bias.zero_()
    for module in model.modules():
        if isinstance(module, nn.PReLU):
            module.weight.fill_(0.25)  # PyTorch's default slope
    # Image channels: conv_first of a x2 / x1 RRDBNet sees them pixel-unshuffled.
    coarse = torch.rand(
        1, convs[0].in_channels // int(getattr(model, "input_multiple", 1)) ** 2, 4, 4, generator=generator
    )
    probe = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    captured: list[torch.Tensor] = []
    handle = convs[-1].register_forward_hook(lambda module, args, output: captured.append(output))
    model(probe)
    handle.remove()
    mean, std = captured[0].mean(dim=(0, 2, 3)), captured[0].std(dim=(0, 2, 3)).clamp_min(1e-6)
    target_mean, target_std = (0.0, 0.05) if residual else (0.5, 0.15)
    gain = target_std / std
    last = convs[-1]
    last.weight.mul_(gain[:, None, None, None])
    assert last.bias is not None
    last.bias.copy_(target_mean - gain * mean)


def create_test_upscaler(
    directory: str | Path, layout: str = "RealESRGAN_x4plus", seed: int = 0, size: str = "tiny"
) -> Path:
    """Write a random-weight upscaler in a published key layout as ``<directory>/<layout>.safetensors``.

    Args:
        directory: the artifact folder; created, and must not already hold weights.
        layout: one of ``PUBLISHED_LAYOUTS``.
        seed: weights are a pure function of (layout, seed, size).
        size: ``tiny`` (narrow and shallow, same key names: 64x64 on CPU in well under a second) or ``full``
            (the published shapes).
    """
    from safetensors.torch import save_file

    if layout not in PUBLISHED_LAYOUTS:
        raise ValueError(f"unknown upscaler layout {layout!r}; choose from {sorted(PUBLISHED_LAYOUTS)}")
    if size not in TEST_UPSCALER_SIZES:
        raise ValueError(f"unknown test upscaler size {size!r}; choose from {TEST_UPSCALER_SIZES}")
    published = PUBLISHED_LAYOUTS[layout]
    architecture = ARCHITECTURES[published.architecture]
    hyperparameters = dict(published.kwargs)
    if size == "tiny":
        depth = math.ceil(hyperparameters[architecture.depth_param] / TINY_DEPTH_DIVISOR)
        hyperparameters.update(architecture.tiny_width, **{architecture.depth_param: depth})
    target = Path(directory)
    if target.is_dir() and any(target.glob("*.safetensors")):
        raise FileExistsError(f"{target} already holds upscaler weights")
    # Built on meta then materialised: the default init would draw from (and move) the global RNG.
    with torch.device("meta"):
        model = architecture.module(**hyperparameters)
    model = model.to_empty(device="cpu")
    _init_test_weights(model, architecture.residual, torch.Generator().manual_seed(seed))
    target.mkdir(parents=True, exist_ok=True)
    # Written under a hidden name and renamed: a half-written file is never visible.
    handle, staging = tempfile.mkstemp(prefix=".create-", suffix=".safetensors", dir=target)
    os.close(handle)
    # One metadata entry only: safetensors writes the metadata map in a random order, so several would make the
    # bytes differ from run to run.
    save_file(model.state_dict(), staging, metadata={"sdserve_test_upscaler": f"{layout} size={size} seed={seed}"})
    os.replace(staging, target / f"{layout}.safetensors")
    return target
