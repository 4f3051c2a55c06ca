"""Weight-free classic restoration decoder, batched in torch.

Runs ``deblock -> denoise -> resize -> deblur -> sharpen -> grade`` in fp32. One call may mix
sizes and plans: items are grouped by scale and size and padded by edge replication, and
every filter keeps that padding a replicate extension of each item's own pixels
(``_Canvas.repad``), so an item's result does not depend on its batch (float rounding
aside). torch is imported lazily.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.messages import Plan
from pixelrelay.pipeline.stages.base import Decoder, RestoredImage, check_batch, filled

if TYPE_CHECKING:
    import torch

    from pixelrelay.pipeline.settings import Settings

JPEG_BLOCK = 8
# Deblock gates, in grey levels: steps smaller than ALPHA across a block boundary, with
# sides flatter than BETA, are treated as artefacts; both grow with strength.
DEBLOCK_ALPHA = (10.0, 30.0)  # base, extra at strength 1
DEBLOCK_BETA = (3.0, 7.0)
# Guided-filter eps is (EPS_FACTOR * sigma / 255)^2: flat areas (variance ~ sigma^2) are
# smoothed, edges (variance >> eps) kept.
DENOISE_EPS_FACTOR = 2.0
DEFAULT_NOISE_SIGMA = 10.0  # when the plan asks for denoise but knows no sigma
RESIZE_MARGIN = 3  # bicubic reads 2 pixels each side; pad explicitly so borders replicate
SHARPEN_SIGMA = 0.8  # per unit of scale, output pixels
SHARPEN_AMOUNT = 1.0  # at strength 1
DEBLUR_AMOUNT = 1.5
DEBLUR_DEFAULT_SIGMA = 1.5  # input pixels, when the plan gives no blur sigma
DEBLUR_SIGMA_RANGE = (1.0, 6.0)  # output pixels


class _Canvas:
    """A padded sub-batch's geometry: each item's own size inside the (B, C, H, W) tensor."""

    def __init__(self, heights: list[int], widths: list[int], device: torch.device) -> None:
        import torch

        self.heights, self.widths = heights, widths
        self.height, self.width = max(heights), max(widths)
        self.uniform = all(h == self.height for h in heights) and all(w == self.width for w in widths)
        h_limit = torch.tensor(heights, device=device).sub(1).view(-1, 1)
        w_limit = torch.tensor(widths, device=device).sub(1).view(-1, 1)
        # Source row/column for every position: itself inside the item, its edge outside.
        self.row_index = torch.minimum(torch.arange(self.height, device=device).view(1, -1), h_limit)
        self.col_index = torch.minimum(torch.arange(self.width, device=device).view(1, -1), w_limit)
        self.widths_t = w_limit.view(-1, 1, 1, 1) + 1
        self.heights_t = h_limit.view(-1, 1, 1, 1) + 1

    def scaled(self, scale: int) -> _Canvas:
        return _Canvas([h * scale for h in self.heights], [w * scale for w in self.widths], self.row_index.device)

    def repad(self, x: torch.Tensor) -> torch.Tensor:
        """Overwrite each item's padding with a replicate extension of its own pixels."""
        import torch

        if self.uniform:
            return x
        batch, channels, height, width = x.shape
        x = torch.gather(x, 2, self.row_index.view(batch, 1, height, 1).expand(batch, channels, height, width))
        return torch.gather(x, 3, self.col_index.view(batch, 1, 1, width).expand(batch, channels, height, width))


def _writable(array: np.ndarray) -> np.ndarray:
    """A C-contiguous, writable uint8 view or copy (torch refuses read-only arrays)."""
    return np.require(array, dtype=np.uint8, requirements=["C", "W"])


