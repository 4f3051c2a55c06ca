"""The one degradation synthesis module, shared by training and evaluation.

Blur, downscale and noise in random order, then JPEG, driven by an explicit
``numpy.random.Generator`` (a seed reproduces the image). Each call also returns the true
parameters on the output pixel grid; ``noise_sigma`` is exact (a clean copy goes through the
same linear steps) and never counts what JPEG smears.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from pixelrelay.pipeline.tensors import downscale, resize, to_tensor, to_uint8, upscale_bicubic

__all__ = ["downscale", "resize", "to_tensor", "to_uint8", "upscale_bicubic"]  # re-exported for training

RESIZE_MODES = ("bicubic", "bilinear", "area")


@dataclass
class DegradationConfig:
    """Probabilities and ranges of the random degradation model."""

    p_blur: float = 0.5
    blur_sigma: tuple[float, float] = (0.3, 2.0)  # in output pixels
    p_noise: float = 0.6
    noise_sigma: tuple[float, float] = (1.0, 50.0)  # 0-255, as added
    p_poisson: float = 0.3  # share of noisy samples that get Poisson instead of Gaussian noise
    p_gray_noise: float = 0.3  # share of Gaussian noise that is the same on all channels
    p_jpeg: float = 0.6
    jpeg_quality: tuple[int, int] = (15, 95)
    resize_modes: tuple[str, ...] = RESIZE_MODES
    shuffle: bool = True  # random order of blur / downscale / noise (JPEG last, but see p_jpeg_early)
    # Share of JPEG-compressed samples whose JPEG step comes before the last step when that is
    # noise or blur (a JPEG edited and re-saved losslessly: noise or blur on top of the
    # blocks). 0 (the default) draws no extra random number, so older configs reproduce.
    p_jpeg_early: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> DegradationConfig:
        d = dict(d or {})
        out = cls()
        for k, v in d.items():
            if not hasattr(out, k):
                raise ValueError(f"unknown degradation option {k!r}")
            setattr(out, k, tuple(v) if isinstance(v, list) else v)
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Everyday files, as a phone or a website makes them: a light blur, a bicubic downscale,
# moderate noise, then JPEG at a moderate-to-high quality (in that order). ``bench quality
# --degradation mild`` scores it; training configs can mix it in ("degradation_mild").
MILD = DegradationConfig(
    p_blur=1.0,
    blur_sigma=(0.3, 1.0),
    p_noise=1.0,
    noise_sigma=(2.0, 15.0),
    p_poisson=0.0,
    p_gray_noise=0.3,
    p_jpeg=1.0,
    jpeg_quality=(40, 95),
    resize_modes=("bicubic",),
    shuffle=False,
)


@dataclass
class DegradationParams:
    scale: int = 1
    downscaled: bool = False
    resize_mode: str | None = None
    blur_sigma: float = 0.0  # output pixels
    noise_kind: str | None = None  # "gaussian" | "gaussian-gray" | "poisson"
    noise_added: float = 0.0  # sigma as added, 0-255 (Poisson: its nominal sigma)
    noise_sigma: float = 0.0  # effective sigma in the output before JPEG, 0-255
    jpeg_quality: int | None = None
    order: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- primitive operations (torch, 1x3xHxW float in [0, 1]) ---------------------------


def gaussian_blur(t: torch.Tensor, sigma: float) -> torch.Tensor:
    """Isotropic Gaussian blur (reflect border, kernel truncated at 3 sigma)."""
    if sigma <= 0:
        return t
    from scipy.ndimage import gaussian_filter

    arr = gaussian_filter(t.numpy(), sigma=(0, 0, sigma, sigma), mode="reflect", truncate=3.0)
    return torch.from_numpy(arr)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """Round-trip an HxWx3 uint8 image through JPEG (PIL/libjpeg, 4:2:0 below q 90)."""
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def crop_to_multiple(img: np.ndarray, scale: int) -> np.ndarray:
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


def _add_noise(
    x: torch.Tensor, sigma: float, seed: int, u_kind: float, u_gray: float, cfg: DegradationConfig
) -> tuple[torch.Tensor, str]:
    """Gaussian (per channel or grey) or Poisson noise of std ``sigma`` (0-1 scale)."""
    g = np.random.default_rng(seed)
    shape = tuple(x.shape)
    if u_kind < cfg.p_poisson:
        kind = "poisson"
        # peak chosen so the noise std at mid-grey (0.5) equals sigma
        peak = 0.5 / max(sigma, 1e-4) ** 2
        lam = x.clamp(0, 1).numpy().astype(np.float64) * peak
        x = torch.from_numpy((g.poisson(lam) / peak).astype(np.float32))
    elif u_gray < cfg.p_gray_noise:
        kind = "gaussian-gray"
        x = x + torch.from_numpy(g.standard_normal((1, 1) + shape[2:], dtype=np.float32) * sigma)
    else:
        kind = "gaussian"
        x = x + torch.from_numpy(g.standard_normal(shape, dtype=np.float32) * sigma)
    return x.clamp(0, 1), kind


# --- the random model -----------------------------------------------------------------


def _uniform(rng: np.random.Generator, lo_hi: Sequence[float]) -> float:
    lo, hi = lo_hi
    return float(rng.uniform(lo, hi))


@dataclass
class _Draw:
    """The random choices of one degradation (see ``_draw``)."""

    steps: list[str]
    do_jpeg: bool
    blur_lr: float
    mode: str
    noise_added: float
    u_kind: float
    u_gray: float
    quality: int
    noise_seed: int
    jpeg_at: int  # the index in ``steps`` JPEG runs before; len(steps): after all of them


def _draw_steps(scale: int, rng: np.random.Generator, cfg: DegradationConfig, force: Sequence[str]) -> list[str]:
    """Which of blur, downscale and noise run, in which order."""
    steps = []
    if "blur" in force or rng.random() < cfg.p_blur:
        steps.append("blur")
    if scale > 1:
        steps.append("downscale")
    if "noise" in force or rng.random() < cfg.p_noise:
        steps.append("noise")
    if cfg.shuffle:
        steps = [steps[i] for i in rng.permutation(len(steps))]
    return steps


def _draw(scale: int, rng: np.random.Generator, cfg: DegradationConfig, force: Sequence[str]) -> _Draw:
    """Every random choice of one degradation. Parameters are drawn in a fixed order, so the
    RNG stream does not depend on the order of the steps."""
    steps = _draw_steps(scale, rng, cfg, force)
    do_jpeg = "jpeg" in force or rng.random() < cfg.p_jpeg
    blur_lr = _uniform(rng, cfg.blur_sigma)
    mode = cfg.resize_modes[int(rng.integers(len(cfg.resize_modes)))]
    noise_added = _uniform(rng, cfg.noise_sigma)
    u_kind = rng.random()
    u_gray = rng.random()
    quality = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
    noise_seed = int(rng.integers(2**31 - 1))
    jpeg_at = len(steps)  # JPEG after all the other steps...
    if do_jpeg and cfg.p_jpeg_early > 0 and rng.random() < cfg.p_jpeg_early and steps and steps[-1] != "downscale":
        jpeg_at = len(steps) - 1  # ...or just before the last one (noise or blur)
    return _Draw(steps, do_jpeg, blur_lr, mode, noise_added, u_kind, u_gray, quality, noise_seed, jpeg_at)


def _run_steps(x: torch.Tensor, scale: int, d: _Draw, cfg: DegradationConfig, p: DegradationParams) -> torch.Tensor:
    """``x`` through the drawn steps (an early JPEG included, a final one not), recording
    them and the effective noise in ``p``."""
    clean = x.clone()  # the same linear steps, without noise: measures the effective noise
    bare = None  # with an early JPEG: x without it (the noise as the restorer must undo it)
    at_lr = False
    for index, step in enumerate(d.steps):
        if index == d.jpeg_at:
            bare = x.clone()
            x = to_tensor(jpeg(to_uint8(x), d.quality))
            p.jpeg_quality = d.quality
            p.order.append("jpeg")
        if step == "blur":
            s = d.blur_lr if (at_lr or scale == 1) else d.blur_lr * scale
            x, clean = gaussian_blur(x, s), gaussian_blur(clean, s)
            bare = None if bare is None else gaussian_blur(bare, s)
            p.blur_sigma = d.blur_lr
        elif step == "downscale":
            x, clean = downscale(x, scale, d.mode), downscale(clean, scale, d.mode)
            bare = None if bare is None else downscale(bare, scale, d.mode)
            at_lr = True
            p.downscaled, p.resize_mode = True, d.mode
        elif step == "noise":
            x, p.noise_kind = _add_noise(x, d.noise_added / 255.0, d.noise_seed, d.u_kind, d.u_gray, cfg)
            if bare is not None:  # the same noise on the JPEG-free copy
                bare, _ = _add_noise(bare, d.noise_added / 255.0, d.noise_seed, d.u_kind, d.u_gray, cfg)
            p.noise_added = d.noise_added
        p.order.append(step)
    if "noise" in p.order:  # ``clean`` and ``bare`` never went through JPEG
        p.noise_sigma = float(((x if bare is None else bare) - clean).std().item() * 255.0)
    return x


def degrade(
    hr: np.ndarray,
    scale: int,
    rng: np.random.Generator,
    config: DegradationConfig | None = None,
    force: Sequence[str] = (),
) -> tuple[np.ndarray, DegradationParams]:
    """Degrade an HR image.

    Args:
        hr: HxWx3 uint8 (cropped here to a multiple of ``scale``).
        scale: the downscale factor.
        rng: draws every random choice.
        config: the step probabilities and ranges; None: the default.
        force: steps ("blur", "noise", "jpeg") applied with probability 1.

    Returns:
        The degraded image (H/scale x W/scale x 3 uint8) and its true parameters.
    """
    cfg = config or DegradationConfig()
    hr = crop_to_multiple(hr, scale)
    p = DegradationParams(scale=scale)
    d = _draw(scale, rng, cfg, force)
    out = to_uint8(_run_steps(to_tensor(hr), scale, d, cfg, p))
    if d.do_jpeg and d.jpeg_at == len(d.steps):
        out = jpeg(out, d.quality)
        p.jpeg_quality = d.quality
        p.order.append("jpeg")
    return out, p


def bicubic_pair(hr: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """The classic benchmark degradation: HR cropped to a multiple of scale, bicubic down."""
    hr = crop_to_multiple(hr, scale)
    return hr, to_uint8(downscale(to_tensor(hr), scale, "bicubic"))


# --- metrics --------------------------------------------------------------------------


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma (16-235) as float64, from HxWx3 uint8/float 0-255."""
    x = np.asarray(img, dtype=np.float64) / 255.0
    return 16.0 + 65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]


