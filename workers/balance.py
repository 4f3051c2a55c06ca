"""Cores where the work is: ``pixelrelay run`` shares the machine's threads between its three
local workers in proportion to each stage's measured CPU seconds per item.

Off unless ``PIXELRELAY_BALANCE_DIR`` names a folder. Each worker writes ``cost-<stage>.json``
after every chunk but its first; ``Balancer.tick`` writes ``threads.json`` (``split``); each
worker applies its count with ``torch.set_num_threads``. Every file read is validated:
nothing here can fail a chunk.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from pixelrelay.pipeline.constants import STAGES

log = logging.getLogger("pixelrelay.balance")

ENV_DIR = "PIXELRELAY_BALANCE_DIR"
THREADS_FILE = "threads.json"
EVERY_S = 10.0
MIN_ITEMS = 8
MAX_THREADS = 1024


def cost_file(folder: str, stage: str) -> str:
    return os.path.join(folder, f"cost-{stage}.json")


def _write_json(path: str, value: object) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def _read_json(path: str) -> object:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def prior(threads: int) -> dict[str, int]:
    """The split before anything is measured: decode is the usual bottleneck."""
    return {"encode": max(1, threads // 4), "plan": 1, "decode": max(1, threads - threads // 4)}


def split(costs: Mapping[str, float], threads: int) -> dict[str, int]:
    """``threads`` shared in proportion to ``costs`` (CPU seconds per item), at least one each.

    The minimum of one can oversubscribe the machine by a thread or two; a cheap stage's
    worker idles most of the time, so its thread rarely competes."""
    total = sum(max(0.0, c) for c in costs.values())
    if total <= 0:
        return prior(threads)
    return {stage: max(1, math.floor(threads * max(0.0, c) / total + 0.5)) for stage, c in costs.items()}


@dataclass
class Reporter:
    """A worker's side: record this stage's cost, apply its thread count."""

    folder: str
    stage: str
    items: int = 0
    started_cpu: float = field(default_factory=time.process_time)
    seen_mtime: float = 0.0

    def after_chunk(self, items: int) -> None:
        try:
            self.items += max(0, items)
            _write_json(
                cost_file(self.folder, self.stage),
                {"items": self.items, "cpu_s": time.process_time() - self.started_cpu},
            )
            self._apply()
        except Exception as exc:  # noqa: BLE001 (a balance problem never fails a chunk)
            log.debug("balance: %s", exc)

    def _apply(self) -> None:
        path = os.path.join(self.folder, THREADS_FILE)
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            return
        if mtime == self.seen_mtime:
            return
        self.seen_mtime = mtime
        value = _read_json(path)
        count = value.get(self.stage) if isinstance(value, dict) else None
        if type(count) is not int or not 1 <= count <= MAX_THREADS:
            return
        torch = sys.modules.get("torch")  # a stage that never imported torch has no threads to set
        if torch is not None and torch.get_num_threads() != count:
            torch.set_num_threads(count)
            log.info("%s: %d torch threads (pixelrelay run's balance)", self.stage, count)


_reporter: Reporter | None = None


def after_chunk(stage: str, items: int) -> None:
    """Called by ``pixelrelay.workers.tasks.run_stage`` after every chunk; a no-op unless balancing is on."""
    global _reporter
    folder = os.environ.get(ENV_DIR)
    if not folder:
        return
    if _reporter is None or _reporter.stage != stage:
        _reporter = Reporter(folder, stage)  # counts from here: model loading and warm-up left out
        return
    _reporter.after_chunk(items)


@dataclass
class Balancer:
    """``run``'s side: split ``threads`` between the stages by their measured cost."""

    folder: str
    threads: int
    current: dict[str, int] = field(default_factory=dict)
    last: float = 0.0

    def __post_init__(self) -> None:
        self.current = prior(self.threads)

    def costs(self) -> dict[str, float] | None:
        """CPU seconds per item per stage, or None until each busy stage has ``MIN_ITEMS``."""
        costs: dict[str, float] = {}
        for stage in STAGES:
            row = _read_json(cost_file(self.folder, stage))
            if not isinstance(row, dict):
                return None
            items, cpu_s = row.get("items"), row.get("cpu_s")
            if type(items) is not int or not isinstance(cpu_s, (int, float)) or items < MIN_ITEMS or cpu_s < 0:
                return None
            costs[stage] = float(cpu_s) / items
        return costs

    def tick(self) -> dict[str, int] | None:
        """Re-split when due; the new split when it changed (and was written), else None."""
        now = time.monotonic()
        if now - self.last < EVERY_S:
            return None
        costs = self.costs()
        if costs is None:  # looked at again on the next tick
            return None
        self.last = now
        wanted = split(costs, self.threads)
        if wanted == self.current:
            return None
        self.current = wanted
        _write_json(os.path.join(self.folder, THREADS_FILE), wanted)
        return wanted
