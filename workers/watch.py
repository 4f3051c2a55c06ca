"""What the watchdog knows of a delivery's model calls: the items in the call running now
(the suspects, should it hang) and the items still to run, which set the budget.

The stage bodies wrap each model call in ``model_call(records)``; ``workers.lease`` arms a
``Watch`` around the delivery (``watching``), on the thread that runs the stage body. While a
call runs, its budget is its own items x ``item_budget_s``; after it, the items still to run
x ``item_budget_s``. Outside a delivery (tests, tools) ``model_call`` does nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from pixelrelay.pipeline.messages import ItemRecord

if TYPE_CHECKING:
    from pixelrelay.workers.lease import Lease


class Watch:
    """One delivery's model calls, written by the thread running them, read by the watchdog.
    ``remaining`` over-counts items that never reach a call (they failed to load): the budget
    errs long, never short."""

    def __init__(self, pending: int) -> None:
        self.remaining = pending
        self.suspects: tuple[int, ...] = ()  # indices of the items in the call now; () between calls
        self.lease: Lease | None = None

    def enter(self, indices: tuple[int, ...]) -> None:
        self.suspects = indices
        if self.lease is not None:
            self.lease.retime(len(indices))

    def leave(self) -> None:
        self.remaining = max(0, self.remaining - len(self.suspects))
        self.suspects = ()
        if self.lease is not None:
            self.lease.retime(self.remaining)


_local = threading.local()


@contextmanager
def watching(watch: Watch, lease: Lease) -> Iterator[Watch]:
    """Arm ``watch`` for the model calls this thread makes inside the block."""
    watch.lease, outer = lease, getattr(_local, "watch", None)
    _local.watch = watch
    try:
        yield watch
    finally:
        _local.watch = outer


@contextmanager
def model_call(records: Sequence[ItemRecord]) -> Iterator[None]:
    """Tell the watchdog that a model call on ``records`` runs inside the block."""
    watch: Watch | None = getattr(_local, "watch", None)
    if watch is None:
        yield
        return
    watch.enter(tuple(r.index for r in records))
    try:
        yield
    finally:
        watch.leave()