def _crop_border(a: np.ndarray, border: int) -> np.ndarray:
    return a[border:-border, border:-border] if border > 0 else a


def psnr_y(a: np.ndarray, b: np.ndarray, border: int = 0) -> float:
    ya, yb = _crop_border(rgb_to_y(a), border), _crop_border(rgb_to_y(b), border)
    mse = float(np.mean((ya - yb) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def edge_overshoot(
    out: np.ndarray,
    gt: np.ndarray,
    border: int = 0,
    radius: int = 2,
    edge_quantile: float = 0.9,
    min_gradient: float = 20.0,
) -> float:
    """Mean overshoot on strong edges, in Y levels (0-255 scale): how far ``out`` goes above the
    ground truth's local maximum or below its local minimum. Halos and ringing raise it; a
    faithful or a blurry output keeps it near 0.

    Args:
        out: the restored image.
        gt: the ground truth, the same size.
        border: pixels cropped from each side first.
        radius: the local window is (2·radius+1)², and pixels within ``radius`` of an edge count.
        edge_quantile: an edge's Sobel magnitude is above this quantile of ``gt``'s...
        min_gradient: ...and above this.

    Returns:
        The mean overshoot over the pixels near strong edges.
    """
    from scipy.ndimage import binary_dilation, maximum_filter, minimum_filter, sobel

    y, o = _crop_border(rgb_to_y(gt), border), _crop_border(rgb_to_y(out), border)
    grad = np.hypot(sobel(y, 0), sobel(y, 1)) / 8.0
    strong = grad > max(np.quantile(grad, edge_quantile), min_gradient)
    if not strong.any():
        return 0.0
    size = 2 * radius + 1
    near = binary_dilation(strong, iterations=radius)
    hi, lo = maximum_filter(y, size=size), minimum_filter(y, size=size)
    over = np.maximum(o - hi, 0.0) + np.maximum(lo - o, 0.0)
    return float(over[near].mean() * 255.0 / 219.0)  # Y spans 16-235


def ssim_y(a: np.ndarray, b: np.ndarray, border: int = 0) -> float:
    """SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5) on the Y channel."""
    from scipy.ndimage import gaussian_filter

    x, y = _crop_border(rgb_to_y(a), border), _crop_border(rgb_to_y(b), border)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def filt(z: np.ndarray) -> np.ndarray:
        return gaussian_filter(z, 1.5, truncate=3.5, mode="reflect")

    mx, my = filt(x), filt(y)
    sxx, syy, sxy = filt(x * x) - mx * mx, filt(y * y) - my * my, filt(x * y) - mx * my
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx * mx + my * my + c1) * (sxx + syy + c2)
    m = num / den
    r = 5  # drop the window's half-width, as the reference implementation does
    return float(m[r:-r, r:-r].mean()) if min(m.shape) > 2 * r else float(m.mean())
