"""Real-ESRGAN upscalers: the published key layouts, recognition from a file, the stage against a plain forward
pass, tiled against untiled, non-native factors, and the retry with smaller tiles after a CUDA OOM."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from models.snapshot import ArtifactSnapshot, SnapshotError
from models.upscaler import (
    ARCHITECTURES,
    PUBLISHED_LAYOUTS,
    RRDBNet,
    SRVGGNetCompact,
    UpscaleCancelled,
    UpscalerStage,
    _tile_starts,
    _tile_weights,
    create_test_upscaler,
    detect_upscaler,
    load_upscaler,
)

CPU = torch.device("cpu")
Layout = dict[str, tuple[int, ...]]

# -- the published files, described independently of models/upscaler.py ---------------------------------------


def rrdbnet_layout(in_ch: int, num_feat: int, num_block: int, grow: int) -> Layout:
    """basicsr's RRDBNet: conv_first, num_block RRDBs of three 5-conv dense blocks, four feature convs, conv_last."""
    keys: Layout = {"conv_first.weight": (num_feat, in_ch, 3, 3), "conv_first.bias": (num_feat,)}
    for block in range(num_block):
        for rdb in (1, 2, 3):
            for conv in range(1, 6):  # conv k sees the block input plus the k-1 earlier growths
                out = num_feat if conv == 5 else grow
                keys[f"body.{block}.rdb{rdb}.conv{conv}.weight"] = (out, num_feat + (conv - 1) * grow, 3, 3)
                keys[f"body.{block}.rdb{rdb}.conv{conv}.bias"] = (out,)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        keys[f"{name}.weight"] = (num_feat, num_feat, 3, 3)
        keys[f"{name}.bias"] = (num_feat,)
    keys["conv_last.weight"] = (3, num_feat, 3, 3)
    keys["conv_last.bias"] = (3,)
    return keys


def srvgg_layout(num_feat: int, num_conv: int, upscale: int) -> Layout:
    """Real-ESRGAN's SRVGGNetCompact: body = conv, prelu, (conv, prelu) * num_conv, conv to 3 * upscale**2."""
    keys: Layout = {"body.0.weight": (num_feat, 3, 3, 3), "body.0.bias": (num_feat,), "body.1.weight": (num_feat,)}
    for i in range(num_conv):
        keys[f"body.{2 + 2 * i}.weight"] = (num_feat, num_feat, 3, 3)
        keys[f"body.{2 + 2 * i}.bias"] = (num_feat,)
        keys[f"body.{3 + 2 * i}.weight"] = (num_feat,)
    keys[f"body.{2 * num_conv + 2}.weight"] = (3 * upscale**2, num_feat, 3, 3)
    keys[f"body.{2 * num_conv + 2}.bias"] = (3 * upscale**2,)
    return keys


# name: (layout, key count, native scale, spot checks). x2plus sees its input pixel-unshuffled by 2 (12 channels).
PUBLISHED: dict[str, tuple[Layout, int, int, Layout]] = {
    "RealESRGAN_x4plus": (
        rrdbnet_layout(3, 64, 23, 32),
        12 + 23 * 30,
        4,
        {
            "conv_first.weight": (64, 3, 3, 3),
            "body.22.rdb3.conv5.weight": (64, 192, 3, 3),
            "conv_last.weight": (3, 64, 3, 3),
        },
    ),
    "RealESRGAN_x2plus": (rrdbnet_layout(12, 64, 23, 32), 12 + 23 * 30, 2, {"conv_first.weight": (64, 12, 3, 3)}),
    "RealESRGAN_x4plus_anime_6B": (
        rrdbnet_layout(3, 64, 6, 32),
        12 + 6 * 30,
        4,
        {"body.5.rdb3.conv5.weight": (64, 192, 3, 3), "conv_up2.weight": (64, 64, 3, 3)},
    ),
    "realesr-general-x4v3": (
        srvgg_layout(64, 32, 4),
        5 + 3 * 32,
        4,
        {
            "body.0.weight": (64, 3, 3, 3),
            "body.1.weight": (64,),
            "body.65.weight": (64,),
            "body.66.weight": (48, 64, 3, 3),
        },
    ),
    "realesr-animevideov3": (srvgg_layout(64, 16, 4), 5 + 3 * 16, 4, {"body.34.weight": (48, 64, 3, 3)}),
}
RRDB_ESRGAN_X4_PARAMETERS = 16_697_987  # ESRGAN's RRDB_ESRGAN_x4.pth, the network RealESRGAN_x4plus retrained


