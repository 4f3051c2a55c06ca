"""A chunk's time limits, derived from its job: the job's chunk size and item budget travel
in its signed spec (``JobSpec.chunk_size``, ``JobSpec.item_budget_s``), so every worker
bounds a chunk by the job's figures, never by its own settings.

The lease watchdog (``pixelrelay.workers.lease``) allows ``items x item_budget_s``; Celery's
hard time limit (prefork pools), sent with each stage message, adds ``HARD_LIMIT_MARGIN_S``
for the watchdog to finish the chunk first. ``check_chunk`` refuses at submit a chunk whose
budget is over ``MAX_CHUNK_BUDGET_S``. Design: docs/design.md, "Time limits".
"""

from __future__ import annotations

import math

from pixelrelay.pipeline.settings import ConfigError

MAX_CHUNK_BUDGET_S = 24 * 3600  # the longest a chunk may be budgeted (chunk size x item budget)
HARD_LIMIT_MARGIN_S = 180.0  # Celery's hard limit past the watchdog's budget: two leases and a minute
SOFT_LIMIT_LEAD_S = 30.0  # Celery's soft limit comes this long before the hard one


def chunk_budget_s(items: int, item_budget_s: float) -> float:
    """The watchdog's budget for ``items`` pending items (at least one)."""
    return max(1, items) * item_budget_s


def celery_limits(items: int, item_budget_s: float) -> tuple[float, float]:
    """Celery's (soft, hard) time limits for a stage message of ``items`` records."""
    hard = chunk_budget_s(items, item_budget_s) + HARD_LIMIT_MARGIN_S
    return max(1.0, hard - SOFT_LIMIT_LEAD_S), hard


def check_chunk(chunk_size: int, item_budget_s: float) -> None:
    """Raise ``ConfigError`` when a job of ``chunk_size`` items at ``item_budget_s`` each
    would be budgeted over ``MAX_CHUNK_BUDGET_S``."""
    budget = chunk_size * item_budget_s
    if budget > MAX_CHUNK_BUDGET_S:
        most = max(1, math.floor(MAX_CHUNK_BUDGET_S / item_budget_s))
        raise ConfigError(
            f"--chunk-size {chunk_size}: {chunk_size} items x {item_budget_s:g} s item budget "
            f"(PIXELRELAY_ITEM_BUDGET_S) = {budget:.0f} s, over the {MAX_CHUNK_BUDGET_S} s a chunk may run; "
            f"use --chunk-size {most} or less, or a smaller item budget"
        )
