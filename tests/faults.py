"""Fault-injection backends for tests, loaded into real workers through PIXELRELAY_PLUGINS.

``crashing`` decodes like ``classic`` but kills its own worker process (as a segfault or the
kernel's OOM killer would) on any image exactly 13 pixels wide.

``hanging`` decodes like ``classic`` but never returns (sleeps an hour) on any image exactly
13 pixels wide: a hung model call, for the watchdog.

``slow`` (an encoder, a planner and a decoder) works like ``analysis`` / ``rules`` /
``classic`` but sleeps ``PIXELRELAY_TEST_SLOW_S`` seconds (default 0.3) per item first, so a
test can stop a worker while it is inside a chunk. With ``PIXELRELAY_TEST_CALL_LOG`` set, the
``slow`` decoder appends a line per image it restores to that file (``<pid> <width>x<height>``),
so a test can count how often each item was decoded, and by which process.
"""

from __future__ import annotations

import os
import time

from pixelrelay.pipeline.stages.decoders.classic import ClassicDecoder
from pixelrelay.pipeline.stages.encoders.analysis import AnalysisEncoder
from pixelrelay.pipeline.stages.planners.rules import RulesPlanner
from pixelrelay.pipeline.stages.registry import register

POISON_WIDTH = 13
SLOW_ENV = "PIXELRELAY_TEST_SLOW_S"
CALL_LOG_ENV = "PIXELRELAY_TEST_CALL_LOG"


class CrashingDecoder(ClassicDecoder):
    kind = "crashing"

    def restore(self, images, plans):
        if any(image.width == POISON_WIDTH for image in images):
            os._exit(137)
        return super().restore(images, plans)


class HangingDecoder(ClassicDecoder):
    kind = "hanging"

    def restore(self, images, plans):
        if any(image.width == POISON_WIDTH for image in images):
            time.sleep(3600)
        return super().restore(images, plans)


def _nap(items: int) -> None:
    time.sleep(float(os.environ.get(SLOW_ENV, "0.3")) * items)


class SlowEncoder(AnalysisEncoder):
    kind = "slow"

    def describe(self, images):
        _nap(len(images))
        return super().describe(images)


class SlowPlanner(RulesPlanner):
    kind = "slow"

    def plan(self, descriptions, options):
        _nap(len(descriptions))
        return super().plan(descriptions, options)


class SlowDecoder(ClassicDecoder):
    kind = "slow"

    def restore(self, images, plans):
        _nap(len(images))
        restored = super().restore(images, plans)
        log = os.environ.get(CALL_LOG_ENV)
        if log:
            with open(log, "a", encoding="ascii") as f:  # one append per call: processes' lines never mix
                f.write("".join(f"{os.getpid()} {image.width}x{image.height}\n" for image in images))
        return restored


register("decoder", "crashing", "tests.faults:CrashingDecoder")
register("decoder", "hanging", "tests.faults:HangingDecoder")
register("encoder", "slow", "tests.faults:SlowEncoder")
register("planner", "slow", "tests.faults:SlowPlanner")
register("decoder", "slow", "tests.faults:SlowDecoder")
