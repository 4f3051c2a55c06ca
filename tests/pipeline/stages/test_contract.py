"""One contract for every backend the registry knows, of every stage.

Backends are collected from the registry, so a newly registered backend is covered without
touching this file: it is built from its plain spec (``KIND``) and skipped, with the reason,
only when it cannot be built here (its model is not available). Backends with weights that
are not shipped are built from tiny random models of their real classes, saved and loaded
like hub checkpoints (``hf_fixtures``), through the registry's ``create_*`` with explicit
settings (small tiles, so the test images really run tiled).

Every stage: a batch gives what single calls give (within each backend's tolerance); an
empty batch gives an empty list. Planners and decoders refuse a batch whose inputs do not
pair up (``BatchMismatchError``). Decoders: output exactly ``scale`` x the input, HxWx3
uint8; alpha in means alpha out, of the output size (a uniform alpha stays exact). Learned
decoders: under a simulated device-memory limit the item still completes, with a note, and
fails with ``TileOutOfMemoryError`` only when one smallest tile does not fit; reduced
precision (bf16, what runs on GPU) stays close to fp32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.messages import Description, JobOptions, Operation, Plan
from pixelrelay.pipeline.settings import Settings
from pixelrelay.pipeline.stages import registry
from pixelrelay.pipeline.stages.base import BatchMismatchError, ModelUnavailableError
from pixelrelay.pipeline.stages.decoders.learned import LearnedDecoder
from pixelrelay.pipeline.tiling import TileOutOfMemoryError
from tests.pipeline import hf_fixtures as fx

torch.set_num_threads(2)

TILE = 32  # every learned decoder's tile here: the 40x36 test image runs as several tiles
SETTINGS = Settings.defaults().model_copy(
    update=dict(
        builtin_tile=TILE,
        builtin_overlap=16,
        builtin_tile_batch=4,
        builtin_min_tile=8,
        sr_tile=TILE,
        sr_overlap=16,
        sr_tile_batch=4,
        sr_min_tile=8,
        sd_tile=TILE,
        sd_overlap=16,
        sd_tile_batch=4,
        sd_min_tile=8,
        sd_steps=1,  # sd_*: the generative ones too
    )
)
# Largest per-pixel difference (uint8) allowed between a batched and a single call.
BATCH_TOLERANCE = {"decoder": 1}
# Mean absolute difference (uint8) allowed between bf16 and fp32 outputs.
BF16_MEAN_TOLERANCE = 4.0


def _sd_spec(factory) -> str:
    pytest.importorskip("diffusers", reason="sd-upscale needs the diffusers extra: pip install 'pixelrelay[diffusers]'")
    return f"sd-upscale:{fx.tiny_model(factory, fx.make_tiny_sd_upscaler, 'sd-x4-upscaler')}"


def _generative_spec(kind: str, builder, name: str):
    def spec(factory) -> str:
        pytest.importorskip(
            "diffusers", reason=f"{kind} needs the diffusers extra: pip install 'pixelrelay[diffusers]'"
        )
        return f"{kind}:{fx.tiny_model(factory, builder, name)}"

    return spec


def _sr_spec(factory) -> str:
    x2 = fx.tiny_model(factory, fx.make_tiny_swin2sr, "swin2SR-classical-sr-x2", upscale=2)
    x4 = fx.tiny_model(factory, fx.make_tiny_swin2sr, "swin2SR-realworld-sr-x4", upscale=4, seed=1)
    return f"hf-sr:{x2},{x4}"


def _spandrel_spec(factory) -> str:
    pytest.importorskip(
        "spandrel", reason="the spandrel decoder needs the spandrel extra: pip install 'pixelrelay[spandrel]'"
    )
    from tests.pipeline import spandrel_fixtures as sf

    x2 = sf.checkpoint(factory, "compact", "realesr-compact-x2.pth", scale=2)
    x4 = sf.checkpoint(factory, "esrgan", "ESRGAN-x4.safetensors", scale=4, seed=1)
    return f"spandrel:{x2},{x4}"


# (stage, kind) -> spec builder, for backends whose real model is not available offline.
TINY_SPECS = {
    ("encoder", "hf-caption"): lambda f: f"hf-caption:{fx.tiny_model(f, fx.make_tiny_blip, 'tiny-blip')}",
    ("planner", "hf-llm"): lambda f: f"hf-llm:{fx.tiny_model(f, fx.make_tiny_qwen2, 'tiny-qwen2')}",
    ("decoder", "hf-sr"): _sr_spec,
    ("decoder", "sd-upscale"): _sd_spec,
    ("decoder", "spandrel"): _spandrel_spec,
    ("decoder", "sd-img2img"): _generative_spec("sd-img2img", fx.make_tiny_sd, "tiny-sd"),
    ("decoder", "instruct-pix2pix"): _generative_spec("instruct-pix2pix", fx.make_tiny_instruct_pix2pix, "tiny-p2p"),
}
CREATE = {"encoder": registry.create_encoder, "planner": registry.create_planner, "decoder": registry.create_decoder}
_BUILT: dict[tuple[str, str], object] = {}


def build(stage: str, kind: str, factory):
    """The backend, built once per session through the registry (skips when it can't be)."""
    key = (stage, kind)
    if key not in _BUILT:
        spec = TINY_SPECS[key](factory) if key in TINY_SPECS else kind
        try:
            _BUILT[key] = CREATE[stage](spec, settings=SETTINGS)
        except ModelUnavailableError as exc:
            pytest.skip(f"{stage} {kind} cannot be built here and has no tiny model: {exc}")
    return _BUILT[key]


SLOW_BACKENDS = {
    "hf-caption",
    "hf-llm",
    "hf-sr",
    "sd-upscale",
    "sd-img2img",
    "instruct-pix2pix",
}  # tiny HF models: seconds


def _params(stage: str) -> list:
    return [
        pytest.param(kind, id=f"{stage}-{kind}", marks=[pytest.mark.slow] if kind in SLOW_BACKENDS else [])
        for kind in registry.known_backends(stage)
    ]


def _images(seed: int = 0) -> list[DecodedImage]:
    rng = np.random.default_rng(seed)
    rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    return [
        DecodedImage(rgb=rgb(40, 36), alpha=rng.integers(0, 256, (40, 36), dtype=np.uint8)),
        DecodedImage(rgb=rgb(40, 36)),
        DecodedImage(rgb=rgb(9, 14), alpha=np.full((9, 14), 200, np.uint8)),
    ]


def _plans() -> list[Plan]:
    noisy = [Operation(name="denoise", strength=0.6)]
    return [
        Plan(scale=2),
        Plan(scale=2, noise_sigma=12, operations=noisy, prompt="a photo"),
        Plan(scale=4, noise_sigma=12, operations=noisy),
    ]


# --- every stage ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", _params("encoder"))
def test_encoder_batch_equals_singles(kind, tmp_path_factory):
    enc = build("encoder", kind, tmp_path_factory)
    images = _images()
    batch = enc.describe(images)
    assert len(batch) == len(images) and enc.describe([]) == []
    for image, got in zip(images, batch, strict=True):
        single = enc.describe([image])[0]
        assert got.caption == single.caption
        for field in ("noise_sigma", "blur_sigma", "jpeg_quality", "downscaled"):
            assert getattr(got, field) == pytest.approx(getattr(single, field), abs=0.05), field
        assert got.metrics.keys() == single.metrics.keys()
        assert got.metrics == pytest.approx(single.metrics, abs=0.05)


DESCRIPTIONS = [
    Description(text="640x480 image, heavy noise (sigma~20)", noise_sigma=20.0, blur_sigma=0.4),
    Description(text="a sharp clean photo", noise_sigma=1.0, blur_sigma=0.2, caption="a dog on a couch"),
    Description(text="blocky JPEG", noise_sigma=3.0, jpeg_quality=35.0),
]
OPTIONS = [
    JobOptions(task="upscale", scale=2),
    JobOptions(task="restore", instruction="no sharpening"),
    JobOptions(task="upscale", scale=4, instruction="gently"),
]


@pytest.mark.parametrize("kind", _params("planner"))
def test_planner_batch_equals_singles_and_refuses_mismatch(kind, tmp_path_factory):
    planner = build("planner", kind, tmp_path_factory)
    batch = planner.plan(DESCRIPTIONS, OPTIONS)
    assert batch == [planner.plan([d], [o])[0] for d, o in zip(DESCRIPTIONS, OPTIONS, strict=True)]
    assert planner.plan([], []) == []
    with pytest.raises(BatchMismatchError, match="3 descriptions but 2"):
        planner.plan(DESCRIPTIONS, OPTIONS[:2])


# --- decoders ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", _params("decoder"))
def test_decoder_batch_equals_singles_and_refuses_mismatch(kind, tmp_path_factory):
    dec = build("decoder", kind, tmp_path_factory)
    images, plans = _images(), _plans()
    batch = dec.restore(images, plans)
    assert len(batch) == len(images) and dec.restore([], []) == []
    for image, plan, got in zip(images, plans, batch, strict=True):
        single = dec.restore([image], [plan])[0]
        diff = np.abs(single.rgb.astype(int) - got.rgb.astype(int))
        assert diff.max() <= BATCH_TOLERANCE["decoder"], (plan, diff.max())
        assert (single.alpha is None) == (got.alpha is None)
        if got.alpha is not None:
            assert np.array_equal(single.alpha, got.alpha)
    with pytest.raises(BatchMismatchError, match="3 images but 2 plans"):
        dec.restore(images, plans[:2])


@pytest.mark.parametrize("scale", [1, 2, 4])
@pytest.mark.parametrize("kind", _params("decoder"))
def test_decoder_output_size_dtype_and_alpha(kind, scale, tmp_path_factory):
    dec = build("decoder", kind, tmp_path_factory)
    images = _images(1) + [DecodedImage(rgb=np.full((1, 1, 3), 77, np.uint8), alpha=np.zeros((1, 1), np.uint8))]
    plans = [p.model_copy(update={"scale": scale}) for p in _plans()] + [Plan(scale=scale)]
    for image, got in zip(images, dec.restore(images, plans), strict=True):
        h, w = image.height * scale, image.width * scale
        assert got.rgb.shape == (h, w, 3) and got.rgb.dtype == np.uint8
        if image.alpha is None:
            assert got.alpha is None
            continue
        assert got.alpha.shape == (h, w) and got.alpha.dtype == np.uint8
        if image.alpha.min() == image.alpha.max():
            assert (got.alpha == image.alpha.flat[0]).all()  # uniform alpha stays exact
        else:
            assert abs(float(got.alpha.mean()) - float(image.alpha.mean())) < 8


def _learned(kind: str, factory) -> LearnedDecoder:
    dec = build("decoder", kind, factory)
    if not isinstance(dec, LearnedDecoder):
        pytest.skip(f"decoder {kind} is not a LearnedDecoder: it runs no tiled model")
    return dec


class _MemoryLimit:
    """Wraps a decoder's tile-batch forward: raises torch.OutOfMemoryError when a tile batch
    holds more than ``limit`` input pixels (simulates device memory; results stay real)."""

    def __init__(self, dec: LearnedDecoder, limit: int) -> None:
        self.dec, self.limit, self.real = dec, limit, dec.forward
        self.refused: list[tuple[int, ...]] = []

    def __call__(self, m, x, plans, items):
        if x.shape[0] * x.shape[-2] * x.shape[-1] > self.limit:
            self.refused.append(tuple(x.shape))
            raise torch.OutOfMemoryError(f"simulated: out of memory for tiles {tuple(x.shape)}")
        return self.real(m, x, plans, items)

    def __enter__(self) -> _MemoryLimit:
        self.dec.forward = self
        return self

    def __exit__(self, *exc) -> None:
        del self.dec.forward  # the class's method again


@pytest.mark.parametrize("kind", _params("decoder"))
def test_learned_decoder_out_of_memory_fallback(kind, tmp_path_factory, monkeypatch):
    dec = _learned(kind, tmp_path_factory)
    emptied = []  # the device cache is emptied after every OOM (here: counted, not run; gc is slow)
    monkeypatch.setattr("pixelrelay.pipeline.tiling.empty_cache", lambda: emptied.append(1))
    h = 16
    rgb = np.random.default_rng(2).integers(0, 256, (h, 40, 3), dtype=np.uint8)
    image, plan = DecodedImage(rgb=rgb), Plan(scale=2)  # two tiles of 16x32
    reference = dec.restore([image], [plan])[0]
    assert not any("out of memory" in n for n in reference.notes)

    with _MemoryLimit(dec, limit=h * TILE) as limit:  # one tile fits, a batch of them does not
        got = dec.restore([image], [plan])[0]
    assert limit.refused and len(emptied) == len(limit.refused) and got.rgb.shape == reference.rgb.shape
    assert any("out of memory" in n and "batch 1" in n for n in got.notes), got.notes
    assert np.abs(got.rgb.astype(int) - reference.rgb.astype(int)).max() <= BATCH_TOLERANCE["decoder"]

    with _MemoryLimit(dec, limit=(TILE // 2) ** 2):  # not even one tile: the tile is halved
        got = dec.restore([image], [plan])[0]
    assert got.rgb.shape == reference.rgb.shape
    assert any(f"tile {TILE // 2}px" in n for n in got.notes), got.notes

    with _MemoryLimit(dec, limit=4 * 4), pytest.raises(TileOutOfMemoryError, match="minimum"):
        dec.restore([image], [plan])


@pytest.mark.parametrize("kind", _params("decoder"))
def test_learned_decoder_bf16_close_to_fp32(kind, tmp_path_factory):
    """bf16 is what runs on most GPUs; the same path runs on the CPU when forced."""
    fp32 = _learned(kind, tmp_path_factory)
    assert fp32.dtype == torch.float32  # CPU: always fp32 by default
    bf16 = type(fp32)(model=fp32.model, settings=fp32.settings, dtype=torch.bfloat16)
    image, plan = _images(3)[1], _plans()[1]
    a, b = fp32.restore([image], [plan])[0].rgb, bf16.restore([image], [plan])[0].rgb
    assert a.shape == b.shape
    assert np.abs(a.astype(float) - b.astype(float)).mean() < BF16_MEAN_TOLERANCE
