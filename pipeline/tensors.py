"""Tensor conversions and resizes that the compute path and training share.

Images are HxWx3 uint8 arrays at the edges of the pipeline and 1x3xHxW float32 tensors in
[0, 1] inside models. ``to_uint8`` rounds (it never truncates) and clamps.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 (or float in [0,1]) -> 1x3xHxW float32."""
    arr = np.asarray(img)
    t = torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1)[None].float()
    return t / 255.0 if arr.dtype == np.uint8 else t


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """1x3xHxW (or 3xHxW) float in [0,1] -> HxWx3 uint8 (rounded)."""
    if t.dim() == 4:
        t = t[0]
    return (t.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def resize_alpha(alpha: np.ndarray, scale: int, device: torch.device | str = "cpu") -> np.ndarray:
    """The one alpha policy of every decoder: alpha is resized on its own, bilinear (no
    ringing at hard mask edges), rounded; a uniform alpha (e.g. fully opaque) stays exact."""
    return resize_alpha_to(alpha, (alpha.shape[0] * scale, alpha.shape[1] * scale), device)


def resize_alpha_to(alpha: np.ndarray, size: tuple[int, int], device: torch.device | str = "cpu") -> np.ndarray:
    """``resize_alpha`` to (h, w); antialiased where it shrinks."""
    if tuple(size) == alpha.shape[:2]:
        return alpha.copy()
    if alpha.size and alpha.min() == alpha.max():
        return np.full(size, alpha.flat[0], dtype=np.uint8)
    a = torch.from_numpy(np.require(alpha, dtype=np.uint8, requirements=["C", "W"])).to(device)[None, None].float()
    down = size[0] < alpha.shape[0] or size[1] < alpha.shape[1]
    a = F.interpolate(a, size=tuple(size), mode="bilinear", align_corners=False, antialias=down)
    return a.round_().clamp_(0, 255).to(torch.uint8)[0, 0].cpu().numpy()


def resize(t: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Resize to (h, w). Downscales are anti-aliased (like PIL / MATLAB imresize)."""
    h, w = size
    if (h, w) == tuple(t.shape[-2:]):
        return t
    if mode == "area":
        return F.interpolate(t, size=(h, w), mode="area")
    down = h < t.shape[-2] or w < t.shape[-1]
    return F.interpolate(t, size=(h, w), mode=mode, align_corners=False, antialias=down)


def downscale(t: torch.Tensor, scale: int, mode: str = "bicubic") -> torch.Tensor:
    h, w = t.shape[-2:]
    return resize(t, (h // scale, w // scale), mode)


def upscale_bicubic(t: torch.Tensor, scale: int) -> torch.Tensor:
    """The bicubic baseline upscale used everywhere (benchmark baseline, decoder base)."""
    if scale == 1:
        return t
    return F.interpolate(t, scale_factor=scale, mode="bicubic", align_corners=False)