def _box_filter(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable mean over a (2r+1)^2 window, replicate borders (any image size)."""
    import torch.nn.functional as F

    size = 2 * radius + 1
    x = F.avg_pool2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), (1, size), stride=1)
    return F.avg_pool2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), (size, 1), stride=1)


def _gaussian_taps(sigmas: Sequence[float], device: torch.device) -> torch.Tensor:
    """(B, K) normalised Gaussian taps; each item's own radius, zero-padded to the largest.

    Zero-padding (instead of one shared radius) keeps an item's kernel, and so its result,
    independent of the other items in the batch.
    """
    import torch

    radii = [max(1, math.ceil(3.0 * s)) for s in sigmas]
    widest = max(radii)
    taps = torch.zeros(len(sigmas), 2 * widest + 1, dtype=torch.float32)
    for i, (sigma, radius) in enumerate(zip(sigmas, radii, strict=True)):
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        taps[i, widest - radius : widest + radius + 1] = kernel / kernel.sum()
    return taps.to(device)


def _gaussian_blur(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Per-item separable Gaussian (taps from ``_gaussian_taps``), replicate borders."""
    import torch.nn.functional as F

    batch, channels, height, width = x.shape
    radius = (taps.shape[1] - 1) // 2
    weights = taps.repeat_interleave(channels, dim=0)  # one kernel per (item, channel)
    groups, size = batch * channels, taps.shape[1]
    flat = x.reshape(1, groups, height, width)
    flat = F.pad(flat, (radius, radius, 0, 0), mode="replicate")
    flat = F.conv2d(flat, weights.view(groups, 1, 1, size), groups=groups)
    flat = F.pad(flat, (0, 0, radius, radius), mode="replicate")
    flat = F.conv2d(flat, weights.view(groups, 1, size, 1), groups=groups)
    return flat.view(batch, channels, height, width)


def _deblock_columns(x: torch.Tensor, strength: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Smooth steps across vertical 8x8 block boundaries (columns 8k | 8k-1).

    For a boundary between p1 p0 | q0 q1: delta = (4(q0-p0) + (p1-q1)) / 8, then p1, p0, q0, q1
    move by +0.4, +0.8, -0.8, -0.4 delta, turning a flat step into a ramp. The filter is gated
    on luminance: big steps (real edges) or busy sides (texture) are left alone.
    """
    import torch
    import torch.nn.functional as F

    width = x.shape[-1]
    if width <= JPEG_BLOCK:
        return x
    padded = F.pad(x, (2, 1, 0, 0), mode="replicate")
    p1, p0, q0, q1 = padded[..., 0:width], padded[..., 1 : width + 1], x, padded[..., 3 : width + 3]

    # Gate on grey levels (channel mean, 0-255) so all channels of a pixel move together.
    gp1, gp0, gq0, gq1 = (t.mean(dim=1, keepdim=True) * 255.0 for t in (p1, p0, q0, q1))
    step = (gq0 - gp0).abs()
    sides = torch.maximum((gp1 - gp0).abs(), (gq1 - gq0).abs())
    alpha = DEBLOCK_ALPHA[0] + DEBLOCK_ALPHA[1] * strength
    beta = DEBLOCK_BETA[0] + DEBLOCK_BETA[1] * strength
    gate = ((alpha - step) / (0.5 * alpha)).clamp(0, 1) * ((beta - sides) / (0.5 * beta)).clamp(0, 1)

    columns = torch.arange(width, device=x.device).view(1, 1, 1, -1)
    on_boundary = (columns % JPEG_BLOCK == 0) & (columns > 0) & (columns < widths)
    delta = (4.0 * (q0 - p0) + (p1 - q1)) / 8.0
    change = strength * gate * on_boundary * delta  # nonzero only at q0 columns

    update = -0.8 * change
    update[..., 1:] -= 0.4 * change[..., :-1]  # q1, one right of the boundary
    update[..., :-1] += 0.8 * change[..., 1:]  # p0, one left
    update[..., :-2] += 0.4 * change[..., 2:]  # p1, two left
    return x + update


def _self_guided_filter(x: torch.Tensor, radius: int, eps: torch.Tensor, canvas: _Canvas) -> torch.Tensor:
    """He et al.'s guided filter with each channel as its own guide: edge-preserving smoothing."""
    mean = canvas.repad(_box_filter(x, radius))
    variance = (canvas.repad(_box_filter(x * x, radius)) - mean * mean).clamp_min(0)
    a = variance / (variance + eps)
    b = mean - a * mean
    return canvas.repad(_box_filter(a, radius)) * x + canvas.repad(_box_filter(b, radius))


def _denoise_radius(sigma: float) -> int:
    return 1 if sigma < 8 else 2 if sigma < 20 else 3


class ClassicDecoder(Decoder):
    """Deblock, denoise, resize and sharpen with classic filters; no model, no weights.

    ``model`` is accepted for the common constructor and ignored: there are no variants.
    """

    kind = "classic"
    grades = True  # applies Plan.edit.grading inside its batch (decoders.edits)

    def __init__(
        self,
        model: str | None = None,
        device: str = "cpu",
        settings: Settings | None = None,
        batch_size: int = 8,
        max_batch_pixels: int = 32 * 1024 * 1024,
    ) -> None:
        super().__init__(model=model, device=device, settings=settings)
        import torch

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.max_batch_pixels = max_batch_pixels  # output pixels per sub-batch (one item always fits)
        self.torch_device = torch.device(device)

    def restore(self, images: Sequence[DecodedImage], plans: Sequence[Plan]) -> list[RestoredImage]:
        import torch

        from pixelrelay.pipeline.tensors import resize_alpha

        check_batch(images, plans)
        results: list[RestoredImage | None] = [None] * len(images)
        for group in self._sub_batches(images, plans):
            with torch.inference_mode():
                rgbs = self._restore_rgb([images[i] for i in group], [plans[i] for i in group])
            for i, rgb in zip(group, rgbs, strict=True):
                alpha = images[i].alpha
                results[i] = RestoredImage(
                    rgb=rgb, alpha=None if alpha is None else resize_alpha(alpha, plans[i].scale, self.torch_device)
                )
        return filled(results)

    def _sub_batches(self, images: Sequence[DecodedImage], plans: Sequence[Plan]) -> list[list[int]]:
        """Group by scale, then by size (less padding), capped by count and output pixels."""
        order = sorted(range(len(images)), key=lambda i: (plans[i].scale, images[i].height * images[i].width))
        groups: list[list[int]] = []
        current: list[int] = []
        max_h = max_w = 0
        for i in order:
            scale = plans[i].scale
            grow_h, grow_w = max(max_h, images[i].height), max(max_w, images[i].width)
            padded_pixels = (len(current) + 1) * grow_h * grow_w * scale * scale
            if current and (
                plans[current[0]].scale != scale
                or len(current) >= self.batch_size
                or padded_pixels > self.max_batch_pixels
            ):
                groups.append(current)
                current, grow_h, grow_w = [], images[i].height, images[i].width
            current.append(i)
            max_h, max_w = grow_h, grow_w
        if current:
            groups.append(current)
        return groups

    def _per_item(self, values: Sequence[float]) -> torch.Tensor:
        import torch

        return torch.tensor(values, dtype=torch.float32, device=self.torch_device).view(-1, 1, 1, 1)

    def _restore_rgb(self, images: Sequence[DecodedImage], plans: Sequence[Plan]) -> list[np.ndarray]:
        import torch
        import torch.nn.functional as F

        canvas = _Canvas([im.height for im in images], [im.width for im in images], self.torch_device)
        x = torch.cat(
            [
                F.pad(
                    torch.from_numpy(_writable(im.rgb)).to(self.torch_device).permute(2, 0, 1)[None].float(),
                    (0, canvas.width - im.width, 0, canvas.height - im.height),
                    mode="replicate",
                )
                for im in images
            ]
        ).div_(255.0)

        deblock = [plan.strength("deblock") for plan in plans]
        if any(deblock):
            strength = self._per_item(deblock)
            x = canvas.repad(_deblock_columns(x, strength, canvas.widths_t))
            x = _deblock_columns(x.transpose(2, 3), strength, canvas.heights_t).transpose(2, 3)
            x = canvas.repad(x.clamp(0, 1))

        denoise = [plan.strength("denoise") for plan in plans]
        if any(denoise):
            sigmas = [plan.noise_sigma if plan.noise_sigma > 0 else DEFAULT_NOISE_SIGMA for plan in plans]
            eps = self._per_item([(DENOISE_EPS_FACTOR * s / 255.0) ** 2 for s in sigmas])
            filtered = torch.zeros_like(x)
            radii = [_denoise_radius(s) for s in sigmas]
            for radius in sorted({r for r, s in zip(radii, denoise, strict=True) if s > 0}):
                chosen = self._per_item([float(r == radius) for r in radii]).bool()
                filtered = torch.where(chosen, _self_guided_filter(x, radius, eps, canvas), filtered)
            x = (x + self._per_item(denoise) * (filtered - x)).clamp_(0, 1)

        scale = plans[0].scale  # sub-batches share one scale
        if scale != 1:
            m = RESIZE_MARGIN
            x = F.pad(x, (m, m, m, m), mode="replicate")
            x = F.interpolate(
                x, size=(x.shape[2] * scale, x.shape[3] * scale), mode="bicubic", antialias=True, align_corners=False
            )
            x = x[..., m * scale : -m * scale, m * scale : -m * scale].clamp_(0, 1)
            canvas = canvas.scaled(scale)
            x = canvas.repad(x)

        deblur = [plan.strength("deblur") for plan in plans]
        if any(deblur):
            lo, hi = DEBLUR_SIGMA_RANGE
            sigmas = [
                min(hi, max(lo, (plan.blur_sigma if plan.blur_sigma > 0 else DEBLUR_DEFAULT_SIGMA) * plan.scale))
                for plan in plans
            ]
            x = self._unsharp(x, sigmas, [DEBLUR_AMOUNT * s for s in deblur], canvas)

        sharpen = [plan.strength("sharpen") for plan in plans]
        if any(sharpen):
            sigmas = [SHARPEN_SIGMA * plan.scale for plan in plans]
            x = self._unsharp(x, sigmas, [SHARPEN_AMOUNT * s for s in sharpen], canvas)

        gradings = [plan.edit.grading if plan.edit is not None else [] for plan in plans]
        if any(gradings):
            from pixelrelay.pipeline.grading import grade

            x = grade(x, gradings, list(zip(canvas.heights, canvas.widths, strict=True)))

        out = x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [
            np.ascontiguousarray(out[i, :h, :w])
            for i, (h, w) in enumerate(zip(canvas.heights, canvas.widths, strict=True))
        ]

    def _unsharp(self, x: torch.Tensor, sigmas: list[float], amounts: list[float], canvas: _Canvas) -> torch.Tensor:
        blurred = canvas.repad(_gaussian_blur(x, _gaussian_taps(sigmas, self.torch_device)))
        return (x + self._per_item(amounts) * (x - blurred)).clamp_(0, 1)
