"""The spandrel decoder on tiny random models of spandrel's own classes (Real-ESRGAN Compact,
ESRGAN RRDBNet, SwinIR), saved as .pth and .safetensors and loaded through the spec, from a
file, an S3 object (moto server) and a hub-layout cache; checkpoints that would run pickled
code, or are not state dicts, are refused without running anything."""

from __future__ import annotations

import io
import re
import uuid
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

from pixelrelay.pipeline.checkpoints import CheckpointError
from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.messages import Backends, Operation, Plan
from pixelrelay.pipeline.settings import ConfigError, Settings
from pixelrelay.pipeline.stages import registry
from pixelrelay.pipeline.stages.base import ModelUnavailableError
from pixelrelay.pipeline.stages.decoders.learned import TileConfig
from pixelrelay.pipeline.stages.decoders.spandrel import SpandrelDecoder, variant_for
from pixelrelay.pipeline.stages.registry import BackendNotAllowedError
from pixelrelay.producer import models_cli
from pixelrelay.producer.submit import normalize_backends
from pixelrelay.workers.runtime import BackendLoadError, Runtime
from tests.pipeline import spandrel_fixtures as sf
from tests.pipeline.hf_fixtures import install_in_hub_cache

pytest.importorskip("spandrel", reason="the spandrel decoder needs the spandrel extra")
torch.set_num_threads(2)

SMALL_TILES = TileConfig(tile=24, overlap=16, tile_batch=4, min_tile=8)
WHOLE = TileConfig(tile=512, overlap=0, tile_batch=4, min_tile=8)
EXPECTED = {  # arch -> (spandrel architecture id, purpose at x2)
    "compact": ("Compact", "SR"),
    "esrgan": ("ESRGAN", "SR"),
    "swinir": ("SwinIR", "SR"),
}


def _image(h: int, w: int, seed: int = 0, alpha: bool = False) -> DecodedImage:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w), dtype=np.uint8) if alpha else None
    return DecodedImage(rgb=rng.integers(0, 256, (h, w, 3), dtype=np.uint8), alpha=a)


def _diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """arch -> {ext: path}: the same weights saved both ways."""
    out = {}
    for arch in sf.ARCHITECTURES:
        net = sf.build(arch, scale=2)
        folder = tmp_path_factory.mktemp(f"sp-{arch}")
        out[arch] = {ext: sf.save(net, folder / f"{arch}_x2{ext}") for ext in (".pth", ".safetensors")}
    return out


# --- loading through the spec -----------------------------------------------------------------


@pytest.mark.parametrize("arch", sf.ARCHITECTURES)
def test_each_architecture_loads_from_pth_and_safetensors_alike(arch, files):
    image = _image(20, 26)
    results = []
    for path in files[arch].values():
        dec = registry.create_decoder(f"spandrel:{path}")
        m = dec.models[0]
        assert (m.architecture, m.purpose, m.scale) == (*EXPECTED[arch], 2)
        assert m.params == sum(p.numel() for p in sf.build(arch).parameters()) and m.nbytes == path.stat().st_size
        out = dec.restore([image], [Plan(scale=2)])[0]
        assert out.rgb.shape == (40, 52, 3) and out.rgb.dtype == np.uint8
        assert f"spandrel: {path} ({EXPECTED[arch][0]} x2, SR" in out.notes[0]
        results.append(out.rgb)
    assert np.array_equal(results[0], results[1])  # same weights, same output
    assert results[0].std() > 1  # a real network ran (random weights do not give a flat image)


def test_a_wrapped_state_dict_loads(tmp_path):
    """BasicSR writes {"params_ema": state_dict}; spandrel's canonicalisation unwraps it."""
    path = sf.save(sf.build("compact", scale=4), tmp_path / "RealESRGAN_x4plus.pth", wrap="params_ema")
    dec = SpandrelDecoder(str(path))
    assert (dec.models[0].architecture, dec.models[0].scale, dec.models[0].variant) == ("Compact", 4, "realworld")


