"""AnalysisEncoder: real measurements on synthetic images with known degradations."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageFilter

from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.messages import Description
from pixelrelay.pipeline.stages.encoders.analysis import AnalysisEncoder
from tests.images import add_noise, clean_photo, smooth_field


def reencode(image: np.ndarray, fmt: str, **kwargs) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt, **kwargs)
    return np.asarray(Image.open(buffer).convert("RGB"))


@pytest.fixture(scope="module")
def encoder() -> AnalysisEncoder:
    return AnalysisEncoder()


def describe(encoder: AnalysisEncoder, rgb: np.ndarray, alpha: np.ndarray | None = None) -> Description:
    (description,) = encoder.describe([DecodedImage(rgb=rgb, alpha=alpha)])
    return description


def test_noise_estimate_rises_monotonically_with_added_noise(encoder):
    base = smooth_field(128, 160)
    estimates = [describe(encoder, add_noise(base, sigma)).noise_sigma for sigma in (0, 2, 5, 10, 25, 40)]
    assert all(b > a for a, b in zip(estimates, estimates[1:], strict=False)), estimates
    assert estimates[0] < 2.0  # the clean image reads ~0


@pytest.mark.parametrize("sigma", [10, 25])
def test_noise_estimate_matches_true_sigma(encoder, sigma):
    description = describe(encoder, add_noise(smooth_field(128, 160), sigma, seed=sigma))
    assert description.noise_sigma == pytest.approx(sigma, abs=2.5)
    assert description.metrics["noise_sigma"] == description.noise_sigma


def test_noise_estimate_ignores_edges(encoder):
    # Sharp shapes must not read as noise; the noisy version must.
    clean = describe(encoder, clean_photo(160, 200))
    noisy = describe(encoder, add_noise(clean_photo(160, 200), 10))
    assert clean.noise_sigma < 2.0
    assert noisy.noise_sigma == pytest.approx(10, abs=2.5)


def test_jpeg_blocking_scores_higher_than_png(encoder):
    base = clean_photo(160, 200)
    png = describe(encoder, reencode(base, "PNG")).metrics["blockiness"]
    jpeg = describe(encoder, reencode(base, "JPEG", quality=10)).metrics["blockiness"]
    assert png == pytest.approx(1.0, abs=0.2)
    assert jpeg > png + 1.0
    assert "JPEG blocking" in describe(encoder, reencode(base, "JPEG", quality=10)).text


def test_blur_lowers_sharpness_and_raises_blur_sigma(encoder):
    sharp_rgb = clean_photo(160, 200)
    blurred_rgb = np.asarray(Image.fromarray(sharp_rgb).filter(ImageFilter.GaussianBlur(2.5)))
    sharp, blurred = describe(encoder, sharp_rgb).metrics, describe(encoder, blurred_rgb).metrics
    assert blurred["laplacian_var"] < sharp["laplacian_var"]
    assert blurred["sharpness"] < sharp["sharpness"]
    assert sharp["blur_sigma"] < 1.0
    assert blurred["blur_sigma"] == pytest.approx(2.5, abs=0.8)
    assert "blurry" in describe(encoder, blurred_rgb).text


@pytest.mark.parametrize("height,width", [(1, 1), (2, 3), (3, 2), (5, 5), (1, 9), (9, 1), (10, 10)])
@pytest.mark.parametrize("with_alpha", [False, True])
def test_tiny_images_give_finite_metrics(encoder, height, width, with_alpha):
    rng = np.random.default_rng(height * 100 + width)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (height, width), dtype=np.uint8) if with_alpha else None
    description = describe(encoder, rgb, alpha)
    assert all(math.isfinite(v) for v in description.metrics.values()), description.metrics
    assert description.metrics["width"] == width and description.metrics["height"] == height
    assert description.text.startswith(f"{width}x{height} image")
    assert description.noise_sigma is not None and math.isfinite(description.noise_sigma)
    Description.model_validate_json(description.model_dump_json())


def test_alpha_is_measured(encoder):
    rgb = clean_photo(40, 60)
    alpha = np.full((40, 60), 255, np.uint8)
    alpha[:, :30] = 0  # left half fully transparent
    alpha[:10, 30:] = 128  # a translucent strip
    description = describe(encoder, rgb, alpha)
    assert description.metrics["has_alpha"] == 1.0
    assert description.metrics["transparent_fraction"] == pytest.approx(0.5)
    assert description.metrics["translucent_fraction"] == pytest.approx(10 * 30 / (40 * 60))
    assert "has transparency" in description.text

    opaque = describe(encoder, rgb, np.full((40, 60), 255, np.uint8))
    assert opaque.metrics["transparent_fraction"] == 0.0 and "opaque alpha" in opaque.text
    no_alpha = describe(encoder, rgb)
    assert no_alpha.metrics["has_alpha"] == 0.0 and "transparen" not in no_alpha.text


def test_text_mentions_noise_only_when_noisy(encoder):
    clean = describe(encoder, smooth_field(128, 160))
    noisy = describe(encoder, add_noise(smooth_field(128, 160), 12))
    assert "no visible noise" in clean.text
    assert "moderate noise (sigma~12)" in noisy.text


def test_exposure_contrast_and_colour(encoder):
    dark = describe(encoder, (smooth_field(128, 160) // 6).astype(np.uint8))
    bright = describe(encoder, np.full((32, 32, 3), 255, np.uint8))
    grey = describe(encoder, np.repeat(smooth_field(128, 160)[..., :1], 3, axis=2))
    assert "underexposed" in dark.text and dark.metrics["brightness"] < 0.25
    assert "overexposed" in bright.text and bright.metrics["clipped_bright"] == 1.0
    assert bright.metrics["contrast"] == 0.0 and "low contrast" in bright.text
    assert grey.metrics["colourfulness"] == pytest.approx(0.0, abs=1e-6) and "greyscale" in grey.text
    vivid = np.zeros((32, 32, 3), np.uint8)
    vivid[:, :16] = (255, 0, 0)
    vivid[:, 16:] = (0, 0, 255)
    assert describe(encoder, vivid).metrics["colourfulness"] > 100
    assert "well exposed" in describe(encoder, smooth_field(128, 160)).text


def test_batch_is_deterministic_and_matches_single_calls(encoder):
    images = [smooth_field(40, 50), add_noise(clean_photo(160, 200), 8), np.zeros((1, 1, 3), np.uint8)]
    batch = encoder.describe([DecodedImage(rgb=im) for im in images])
    again = encoder.describe([DecodedImage(rgb=im) for im in images])
    singles = [describe(encoder, im) for im in images]
    assert batch == again == singles
