"""The ``null`` planner: the same empty plan for every item; only the scale follows the job
(``JobOptions.effective_scale``). For measuring pixelrelay's own per-item cost.
"""

from __future__ import annotations

from collections.abc import Sequence

from pixelrelay.pipeline import outsize
from pixelrelay.pipeline.messages import Description, JobOptions, Plan
from pixelrelay.pipeline.stages.base import Planner, check_batch

NULL_RATIONALE = "null planner: no operations"


class NullPlanner(Planner):
    """description + options -> a fixed, schema-valid Plan with no operations."""

    kind = "null"

    def plan(self, descriptions: Sequence[Description], options: Sequence[JobOptions]) -> list[Plan]:
        check_batch(descriptions, options, "descriptions/options")
        return [_plan(o) for o in options]


def _plan(options: JobOptions) -> Plan:
    scale, target = outsize.planned(options)
    return Plan(scale=scale, target=target, output_format=options.format or "png", rationale=NULL_RATIONALE)
