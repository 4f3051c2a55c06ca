"""Weight-free image analysis encoder: classic no-reference statistics, as a short sentence.

Plain numpy, deterministic; a measure undefined on a tiny image falls back to a neutral
value, never NaN. With a pixel budget (``measure(image, max_pixels)``) a larger image is
sampled on spread 8-aligned tiles and a strided grid.

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
from collections.abc import Sequence

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
TILE = 128  # side of the tiles a pixel budget samples local statistics on


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


def _immerkaer_abs(channel: np.ndarray) -> np.ndarray:
    """|Immerkaer response| on the interior; the kernel is separable, [1,-2,1] x [1,-2,1]."""
    rows = channel[:-2] - 2.0 * channel[1:-1] + channel[2:]
    return np.abs(rows[:, :-2] - 2.0 * rows[:, 1:-1] + rows[:, 2:])


def _sobel_abs_sum(luma: np.ndarray) -> np.ndarray:
    """|Sobel x| + |Sobel y| on the interior (each kernel is separable, [1,2,1] x [-1,0,1])."""
    smooth_rows = luma[:-2] + 2.0 * luma[1:-1] + luma[2:]
    smooth_cols = luma[:, :-2] + 2.0 * luma[:, 1:-1] + luma[:, 2:]
    out = np.abs(smooth_rows[:, 2:] - smooth_rows[:, :-2])
    out += np.abs(smooth_cols[2:] - smooth_cols[:-2])
    return out


def noise_sigma(rgb: np.ndarray, luma: np.ndarray) -> float:
    """Immerkaer's fast noise estimator with Tai & Yang's edge exclusion (0-255 scale).

    Estimated per colour channel and averaged, so it reads the per-channel Gaussian sigma
    (what denoisers are conditioned on) whether the noise is colour or grey. Pixels whose
    luminance gradient is in the top 10% (edges, texture) are left out of the sums.
    """
    return noise_sigma_tiles([(rgb, luma)])


def noise_sigma_tiles(tiles: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """``noise_sigma`` pooled over (rgb, luma) tiles: one edge-exclusion quantile, one mean."""
    tiles = [(rgb, luma) for rgb, luma in tiles if luma.shape[0] >= 3 and luma.shape[1] >= 3]
    if not tiles:
        return 0.0
    gradients = [_sobel_abs_sum(luma).reshape(-1) for _, luma in tiles]
    every = np.concatenate(gradients) if len(gradients) > 1 else gradients[0]
    keeps = [np.ones_like(g, dtype=bool) for g in gradients]
    if every.size >= 10:
        cut = np.quantile(every, 1.0 - NOISE_EDGE_EXCLUSION)
        keeps = [g <= cut for g in gradients]
        if not any(k.any() for k in keeps):
            keeps = [np.ones_like(g, dtype=bool) for g in gradients]
    sigmas = []
    for channel in range(3):
        total, count = 0.0, 0
        for (rgb, _), keep in zip(tiles, keeps, strict=True):
            response = _immerkaer_abs(rgb[..., channel].astype(np.float32)).reshape(-1)[keep]
            total, count = total + float(response.sum(dtype=np.float64)), count + response.size
        sigmas.append(math.sqrt(math.pi / 2.0) * total / max(count, 1) / 6.0)
    return float(np.mean(sigmas))


def laplacian_variance(luma: np.ndarray) -> float:
    if luma.shape[0] < 3 or luma.shape[1] < 3:
        return 0.0
    centre = luma[1:-1, 1:-1]
    response = luma[:-2, 1:-1] + luma[2:, 1:-1]
    response += luma[1:-1, :-2]
    response += luma[1:-1, 2:]
    response -= 4.0 * centre
    return float(response.var(dtype=np.float64))


def edge_blur_sigma(luma: np.ndarray, noise: float) -> tuple[float, float]:
    """Blur sigma from strong edges (Zhuo & Sim's re-blur gradient ratio).

    At a step edge blurred by sigma, re-blurring with sigma0 lowers the peak gradient by
    R = sqrt(sigma^2 + sigma0^2) / sigma, so sigma = sigma0 / sqrt(R^2 - 1). We take the median
    over strong local-maximum edge points and remove the sampling's own intrinsic blur.
    Returns (blur_sigma, edge_density); (0, 0) when there are too few edges to tell.
    """
    return _combine_edges([_edge_sigmas(luma, noise)], luma.size)


def _edge_sigmas(luma: np.ndarray, noise: float) -> np.ndarray:
    """The per-edge-point blur sigmas of one image or tile (empty when it is too small)."""
    margin = 5  # keep away from the borders, where the re-blur sees replicated pixels
    height, width = luma.shape
    if height <= 2 * margin + 2 or width <= 2 * margin + 2:
        return np.zeros(0)
    reblurred = _gaussian_blur(luma, REBLUR_SIGMA)
    gradient = _gradient_magnitude(luma)[margin:-margin, margin:-margin]
    gradient_reblurred = _gradient_magnitude(reblurred)[margin:-margin, margin:-margin]
    # Strong enough to stand clear of the noise (luminance noise is ~0.67x the per-channel
    # sigma for colour noise), and a ridge of the gradient.
    threshold = max(EDGE_MIN_GRADIENT, 2.5 * noise)
    edges = (gradient >= threshold) & _local_max_3x3(gradient)
    ratio = gradient[edges] / np.maximum(gradient_reblurred[edges], 1e-6)
    ratio_sq_minus_one = np.maximum(ratio.astype(np.float64) ** 2 - 1.0, 1e-4)
    return np.minimum(REBLUR_SIGMA / np.sqrt(ratio_sq_minus_one), 20.0)


def _combine_edges(parts: Sequence[np.ndarray], pixels: int) -> tuple[float, float]:
    measured = np.concatenate(parts) if len(parts) > 1 else parts[0]
    if measured.size < MIN_EDGE_POINTS:
        return 0.0, 0.0
    sigma = float(np.median(measured))
    return math.sqrt(max(sigma * sigma - INTRINSIC_EDGE_SIGMA**2, 0.0)), measured.size / float(pixels)


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
        ratios.append((float(profile[boundary]) + BLOCKINESS_FLOOR) / (float(np.median(inside)) + BLOCKINESS_FLOOR))
    return ratios


def blockiness(luma: np.ndarray) -> float:
    """JPEG 8x8 blocking: >1 when differences across block boundaries beat those inside."""
    ratios = _blockiness_ratios(luma)
    return float(np.median(ratios)) if ratios else 1.0


def _blockiness_ratios(luma: np.ndarray) -> list[float]:
    ratios: list[float] = []
    if luma.shape[1] > JPEG_BLOCK:
        ratios += _boundary_ratios(np.abs(np.diff(luma, axis=1)).mean(axis=0, dtype=np.float64))
    if luma.shape[0] > JPEG_BLOCK:
        ratios += _boundary_ratios(np.abs(np.diff(luma, axis=0)).mean(axis=1, dtype=np.float64))
    return ratios


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler & Suesstrunk (2003) colourfulness on a 0-255 scale; rgb is N x 3 (float32
    arithmetic, float64 sums)."""
    if rgb.shape[0] == 0:
        return 0.0
    red, green, blue = (rgb[:, i].astype(np.float32) for i in range(3))
    rg = red - green
    yb = 0.5 * (red + green) - blue
    rg_mean, yb_mean = float(rg.mean(dtype=np.float64)), float(yb.mean(dtype=np.float64))
    spread = math.sqrt(_variance(rg, rg_mean) + _variance(yb, yb_mean))
    mean = math.sqrt(rg_mean**2 + yb_mean**2)
    return float(spread + 0.3 * mean)


def _variance(values: np.ndarray, mean: float) -> float:
    centred = values - np.float32(mean)
    return float(np.dot(centred, centred)) / values.size if values.size else 0.0


def tile_starts(length: int, tile: int, count: int) -> list[int]:
    """``count`` evenly spread tile starts on multiples of 8 (the JPEG grid)."""
    if length <= tile or count <= 1:
        return [max(0, (length - tile) // 2) // JPEG_BLOCK * JPEG_BLOCK]
    return sorted({int(s) // JPEG_BLOCK * JPEG_BLOCK for s in np.linspace(0, length - tile, count)})


def sample_tiles(height: int, width: int, max_pixels: int | None) -> list[tuple[slice, slice]]:
    """The regions local statistics are pooled over: the whole image when it has at most
    ``max_pixels`` pixels (or no budget is set), else an evenly spread grid of TILE x TILE
    tiles, 8-aligned, with at most ``max_pixels`` pixels in all. Deterministic."""
    if max_pixels is None or height * width <= max_pixels:
        return [(slice(0, height), slice(0, width))]
    per_axis = max(1, int(math.sqrt(max_pixels / float(TILE * TILE))))
    rows = tile_starts(height, TILE, min(per_axis, max(1, height // TILE)))
    cols = tile_starts(width, TILE, min(per_axis, max(1, width // TILE)))
    return [(slice(y, y + TILE), slice(x, x + TILE)) for y in rows for x in cols]


def sampled_blockiness(rgb: np.ndarray, max_pixels: int | None = None) -> float:
    """``blockiness`` pooled over ``sample_tiles`` (what ``measure`` reports with that budget)."""
    height, width = rgb.shape[:2]
    ratios = [
        r for ys, xs in sample_tiles(height, width, max_pixels) for r in _blockiness_ratios(_luminance(rgb[ys, xs]))
    ]
    return float(np.median(ratios)) if ratios else 1.0


def measure(image: DecodedImage, max_pixels: int | None = None) -> dict[str, float]:
    """All metrics for one image; see the module docstring for the keys.

    With ``max_pixels``, an image larger than that is measured on a sample: local statistics
    (noise, Laplacian, blur, blocking) pooled over ``sample_tiles``, global ones (exposure,
    contrast, colour) on an evenly strided grid of pixels. The cost then stays bounded.
    """
    rgb = image.rgb
    height, width = rgb.shape[:2]
    regions = sample_tiles(height, width, max_pixels)
    stride = 1 if len(regions) == 1 else max(1, math.ceil(math.sqrt(height * width / float(max_pixels or 1))))
    tiles = [(rgb[ys, xs], _luminance(rgb[ys, xs])) for ys, xs in regions]
    grid_rgb = rgb[::stride, ::stride]
    grid_luma = tiles[0][1] if len(regions) == 1 else _luminance(grid_rgb)
    # Global statistics skip fully transparent pixels, whose colour is usually junk.
    grid_alpha = None if image.alpha is None else image.alpha[::stride, ::stride]
    if grid_alpha is not None and (grid_alpha > 0).any():
        visible = grid_alpha > 0
        visible_luma, visible_rgb = grid_luma[visible], grid_rgb[visible]
    else:
        visible_luma, visible_rgb = grid_luma.reshape(-1), grid_rgb.reshape(-1, 3)
    luma_mean = float(visible_luma.mean(dtype=np.float64)) if visible_luma.size else 0.0

    noise = noise_sigma_tiles(tiles)
    lap_var = float(np.mean([laplacian_variance(luma) for _, luma in tiles]))
    blur, edge_density = _combine_edges(
        [_edge_sigmas(luma, noise) for _, luma in tiles], sum(luma.size for _, luma in tiles)
    )
    ratios = [r for _, luma in tiles for r in _blockiness_ratios(luma)]
    metrics = {
        "width": float(width),
        "height": float(height),
        "laplacian_var": lap_var,
        "sharpness": lap_var / (lap_var + SHARPNESS_HALF_POINT),
        "blur_sigma": blur,
        "edge_density": edge_density,
        "noise_sigma": noise,
        "blockiness": float(np.median(ratios)) if ratios else 1.0,
        "brightness": luma_mean / 255.0,
        "clipped_dark": float(np.count_nonzero(visible_luma <= 2.0)) / max(visible_luma.size, 1),
        "clipped_bright": float(np.count_nonzero(visible_luma >= 253.0)) / max(visible_luma.size, 1),
        "contrast": math.sqrt(_variance(visible_luma, luma_mean)) / 255.0,
        "colourfulness": colourfulness(visible_rgb),
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


def _is_grey(rgb: np.ndarray) -> bool:
    return bool(
        (np.abs(rgb[..., 0].astype(np.int16) - rgb[..., 1]) <= 1).all()
        and (np.abs(rgb[..., 1].astype(np.int16) - rgb[..., 2]) <= 1).all()
    )


class AnalysisEncoder(Encoder):
    """Describes images by measuring them; no model, no weights."""

    kind = "analysis"
    max_pixels: int | None = None  # measure larger images on a sample (see ``measure``)

    def describe(self, images: Sequence[DecodedImage]) -> list[Description]:
        descriptions = []
        for image in images:
            metrics = measure(image, self.max_pixels)
            is_grey = _is_grey(image.rgb[::7, ::7]) and _is_grey(image.rgb)  # a sample rules most out
            descriptions.append(
                Description(
                    text=describe_metrics(metrics, is_grey=is_grey),
                    metrics=metrics,
                    noise_sigma=metrics["noise_sigma"],
                )
            )
        return descriptions
