"""Weight-free image analysis encoder.

Measures each image with classic no-reference statistics (noise, blur, JPEG blocking,
exposure, contrast, colourfulness, alpha) and turns the numbers into a short sentence.
Everything is plain numpy on the CPU and fully deterministic. Measures that are undefined
for tiny images (a Laplacian of a 1x1 image, say) fall back to neutral values, never NaN.

Metric keys (all floats):
  width, height
  laplacian_var      variance of the luminance Laplacian (0-255 scale)
  sharpness          laplacian_var / (laplacian_var + 100), in [0, 1)
  blur_sigma         Gaussian blur sigma estimated at strong edges (pixels; 0 = sharp/unknown)
  edge_density       fraction of pixels that are strong edge points used for blur_sigma
                     (0 when there are too few to measure blur at all)
  noise_sigma        Immerkaer / Tai-Yang Gaussian noise sigma per channel (0-255 scale)
  blockiness         8x8 boundary vs in-block mean abs difference ratio (1.0 = none)
  brightness         mean luminance in [0, 1]
  clipped_dark       fraction of pixels with luminance <= 2
  clipped_bright     fraction of pixels with luminance >= 253
  contrast           RMS contrast (std of luminance in [0, 1])
  colourfulness      Hasler-Suesstrunk M (0-255 scale; ~0 grey, >45 colourful)
  has_alpha          1.0 when the image carries an alpha channel
  transparent_fraction   fraction of pixels with alpha == 0
  translucent_fraction   fraction of pixels with 0 < alpha < 255
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.messages import Description
from pixelrelay.pipeline.stages.base import Encoder

# Rec.601 luma weights (what JPEG uses).
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# Immerkaer's noise kernel: the difference of two Laplacians, blind to flat and linear areas.
IMMERKAER_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)
LAPLACIAN_KERNEL = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float32)
SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float32)
# Tai & Yang: leave the strongest-gradient 10% of pixels (edges, texture) out of the noise sum.
NOISE_EDGE_EXCLUSION = 0.10
SHARPNESS_HALF_POINT = 100.0  # laplacian_var giving sharpness 0.5
JPEG_BLOCK = 8
BLOCKINESS_FLOOR = 0.25  # grey levels added to both sides of the ratio so flat areas read 1.0
REBLUR_SIGMA = 1.0  # blur_sigma: re-blur with this sigma and compare edge gradients
# A perfectly sharp step, sampled and differenced, already reads as this much blur.
INTRINSIC_EDGE_SIGMA = 0.8
MIN_EDGE_POINTS = 16
EDGE_MIN_GRADIENT = 4.0  # grey levels per pixel


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float32) @ LUMA_WEIGHTS


def _filter3x3_valid(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """3x3 correlation over the interior only ('valid'); empty when the image is smaller."""
    height, width = image.shape
    out = np.zeros((max(height - 2, 0), max(width - 2, 0)), dtype=np.float32)
    if out.size == 0:
        return out
    for dy in range(3):
        for dx in range(3):
            if kernel[dy, dx]:
                out += kernel[dy, dx] * image[dy : dy + height - 2, dx : dx + width - 2]
    return out


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian with edge-replicating borders."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    taps /= taps.sum()
    padded = np.pad(image, radius, mode="edge")
    height, width = image.shape
    rows = np.zeros((height + 2 * radius, width), dtype=np.float32)
    for i, tap in enumerate(taps):
        rows += tap * padded[:, i : i + width]
    out = np.zeros((height, width), dtype=np.float32)
    for i, tap in enumerate(taps):
        out += tap * rows[i : i + height, :]
    return out


def _gradient_magnitude(image: np.ndarray) -> np.ndarray:
    """Central-difference gradient magnitude on the interior (shape H-2 x W-2)."""
    gx = (image[1:-1, 2:] - image[1:-1, :-2]) * 0.5
    gy = (image[2:, 1:-1] - image[:-2, 1:-1]) * 0.5
    return np.sqrt(gx * gx + gy * gy)


def _local_max_3x3(values: np.ndarray) -> np.ndarray:
    """Boolean mask of pixels that are the maximum of their 3x3 neighbourhood."""
    padded = np.pad(values, 1, mode="constant", constant_values=-np.inf)
    height, width = values.shape
    neighbourhood_max = np.full_like(values, -np.inf)
    for dy in range(3):
        for dx in range(3):
            np.maximum(neighbourhood_max, padded[dy : dy + height, dx : dx + width], out=neighbourhood_max)
    return values >= neighbourhood_max


def noise_sigma(rgb: np.ndarray, luma: np.ndarray) -> float:
    """Immerkaer's fast noise estimator with Tai & Yang's edge exclusion (0-255 scale).

    Estimated per colour channel and averaged, so it reads the per-channel Gaussian sigma
    (what denoisers are conditioned on) whether the noise is colour or grey. Pixels whose
    luminance gradient is in the top 10% (edges, texture) are left out of the sums.
    """
    height, width = luma.shape
    if height < 3 or width < 3:
        return 0.0
    gradient = np.abs(_filter3x3_valid(luma, SOBEL_X)) + np.abs(_filter3x3_valid(luma, SOBEL_X.T))
    keep = np.ones_like(gradient, dtype=bool)
    if gradient.size >= 10:
        keep = gradient <= np.quantile(gradient, 1.0 - NOISE_EDGE_EXCLUSION)
        if not keep.any():
            keep[...] = True
    sigmas = []
    for channel in range(3):
        response = np.abs(_filter3x3_valid(rgb[..., channel].astype(np.float32), IMMERKAER_KERNEL))
        sigmas.append(math.sqrt(math.pi / 2.0) * response[keep].mean(dtype=np.float64) / 6.0)
    return float(np.mean(sigmas))


def laplacian_variance(luma: np.ndarray) -> float:
    response = _filter3x3_valid(luma, LAPLACIAN_KERNEL)
    return float(response.var(dtype=np.float64)) if response.size else 0.0


def edge_blur_sigma(luma: np.ndarray, noise: float) -> tuple[float, float]:
    """Blur sigma from strong edges (Zhuo & Sim's re-blur gradient ratio).

    At a step edge blurred by sigma, re-blurring with sigma0 lowers the peak gradient by
    R = sqrt(sigma^2 + sigma0^2) / sigma, so sigma = sigma0 / sqrt(R^2 - 1). We take the median
    over strong local-maximum edge points and remove the sampling's own intrinsic blur.
    Returns (blur_sigma, edge_density); (0, 0) when there are too few edges to tell.
    """
    margin = 5  # keep away from the borders, where the re-blur sees replicated pixels
    height, width = luma.shape
    if height <= 2 * margin + 2 or width <= 2 * margin + 2:
        return 0.0, 0.0
    reblurred = _gaussian_blur(luma, REBLUR_SIGMA)
    gradient = _gradient_magnitude(luma)[margin:-margin, margin:-margin]
    gradient_reblurred = _gradient_magnitude(reblurred)[margin:-margin, margin:-margin]
    # Strong enough to stand clear of the noise (luminance noise is ~0.67x the per-channel
    # sigma for colour noise), and a ridge of the gradient.
    threshold = max(EDGE_MIN_GRADIENT, 2.5 * noise)
    edges = (gradient >= threshold) & _local_max_3x3(gradient)
    count = int(edges.sum())
    if count < MIN_EDGE_POINTS:
        return 0.0, 0.0
    density = count / float(height * width)
    ratio = gradient[edges] / np.maximum(gradient_reblurred[edges], 1e-6)
    ratio_sq_minus_one = np.maximum(ratio.astype(np.float64) ** 2 - 1.0, 1e-4)
    measured = REBLUR_SIGMA / np.sqrt(ratio_sq_minus_one)
    sigma = float(np.median(np.minimum(measured, 20.0)))
    return math.sqrt(max(sigma * sigma - INTRINSIC_EDGE_SIGMA**2, 0.0)), density


def _boundary_ratios(profile: np.ndarray) -> list[float]:
    """Per block boundary: mean abs difference across it vs the median inside its two blocks.

    ``profile[x]`` is the mean abs difference between columns x and x+1. Boundaries sit at
    x = 8k-1. Comparing each boundary with its own neighbourhood, then taking the median over
    boundaries, means a few real edges that happen to fall on the grid don't read as blocking.
    """
    ratios = []
    for boundary in range(JPEG_BLOCK - 1, profile.size, JPEG_BLOCK):
        lo, hi = max(0, boundary - JPEG_BLOCK + 1), min(profile.size, boundary + JPEG_BLOCK)
        inside = np.concatenate([profile[lo:boundary], profile[boundary + 1 : hi]])
        if inside.size == 0:
            continue
        ratios.append(
            (float(profile[boundary]) + BLOCKINESS_FLOOR) / (float(np.median(inside)) + BLOCKINESS_FLOOR)
        )
    return ratios


def blockiness(luma: np.ndarray) -> float:
    """JPEG 8x8 blocking: >1 when differences across block boundaries beat those inside."""
    ratios: list[float] = []
    if luma.shape[1] > JPEG_BLOCK:
        ratios += _boundary_ratios(np.abs(np.diff(luma, axis=1)).mean(axis=0, dtype=np.float64))
    if luma.shape[0] > JPEG_BLOCK:
        ratios += _boundary_ratios(np.abs(np.diff(luma, axis=0)).mean(axis=1, dtype=np.float64))
    return float(np.median(ratios)) if ratios else 1.0


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler & Suesstrunk (2003) colourfulness on a 0-255 scale; rgb is N x 3."""
    if rgb.shape[0] == 0:
        return 0.0
    red, green, blue = (rgb[:, i].astype(np.float64) for i in range(3))
    rg = red - green
    yb = 0.5 * (red + green) - blue
    spread = math.sqrt(rg.var() + yb.var())
    mean = math.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    return float(spread + 0.3 * mean)


def measure(image: DecodedImage) -> dict[str, float]:
    """All metrics for one image; see the module docstring for the keys."""
    rgb = image.rgb
    height, width = rgb.shape[:2]
    luma = _luminance(rgb)
    # Global statistics skip fully transparent pixels, whose colour is usually junk.
    visible = np.ones((height, width), dtype=bool)
    if image.alpha is not None and (image.alpha > 0).any():
        visible = image.alpha > 0
    visible_luma = luma[visible].astype(np.float64)

    noise = noise_sigma(rgb, luma)
    lap_var = laplacian_variance(luma)
    blur, edge_density = edge_blur_sigma(luma, noise)
    metrics = {
        "width": float(width),
        "height": float(height),
        "laplacian_var": lap_var,
        "sharpness": lap_var / (lap_var + SHARPNESS_HALF_POINT),
        "blur_sigma": blur,
        "edge_density": edge_density,
        "noise_sigma": noise,
        "blockiness": blockiness(luma),
        "brightness": float(visible_luma.mean() / 255.0),
        "clipped_dark": float((visible_luma <= 2.0).mean()),
        "clipped_bright": float((visible_luma >= 253.0).mean()),
        "contrast": float(visible_luma.std() / 255.0),
        "colourfulness": colourfulness(rgb[visible]),
        "has_alpha": 0.0,
        "transparent_fraction": 0.0,
        "translucent_fraction": 0.0,
    }
    if image.alpha is not None:
        alpha = image.alpha
        metrics["has_alpha"] = 1.0
        metrics["transparent_fraction"] = float((alpha == 0).mean())
        metrics["translucent_fraction"] = float(((alpha > 0) & (alpha < 255)).mean())
    # Belt and braces: nothing undefined ever leaves the encoder.
    return {key: (value if math.isfinite(value) else 0.0) for key, value in metrics.items()}


def describe_metrics(metrics: dict[str, float], is_grey: bool = False) -> str:
    """A short sentence from the metrics, e.g. '640x480 image, sharp, moderate noise (sigma~12)'."""
    parts = [f"{int(metrics['width'])}x{int(metrics['height'])} image"]

    blur = metrics["blur_sigma"]
    if metrics["edge_density"] == 0.0:
        parts.append("smooth, few edges")
    elif blur >= 1.5:
        parts.append(f"blurry (blur sigma~{blur:.1f})")
    elif blur >= 1.0:
        parts.append("slightly soft")
    else:
        parts.append("sharp")

    noise = metrics["noise_sigma"]
    if noise >= 18:
        parts.append(f"heavy noise (sigma~{noise:.0f})")
    elif noise >= 6:
        parts.append(f"moderate noise (sigma~{noise:.0f})")
    elif noise >= 2.5:
        parts.append(f"slight noise (sigma~{noise:.0f})")
    else:
        parts.append("no visible noise")

    blocks = metrics["blockiness"]
    if blocks >= 2.5:
        parts.append("strong JPEG blocking")
    elif blocks >= 1.8:
        parts.append("visible JPEG blocking")

    brightness = metrics["brightness"]
    if brightness < 0.25 or metrics["clipped_dark"] > 0.25:
        parts.append("underexposed")
    elif brightness > 0.75 or metrics["clipped_bright"] > 0.25:
        parts.append("overexposed")
    else:
        parts.append("well exposed")

    contrast = metrics["contrast"]
    parts.append("low contrast" if contrast < 0.12 else "high contrast" if contrast > 0.3 else "normal contrast")

    colour = metrics["colourfulness"]
    if is_grey:
        parts.append("greyscale")
    else:
        parts.append("muted colours" if colour < 15 else "moderately colourful" if colour < 45 else "colourful")

    if metrics["has_alpha"]:
        transparent = metrics["transparent_fraction"] + metrics["translucent_fraction"]
        parts.append("has transparency" if transparent > 0 else "opaque alpha channel")
    return ", ".join(parts)


class AnalysisEncoder(Encoder):
    """Describes images by measuring them; no model, no weights."""

    kind = "analysis"

    def describe(self, images: Sequence[DecodedImage]) -> list[Description]:
        descriptions = []
        for image in images:
            metrics = measure(image)
            rgb = image.rgb
            is_grey = bool(
                (np.abs(rgb[..., 0].astype(np.int16) - rgb[..., 1]) <= 1).all()
                and (np.abs(rgb[..., 1].astype(np.int16) - rgb[..., 2]) <= 1).all()
            )
            descriptions.append(
                Description(
                    text=describe_metrics(metrics, is_grey=is_grey),
                    metrics=metrics,
                    noise_sigma=metrics["noise_sigma"],
                )
            )
        return descriptions
