"""Global colour and tone grading, batched in torch: the one implementation every decoder uses.

Invariants: operations run in ``ORDER`` whatever the list's order; every statistic is per
item, from its own ``sizes``, so batching and padding change nothing; alpha is never an
input. Strength 1 of each operation is set by the module's constants (``EXPOSURE_STOPS``
...). Changing what an operation does changes outputs: bump
``pixelrelay.pipeline.constants.DECODE_PATH_VERSION``. torch is imported lazily.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from pixelrelay.pipeline.messages import GradingName, GradingOp

if TYPE_CHECKING:
    import torch

ORDER: tuple[GradingName, ...] = (
    "white_balance",
    "exposure",
    "warmth",
    "contrast",
    "saturation",
    "grayscale",
    "sepia",
    "vignette",
)
LINEAR_OPS = frozenset({"white_balance", "exposure", "warmth"})
EXPOSURE_STOPS = 1.5
WARMTH_STOPS = 0.5
CONTRAST_STOPS = 1.0
WB_GAIN_RANGE = (0.5, 2.0)
VIGNETTE_DARKEN = 0.6  # fraction of brightness taken from the corners at strength 1
VIGNETTE_START = 0.35  # normalised distance from the centre (corners: 1) where it begins
LUMA = (0.2126, 0.7152, 0.0722)  # Rec. 709
SEPIA = (
    (0.393, 0.769, 0.189),
    (0.349, 0.686, 0.168),
    (0.272, 0.534, 0.131),
)


def _strengths(gradings: Sequence[Sequence[GradingOp]], name: str) -> list[float]:
    return [next((op.strength for op in ops if op.name == name), 0.0) for ops in gradings]


def _srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055).clamp_min(0) ** 2.4)


def _linear_to_srgb(x: torch.Tensor) -> torch.Tensor:
    import torch

    x = x.clamp(0, 1)
    return torch.where(x <= 0.0031308, x * 12.92, 1.055 * x.clamp_min(1e-12) ** (1 / 2.4) - 0.055)


class _Items:
    """Each row's own region of a (possibly padded) batch: masked means, centred coordinates."""

    def __init__(self, x: torch.Tensor, sizes: Sequence[tuple[int, int]] | None) -> None:
        import torch

        batch, _, height, width = x.shape
        sizes = list(sizes) if sizes is not None else [(height, width)] * batch
        if len(sizes) != batch:
            raise ValueError(f"{len(sizes)} sizes for a batch of {batch}")
        self.device = x.device
        self.h = torch.tensor([h for h, _ in sizes], dtype=torch.float32, device=x.device).view(-1, 1, 1, 1)
        self.w = torch.tensor([w for _, w in sizes], dtype=torch.float32, device=x.device).view(-1, 1, 1, 1)
        self.padded = any(s != (height, width) for s in sizes)
        rows = torch.arange(height, dtype=torch.float32, device=x.device).view(1, 1, -1, 1)
        cols = torch.arange(width, dtype=torch.float32, device=x.device).view(1, 1, 1, -1)
        self.rows, self.cols = rows, cols
        self.mask = ((rows < self.h) & (cols < self.w)).float() if self.padded else None

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """(B,C,1,1) mean of each row over its own pixels."""
        if self.mask is not None:
            x = x * self.mask
        return x.sum(dim=(2, 3), keepdim=True) / (self.h * self.w)

    def radius(self) -> torch.Tensor:
        """(B,1,H,W) distance from each item's centre, 1 at its corners."""
        dy = (self.rows - (self.h - 1) / 2) / (self.h / 2).clamp_min(0.5)
        dx = (self.cols - (self.w - 1) / 2) / (self.w / 2).clamp_min(0.5)
        return ((dy * dy + dx * dx) / 2).sqrt()


def _per_item(values: Sequence[float], device: torch.device) -> torch.Tensor:
    import torch

    return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1, 1)


def _luma(x: torch.Tensor) -> torch.Tensor:
    r, g, b = LUMA
    return r * x[:, 0:1] + g * x[:, 1:2] + b * x[:, 2:3]


