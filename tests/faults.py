"""Fault-injection backends for tests, loaded into real workers through PIXELRELAY_PLUGINS.

``crashing`` decodes like ``classic`` but kills its own worker process (as a segfault or the
kernel's OOM killer would) on any image exactly 13 pixels wide.
"""

from __future__ import annotations

import os

from pixelrelay.pipeline.stages.decoders.classic import ClassicDecoder
from pixelrelay.pipeline.stages.registry import register

POISON_WIDTH = 13


class CrashingDecoder(ClassicDecoder):
    kind = "crashing"

    def restore(self, images, plans):
        if any(image.width == POISON_WIDTH for image in images):
            os._exit(137)
        return super().restore(images, plans)


register("decoder", "crashing", "tests.faults:CrashingDecoder")