def meta_state(layout: str) -> dict[str, torch.Tensor]:
    published = PUBLISHED_LAYOUTS[layout]
    with torch.device("meta"):
        return dict(ARCHITECTURES[published.architecture].module(**published.kwargs).state_dict())


@pytest.mark.parametrize("layout", list(PUBLISHED))
def test_published_layouts(layout: str) -> None:
    expected, count, scale, spot = PUBLISHED[layout]
    assert len(expected) == count
    assert all(expected[key] == shape for key, shape in spot.items())
    state = meta_state(layout)
    assert {key: tuple(value.shape) for key, value in state.items()} == expected
    info = detect_upscaler(state)
    assert (info.architecture, info.scale, info.layout) == (PUBLISHED_LAYOUTS[layout].architecture, scale, layout)
    assert dict(info.hyperparameters) == dict(PUBLISHED_LAYOUTS[layout].kwargs)
    if layout == "RealESRGAN_x4plus":
        assert sum(value.numel() for value in state.values()) == RRDB_ESRGAN_X4_PARAMETERS


# -- files, detection, the factory ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random-weight artifact folder per published layout."""
    root = tmp_path_factory.mktemp("upscalers")
    return {layout: create_test_upscaler(root / layout, layout, seed=0) for layout in PUBLISHED_LAYOUTS}


def stage(path: Path, **options: int) -> UpscalerStage:
    return UpscalerStage("up", ArtifactSnapshot(path, "v1", "upscaler"), CPU, torch.float32, **options)