def test_batch_equals_singles_with_mixed_models_sizes_and_alpha(tmp_path_factory):
    x2 = sf.checkpoint(tmp_path_factory, "compact", "x2.pth", scale=2)
    x4 = sf.checkpoint(tmp_path_factory, "esrgan", "x4.safetensors", scale=4, seed=1)
    dec = SpandrelDecoder(f"{x2},{x4}", tiles=SMALL_TILES)
    images = [_image(20, 26, 1, alpha=True), _image(20, 26, 2), _image(9, 14, 3), _image(20, 26, 4)]
    plans = [Plan(scale=2), Plan(scale=4), Plan(scale=2), Plan(scale=2, noise_sigma=10)]
    batch = dec.restore(images, plans)
    for image, plan, got in zip(images, plans, batch, strict=True):
        single = dec.restore([image], [plan])[0]
        assert _diff(single.rgb, got.rgb) <= 1 and single.notes == got.notes
        assert got.rgb.shape == (image.height * plan.scale, image.width * plan.scale, 3)
        assert (got.alpha is None) == (image.alpha is None)
        if got.alpha is not None:
            assert np.array_equal(single.alpha, got.alpha) and got.alpha.shape == got.rgb.shape[:2]
    assert str(x4) in batch[1].notes[0] and str(x2) in batch[0].notes[0]


@pytest.mark.parametrize("arch", ["compact", "esrgan", "swinir"])
@pytest.mark.slow
def test_tiled_equals_untiled(arch, files):
    """Small tiles (several per image, cross-faded) give the untiled result. SwinIR's descriptor
    discourages tiling, so the decoder runs it whole; forced to tile, its tiles follow its
    attention windows and agree too."""
    image = _image(30, 40, 5)
    path = str(files[arch][".pth"])
    whole = SpandrelDecoder(path, tiles=WHOLE).restore([image], [Plan(scale=2)])[0].rgb
    tiled_dec = SpandrelDecoder(path, tiles=SMALL_TILES)
    if arch == "swinir":
        m = tiled_dec.models[0]
        assert m.untiled and m.align == 4  # window_size 4
        assert np.array_equal(tiled_dec.restore([image], [Plan(scale=2)])[0].rgb, whole)  # ran whole
        m.untiled = False  # force tiling
    calls = []
    real = tiled_dec.forward
    tiled_dec.forward = lambda m, x, p, i: calls.append(tuple(x.shape)) or real(m, x, p, i)
    tiled = tiled_dec.restore([image], [Plan(scale=2)])[0].rgb
    assert sum(c[0] for c in calls) > 1 and max(c[-1] for c in calls) <= 24, calls  # really tiled
    assert _diff(tiled, whole) <= 1


def test_precision_follows_what_the_model_supports(files):
    """Asked for fp16: Compact supports it; SwinIR does not and runs fp32 (on CUDA it would
    take bf16, which it supports), noted in the manifest notes."""
    paths = f"{files['compact']['.pth']},{files['swinir']['.pth']}"
    dec = SpandrelDecoder(paths, dtype=torch.float16)
    compact, swinir = dec.models
    assert compact.dtype == torch.float16 and next(compact.descriptor.model.parameters()).dtype == torch.float16
    assert swinir.dtype == torch.float32 and next(swinir.descriptor.model.parameters()).dtype == torch.float32
    assert dec.notes(swinir, Plan(scale=2))[0].endswith(", float32)")
    assert dec.notes(compact, Plan(scale=2))[0].endswith("classical)")


def test_a_gray_model_runs_each_channel(tmp_path):
    path = sf.save(sf.build("compact", scale=2, channels=1), tmp_path / "gray_x2.pth")
    dec = SpandrelDecoder(str(path))
    image = _image(12, 10, 6)
    out = dec.restore([image], [Plan(scale=2)])[0].rgb
    for c in range(3):  # channel c of the output is the model run on channel c alone
        alone = DecodedImage(rgb=np.repeat(image.rgb[..., c : c + 1], 3, axis=2))
        assert _diff(out[..., c], dec.restore([alone], [Plan(scale=2)])[0].rgb[..., 0]) <= 1


# --- the pick rule (decoders.choice, shared with hf-sr) ----------------------------------------


