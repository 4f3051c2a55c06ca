"""AnalysisEncoder: real measurements on synthetic images with known degradations."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from pipeline.imageio import DecodedImage
from pipeline.messages import Description
from pipeline.stages.encoders.analysis import AnalysisEncoder


def smooth_image(height: int = 128, width: int = 160) -> np.ndarray:
    """Slowly varying colour fields: no edges, no noise, mid-range values (no clipping)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    red = 128 + 50 * np.sin(xx / 20) * np.cos(yy / 25)
    green = 120 + 40 * np.cos(xx / 30 + yy / 40)
    blue = 110 + 30 * np.sin((xx - yy) / 35)
    return np.clip(np.stack([red, green, blue], -1), 0, 255).round().astype(np.uint8)


def photo_like(height: int = 160, width: int = 200) -> np.ndarray:
    """Smooth background with sharp-edged shapes on it."""
    image = Image.fromarray(smooth_image(height, width))
    draw = ImageDraw.Draw(image)
    draw.rectangle([20, 30, 90, 100], fill=(220, 40, 40))
    draw.ellipse([110, 20, 180, 90], fill=(30, 60, 200))
    draw.rectangle([60, 110, 170, 140], fill=(240, 240, 80))
    return np.asarray(image)


def add_noise(image: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(image + rng.normal(0.0, sigma, image.shape), 0, 255).round().astype(np.uint8)


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
    base = smooth_image()
    estimates = [describe(encoder, add_noise(base, sigma)).noise_sigma for sigma in (0, 2, 5, 10, 25, 40)]
    assert all(b > a for a, b in zip(estimates, estimates[1:])), estimates
    assert estimates[0] < 2.0  # the clean image reads ~0


@pytest.mark.parametrize("sigma", [10, 25])
def test_noise_estimate_matches_true_sigma(encoder, sigma):
    description = describe(encoder, add_noise(smooth_image(), sigma, seed=sigma))
    assert description.noise_sigma == pytest.approx(sigma, abs=2.5)
    assert description.metrics["noise_sigma"] == description.noise_sigma


def test_noise_estimate_ignores_edges(encoder):
    # Sharp shapes must not read as noise; the noisy version must.
    clean = describe(encoder, photo_like())
    noisy = describe(encoder, add_noise(photo_like(), 10))
    assert clean.noise_sigma < 2.0
    assert noisy.noise_sigma == pytest.approx(10, abs=2.5)


def test_jpeg_blocking_scores_higher_than_png(encoder):
    base = photo_like()
    png = describe(encoder, reencode(base, "PNG")).metrics["blockiness"]
    jpeg = describe(encoder, reencode(base, "JPEG", quality=10)).metrics["blockiness"]
    assert png == pytest.approx(1.0, abs=0.2)
    assert jpeg > png + 1.0
    assert "JPEG blocking" in describe(encoder, reencode(base, "JPEG", quality=10)).text


def test_blur_lowers_sharpness_and_raises_blur_sigma(encoder):
    sharp_rgb = photo_like()
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
    rgb = photo_like(40, 60)
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
    clean = describe(encoder, smooth_image())
    noisy = describe(encoder, add_noise(smooth_image(), 12))
    assert "no visible noise" in clean.text
    assert "moderate noise (sigma~12)" in noisy.text


def test_exposure_contrast_and_colour(encoder):
    dark = describe(encoder, (smooth_image() // 6).astype(np.uint8))
    bright = describe(encoder, np.full((32, 32, 3), 255, np.uint8))
    grey = describe(encoder, np.repeat(smooth_image()[..., :1], 3, axis=2))
    assert "underexposed" in dark.text and dark.metrics["brightness"] < 0.25
    assert "overexposed" in bright.text and bright.metrics["clipped_bright"] == 1.0
    assert bright.metrics["contrast"] == 0.0 and "low contrast" in bright.text
    assert grey.metrics["colourfulness"] == pytest.approx(0.0, abs=1e-6) and "greyscale" in grey.text
    vivid = np.zeros((32, 32, 3), np.uint8)
    vivid[:, :16] = (255, 0, 0)
    vivid[:, 16:] = (0, 0, 255)
    assert describe(encoder, vivid).metrics["colourfulness"] > 100
    assert "well exposed" in describe(encoder, smooth_image()).text


def test_batch_is_deterministic_and_matches_single_calls(encoder):
    images = [smooth_image(40, 50), add_noise(photo_like(), 8), np.zeros((1, 1, 3), np.uint8)]
    batch = encoder.describe([DecodedImage(rgb=im) for im in images])
    again = encoder.describe([DecodedImage(rgb=im) for im in images])
    singles = [describe(encoder, im) for im in images]
    assert batch == again == singles
