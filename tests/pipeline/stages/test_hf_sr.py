"""hf-sr (Swin2SR) and sd-upscale decoders on tiny random models of the real classes,
loaded from save_pretrained folders and from a hub-layout cache, offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.messages import Operation, Plan
from pixelrelay.pipeline.stages.base import ModelUnavailableError
from pixelrelay.pipeline.stages.decoders.hf_sr import HFSuperResolutionDecoder
from pixelrelay.pipeline.stages.decoders.learned import TileConfig
from tests.pipeline.hf_fixtures import install_in_hub_cache, make_tiny_swin2sr, tiny_model


@pytest.fixture(scope="session")
def sr_x2(tmp_path_factory):
    return tiny_model(tmp_path_factory, make_tiny_swin2sr, "swin2SR-classical-sr-x2", upscale=2)


@pytest.fixture(scope="session")
def sr_x4(tmp_path_factory):
    return tiny_model(tmp_path_factory, make_tiny_swin2sr, "swin2SR-realworld-sr-x4", upscale=4, seed=1)


@pytest.fixture(scope="module")
def decoder(sr_x2, sr_x4):
    return HFSuperResolutionDecoder(
        f"{sr_x2},{sr_x4}", tiles=TileConfig(tile=64, overlap=32, tile_batch=4, min_tile=16)
    )


def _image(h, w, seed=0, alpha=False):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    a = rng.integers(0, 256, (h, w), dtype=np.uint8) if alpha else None
    return DecodedImage(rgb=rgb, alpha=a)


def test_output_is_exactly_scale_times_input(decoder, sr_x2, sr_x4):
    img = _image(37, 29)
    plans = [Plan(scale=1), Plan(scale=2), Plan(scale=4)]
    out = decoder.restore([img] * 3, plans)
    for res, plan in zip(out, plans, strict=True):
        assert res.rgb.shape == (37 * plan.scale, 29 * plan.scale, 3) and res.rgb.dtype == np.uint8
        assert res.alpha is None
    # x1 and x2 ran the x2 model, x4 the x4 one; x1 was downscaled back
    assert str(sr_x2) in out[0].notes[0] and "downscaled" in " ".join(out[0].notes)
    assert str(sr_x2) in out[1].notes[0] and len(out[1].notes) == 1
    assert str(sr_x4) in out[2].notes[0]


def test_model_choice_by_scale_and_degradation(tmp_path_factory, sr_x2):
    compressed = tiny_model(tmp_path_factory, make_tiny_swin2sr, "swin2SR-compressed-sr-x2", upscale=2, seed=2)
    dec = HFSuperResolutionDecoder(f"{sr_x2},{compressed}", tiles=TileConfig(tile=64, overlap=16))
    assert dec.choose(Plan(scale=2)).model_id == str(sr_x2)
    assert dec.choose(Plan(scale=2, jpeg_quality=40)).model_id == str(compressed)
    assert dec.choose(Plan(scale=2, operations=[Operation(name="deblock", strength=0.5)])).model_id == str(compressed)
    assert dec.choose(Plan(scale=2, model="compressed")).model_id == str(compressed)
    assert dec.choose(Plan(scale=2, model=str(sr_x2), jpeg_quality=40)).model_id == str(sr_x2)
    # only x2 models: a x4 plan uses x2 and bicubic for the rest, still exactly 4x
    res = dec.restore([_image(12, 10)], [Plan(scale=4)])[0]
    assert res.rgb.shape == (48, 40, 3) and "bicubic" in " ".join(res.notes)


def test_tiled_equals_untiled(decoder):
    m = decoder.models[0]
    x = torch.rand(1, 3, 80, 72)
    untiled, s1 = decoder.upscale_tensor(m, x, [Plan(scale=2)], tile=4096)
    tiled, s2 = decoder.upscale_tensor(m, x, [Plan(scale=2)], tile=48, overlap=32)
    assert s1.tile >= 80 and s2.tile == 48
    assert tiled.shape == untiled.shape == (1, 3, 160, 144)
    assert float((tiled - untiled).abs().max()) < 1e-4


def test_alpha_upscaled_and_reattached(decoder):
    img = _image(20, 16, alpha=True)
    res = decoder.restore([img], [Plan(scale=2)])[0]
    assert res.alpha.shape == (40, 32) and res.alpha.dtype == np.uint8
    assert abs(float(res.alpha.mean()) - float(img.alpha.mean())) < 8
    opaque = DecodedImage(rgb=img.rgb, alpha=np.full((20, 16), 255, np.uint8))
    assert (decoder.restore([opaque], [Plan(scale=4)])[0].alpha == 255).all()


def test_missing_models_fail_at_startup(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailableError, match=r"caidas/swin2SR-classical-sr-x4-64.*pixelrelay models pull"):
        HFSuperResolutionDecoder.check_available("caidas/swin2SR-classical-sr-x4-64")
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        HFSuperResolutionDecoder.check_available(str(tmp_path / "nope"))
    with pytest.raises(ModelUnavailableError):
        HFSuperResolutionDecoder("caidas/swin2SR-classical-sr-x2-64")  # before any model load


def test_hub_id_loads_from_cache_offline(tmp_path, monkeypatch, sr_x2):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    install_in_hub_cache(sr_x2, cache, "caidas/swin2SR-classical-sr-x2-64")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    HFSuperResolutionDecoder.check_available(None)  # the default hub id, from the cache
    dec = HFSuperResolutionDecoder(None, tiles=TileConfig(tile=64, overlap=16))
    assert dec.models[0].model_id == "caidas/swin2SR-classical-sr-x2-64"
    assert dec.restore([_image(9, 11)], [Plan(scale=2)])[0].rgb.shape == (18, 22, 3)


# --- sd-upscale (optional extra) -----------------------------------------------------------


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    pytest.importorskip("diffusers", reason="sd-upscale needs the diffusers extra: pip install 'pixelrelay[diffusers]'")
    from tests.pipeline.hf_fixtures import make_tiny_sd_upscaler

    return tiny_model(tmp_path_factory, make_tiny_sd_upscaler, "sd-x4-upscaler")


@pytest.mark.slow
def test_sd_upscale_tiny_pipeline(sd_folder):
    from pixelrelay.pipeline.stages.decoders.sd_upscale import SDUpscaleDecoder

    SDUpscaleDecoder.check_available(str(sd_folder))
    dec = SDUpscaleDecoder(str(sd_folder), steps=2, tiles=TileConfig(tile=32, overlap=16))
    img = _image(16, 16, alpha=True)
    plans = [Plan(scale=4, prompt="a photo of a cat"), Plan(scale=2, prompt="a photo of a cat")]
    out = dec.restore([img, img], plans)
    assert out[0].rgb.shape == (64, 64, 3) and out[0].alpha.shape == (64, 64)
    assert out[1].rgb.shape == (32, 32, 3) and "downscaled" in " ".join(out[1].notes)
    assert out[0].rgb.std() > 0
    # tile noise is seeded from tile content: same input, same output, whatever the batch
    again = dec.restore([img], [plans[0]])[0]
    diff = np.abs(again.rgb.astype(int) - out[0].rgb.astype(int))
    assert diff.max() <= 1, diff.max()
