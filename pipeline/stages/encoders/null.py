"""The ``null`` encoder: a pass-through that describes every image the same way.

It measures nothing, so a job run with the null backends (``null`` / ``null`` / ``null``)
costs only what pixelrelay itself costs per item: broker, storage, image codecs and
bookkeeping (``benchmarks/bench_overhead.py``). Deterministic, weight-free, no torch.
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
