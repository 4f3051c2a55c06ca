"""The ``null`` decoder: identity, pixel-repeated to the plan's scale; no torch, no model.

Its output still takes the normal output path, so a job on the null backends measures
pixelrelay's own per-item cost (``benchmarks/bench_overhead.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

import numpy as np

from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.messages import Plan
from pixelrelay.pipeline.stages.base import Decoder, RestoredImage, check_batch


@overload
def _repeat(pixels: np.ndarray, scale: int) -> np.ndarray: ...


@overload
def _repeat(pixels: None, scale: int) -> None: ...


def _repeat(pixels: np.ndarray | None, scale: int) -> np.ndarray | None:
    if pixels is None or scale == 1:
        return pixels
    return np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)


class NullDecoder(Decoder):
    """source image + plan -> the source image (pixel-repeated to the plan's scale)."""

    kind = "null"

    def restore(self, images: Sequence[DecodedImage], plans: Sequence[Plan]) -> list[RestoredImage]:
        check_batch(images, plans)
        return [
            RestoredImage(rgb=_repeat(i.rgb, p.scale), alpha=_repeat(i.alpha, p.scale))
            for i, p in zip(images, plans, strict=True)
        ]
