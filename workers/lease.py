"""A worker's lease on the chunk it runs, renewed while the chunk is within its time budget,
and the watchdog that ends a chunk whose budget is spent.

Invariants:

* While a stage body runs, its worker holds ``pixelrelay:job:<id>:lease:<slot>`` (value: the
  worker's id, ``PX lease_s``), taken *before* the chain's entry is set to this stage. A
  heartbeat thread renews it every ``lease_s / 3``, also while the main thread is inside a
  long model call, so a live lease means a live worker making progress.
* Renewal is bounded by progress, not by the clock alone: a delivery earns a budget of
  ``pending items x item_budget_s`` seconds (``PIXELRELAY_ITEM_BUDGET_S``) and the heartbeat
  stops renewing once it is spent. A hung call therefore loses its lease after at most
  budget + ``lease_s``, and the sweep can take the chunk over.
* When the budget is spent the watchdog (the heartbeat thread) fails the delivery's pending
  items with "timed out after N s", finishes the chunk (part written, bits marked, next
  chunk fed: ``DeliveryPolicy.time_out``) and then ends the worker process with
  ``os._exit(WATCHDOG_EXIT_CODE)``: a model call cannot be interrupted, so the process that
  runs it is given up, and its supervisor (systemd, Kubernetes, compose ``restart:``, the
  prefork pool for a child) starts a new one. The message it held is dropped on redelivery
  as a stale duplicate (its part is written).
* The lease is not deleted when the body returns: it runs out by itself, covering the
  moment in which Celery sends the chain's next message.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

import redis

from pixelrelay.jobs import keys
from pixelrelay.jobs.chunks import Slot

log = logging.getLogger("pixelrelay.worker")

WATCHDOG_EXIT_CODE = 75  # EX_TEMPFAIL: a chunk overran its budget; restart this worker


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class LeaseTiming:
    lease_s: float
    item_budget_s: float

    def budget(self, items: int) -> float:
        return max(1, items) * self.item_budget_s

    @property
    def renew_every_s(self) -> float:
        return self.lease_s / 3


class Lease:
    """Holds one slot's lease for the length of a ``with`` block (see the module docstring).

    ``on_timeout(budget_s)`` is called in the heartbeat thread once the budget is spent."""

    def __init__(
        self,
        client: redis.Redis,
        job_id: str,
        slot: Slot,
        timing: LeaseTiming,
        items: int,
        on_timeout: Callable[[float], None],
        owner: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.r, self.key, self.timing = client, keys.lease(job_id, slot.name), timing
        self.owner = owner or worker_id()
        self.budget_s = timing.budget(items)
        self.on_timeout, self.clock = on_timeout, clock
        self.expired = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="pixelrelay-lease", daemon=True)

    def __enter__(self) -> "Lease":
        self._renew()
        self._deadline = self.clock() + self.budget_s
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(max(1.0, self.timing.lease_s))

    def _renew(self) -> None:
        self.r.set(self.key, self.owner, px=max(1, int(self.timing.lease_s * 1000)))

    def _beat(self) -> None:
        while not self._stop.wait(max(0.0, min(self.timing.renew_every_s, self._deadline - self.clock()))):
            if self.clock() >= self._deadline:
                if self._stop.is_set():  # the body returned just in time
                    return
                self.expired = True
                self.on_timeout(self.budget_s)
                return
            try:
                self._renew()
            except redis.RedisError as exc:  # the lease may lapse; the chunk may be re-sent (idempotent)
                log.warning("cannot renew lease %s: %s", self.key, exc)


def deliver_leased(policy, delivery, work, timing: LeaseTiming, exit: Callable[[int], None] = os._exit):
    """``policy.deliver(delivery, work)`` under a lease on the delivery's slot, with the
    watchdog armed; ``exit`` ends the process once the watchdog finished the chunk."""
    msg = delivery.msg

    def on_timeout(budget_s: float) -> None:
        try:
            policy.time_out(delivery, budget_s)
        except BaseException:
            log.exception("watchdog: cannot finish chunk %s/%d; the sweep will re-send it", msg.job_id, msg.chunk)
        finally:
            log.error("watchdog: a %s call overran its %g s budget: exiting (code %d) for a restart",
                      delivery.stage, budget_s, WATCHDOG_EXIT_CODE)
            for handler in logging.getLogger().handlers + log.handlers:
                try:
                    handler.flush()
                except Exception:
                    pass
            exit(WATCHDOG_EXIT_CODE)

    with Lease(policy.state.r, msg.job_id, Slot.of(msg), timing, len(delivery.pending()), on_timeout):
        return policy.deliver(delivery, work)