def test_the_plan_picks_a_model_by_scale_and_degradation(tmp_path_factory):
    ck = lambda arch, name, **kw: str(sf.checkpoint(tmp_path_factory, arch, name, **kw))  # noqa: E731
    clean = ck("compact", "4x-UltraSharp.pth", scale=4)
    jpeg = ck("compact", "4x_JPEG_60-80.safetensors", scale=4, seed=1)
    real = ck("compact", "RealESRGAN_x4plus.pth", scale=4, seed=2)
    x2 = ck("compact", "2x_Sharp.pth", scale=2, seed=3)
    denoise = ck("compact", "1x_Denoise.pth", scale=1, seed=4)
    dec = SpandrelDecoder(",".join([clean, jpeg, real, x2, denoise]))
    pick = lambda **kw: dec.choose(Plan(**kw)).name  # noqa: E731
    assert [m.variant for m in dec.models] == ["classical", "compressed", "realworld", "classical", "realworld"]
    assert dec.models[-1].purpose == "Restoration"
    assert pick(scale=4) == clean
    assert pick(scale=4, jpeg_quality=40) == jpeg
    assert pick(scale=4, operations=[Operation(name="deblock", strength=0.5)]) == jpeg
    assert pick(scale=4, noise_sigma=12) == real
    assert pick(scale=4, operations=[Operation(name="deblur", strength=0.3)]) == real
    assert pick(scale=2, noise_sigma=12) == x2  # the only x2: the scale comes first
    assert pick(scale=1, noise_sigma=12) == denoise
    assert pick(scale=4, model="compressed") == jpeg  # a planner's variant name
    assert pick(scale=4, model="RealESRGAN") == real  # a unique part of a name
    assert pick(scale=4, model=clean, jpeg_quality=40) == clean
    out = dec.restore([_image(8, 8)], [Plan(scale=4, jpeg_quality=40)])[0]
    assert out.notes == (f"spandrel: {jpeg} (Compact x4, SR, compressed)",)


def test_variants_read_the_metadata_and_the_file_name_only():
    assert variant_for("/models/GFPGANv1.4.pth", "GFPGAN", "FaceSR") == "face"
    assert variant_for("/m/fbcnn_color.pth", "FBCNN", "Restoration") == "compressed"
    assert variant_for("/m/1x_NMKD-Jaywreck3-Lite.pth", "SPAN", "Restoration") == "lightweight"
    assert variant_for("/m/scunet_color_real_psnr.pth", "SCUNet", "Restoration") == "realworld"
    assert variant_for("/m/NAFNet-SIDD-width64.pth", "NAFNet", "Restoration") == "realworld"
    assert variant_for("/home/realname/jpeg/4x-UltraSharp.pth", "ESRGAN", "SR") == "classical"
    assert variant_for("org/realesr/realesr-general-x4v3.pth", "Compact", "SR") == "realworld"


# --- refused checkpoints ------------------------------------------------------------------------


def _refused(spec_path, match: str):
    with pytest.raises(CheckpointError, match=match) as info:
        SpandrelDecoder(str(spec_path))
    assert str(spec_path) in str(info.value)  # the error names the file
    return info.value


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    for name, inside in (("evil.pth", True), ("evil.ckpt", True), ("bare.pt", False), ("bare.bin", False)):
        path = sf.evil_pickle(tmp_path / name, marker, inside_state_dict=inside)
        _refused(path, "would run pickled code")
        assert not marker.exists()
        assert SpandrelDecoder.model_status(str(path)).startswith("refused: ")
        assert not marker.exists()
    # the same file through a worker's runtime: a load error naming it, nothing run
    rt = Runtime(Settings.defaults().model_copy(update={"allowed_backends": "*"}))
    with pytest.raises(BackendLoadError, match=f"CheckpointError: checkpoint '{tmp_path / 'evil.pth'}'"):
        rt.stage("decode", f"spandrel:{tmp_path / 'evil.pth'}")
    assert not marker.exists()


def test_torchscript_and_non_state_dicts_are_refused(tmp_path, files):
    net = sf.build("compact")
    ts = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(net, torch.rand(1, 3, 8, 8)), str(ts))
    _refused(ts, "TorchScript")
    listed = tmp_path / "list.pth"
    torch.save([t for t in net.state_dict().values()], listed)
    _refused(listed, "not a state dict .*list")
    mixed = tmp_path / "mixed.pth"
    torch.save({**net.state_dict(), "epoch": 12}, mixed)
    _refused(mixed, "entry 'epoch' is a int")
    unknown = tmp_path / "unknown.safetensors"
    sf.save(torch.nn.Sequential(torch.nn.Linear(3, 3)), unknown)
    _refused(unknown, "no supported architecture")
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(files["compact"][".pth"].read_bytes())
    _refused(onnx, "unsupported file type '.onnx'")