def smooth_pixels(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Image-like uint8 pixels: random colours bilinearly interpolated from an 8x coarser grid."""
    coarse = torch.rand(n, 3, height // 8 + 1, width // 8 + 1, generator=torch.Generator().manual_seed(seed))
    image = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return (image * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("layout", list(PUBLISHED))
def test_tiny_files_are_recognised(artifacts: dict[str, Path], layout: str, tmp_path: Path) -> None:
    folder = artifacts[layout]
    assert [p.name for p in folder.iterdir()] == [f"{layout}.safetensors"]
    model, info = load_upscaler(folder, CPU, torch.float32)
    assert (info.architecture, info.scale) == (PUBLISHED_LAYOUTS[layout].architecture, PUBLISHED[layout][2])
    assert info.layout is None  # tiny: narrower and shallower than the published model
    assert type(model).__name__ == info.architecture and not model.training
    # A DataParallel-style "module." prefix is stripped; the same weights come out.
    state = load_file(folder / f"{layout}.safetensors")
    save_file({f"module.{key}": value for key, value in state.items()}, tmp_path / "wrapped.safetensors")
    wrapped, wrapped_info = load_upscaler(tmp_path / "wrapped.safetensors", CPU, torch.float32)
    assert wrapped_info == info
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), wrapped.state_dict().values(), strict=True)
    )


def test_unknown_layouts_are_refused(artifacts: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown upscaler layout \(2 tensors: fc\.bias \(10,\), fc\.weight"):
        detect_upscaler({"fc.weight": torch.zeros(10, 4), "fc.bias": torch.zeros(10)})
    state = load_file(artifacts["RealESRGAN_x4plus"] / "RealESRGAN_x4plus.safetensors")
    del state["conv_hr.weight"]
    with pytest.raises(ValueError, match=r"look like RRDBNet.*missing \['conv_hr.weight'\]"):
        detect_upscaler(state)
    state = load_file(artifacts["realesr-general-x4v3"] / "realesr-general-x4v3.safetensors")
    with pytest.raises(ValueError, match="without PReLU weights"):
        detect_upscaler({key: value for key, value in state.items() if key != "body.1.weight"})
    (tmp_path / "model.pth").write_bytes(b"pickle")
    with pytest.raises(SnapshotError, match="convert them to safetensors"):
        load_upscaler(tmp_path, CPU, torch.float32)
    save_file(state, tmp_path / "a.safetensors")
    save_file(state, tmp_path / "b.safetensors")
    with pytest.raises(SnapshotError, match="2 safetensors files"):
        load_upscaler(tmp_path, CPU, torch.float32)


def test_factory_is_deterministic_and_not_degenerate(artifacts: dict[str, Path], tmp_path: Path) -> None:
    def digest(folder: Path, layout: str) -> str:
        return hashlib.sha256((folder / f"{layout}.safetensors").read_bytes()).hexdigest()

    again = create_test_upscaler(tmp_path / "again", "RealESRGAN_x4plus", seed=0)
    assert digest(again, "RealESRGAN_x4plus") == digest(artifacts["RealESRGAN_x4plus"], "RealESRGAN_x4plus")
    other = create_test_upscaler(tmp_path / "other", "RealESRGAN_x4plus", seed=1)
    assert digest(other, "RealESRGAN_x4plus") != digest(again, "RealESRGAN_x4plus")
    with pytest.raises(FileExistsError):
        create_test_upscaler(again, "RealESRGAN_x4plus")
    full = create_test_upscaler(tmp_path / "full", "realesr-animevideov3", size="full")
    assert load_upscaler(full, CPU, torch.float32)[1].layout == "realesr-animevideov3"
    pixels = smooth_pixels(1, 32, 32)
    for layout in PUBLISHED:
        out = stage(artifacts[layout]).upscale(pixels, PUBLISHED[layout][2]).astype(float)
        # Mid-grey with texture, not flat and hardly clipped (what the calibrated output conv aims for).
        assert 80 < out.mean() < 180 and out.std() > 20, layout
        assert np.mean((out == 0) | (out == 255)) < 0.05, layout


# -- the stage -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["RealESRGAN_x4plus", "RealESRGAN_x2plus", "realesr-general-x4v3"])
def test_stage_matches_plain_forward(artifacts: dict[str, Path], layout: str) -> None:
    upscaler = stage(artifacts[layout])
    published = PUBLISHED_LAYOUTS[layout]
    assert (upscaler.name, upscaler.version, upscaler.architecture) == ("up", "v1", published.architecture)
    assert upscaler.loaded_modules() == {"upscaler": published.architecture}
    # The reference: the architecture built directly (default init, then the file's weights), one forward pass.
    state = load_file(artifacts[layout] / f"{layout}.safetensors")
    architecture: Callable[..., torch.nn.Module] = RRDBNet if published.architecture == "RRDBNet" else SRVGGNetCompact
    model = architecture(**detect_upscaler(state).hyperparameters)
    model.load_state_dict(state, strict=True)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
    with torch.no_grad():
        reference = model.eval()(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255)
    expected = (reference.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = upscaler.upscale(pixels, upscaler.scale)
    assert out.shape == (2, 40 * upscaler.scale, 48 * upscaler.scale, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


@pytest.fixture()
def forward_inputs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[UpscalerStage], list[tuple[int, ...]]]]:
    """Records the input shape of every forward pass of a stage's model."""

    def watch(upscaler: UpscalerStage) -> list[tuple[int, ...]]:
        shapes: list[tuple[int, ...]] = []
        forward = upscaler.model.forward

        def recording(x: torch.Tensor) -> torch.Tensor:
            shapes.append(tuple(x.shape))
            return forward(x)

        monkeypatch.setattr(upscaler.model, "forward", recording)
        return shapes

    yield watch


# Tiled-vs-untiled bounds in uint8 levels (max, mean) for two 72x80 images, 32 px tiles, 8 px overlap.
# Measured (seed 0): x4plus 8 / 0.11, general-x4v3 17 / 0.30 (seeds 0-3, two images each: at most 13 / 0.11 and
# 20 / 0.30). The rest is the receptive field: near a tile edge a conv net sees zero padding instead of its
# neighbours; the crossfade skips the outer quarter of each overlap, but a random net's errors reach further
# (general-x4v3 tiny: 6 convs at input resolution, 6 px). The bounds add 50% for float-rounding differences
# between CPUs. Worse blends fail the mean bound: a plain average over the overlaps measured 199 / 6.6 (x4plus)
# and 68 / 2.5 (general-x4v3), a linear ramp across the whole overlap 45 / 1.4 and 24 / 0.87.
TILING_TOLERANCE = {"RealESRGAN_x4plus": (12, 0.17), "realesr-general-x4v3": (26, 0.45)}


@pytest.mark.parametrize("layout", list(TILING_TOLERANCE))
def test_tiled_matches_untiled(
    artifacts: dict[str, Path], layout: str, forward_inputs: Callable[[UpscalerStage], list[tuple[int, ...]]]
) -> None:
    pixels = smooth_pixels(2, 72, 80)
    whole = stage(artifacts[layout]).upscale(pixels, 4)
    tiled_stage = stage(artifacts[layout], tile_size=32, tile_overlap=8, max_tile_batch=4)
    inputs = forward_inputs(tiled_stage)
    tiled = tiled_stage.upscale(pixels, 4)
    # 72 rows and 80 columns each take 3 tiles of 32 px at least 8 px apart: 2 images x 9 tiles, batched by 4.
    assert [shape[0] for shape in inputs] == [4, 4, 4, 4, 2]
    assert {shape[1:] for shape in inputs} == {(3, 32, 32)}
    difference = np.abs(tiled.astype(int) - whole.astype(int))
    max_levels, mean_levels = TILING_TOLERANCE[layout]
    assert difference.max() <= max_levels and difference.mean() <= mean_levels, (difference.max(), difference.mean())


@pytest.mark.parametrize("length", [1, 31, 32, 33, 57, 72, 80, 150])
@pytest.mark.parametrize(("tile", "overlap"), [(32, 0), (32, 8), (33, 16), (16, 8)])
def test_tile_cover(length: int, tile: int, overlap: int) -> None:
    side = min(tile, length)
    starts = _tile_starts(length, side, overlap)
    assert starts[0] == 0 and starts[-1] + side == length
    assert all(0 < b - a <= side - min(overlap, side) for a, b in itertools.pairwise(starts))
    total = torch.zeros(length * 4)
    for start, weight in zip(starts, _tile_weights(starts, side, 4, CPU), strict=True):
        total[start * 4 : (start + side) * 4] += weight
    assert total.min() > 0  # every output pixel gets a weight, so the normalised blend is defined


def test_non_native_factors(
    artifacts: dict[str, Path], forward_inputs: Callable[[UpscalerStage], list[tuple[int, ...]]]
) -> None:
    pixels = smooth_pixels(1, 40, 48)
    upscaler = stage(artifacts["RealESRGAN_x4plus"])
    native = upscaler.upscale(pixels, 4)
    # 2.5x: one x4 pass, then Lanczos down to the target.
    expected = np.asarray(Image.fromarray(native[0]).resize((120, 100), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(upscaler.upscale(pixels, 2.5)[0], expected)
    assert upscaler.upscale(pixels, 3.3).shape == (1, 132, 158, 3)  # round(40 * 3.3), round(48 * 3.3)
    inputs = forward_inputs(upscaler)
    # 6x: two x4 passes (the second on 160x192, still within a 192 px tile), then Lanczos down from 16x.
    assert upscaler.upscale(pixels, 6).shape == (1, 240, 288, 3)
    assert inputs == [(1, 3, 40, 48), (1, 3, 160, 192)]
    x2 = stage(artifacts["RealESRGAN_x2plus"])
    assert x2.upscale(pixels, 3).shape == (1, 120, 144, 3)  # two x2 passes, then down from 4x
    assert x2.upscale(smooth_pixels(1, 33, 47), 2).shape == (1, 66, 94, 3)  # odd sides: padded for the unshuffle
    for factor in (1.0, 0.5, 0, 8.5):
        with pytest.raises(ValueError, match="upscale factor must be > 1"):
            upscaler.upscale(pixels, factor)


def test_oom_halves_the_tile(
    artifacts: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    forward_inputs: Callable[[UpscalerStage], list[tuple[int, ...]]],
) -> None:
    path = artifacts["RealESRGAN_x4plus"]
    pixels = smooth_pixels(1, 48, 56)
    untiled = stage(path).upscale(pixels, 4)
    at_32 = stage(path, tile_size=32, tile_overlap=8).upscale(pixels, 4)
    upscaler = stage(path, tile_size=64, tile_overlap=8)
    inputs = forward_inputs(upscaler)
    recording = upscaler.model.forward
    fits = [32]  # the largest input side that "fits in GPU memory"

    def out_of_memory_above(x: torch.Tensor) -> torch.Tensor:
        out = recording(x)
        if max(x.shape[-2:]) > fits[0]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return out

    monkeypatch.setattr(upscaler.model, "forward", out_of_memory_above)
    out = upscaler.upscale(pixels, 4)
    # The whole 48x56 image (one 64 px tile) fails once; the call reruns in 32 px tiles and succeeds.
    assert inputs[0] == (1, 3, 48, 56) and {shape[-2:] for shape in inputs[1:]} == {(32, 32)}
    np.testing.assert_array_equal(out, at_32)
    max_levels, mean_levels = TILING_TOLERANCE["RealESRGAN_x4plus"]
    difference = np.abs(out.astype(int) - untiled.astype(int))
    assert difference.max() <= max_levels and difference.mean() <= mean_levels
    # When 32 px tiles fail too, the next halving would go below the 32 px floor: the error propagates.
    fits[0] = 16
    inputs.clear()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        upscaler.upscale(pixels, 4)
    assert inputs == [(1, 3, 48, 56), (4, 3, 32, 32)]


# Half-precision stages against fp32 (levels: max, mean), same tiles. Measured on CPU: bf16 6 / 0.68, fp16
# 1 / 0.12 (CUDA fp16 is not measured here; its kernels round differently, so it gets the bf16 margin).
HALF_PRECISION = [
    pytest.param("cpu", torch.bfloat16, (10, 1.0), id="cpu-bf16"),
    pytest.param("cuda", torch.float16, (10, 1.0), id="cuda-fp16", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize(("device", "dtype", "bounds"), HALF_PRECISION)
def test_half_precision(artifacts: dict[str, Path], device: str, dtype: torch.dtype, bounds: tuple[int, float]) -> None:
    path = artifacts["RealESRGAN_x4plus"]
    pixels = smooth_pixels(2, 72, 80)
    reference = stage(path, tile_size=32, tile_overlap=8).upscale(pixels, 4).astype(int)
    snapshot = ArtifactSnapshot(path, "v1", "upscaler")
    half = UpscalerStage("up", snapshot, torch.device(device), dtype, tile_size=32, tile_overlap=8)
    assert next(half.model.parameters()).dtype == dtype
    difference = np.abs(half.upscale(pixels, 4).astype(int) - reference)
    assert difference.max() <= bounds[0] and difference.mean() <= bounds[1], (difference.max(), difference.mean())


def test_a_cancelled_upscale_stops_between_forward_passes(
    artifacts: dict[str, Path], forward_inputs: Callable[[UpscalerStage], list[tuple[int, ...]]]
) -> None:
    tiled_stage = stage(artifacts["RealESRGAN_x4plus"], tile_size=32, tile_overlap=8, max_tile_batch=4)
    inputs = forward_inputs(tiled_stage)
    with pytest.raises(UpscaleCancelled):
        tiled_stage.upscale(smooth_pixels(2, 72, 80), 4, should_stop=lambda: len(inputs) >= 2)
    assert len(inputs) == 2  # of the 5 forward passes the whole upscale needs


def test_skipped_images_are_not_upscaled(
    artifacts: dict[str, Path], forward_inputs: Callable[[UpscalerStage], list[tuple[int, ...]]]
) -> None:
    upscaler = stage(artifacts["RealESRGAN_x4plus"])
    pixels = smooth_pixels(3, 24, 16)
    alone = upscaler.upscale(pixels[1:2], 4)
    inputs = forward_inputs(upscaler)
    out = upscaler.upscale(pixels, 4, skip=(True, False, True))
    assert out.shape == (3, 96, 64, 3) and not out[0].any() and not out[2].any()
    assert np.array_equal(out[1], alone[0])
    assert [shape[0] for shape in inputs] == [1]  # one image went through the network
