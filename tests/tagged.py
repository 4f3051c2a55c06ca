"""Test backends for fingerprints, loaded into real workers through PIXELRELAY_PLUGINS.

``tagged`` decodes like ``classic``; its model identity is ``tagged:<TAG>``, TAG read from
``PIXELRELAY_TEST_DECODER_TAG`` when the backend is built: a worker restarted with another
tag stands for a decoder whose weights changed.
"""

from __future__ import annotations

import os

from pixelrelay.pipeline.stages.decoders.classic import ClassicDecoder
from pixelrelay.pipeline.stages.registry import register

TAG_ENV = "PIXELRELAY_TEST_DECODER_TAG"


class TaggedDecoder(ClassicDecoder):
    kind = "tagged"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tag = os.environ.get(TAG_ENV, "a")

    def compute_identity(self) -> str:
        return f"tagged:{self.tag}"


register("decoder", "tagged", "tests.tagged:TaggedDecoder")
