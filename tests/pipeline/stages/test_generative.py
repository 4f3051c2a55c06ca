"""The generative decoders (sd-img2img, instruct-pix2pix) on tiny random diffusers pipelines
of the real classes (``hf_fixtures.make_tiny_sd`` / ``make_tiny_instruct_pix2pix``, native
size 32 px), loaded like a checkpoint folder: seeds, sizes and alpha, which plan runs what,
the native-size path keeping the source's fine detail, the out-of-memory fallback around the
real pipeline call, the safety checker, grading after the edit, pulls and the allowlist.
The shared contract (batch = singles, sizes, alpha) is ``test_contract.py``'s."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.messages import Edit, GenerativeEdit, GradingOp, Operation, Plan
from pixelrelay.pipeline.settings import Settings
from pixelrelay.pipeline.stages import registry
from pixelrelay.pipeline.stages.base import ModelUnavailableError
from pixelrelay.pipeline.stages.decoders.edits import restore_with_edits
from pixelrelay.pipeline.tiling import TileOutOfMemoryError
from tests.pipeline import hf_fixtures as fx

pytest.importorskip("diffusers", reason="the generative decoders need the diffusers extra")

from pixelrelay.pipeline.stages.decoders.generative import SafetyCheckerError, working_size  # noqa: E402
from pixelrelay.pipeline.stages.decoders.instruct_pix2pix import image_guidance  # noqa: E402
from pixelrelay.pipeline.stages.decoders.sd_img2img import img2img_steps  # noqa: E402

torch.set_num_threads(2)
SETTINGS = Settings.defaults().model_copy(update=dict(sd_steps=2, sd_min_tile=8, sd_tile_batch=2))
BUILDERS = {"sd-img2img": (fx.make_tiny_sd, "tiny-sd"), "instruct-pix2pix": (fx.make_tiny_instruct_pix2pix, "tiny-p2p")}
_DECODERS: dict[str, object] = {}


def folder(kind: str, factory):
    builder, name = BUILDERS[kind]
    return fx.tiny_model(factory, builder, name)


@pytest.fixture(params=sorted(BUILDERS))
def dec(request, tmp_path_factory):
    kind = request.param
    if kind not in _DECODERS:
        _DECODERS[kind] = registry.create_decoder(f"{kind}:{folder(kind, tmp_path_factory)}", settings=SETTINGS)
    return _DECODERS[kind]


def _image(h: int, w: int, seed: int = 0, alpha: bool = False) -> DecodedImage:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([80 + 100 * xx / w, 60 + 120 * yy / h, 140 + 0 * xx], -1)
    rgb = np.clip(smooth + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)  # fine texture on a gradient
    a = np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1)) if alpha else None
    return DecodedImage(rgb=rgb, alpha=a)


def _edit(seed: int = 7, scale: int = 1, strength: float = 0.75, **grading: float) -> Plan:
    ops = [GradingOp(name=n, strength=s) for n, s in grading.items()]
    gen = GenerativeEdit(prompt="a watercolour painting", negative_prompt="blur", strength=strength, steps=2, seed=seed)
    return Plan(scale=scale, edit=Edit(grading=ops, generative=gen))


def test_same_seed_same_output_different_seed_different_output(dec):
    image = _image(32, 64)
    a, again, other = (dec.restore([image], [_edit(seed)])[0] for seed in (7, 7, 8))
    assert np.array_equal(a.rgb, again.rgb)
    assert np.abs(a.rgb.astype(float) - other.rgb.astype(float)).mean() > 2
    assert np.abs(a.rgb.astype(float) - image.rgb.astype(float)).mean() > 2  # it edited
    assert any(f"{dec.kind}: " in n and "edit at 48x24 (native 32x32)" in n and "seed 7" in n for n in a.notes), a.notes


@pytest.mark.parametrize("scale", [1, 2])
def test_output_size_is_scale_times_input_and_alpha_is_kept(dec, scale):
    image = _image(20, 28, alpha=True)
    out = dec.restore([image], [_edit(scale=scale)])[0]
    assert out.rgb.shape == (20 * scale, 28 * scale, 3) and out.rgb.dtype == np.uint8
    assert out.alpha.shape == (20 * scale, 28 * scale)
    if scale == 1:
        assert np.array_equal(out.alpha, image.alpha)
    else:
        assert any("bicubic" in n for n in out.notes)


def test_any_output_scale_edits_at_x1_then_resamples(dec):
    """A generative decoder's one native scale is x1 (it edits, it does not upscale): an
    output target is the x1 edit resampled to the exact size (pipeline.outsize)."""
    from pixelrelay.pipeline.messages import OutputTarget

    image = _image(21, 27, alpha=True)
    plan = _edit().model_copy(update={"target": OutputTarget(scale=1.5)})
    out = restore_with_edits(dec, [image], [plan])[0]
    assert dec.native_scales() == (1,) and out.native_scale == 1
    assert out.rgb.shape == (32, 41, 3) and out.alpha.shape == (32, 41)  # 31.5 -> 32, 40.5 -> 41
    assert any("no native scale at or above x1.5 (decoder's: 1): ran x1" in n for n in out.notes), out.notes


def _highpass(x: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1)[None]
    blur = F.avg_pool2d(F.pad(t, (2, 2, 2, 2), mode="reflect"), 5, stride=1)
    return (t - blur).flatten().numpy()


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(_highpass(a), _highpass(b))[0, 1])


def test_a_large_image_is_edited_at_native_size_and_keeps_the_sources_detail(dec):
    from pixelrelay.pipeline import tensors

    image = _image(128, 128, seed=3)
    out = dec.restore([image], [_edit()])[0]
    assert out.rgb.shape == (128, 128, 3)
    assert any("edit at 32x32 (native 32x32)" in n for n in out.notes), out.notes
    # The edit alone, at the working size, brought up without the source (what an "upsample
    # the edit" decoder would return): the same seed and request on the downscaled source.
    small = tensors.to_uint8(tensors.resize(tensors.to_tensor(image.rgb), (32, 32)))
    edit = dec.restore([DecodedImage(rgb=small)], [_edit()])[0].rgb
    plain = tensors.to_uint8(tensors.resize(tensors.to_tensor(edit), (128, 128)))
    assert _corr(out.rgb, image.rgb) > 0.9  # the source's fine texture is there
    assert _corr(plain, image.rgb) < 0.3  # ...and would not be without it
    low = lambda x: tensors.resize(tensors.to_tensor(x), (16, 16)).numpy() * 255  # noqa: E731
    assert np.abs(low(out.rgb) - low(plain)).mean() < 3  # coarse content: the edit's
    assert np.abs(low(out.rgb) - low(image.rgb)).mean() > 5  # ...which differs from the source


def test_plans_without_a_generative_edit(dec):
    """No edit and no restoration: passes through untouched (no model run). Restoration
    operations: a gentle restoration request. A generative edit: its own fields, with the
    restoration terms in the negative prompt."""
    image = _image(24, 24, alpha=True)
    calls = []
    real = dec.pipe
    dec.pipe = lambda **kw: calls.append(kw) or real(**kw)
    try:
        same = dec.restore([image], [Plan()])[0]
        assert not calls and np.array_equal(same.rgb, image.rgb) and np.array_equal(same.alpha, image.alpha)
        assert "passes through" in same.notes[0]
        bigger = dec.restore([image], [Plan(scale=2)])[0]
        assert bigger.rgb.shape == (48, 48, 3) and not calls
        restored = dec.restore([image], [Plan(operations=[Operation(name="denoise", strength=0.6)])])[0]
        assert len(calls) == 1 and "restoration at" in restored.notes[0]
    finally:
        dec.pipe = real
    req = dec.request(
        Plan(operations=[Operation(name="denoise", strength=0.6), Operation(name="deblock", strength=0.2)])
    )
    assert req.what == "restoration" and req.strength == pytest.approx(0.3) and req.seed == 0
    assert "noise, grain" in req.negative and "jpeg artifacts" in req.negative and req.steps == SETTINGS.sd_steps
    if dec.kind == "instruct-pix2pix":
        assert req.prompt == "remove the noise and remove the jpeg artifacts"
    edit = dec.request(_edit().model_copy(update={"operations": [Operation(name="deblur", strength=0.5)]}))
    assert (
        edit.what == "edit" and edit.prompt == "a watercolour painting" and edit.negative == "blur, blur, out of focus"
    )
    assert edit.strength == 0.75 and edit.seed == 7


def test_parameter_mappings():
    assert image_guidance(0.5) == 1.5 and image_guidance(1.0) == 1.0 and image_guidance(0.25) == 1.75
    assert img2img_steps(30, 0.5) == 30 and img2img_steps(2, 0.25) == 4 and img2img_steps(1, 0.7) == 2
    assert working_size(1024, 768, 512) == (592, 440)  # aspect kept, multiples of 8, ~512^2
    assert working_size(64, 64, 512) == (512, 512)  # small images are drawn at native size too
    assert working_size(10, 4000, 512) == (24, 1024)  # bounded sides


class _MemoryLimit:
    """Wraps the decoder's real pipeline: a call with more than ``limit`` image pixels in its
    batch raises torch.OutOfMemoryError (simulated device memory; the results stay real)."""

    def __init__(self, dec, limit: int) -> None:
        self.dec, self.limit, self.real = dec, limit, dec.pipe
        self.refused: list[tuple[int, ...]] = []

    def __call__(self, **kwargs):
        shape = tuple(kwargs["image"].shape)
        if shape[0] * shape[2] * shape[3] > self.limit:
            self.refused.append(shape)
            raise torch.OutOfMemoryError(f"simulated: out of memory for {shape}")
        return self.real(**kwargs)

    def __enter__(self):
        self.dec.pipe = self
        return self

    def __exit__(self, *exc) -> None:
        self.dec.pipe = self.real


@pytest.fixture
def img2img(tmp_path_factory):
    """One decoder for the machinery both share (``GenerativeDecoder``): out of memory, safety."""
    if "sd-img2img" not in _DECODERS:
        spec = f"sd-img2img:{folder('sd-img2img', tmp_path_factory)}"
        _DECODERS["sd-img2img"] = registry.create_decoder(spec, settings=SETTINGS)
    return _DECODERS["sd-img2img"]


@pytest.mark.slow
def test_out_of_memory_halves_the_batch_then_the_working_size(img2img, monkeypatch):
    dec = img2img
    monkeypatch.setattr("pixelrelay.pipeline.tiling.empty_cache", lambda: None)  # gc is slow
    images = [_image(32, 32, seed=s) for s in (1, 2)]
    plans = [_edit(seed=1), _edit(seed=2)]
    reference = dec.restore(images, plans)
    with _MemoryLimit(dec, 32 * 32) as limit:  # one item fits, two do not
        got = dec.restore(images, plans)
    assert limit.refused == [(2, 3, 32, 32)]
    assert any("out of memory, finished with batch 1, working side 32px" in n for n in got[0].notes), got[0].notes
    for a, b in zip(reference, got, strict=True):
        assert np.abs(a.rgb.astype(int) - b.rgb.astype(int)).max() <= 1
    with _MemoryLimit(dec, 300):  # not even one at native size: the working side is halved
        got = dec.restore(images, plans)
    assert got[0].rgb.shape == (32, 32, 3) and any("edit at 16x16" in n for n in got[0].notes), got[0].notes
    assert any("working side 16px" in n for n in got[1].notes)
    assert any("seed 1" in n for n in got[0].notes) and any("seed 2" in n for n in got[1].notes)  # each its own
    with _MemoryLimit(dec, 10), pytest.raises(TileOutOfMemoryError, match="minimum"):
        dec.restore(images[:1], plans[:1])


def test_an_output_the_safety_checker_flags_fails(img2img):
    dec = img2img
    real = dec.pipe

    def flagging(**kwargs):
        out = real(**kwargs)
        out.nsfw_content_detected = [True] * len(out.images)
        return out

    dec.pipe = flagging
    try:
        with pytest.raises(SafetyCheckerError, match="flagged by the model's safety checker"):
            dec.restore([_image(16, 16)], [_edit()])
    finally:
        dec.pipe = real


def test_grading_applies_after_the_edit_and_generative_plans_reach_it(dec):
    image = _image(24, 32, alpha=True)
    (out,) = restore_with_edits(dec, [image], [_edit(grayscale=1.0)])
    rgb = out.rgb.astype(int)
    assert np.abs(rgb[..., 0] - rgb[..., 2]).max() <= 1  # gray after the (colourful) edit
    assert any(n.startswith("graded: grayscale 1; generative edit") for n in out.notes), out.notes
    assert np.array_equal(out.alpha, image.alpha)
    classic = registry.create_decoder("classic")
    (refused,) = restore_with_edits(classic, [image], [_edit()])
    assert isinstance(refused, Exception) and "sd-img2img, instruct-pix2pix" in str(refused)


def test_models_pull_list_and_allowlist(tmp_path, monkeypatch, tmp_path_factory):
    from huggingface_hub import constants

    from pixelrelay.pipeline.stages.decoders.sd_img2img import SDImg2ImgDecoder

    cls = registry.backend_class("decoder", "instruct-pix2pix")
    assert cls.generative and not cls.grades and cls.extra == "diffusers"
    assert registry.models_for("decoder", "sd-img2img") == ["stable-diffusion-v1-5/stable-diffusion-v1-5"]
    assert registry.models_for("decoder", "instruct-pix2pix") == ["timbrooks/instruct-pix2pix"]
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailableError, match="models pull sd-img2img"):
        SDImg2ImgDecoder.check_available(None)
    with pytest.raises(ModelUnavailableError, match="HF_HUB_OFFLINE"):
        SDImg2ImgDecoder.pull_model("stable-diffusion-v1-5/stable-diffusion-v1-5")
    fx.install_in_hub_cache(folder("sd-img2img", tmp_path_factory), tmp_path / "hub", SDImg2ImgDecoder.default_model)
    SDImg2ImgDecoder.check_available(None)  # present now, from the cache
    assert SDImg2ImgDecoder.pull_model(SDImg2ImgDecoder.default_model).endswith("0" * 40)
    # a spec naming a local folder: allowed only where listed (submit refuses it otherwise)
    local = f"sd-img2img:{tmp_path}/models/sd"
    assert registry.names_local_path(local) and not registry.names_local_path("sd-img2img")
    allowed = registry.parse_allowlist("sd-img2img instruct-pix2pix:org/p2p")
    assert registry.spec_allowed("decoder", "sd-img2img", allowed)
    assert not registry.spec_allowed("decoder", local, allowed)
    assert registry.spec_allowed("decoder", "instruct-pix2pix:org/p2p", allowed)
    assert not registry.spec_allowed("decoder", "instruct-pix2pix", allowed)  # the default model is not listed
