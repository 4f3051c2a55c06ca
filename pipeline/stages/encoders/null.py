"""The ``null`` encoder: the same minimal description for every image; it measures nothing.

For measuring pixelrelay's own per-item cost (``benchmarks/bench_overhead.py``). No torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.messages import Description
from pixelrelay.pipeline.stages.base import Encoder

NULL_TEXT = "null encoder: not measured"


class NullEncoder(Encoder):
    """image -> the same minimal Description, whatever the image."""

    kind = "null"

    def describe(self, images: Sequence[DecodedImage]) -> list[Description]:
        return [Description(text=NULL_TEXT) for _ in images]
