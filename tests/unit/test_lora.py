"""Per-request LoRA: files in both formats equal diffusers' pipeline with the same file loaded, rows with different
adapters share a UNet call yet each gets its own, and slots behave as an LRU that never evicts an adapter in use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.adapters import AdapterError, LoraBank, SlotsBusy, read_lora
from models.adapters.slots import UNET_TARGETS
from models.contracts import DenoiseParams, EncodeRequest
from models.decoder import DecoderStage
from models.denoiser import DenoiserStage
from models.snapshot import open_snapshot
from models.testmodels import create_test_lora
from models.text_encoder import TextEncoderStage
from tests.unit.test_stages_match_diffusers import run_reference

CPU = torch.device("cpu")
PROMPT = "a watercolor fox in a snowy forest"


@pytest.fixture(scope="module")
def stages(tiny_model_dir: Path) -> tuple[TextEncoderStage, DenoiserStage, DecoderStage]:
    snap = open_snapshot(str(tiny_model_dir))
    options = {"lora_slots": 3, "lora_max_rank": 8, "loras_per_request": 2}
    return (
        TextEncoderStage("tiny", snap, CPU, torch.float32, **options),  # type: ignore[arg-type]
        DenoiserStage("tiny", snap, CPU, torch.float32, max_rows=16, **options),  # type: ignore[arg-type]
        DecoderStage("tiny", snap, CPU, torch.float32),
    )


@pytest.fixture(scope="module")
def loras(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {
        # kohya / A1111 with alpha != rank (scale alpha / rank), UNet + text encoder
        "kohya": create_test_lora(tiny_model_dir, root / "kohya", "kohya", rank=4, alpha=2.0, seed=1),
        "kohya-unet": create_test_lora(tiny_model_dir, root / "kohya-unet", "kohya", 8, 4.0, False, seed=2),
        "diffusers": create_test_lora(tiny_model_dir, root / "diffusers", "diffusers", rank=4, seed=3),
        "diffusers-unet": create_test_lora(tiny_model_dir, root / "diffusers-unet", "diffusers", 2, None, False, 4),
    }


def staged(stages, files: list[tuple[Path, float]], params: DenoiseParams, negative: str | None = None) -> np.ndarray:  # type: ignore[no-untyped-def]
    encoder, denoiser, decoder = stages
    te_adapters, unet_adapters, slots = [], [], []
    for path, scale in files:
        weights = read_lora(path)
        if weights.text_encoder:
            slot = encoder.loras.acquire(str(path), weights.text_encoder)
            te_adapters.append((str(path), slot, scale))
            slots.append((encoder.loras, slot))
        if weights.unet:
            slot = denoiser.loras.acquire(str(path), weights.unet)
            unet_adapters.append((slot, scale))
            slots.append((denoiser.loras, slot))
    try:
        request = EncodeRequest("tiny", PROMPT, negative, params.guidance_scale > 1)
        (emb,) = encoder.encode([request], [tuple(te_adapters)])
        latents = denoiser.run(params, emb, adapters=tuple(unet_adapters))
    finally:
        for bank, slot in slots:
            bank.release(slot)
    return decoder.decode_pixels(latents.tensor)


def reference(
    model: Path, files: list[tuple[Path, float]], params: DenoiseParams, negative: str | None = None
) -> np.ndarray:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    names = []
    for i, (path, _) in enumerate(files):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"a{i}")
        names.append(f"a{i}")
    if names:
        pipe.set_adapters(names, [scale for _, scale in files])
    return run_reference(pipe, PROMPT, negative, params)


@pytest.mark.parametrize(
    ("names", "scales", "scheduler"),
    [
        (("kohya",), (0.8,), "euler"),  # UNet + text encoder, kohya format, alpha / rank = 0.5
        (("kohya-unet",), (1.0,), "euler_a"),  # UNet only
        (("diffusers",), (1.3,), "dpmpp_2m"),  # UNet + text encoder, diffusers format
        (("diffusers-unet",), (0.6,), "euler"),  # UNet only
        (("kohya", "diffusers-unet"), (0.7, 0.5), "euler"),  # two adapters combined
    ],
)
def test_adapter_equals_diffusers(stages, loras, tiny_model_dir, names, scales, scheduler) -> None:  # type: ignore[no-untyped-def]
    files = [(loras[n], s) for n, s in zip(names, scales, strict=True)]
    params = DenoiseParams("tiny", 64, 64, 4, 6.0, scheduler, seed=77)
    ours = staged(stages, files, params, "blurry")
    theirs = reference(tiny_model_dir, files, params, "blurry")
    plain = reference(tiny_model_dir, [], params, "blurry")
    assert np.abs(theirs.astype(int) - plain.astype(int)).max() > 8, "the adapter must change the image"
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    assert diff.max() <= 1, f"max pixel difference {diff.max()}"


def test_rows_with_different_adapters_share_a_call(stages, loras) -> None:  # type: ignore[no-untyped-def]
    """Four jobs (three adapter sets and none) advance in the same UNet calls; each equals its solo run."""
    encoder, denoiser, _ = stages
    sets = [(), (("kohya-unet", 1.0),), (("diffusers-unet", 0.8),), (("kohya-unet", 0.5), ("diffusers-unet", 1.0))]
    jobs, solos, held = [], [], []
    for i, adapters in enumerate(sets):
        slots = []
        for name, scale in adapters:
            slot = denoiser.loras.acquire(name, read_lora(loras[name]).unet)
            slots.append((slot, scale))
            held.append(slot)
        params = DenoiseParams("tiny", 64, 64, 3, 5.0, "euler", seed=10 + i, num_images=1 + i % 2)
        (emb,) = encoder.encode([EncodeRequest("tiny", f"prompt {i}", None, True)])
        solos.append(denoiser.run(params, emb, adapters=tuple(slots)).tensor)
        job = denoiser.start(params, emb)
        job.adapters = tuple(slots)
        jobs.append(job)
    try:
        calls = 0
        while not all(j.done for j in jobs):
            denoiser.step(jobs)  # one UNet call for all four (same shapes)
            calls += 1
        assert calls == 3
        for job, solo in zip(jobs, solos, strict=True):
            assert torch.allclose(job.latents, solo, atol=1e-4), (job.latents - solo).abs().max()
        assert not torch.allclose(jobs[0].latents[:1], jobs[1].latents[:1], atol=1e-3)
    finally:
        for slot in held:
            denoiser.loras.release(slot)


def test_text_encoder_cache_keys_on_adapters(stages, loras) -> None:  # type: ignore[no-untyped-def]
    encoder = stages[0]
    weights = read_lora(loras["kohya"])
    slot = encoder.loras.acquire("k", weights.text_encoder)
    try:
        request = EncodeRequest("tiny", "a lighthouse", None, False)
        plain = encoder.encode([request])[0].positive
        adapted = encoder.encode([request], [(("k", slot, 1.0),)])[0].positive
        half = encoder.encode([request], [(("k", slot, 0.5),)])[0].positive
        again = encoder.encode([request], [(("k", slot, 1.0),)])[0].positive
    finally:
        encoder.loras.release(slot)
    assert not torch.equal(plain, adapted) and not torch.equal(adapted, half)
    assert torch.equal(adapted, again)
    assert torch.equal(encoder.encode([request])[0].positive, plain)


def test_slots_are_an_lru_that_keeps_adapters_in_use(tiny_model_dir, loras) -> None:  # type: ignore[no-untyped-def]
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    bank = LoraBank(unet, UNET_TARGETS, slots=2, max_rank=8, per_row=2, max_rows=4, component="UNet")
    layers = read_lora(loras["kohya-unet"]).unet
    a = bank.acquire("a", layers)
    b = bank.acquire("b", layers)
    assert {a, b} == {1, 2} and bank.copies == 2
    with pytest.raises(SlotsBusy):
        bank.acquire("c", layers)  # both in use
    bank.release(a)
    assert bank.acquire("b", layers) == b and bank.copies == 2  # resident: no copy
    c = bank.acquire("c", layers)
    assert c == a and "a" not in bank.resident  # the idle one made room
    bank.release(b)
    bank.release(b)
    bank.release(c)
    assert bank.acquire("a", layers) in {1, 2} and bank.copies == 4


def test_unfit_adapters_are_refused(tiny_model_dir, loras, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    small = LoraBank(unet, UNET_TARGETS, slots=1, max_rank=2, per_row=1, max_rows=2, component="UNet")
    with pytest.raises(AdapterError, match="rank 8"):
        small.acquire("big", read_lora(loras["kohya-unet"]).unet)
    # A layer shaped for another base model (a wider cross-attention: an SDXL-like adapter).
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file(
        {f"{key}.lora_down.weight": torch.zeros(2, 77), f"{key}.lora_up.weight": torch.zeros(32, 2)},
        str(tmp_path / "other.safetensors"),
    )
    with pytest.raises(AdapterError, match="another base model"):
        small.acquire("other", read_lora(tmp_path / "other.safetensors").unet)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="not a readable safetensors"):
        read_lora(tmp_path / "bad")
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "x.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(AdapterError, match=r"one \.safetensors file"):
        read_lora(tmp_path / "pickle")


def test_a_request_reserves_all_its_slots_or_none(tiny_model_dir, loras) -> None:  # type: ignore[no-untyped-def]
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    bank = LoraBank(unet, UNET_TARGETS, slots=2, max_rank=8, per_row=2, max_rows=4, component="UNet")
    layers = read_lora(loras["kohya-unet"]).unet
    held, fresh = bank.reserve("a", layers)
    assert fresh and bank.copies == 0  # bookkeeping only: the copy is the caller's to run (fill)
    bank.fill(held, layers)
    with pytest.raises(SlotsBusy):
        bank.reserve_all([("b", layers), ("c", layers)])  # one slot free, two wanted
    assert set(bank.resident) == {"a"} and bank.users == {held: 1}  # nothing of the failed request is kept
    assert bank.reserve_all([("a", layers), ("b", layers)]) == [(held, False), (3 - held, True)]