def test_corrupt_files_are_refused(tmp_path, files):
    good = files["esrgan"][".pth"].read_bytes()
    for name, data in (
        ("junk.pth", b"junk" * 10),
        ("cut.pth", good[: len(good) // 2]),
        ("junk.safetensors", b"junk" * 10),
        ("empty.safetensors", b""),
    ):
        (tmp_path / name).write_bytes(data)
        _refused(tmp_path / name, "not a readable (torch|safetensors) file")


def test_a_checkpoint_over_the_bound_is_refused_unread(files):
    path = files["compact"][".pth"]
    small = Settings.defaults().model_copy(update={"checkpoint_max_bytes": 1000})
    with pytest.raises(CheckpointError, match=f"'{path}' is {path.stat().st_size} bytes, over the 1000-byte bound"):
        SpandrelDecoder(str(path), settings=small)


def test_missing_things_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ModelUnavailableError, match="needs checkpoints: spandrel:PATH"):
        registry.create_decoder("spandrel")
    with pytest.raises(ModelUnavailableError, match="no such file"):
        SpandrelDecoder.check_available(str(tmp_path / "nope.pth"))
    with pytest.raises(ModelUnavailableError, match="not a file, an s3:// URI or a hub id"):
        SpandrelDecoder.check_available("justaword")
    monkeypatch.setitem(__import__("sys").modules, "spandrel", None)  # the extra is not installed
    for call in (lambda: SpandrelDecoder(str(tmp_path / "x.pth")), lambda: SpandrelDecoder.check_available("a/b")):
        with pytest.raises(ModelUnavailableError, match=r"pip install 'pixelrelay\[spandrel\]'"):
            call()


# --- where checkpoints come from ----------------------------------------------------------------


def test_an_s3_checkpoint_is_cached_once_and_bounded(s3_server, s3_bucket, s3_client, files, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf-home"))
    key = f"models/{uuid.uuid4().hex[:6]}/RealESRGAN_x2.safetensors"
    s3_client.put_object(Bucket=s3_bucket, Key=key, Body=files["esrgan"][".safetensors"].read_bytes())
    uri = f"s3://{s3_bucket}/{key}"
    settings = Settings.from_env()
    dec = SpandrelDecoder(uri, settings=settings)
    assert (dec.models[0].architecture, dec.models[0].variant) == ("ESRGAN", "realworld")
    cached = list((tmp_path / "hf-home" / "pixelrelay-checkpoints").iterdir())
    assert len(cached) == 1 and cached[0].read_bytes() == files["esrgan"][".safetensors"].read_bytes()
    mtime = cached[0].stat().st_mtime_ns
    SpandrelDecoder(uri, settings=settings)  # cached: not downloaded again
    assert cached[0].stat().st_mtime_ns == mtime
    s3_client.put_object(Bucket=s3_bucket, Key=key, Body=files["compact"][".safetensors"].read_bytes())  # a new version
    assert SpandrelDecoder(uri, settings=settings).models[0].architecture == "Compact"
    assert [p.read_bytes() for p in cached[0].parent.iterdir()] == [files["compact"][".safetensors"].read_bytes()]
    other = f"s3://{s3_bucket}/models/{uuid.uuid4().hex[:6]}/2x_swinir.pth"
    s3_client.put_object(Bucket=s3_bucket, Key=other.split("/", 3)[3], Body=files["swinir"][".pth"].read_bytes())
    out = io.StringIO()
    with redirect_stdout(out):  # `models pull` fetches an S3 checkpoint into the cache; `list` then reads it
        assert models_cli.main(["pull", f"spandrel:{other}"]) == 0
        assert models_cli.main(["list", "--check", "--decoder", f"spandrel:{uri},{other}"]) == 0
    assert re.search(rf"{re.escape(other)} +present: SwinIR x2 SR, 5.7k params, .* \(cached copy\)", out.getvalue()), (
        out.getvalue()
    )
    assert len(list(cached[0].parent.iterdir())) == 2
    big = f"s3://{s3_bucket}/models/big.pth"
    s3_client.put_object(Bucket=s3_bucket, Key="models/big.pth", Body=b"x" * 5000)
    with pytest.raises(CheckpointError, match=f"'{big}' is 5000 bytes, over the 4096-byte bound"):
        SpandrelDecoder(big, settings=settings.model_copy(update={"checkpoint_max_bytes": 4096}))
    assert len(list(cached[0].parent.iterdir())) == 2  # nothing downloaded
    with pytest.raises(ModelUnavailableError, match="no such object"):
        SpandrelDecoder(f"s3://{s3_bucket}/models/none.pth", settings=settings)


def test_hub_checkpoints_load_from_the_cache_offline(tmp_path, monkeypatch, files):
    from huggingface_hub import constants

    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "RealESRGAN_x2.pth").write_bytes(files["compact"][".pth"].read_bytes())
    (folder / "README.md").write_text("tiny")
    cache = tmp_path / "hub"
    install_in_hub_cache(folder, cache, "someone/real-esrgan")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for name in ("someone/real-esrgan/RealESRGAN_x2.pth", "someone/real-esrgan"):
        SpandrelDecoder.check_available(name)
        dec = registry.create_decoder(f"spandrel:{name}")
        assert dec.models[0].architecture == "Compact" and dec.identity().startswith(f"spandrel:{name}=sha256:")
    with pytest.raises(
        ModelUnavailableError, match="not in the Hugging Face cache.*models pull spandrel:someone/other/x.pth"
    ):
        SpandrelDecoder.check_available("someone/other/x.pth")
    out = io.StringIO()
    with redirect_stdout(out):  # `models pull`: present in the cache; offline, a missing one is reported
        assert models_cli.main(["pull", "spandrel:someone/real-esrgan/RealESRGAN_x2.pth"]) == 0
        assert models_cli.main(["pull", "spandrel:someone/other/x.pth"]) == 6
    assert "spandrel:someone/real-esrgan/RealESRGAN_x2.pth: present at " in out.getvalue()
    (cache / "models--someone--real-esrgan" / "snapshots" / ("0" * 40) / "x4.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="holds 2 weights files .*name one"):
        SpandrelDecoder("someone/real-esrgan")


# --- allowlist, submit, models list -------------------------------------------------------------


def test_local_paths_obey_the_allowlist_like_builtin_paths(files):
    path = files["compact"][".pth"]
    spec = f"spandrel:{path}"
    with pytest.raises(ConfigError, match="names a local path"):
        normalize_backends(Backends(decoder=spec))
    assert normalize_backends(Backends(decoder=spec), allowed=spec).decoder == spec
    assert normalize_backends(Backends(decoder="spandrel:org/repo/x.pth")).decoder == "spandrel:org/repo/x.pth"
    rt = Runtime(Settings.defaults().model_copy(update={"decoder": "classic"}))
    for other in (spec, "spandrel:s3://b/x.pth", "spandrel:org/repo/x.pth"):
        with pytest.raises(BackendNotAllowedError):
            rt.stage("decode", other)
    assert rt._stages == {}
    listed = Runtime(Settings.defaults().model_copy(update={"allowed_backends": spec}))
    assert listed.allowed("decode", spec) == spec
    with pytest.raises(BackendNotAllowedError):
        listed.allowed("decode", f"spandrel:{files['swinir']['.pth']}")
    own = Runtime(Settings.defaults().model_copy(update={"decoder": spec}))
    assert own.stage("decode", None).models[0].architecture == "Compact"


def test_models_list_shows_architecture_scale_and_size(files, monkeypatch):
    x2, swin = files["esrgan"][".safetensors"], files["swinir"][".pth"]
    out = io.StringIO()
    with redirect_stdout(out):
        code = models_cli.main(["list", "--decoder", f"spandrel:{x2},{swin}"])
    text = out.getvalue()
    assert code == 0, text

    def kb(path: Path) -> str:
        return f"{path.stat().st_size / 1024:.1f} KiB"

    def row(path: Path, status: str) -> re.Match | None:
        return re.search(rf"^decoder +spandrel\* +{re.escape(str(path))} +{re.escape(status)} +configured$", text, re.M)

    assert row(x2, f"present: ESRGAN x2 SR, 0.23M params, {kb(x2)}"), text
    assert row(swin, f"present: SwinIR x2 SR, 5.7k params, {kb(swin)}"), text
    out = io.StringIO()
    with redirect_stdout(out):
        code = models_cli.main(["list", "--check", "--decoder", "spandrel:/no/such/x.pth"])
    assert code == 6 and re.search(r"/no/such/x\.pth +missing +configured", out.getvalue()), out.getvalue()
