"""A worker's lease on the chunk it runs, its heartbeat, and the watchdog.

Invariants: the lease (``pixelrelay:job:<id>:lease:<slot>``, ``PX lease_s``) is taken before
the chain's entry is set to this stage; one heartbeat thread per process renews its leases
(and marks the worker seen: ``observe.present``) every ``lease_s / 3`` (at most
``RENEW_MAX_S``), only while the delivery's budget lasts: pending items x the job's
``item_budget_s`` at first, then retimed by each model call (``workers.watch``: the call's
items while it runs, the items still to run after it; never past the first deadline). Each
renewal also moves the broker's delivery time of the chunk's message
(``pixelrelay.workers.transport.touch``), so no visibility timeout restores a renewed one.
Once the budget is spent the watchdog ends the delivery (``DeliveryPolicy.time_out``: the
item that hung fails, the others go on in chains of their own) and the process
(``WATCHDOG_EXIT_CODE``), since a model call cannot be interrupted. A lease is never deleted:
it runs out, covering the hand-off to the next stage.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import redis

from pixelrelay.jobs import keys
from pixelrelay.jobs.chunks import Slot
from pixelrelay.workers import observe
from pixelrelay.workers.transport import delivery_tags, touch
from pixelrelay.workers.watch import Watch, watching

log = logging.getLogger("pixelrelay.worker")

WATCHDOG_EXIT_CODE = 75  # EX_TEMPFAIL: a chunk overran its budget; restart this worker
# The longest between two renewals whatever the lease: a third of the shortest visibility
# timeout any worker accepts (``Settings.min_visibility_s``: over 60 s), so no client of a
# fleet restores a message whose lease is being renewed.
RENEW_MAX_S = 20.0


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
        return min(self.lease_s / 3, RENEW_MAX_S)


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
        task_id: str | None = None,
    ) -> None:
        """A lease on one slot, armed by ``with``.

        Args:
            client: Redis.
            job_id: the job.
            slot: the chain.
            timing: lease length, renewal and per-item budget.
            items: pending items: the budget is ``items x item_budget_s``.
            on_timeout: called with the budget in the heartbeat thread once the budget is spent.
            owner: the lease's value; None: this worker's id.
            task_id: the delivery's Celery task id, whose unacked message each renewal
                touches; None: none is.
        """
        self.r, self.key, self.timing = client, keys.lease(job_id, slot.name), timing
        self.owner = owner or worker_id()
        self.budget_s = timing.budget(items)
        self.on_timeout = on_timeout
        self.deadline = self.limit = self.next_renew = 0.0  # limit: the first deadline, never passed
        self.task_id, self.tags = task_id, list[str]() if task_id is None else None

    def __enter__(self) -> Lease:
        """Arm the heartbeat and the watchdog. The lease itself is first written by ``take``,
        in the delivery policy's admission transaction, with the chain's entry."""
        now = time.monotonic()
        self.deadline, self.next_renew = now + self.budget_s, now + self.timing.renew_every_s
        self.limit = self.deadline
        _heartbeat().hold(self)
        return self

    def __exit__(self, *exc) -> None:
        _heartbeat().release(self)

    def take(self, pipe) -> None:
        """Queue the lease's first write on ``pipe`` (a transaction its caller runs)."""
        pipe.set(self.key, self.owner, px=max(1, int(self.timing.lease_s * 1000)))

    def renew(self) -> None:
        """Renew the lease and move its message's delivery time to now (its tags are looked
        up at the first renewal: most deliveries end before it)."""
        if self.tags is None and self.task_id is not None:
            self.tags = delivery_tags(self.r, self.task_id)
        pipe = self.r.pipeline(transaction=False)
        self.take(pipe)
        touch(pipe, self.tags or [], time.time())
        pipe.execute()

    def retime(self, items: int) -> None:
        """The budget from now on: ``items x item_budget_s`` (the items still to run), never past
        the first deadline (the bound the visibility timeout and Celery's limits derive from)."""
        _heartbeat().retime(self, self.timing.budget(items))

    def due(self) -> float:
        return min(self.next_renew, self.deadline)


