"""The registry against real stores: push, pinned pulls, stage-selective downloads, integrity, concurrency."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from models.registry import MANIFEST_NAME, SnapshotCache, parse_ref
from models.registry.errors import IntegrityError, NotFoundError, RegistryError, UnsafeWeightsError
from models.registry.manifest import Manifest, content_id
from models.registry.sources import publish
from serving.stages import STAGES
from tests.registry.conftest import point_hub_at
from tests.servers import DroppingProxy, HubServer, S3Server

pytestmark = pytest.mark.slow


def sizes(model: Path, components: tuple[str, ...]) -> int:
    manifest = Manifest.from_bytes((model / MANIFEST_NAME).read_bytes(), "test")
    return sum(e.size for e in manifest.entries(components))


def test_s3_push_then_stage_selective_pulls(s3_env: S3Server, model_copy: Path, tmp_path: Path) -> None:
    pinned, version = publish(model_copy, parse_ref("s3://models/tiny@v1"))
    assert str(pinned) == "s3://models/tiny@v1"
    assert version == content_id((model_copy / MANIFEST_NAME).read_bytes())
    cache = SnapshotCache(tmp_path / "cache")

    snap = cache.materialize("s3://models/tiny@v1", STAGES["denoiser"].components)
    assert {p.name for p in snap.path.iterdir()} == {"model_index.json", MANIFEST_NAME, "scheduler", "unet"}
    assert snap.report.version == version
    assert snap.report.bytes_fetched == sizes(model_copy, ("unet", "scheduler"))
    assert s3_env.gets("tiny/v1/vae/diffusion_pytorch_model.safetensors") == 0  # never asked for

    text = cache.materialize("s3://models/tiny@v1", STAGES["text_encoder"].components)
    assert text.path == snap.path  # one content-addressed snapshot, filled component by component
    assert text.report.bytes_fetched == sizes(model_copy, ("tokenizer", "text_encoder")) - sizes(model_copy, ())
    again = cache.materialize("s3://models/tiny@v1", STAGES["denoiser"].components)
    assert again.report.bytes_fetched == 0 and again.report.bytes_cached == snap.report.bytes_fetched
    assert cache.verify("s3://models/tiny@v1") == []

    with pytest.raises(RegistryError, match="immutable"):
        publish(model_copy, parse_ref("s3://models/tiny@v1"))


def test_s3_versions_must_be_named_and_exist(s3_env: S3Server, model_copy: Path, tmp_path: Path) -> None:
    cache = SnapshotCache(tmp_path / "cache")
    with pytest.raises(RegistryError, match="must name a version"):
        cache.materialize("s3://models/tiny")
    with pytest.raises(NotFoundError, match="unknown version"):
        cache.materialize("s3://models/tiny@v404")


def test_s3_missing_manifest_is_refused(s3_env: S3Server, model_copy: Path, tmp_path: Path) -> None:
    client = s3_env.client()
    for path in model_copy.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "models", f"bare/v1/{path.relative_to(model_copy).as_posix()}")
    with pytest.raises(NotFoundError, match=MANIFEST_NAME):
        SnapshotCache(tmp_path / "cache").materialize("s3://models/bare@v1")


def test_a_corrupted_byte_is_caught_and_never_published(s3_env: S3Server, model_copy: Path, tmp_path: Path) -> None:
    publish(model_copy, parse_ref("s3://models/tiny@corrupt"))
    client = s3_env.client()
    key = "tiny/corrupt/unet/diffusion_pytorch_model.safetensors"
    data = bytearray(client.get_object(Bucket="models", Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket="models", Key=key, Body=bytes(data))

    cache = SnapshotCache(tmp_path / "cache")
    with pytest.raises(IntegrityError, match=r"unet/diffusion_pytorch_model\.safetensors"):
        cache.materialize("s3://models/tiny@corrupt", STAGES["denoiser"].components)
    cid = content_id((model_copy / MANIFEST_NAME).read_bytes())
    assert not (tmp_path / "cache" / "snapshots" / cid / "unet").exists()
    assert not list((tmp_path / "cache" / "partial").rglob("diffusion_pytorch_model.safetensors"))
    # Components that do match are still served (the decoder's VAE is intact).
    cache.materialize("s3://models/tiny@corrupt", STAGES["decoder"].components)


def test_pickle_weights_are_refused_unless_explicitly_allowed(
    s3_env: S3Server, model_copy: Path, tmp_path: Path
) -> None:
    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(UnsafeWeightsError, match=r"diffusion_pytorch_model\.bin"):
        publish(model_copy, parse_ref("s3://models/pickled@v1"))
    publish(model_copy, parse_ref("s3://models/pickled@v1"), allow_pickle=True)

    with pytest.raises(UnsafeWeightsError, match="unsafe_allow_pickle_weights"):
        SnapshotCache(tmp_path / "cache").materialize("s3://models/pickled@v1", STAGES["denoiser"].components)
    # Components without pickle files are unaffected, and the loud option lets the rest through.
    SnapshotCache(tmp_path / "cache").materialize("s3://models/pickled@v1", STAGES["decoder"].components)
    unsafe = SnapshotCache(tmp_path / "cache", allow_pickle=True)
    assert (
        unsafe.materialize("s3://models/pickled@v1", ("unet",)).path / "unet" / weights.with_suffix(".bin").name
    ).exists()


def test_s3_download_dropped_midway_resumes(
    s3_env: S3Server, model_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(model_copy, parse_ref("s3://models/tiny@flaky"))
    upstream = int(s3_env.url.rsplit(":", 1)[1])
    # Cut the UNet weights (3 MB) after 1 MB, once.
    proxy = DroppingProxy(upstream, after_bytes=1_000_000, drops=1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        cache = SnapshotCache(tmp_path / "cache", attempts=1)
        with pytest.raises(RegistryError):
            cache.materialize("s3://models/tiny@flaky", STAGES["denoiser"].components)
        cid = content_id((model_copy / MANIFEST_NAME).read_bytes())
        assert proxy.dropped == 1
        assert not (tmp_path / "cache" / "snapshots" / cid / "unet").exists()  # nothing partial is visible

        proxy.remaining = 1  # the next run is cut once more and still succeeds
        snap = SnapshotCache(tmp_path / "cache", attempts=3).materialize("s3://models/tiny@flaky", ("unet",))
        assert proxy.dropped == 2
        assert (snap.path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == (
            model_copy / "unet" / "diffusion_pytorch_model.safetensors"
        ).read_bytes()
    finally:
        proxy.close()


def test_hub_branch_is_pinned_to_its_commit(hub_env: HubServer, model_copy: Path, tmp_path: Path) -> None:
    commit = hub_env.publish(model_copy, "acme/tiny")
    cache = SnapshotCache(tmp_path / "cache")
    snap = cache.materialize("hf://acme/tiny@main", STAGES["decoder"].components)
    assert snap.report.pinned == f"hf://acme/tiny@{commit}"
    assert {p.name for p in snap.path.iterdir()} == {"model_index.json", MANIFEST_NAME, "vae"}
    assert snap.report.bytes_fetched == sizes(model_copy, ("vae",))

    # A new commit on the branch is a new version; the old commit stays addressable.
    (model_copy / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**json.loads((model_copy / "scheduler" / "scheduler_config.json").read_text()), "note": 2})
    )
    second = hub_env.publish(model_copy, "acme/tiny")
    assert cache.pin("hf://acme/tiny@main") == parse_ref(f"hf://acme/tiny@{second}")
    old = cache.materialize(f"hf://acme/tiny@{commit}", STAGES["denoiser"].components)
    assert old.report.version == snap.report.version


def test_hub_unknown_revisions_and_offline_mode(
    hub_env: HubServer, model_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    commit = hub_env.publish(model_copy, "acme/offline")
    cache = SnapshotCache(tmp_path / "cache")
    with pytest.raises(NotFoundError, match="no-such-branch"):
        cache.materialize("hf://acme/offline@no-such-branch")
    with pytest.raises(RegistryError):
        cache.materialize("hf://acme/offline@" + "0" * 40)
    cache.materialize("hf://acme/offline@main", STAGES["decoder"].components)

    # Offline: no request reaches a hub; what was pinned and cached here is served, nothing else.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    point_hub_at(monkeypatch, "http://127.0.0.1:9")
    snap = cache.materialize("hf://acme/offline@main", STAGES["decoder"].components)
    assert snap.report.pinned == f"hf://acme/offline@{commit}" and snap.report.bytes_fetched == 0
    with pytest.raises(RegistryError):
        cache.materialize("hf://acme/offline@main", STAGES["denoiser"].components)  # never downloaded


def test_hub_download_dropped_midway_recovers(
    hub_env: HubServer, model_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    hub_env.publish(model_copy, "acme/flaky")
    proxy = DroppingProxy(int(hub_env.url.rsplit(":", 1)[1]), after_bytes=1_000_000, drops=1)
    point_hub_at(monkeypatch, proxy.url)
    try:
        snap = SnapshotCache(tmp_path / "cache", attempts=3).materialize("hf://acme/flaky@main", ("unet",))
        assert proxy.dropped == 1
        assert SnapshotCache(tmp_path / "cache").verify("hf://acme/flaky@main") == []
        assert (snap.path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size == (
            model_copy / "unet" / "diffusion_pytorch_model.safetensors"
        ).stat().st_size
    finally:
        proxy.close()


def test_replicas_resolving_one_snapshot_download_it_once(s3_env: S3Server, model_copy: Path, tmp_path: Path) -> None:
    """Four processes pull the same snapshot into one cache at once: the server sees one download."""
    publish(model_copy, parse_ref("s3://models/tiny@shared"))
    weights = "tiny/shared/unet/diffusion_pytorch_model.safetensors"
    before = s3_env.gets(weights)
    code = (
        "import json, sys; from models.registry import SnapshotCache; "
        "s = SnapshotCache(sys.argv[1]).materialize('s3://models/tiny@shared', ('unet', 'scheduler')); "
        "print(json.dumps({'path': str(s.path), 'fetched': s.report.bytes_fetched}))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "cache")], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert s3_env.gets(weights) - before == 1
    assert len({r["path"] for r in results}) == 1
    # Each component is fetched by whichever process takes its lock first; together, every byte exactly once.
    assert sum(r["fetched"] for r in results) == sizes(model_copy, ("unet", "scheduler"))


def test_cli_push_pull_verify_list(s3_env: S3Server, model_copy: Path, tmp_path: Path) -> None:
    import os

    sdserve = str(Path(sys.executable).parent / "sdserve")
    cache = str(tmp_path / "cache")
    env = {**os.environ, **s3_env.env}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sdserve, *args], env=env, capture_output=True, text=True, timeout=120)

    pushed = run("models", "push", str(model_copy), "s3://models/cli@v1")
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout)["version"] == content_id((model_copy / MANIFEST_NAME).read_bytes())
    pulled = run("models", "pull", "s3://models/cli@v1", "--stage", "decoder", "--cache-dir", cache)
    assert pulled.returncode == 0, pulled.stderr
    report = json.loads(pulled.stdout)
    assert report["components"] == ["vae"] and report["bytes_fetched"] == sizes(model_copy, ("vae",))
    assert "download" in pulled.stderr  # the progress bar
    verified = run("models", "verify", "s3://models/cli@v1", "--cache-dir", cache)
    assert verified.returncode == 0 and json.loads(verified.stdout)["ok"] is True
    listed = run("models", "list", "--cache-dir", cache)
    (entry,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert entry["pinned"] == "s3://models/cli@v1" and set(entry["components"]) >= {"vae", "unet"}
    assert run("models", "list", "s3://models/cli").stdout.split() == ["s3://models/cli@v1"]

    # Tamper with a cached file: verify says which one and fails.
    cached = Path(report["path"]) / "vae" / "diffusion_pytorch_model.safetensors"
    cached.chmod(0o644)
    cached.write_bytes(cached.read_bytes()[:-1] + b"\0")
    bad = run("models", "verify", "s3://models/cli@v1", "--cache-dir", cache)
    assert bad.returncode == 1 and "vae/diffusion_pytorch_model.safetensors" in bad.stderr
    refused = run("models", "pull", "s3://models/cli@v404", "--cache-dir", cache, "--quiet")
    assert refused.returncode == 2 and "unknown version" in refused.stderr


def test_lora_adapters_are_references_too(s3_env: S3Server, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({"unet.down.lora_A.weight": torch.randn(4, 32)}, str(adapter / "pytorch_lora_weights.safetensors"))
    publish(adapter, parse_ref("s3://models/loras/ink@v1"))
    manifest = Manifest.from_bytes((adapter / MANIFEST_NAME).read_bytes(), "test")
    assert manifest.kind == "lora"
    snap = SnapshotCache(tmp_path / "cache").materialize("s3://models/loras/ink@v1")
    assert (snap.path / "pytorch_lora_weights.safetensors").read_bytes() == (
        adapter / "pytorch_lora_weights.safetensors"
    ).read_bytes()


def test_verify_reads_local_folders_in_place(model_copy: Path, tmp_path: Path) -> None:
    from models.registry import write_manifest

    write_manifest(model_copy, revision="local")
    cache = SnapshotCache(tmp_path / "cache")
    assert cache.verify(f"file://{model_copy}") == []
    weights = model_copy / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    assert cache.verify(str(model_copy)) == [
        "vae/diffusion_pytorch_model.safetensors: size or sha256 differs from the manifest"
    ]


# -- upscaler and safety-checker artifacts ---------------------------------------------------------------------


def read_manifest(directory: Path) -> Manifest:
    return Manifest.from_bytes((directory / MANIFEST_NAME).read_bytes(), "test")


def published_files(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in directory.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    }


@pytest.fixture
def checker_copy(tiny_safety_checker_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_safety_checker_dir, tmp_path / "checker"))


def test_upscalers_and_safety_checkers_are_published_by_kind(
    s3_env: S3Server, checker_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from models.runtime import StageRuntime
    from models.upscaler import create_test_upscaler

    upscaler = create_test_upscaler(tmp_path / "upscaler", "RealESRGAN_x4plus", seed=0)
    publish(upscaler, parse_ref("s3://models/upscalers/x4@v1"))
    publish(checker_copy, parse_ref("s3://models/safety/tiny@v1"))
    assert read_manifest(upscaler).kind == "upscaler"
    assert read_manifest(checker_copy).kind == "safety_checker"

    cache = SnapshotCache(tmp_path / "cache")
    for ref, source in (("s3://models/upscalers/x4@v1", upscaler), ("s3://models/safety/tiny@v1", checker_copy)):
        snap = cache.materialize(ref)
        assert snap.manifest is not None and snap.manifest.kind == read_manifest(source).kind
        assert published_files(snap.path) == published_files(source)
        assert cache.verify(ref) == []

    # configure_threads sets process-wide state: put it back after the test.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    try:
        runtime = StageRuntime(
            "upscaler", lambda *args, **kwargs: None, cache, artifact="upscaler", device="cpu", dtype="float32",
            threads=1,
        )  # fmt: skip
        with pytest.raises(RegistryError, match="is a safety_checker, not a upscaler"):
            runtime.fetch("s3://models/safety/tiny@v1")
        pinned, snap = runtime.fetch("s3://models/upscalers/x4@v1")
        assert pinned == "s3://models/upscalers/x4@v1" and snap.manifest is not None
    finally:
        torch.set_num_threads(threads)


def test_a_tampered_upscaler_is_refused(s3_env: S3Server, tmp_path: Path) -> None:
    from models.upscaler import create_test_upscaler

    upscaler = create_test_upscaler(tmp_path / "upscaler", "realesr-general-x4v3", seed=1)
    publish(upscaler, parse_ref("s3://models/upscalers/general@tampered"))
    client = s3_env.client()
    key = "upscalers/general/tampered/realesr-general-x4v3.safetensors"
    data = bytearray(client.get_object(Bucket="models", Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket="models", Key=key, Body=bytes(data))

    cache = SnapshotCache(tmp_path / "cache")
    with pytest.raises(IntegrityError, match=r"realesr-general-x4v3\.safetensors"):
        cache.materialize("s3://models/upscalers/general@tampered")
    assert not list((tmp_path / "cache").rglob("realesr-general-x4v3.safetensors"))


def test_artifact_kinds_are_detected_or_given(checker_copy: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from models.registry.manifest import KNOWN_KINDS, build_manifest
    from models.upscaler import create_test_upscaler

    assert KNOWN_KINDS == ("pipeline", "safety_checker", "upscaler", "lora")
    # A pipeline snapshot's safety_checker/ + feature_extractor/ subfolders (no model_index.json).
    pipeline_layout = tmp_path / "pipeline_layout"
    shutil.copytree(checker_copy, pipeline_layout / "safety_checker")
    (pipeline_layout / "feature_extractor").mkdir()
    (pipeline_layout / "safety_checker" / "preprocessor_config.json").rename(
        pipeline_layout / "feature_extractor" / "preprocessor_config.json"
    )
    assert build_manifest(pipeline_layout, "v1").kind == "safety_checker"
    # Some other CLIP model's config is not a safety checker.
    config = json.loads((checker_copy / "config.json").read_text())
    (checker_copy / "config.json").write_text(json.dumps({**config, "architectures": ["CLIPModel"]}))
    assert build_manifest(checker_copy, "v1").kind == "lora"  # only its safetensors file is left to match

    # An upscaler's single file is recognised from its header; other single files stay adapters.
    upscaler = create_test_upscaler(tmp_path / "upscaler", "RealESRGAN_x2plus", seed=0)
    assert build_manifest(upscaler, "v1").kind == "upscaler"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({"conv_first.weight": torch.zeros(8, 5, 3, 3), "conv_last.weight": torch.zeros(3, 8, 3, 3)},
              str(adapter / "odd.safetensors"))  # fmt: skip
    assert build_manifest(adapter, "v1").kind == "lora"  # RRDBNet-like keys, but not a layout it can build
    (adapter / "odd.safetensors").write_bytes(b"not a safetensors file")
    assert build_manifest(adapter, "v1").kind == "lora"

    # A given kind overrides detection; an unknown one is refused.
    assert build_manifest(upscaler, "v1", kind="lora").kind == "lora"
    with pytest.raises(RegistryError, match="unknown artifact kind 'vae'"):
        build_manifest(upscaler, "v1", kind="vae")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("hello")
    with pytest.raises(RegistryError, match="neither a diffusers pipeline"):
        build_manifest(tmp_path / "notes", "v1")
    assert build_manifest(tmp_path / "notes", "v1", kind="upscaler").kind == "upscaler"


def test_lora_adapters_are_pulled_verified_and_converted(
    s3_env: S3Server, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A kohya adapter pushed to S3: its manifest records its base family; a replica's store pulls, verifies and
    converts it once (host memory after that); a pickle adapter and a tampered file are refused at pull."""
    from models.adapters import AdapterError, AdapterStore
    from models.testmodels import create_test_lora

    lora = create_test_lora(tiny_model_dir, tmp_path / "ink", "kohya", rank=4, alpha=2.0)
    publish(lora.parent, parse_ref("s3://models/adapters/ink@v1"))
    assert Manifest.from_bytes((lora.parent / MANIFEST_NAME).read_bytes(), "t").family == "sd1"
    store = AdapterStore(SnapshotCache(tmp_path / "cache"), max_bytes=2**30)
    first = store.load("s3://models/adapters/ink@v1")
    assert first.weights.format == "kohya" and first.weights.unet and first.weights.text_encoder
    assert store.load("s3://models/adapters/ink@v1") is first and store.loads == 1

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter.ckpt").write_bytes(b"\x80\x04K\x01.")
    publish(pickled, parse_ref("s3://models/adapters/pickled@v1"), allow_pickle=True, kind="lora")
    with pytest.raises(AdapterError, match="pickle"):
        store.load("s3://models/adapters/pickled@v1")

    tampered = create_test_lora(tiny_model_dir, tmp_path / "grain", "diffusers", rank=2)
    publish(tampered.parent, parse_ref("s3://models/adapters/grain@v1"))
    client, key = s3_env.client(), "adapters/grain/v1/grain.safetensors"
    data = bytearray(client.get_object(Bucket="models", Key=key)["Body"].read())
    data[-1] ^= 0xFF
    client.put_object(Bucket="models", Key=key, Body=bytes(data))
    with pytest.raises(AdapterError, match="refused"):
        store.load("s3://models/adapters/grain@v1")
