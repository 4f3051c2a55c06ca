"""hf-caption encoder on a tiny random BlipForConditionalGeneration, loaded offline."""

from __future__ import annotations

import numpy as np
import pytest

from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.stages.base import ModelUnavailableError
from pixelrelay.pipeline.stages.encoders.hf_caption import HFCaptionEncoder
from tests.pipeline.hf_fixtures import install_in_hub_cache, make_tiny_blip, tiny_model


@pytest.fixture(scope="session")
def blip(tmp_path_factory):
    return tiny_model(tmp_path_factory, make_tiny_blip, "tiny-blip")


@pytest.fixture(scope="module")
def encoder(blip):
    return HFCaptionEncoder(str(blip), batch_size=8, max_new_tokens=8)


def _images():
    rng = np.random.default_rng(0)
    out = [DecodedImage(rgb=rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(40, 50), (17, 90)]]
    out.append(DecodedImage(rgb=np.zeros((32, 32, 3), np.uint8), alpha=np.full((32, 32), 7, np.uint8)))
    out.append(DecodedImage(rgb=np.full((20, 30, 3), 255, np.uint8)))
    return out


def test_caption_joins_analysis(encoder):
    images = _images()
    descs = encoder.describe(images)
    assert len(descs) == len(images)
    for d, img in zip(descs, images, strict=True):
        assert d.caption and isinstance(d.caption, str)
        assert d.text.startswith(d.caption.rstrip("."))
        # the analysis measurements are all there
        assert d.metrics["width"] == img.width and d.metrics["height"] == img.height
        assert "noise_sigma" in d.metrics and d.noise_sigma is not None


def test_batch_equals_single_calls(encoder):
    images = _images()
    batch = encoder.caption(images)
    singles = [encoder.caption([img])[0] for img in images]
    assert batch == singles
    assert encoder.describe(images) == [encoder.describe([img])[0] for img in images]


def test_loads_hub_id_from_cache_and_missing_fails_at_startup(tmp_path, monkeypatch, blip):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailableError, match="Salesforce/blip-image-captioning-base"):
        HFCaptionEncoder.check_available(None)
    install_in_hub_cache(blip, tmp_path / "hub", "Salesforce/blip-image-captioning-base")
    HFCaptionEncoder.check_available(None)
    enc = HFCaptionEncoder(None, max_new_tokens=4)
    assert enc.model_id == "Salesforce/blip-image-captioning-base"
    assert enc.describe(_images()[:1])[0].caption