class _Heartbeat:
    """The one heartbeat thread of a process: it renews every lease the process holds and
    times out those whose budget is spent. It is started with the first lease and then kept
    (a thread per delivery cost a start and a join per chunk and stage), and made anew in a
    forked child (``os.register_at_fork``), which has no thread of its parent's."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: set[Lease] = set()
        self._thread: threading.Thread | None = None
        self._wake_at = float("inf")  # when the thread wakes next by itself

    def hold(self, lease: Lease) -> None:
        with self._cond:
            self._held.add(lease)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="pixelrelay-lease", daemon=True)
                self._thread.start()
            if lease.due() < self._wake_at:  # else its wake-up comes first anyway: no GIL hand-off
                self._cond.notify()

    def release(self, lease: Lease) -> None:
        with self._cond:
            self._held.discard(lease)

    def retime(self, lease: Lease, budget_s: float) -> None:
        """Move a held lease's deadline to ``budget_s`` from now, at most to its limit (a spent
        one stays spent)."""
        with self._cond:
            if lease not in self._held:
                return
            lease.budget_s, lease.deadline = budget_s, min(lease.limit, time.monotonic() + budget_s)
            if lease.due() < self._wake_at:
                self._cond.notify()

    def _next(self) -> tuple[list[Lease], list[Lease]]:
        """Wait until some lease is due: (leases to renew, leases whose budget is spent).
        The spent ones are released here, so they are timed out once."""
        with self._cond:
            while True:
                now = time.monotonic()
                due = [lease for lease in self._held if lease.due() <= now]
                if due:
                    spent = [lease for lease in due if now >= lease.deadline]
                    self._held.difference_update(spent)
                    return [lease for lease in due if lease not in spent], spent
                wait = min((lease.due() - now for lease in self._held), default=None)
                self._wake_at = float("inf") if wait is None else now + wait
                self._cond.wait(wait)  # None: until a lease is held
                self._wake_at = float("-inf")  # awake: a lease held now is looked at before the next wait

    def _run(self) -> None:
        while True:
            renew, spent = self._next()
            for lease in spent:
                self._renew(lease)  # one last time: the chain stays leased while the watchdog ends it
                try:
                    lease.on_timeout(lease.budget_s)
                except Exception:  # never the end of the thread: the other leases still need it
                    log.exception("watchdog of lease %s failed", lease.key)
            for lease in renew:
                lease.next_renew = time.monotonic() + lease.timing.renew_every_s
                self._renew(lease)
            if renew:
                observe.present(renew[0].r)  # a worker deep in a long call is still seen

    @staticmethod
    def _renew(lease: Lease) -> None:
        try:
            lease.renew()
        except Exception as exc:  # the lease may lapse; the chunk may be re-sent (idempotent)
            log.warning("cannot renew lease %s: %s", lease.key, exc)


_beat: _Heartbeat | None = None


def _heartbeat() -> _Heartbeat:
    global _beat
    if _beat is None:
        _beat = _Heartbeat()
    return _beat


def _forget_heartbeat() -> None:  # in a forked child: the parent's thread and lock are not ours
    global _beat
    _beat = None


os.register_at_fork(after_in_child=_forget_heartbeat)


def deliver_leased(
    policy, delivery, work, timing: LeaseTiming, exit: Callable[[int], None] = os._exit, task_id: str | None = None
):
    """``policy.deliver(delivery, work)`` under a lease on the delivery's slot, with the
    watchdog armed and told of the model calls (``workers.watch``); ``exit`` ends the process
    once the watchdog finished the chunk; ``task_id``: the Celery task whose unacked message
    the renewals touch."""
    msg = delivery.msg
    watch = Watch(len(delivery.pending()))

    def on_timeout(budget_s: float) -> None:
        try:
            policy.time_out(delivery, budget_s, watch.suspects)
        except BaseException:
            log.exception("watchdog: cannot finish chunk %s/%d; the sweep will re-send it", msg.job_id, msg.chunk)
        finally:
            log.error(
                "watchdog: a %s call overran its %g s budget: exiting (code %d) for a restart",
                delivery.stage,
                budget_s,
                WATCHDOG_EXIT_CODE,
            )
            for handler in logging.getLogger().handlers + log.handlers:
                try:
                    handler.flush()
                except Exception:
                    pass
            exit(WATCHDOG_EXIT_CODE)

    with Lease(policy.state.r, msg.job_id, Slot.of(msg), timing, watch.remaining, on_timeout, task_id=task_id) as lease:
        with watching(watch, lease):
            return policy.deliver(replace(delivery, lease=lease), work)