def _mix(x: torch.Tensor, target: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    return x + amount * (target - x)


def _linear_ops(x: torch.Tensor, gradings: Sequence[Sequence[GradingOp]], items: _Items) -> torch.Tensor:
    import torch

    lin = _srgb_to_linear(x)
    wb = _strengths(gradings, "white_balance")
    if any(wb):
        means = items.mean(lin).clamp_min(1e-4)  # (B,3,1,1)
        gains = (means.mean(dim=1, keepdim=True) / means).clamp(*WB_GAIN_RANGE)
        lin = lin * gains ** _per_item(wb, x.device)
    exposure = _strengths(gradings, "exposure")
    if any(exposure):
        lin = lin * torch.exp2(_per_item(exposure, x.device) * EXPOSURE_STOPS)
    warmth = _strengths(gradings, "warmth")
    if any(warmth):
        stops = _per_item(warmth, x.device) * WARMTH_STOPS
        gains = torch.cat([torch.exp2(stops), torch.ones_like(stops), torch.exp2(-stops)], dim=1)
        lin = lin * gains
    return _linear_to_srgb(lin)


def grade(
    x: torch.Tensor, gradings: Sequence[Sequence[GradingOp]], sizes: Sequence[tuple[int, int]] | None = None
) -> torch.Tensor:
    """Grade a (B,3,H,W) float batch in [0, 1]; row i by ``gradings[i]`` (see the module
    docstring). ``sizes``: each row's own (height, width) inside a padded batch."""
    import torch

    if len(gradings) != x.shape[0]:
        raise ValueError(f"{len(gradings)} gradings for a batch of {x.shape[0]}")
    if not any(gradings):
        return x
    x = x.float()
    items = _Items(x, sizes)
    device = x.device
    if any(op.name in LINEAR_OPS for ops in gradings for op in ops):
        x = _linear_ops(x.clamp(0, 1), gradings, items)
    contrast = _strengths(gradings, "contrast")
    if any(contrast):
        pivot = items.mean(_luma(x))
        x = (pivot + (x - pivot) * torch.exp2(_per_item(contrast, device) * CONTRAST_STOPS)).clamp(0, 1)
    saturation = _strengths(gradings, "saturation")
    if any(saturation):
        grey = _luma(x)
        x = (grey + (x - grey) * (1 + _per_item(saturation, device))).clamp(0, 1)
    grayscale = _strengths(gradings, "grayscale")
    if any(grayscale):
        x = _mix(x, _luma(x).expand_as(x), _per_item(grayscale, device))
    sepia = _strengths(gradings, "sepia")
    if any(sepia):
        matrix = torch.tensor(SEPIA, dtype=x.dtype, device=device)
        toned = torch.einsum("oc,bchw->bohw", matrix, x).clamp(0, 1)
        x = _mix(x, toned, _per_item(sepia, device))
    vignette = _strengths(gradings, "vignette")
    if any(vignette):
        ramp = ((items.radius() - VIGNETTE_START) / (1 - VIGNETTE_START)).clamp(0, 1)
        x = x * (1 - VIGNETTE_DARKEN * _per_item(vignette, device) * ramp * ramp)
    return x.clamp(0, 1)


def grade_images(
    rgbs: Sequence[np.ndarray],
    gradings: Sequence[Sequence[GradingOp]],
    device: str | torch.device = "cpu",
    max_batch_pixels: int = 16 * 1024 * 1024,
) -> list[np.ndarray]:
    """Grade HxWx3 uint8 images: same-size images run as one tensor (at most
    ``max_batch_pixels`` pixels per tensor; one image always fits), mixed sizes in groups.
    An image with no grading is returned as it is (the same array)."""
    import torch

    if len(rgbs) != len(gradings):
        raise ValueError(f"{len(rgbs)} images but {len(gradings)} gradings")
    out: list[np.ndarray] = list(rgbs)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (rgb, ops) in enumerate(zip(rgbs, gradings, strict=True)):
        if ops:
            groups.setdefault(tuple(rgb.shape[:2]), []).append(i)
    for (height, width), idx in groups.items():
        per_batch = max(1, max_batch_pixels // max(1, height * width))
        for start in range(0, len(idx), per_batch):
            part = idx[start : start + per_batch]
            stacked = np.stack([np.asarray(rgbs[i], dtype=np.uint8) for i in part])
            with torch.inference_mode():
                x = torch.from_numpy(stacked).to(device).permute(0, 3, 1, 2).float().div_(255.0)
                y = grade(x, [gradings[i] for i in part])
                graded = y.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            for k, i in enumerate(part):
                out[i] = np.ascontiguousarray(graded[k])
    return out
