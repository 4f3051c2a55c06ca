"""The sweep: find chains that are neither running nor waiting in a queue, and send them again.

``sweep_once`` is Celery-free (it is given a ``send``). A chain in flight is left alone when
it is young (its entry is under ``lease_s`` plus its retry wait old), leased, queued (its
task id in a queue list) or just taken (in kombu's ``unacked`` under ``lease_s`` ago).
Otherwise it is lost: after a short confirmation pause it is re-sent once, under a per-slot
lock, rebuilt from the job's listing in storage and sent from encode; its dead message is
removed from ``unacked``. A lost chain whose part is written has its finish completed
instead; one of a cancelled job is untracked. A job whose spec or cursor fails its signature
is skipped. ``rebuild_registered`` rebuilds the registry's jobs that Redis lost. See
docs/design.md, "Failure and recovery".
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import cast

import redis

from pixelrelay.jobs import keys
from pixelrelay.jobs.chunks import ChunksInFlight, Entry, Slot, TaskRef, parse_entries, parse_task_id, tracked
from pixelrelay.jobs.feed import Send, feed
from pixelrelay.jobs.files import read_chunk, read_part, record_for
from pixelrelay.jobs.finish import finalize_cancelled, finalize_if_complete, finish_pending
from pixelrelay.jobs.merge import merge_group_if_complete
from pixelrelay.jobs.recover import RebuildError, rebuild
from pixelrelay.jobs.registry import Registry
from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline import constants as C
from pixelrelay.pipeline.messages import ChunkMessage
from pixelrelay.pipeline.signing import SignatureError, Signer
from pixelrelay.pipeline.storage import Storage

log = logging.getLogger("pixelrelay.sweep")

OpenStorage = Callable[[str], Storage]
QUEUES = tuple(C.QUEUE_PREFIX + stage for stage in C.STAGES)
PAGE = 256  # queue-list entries read per LRANGE


@dataclass
class SweepReport:
    jobs: int = 0
    in_flight: int = 0
    candidates: int = 0  # neither young nor leased: the queues were read
    resent: list[str] = field(default_factory=list)  # "<job>/<slot>"
    finished: list[str] = field(default_factory=list)  # lost after their part was written
    retired: list[str] = field(default_factory=list)  # jobs taken off the active set


@dataclass(frozen=True)
class Lost:
    job_id: str
    slot: Slot
    entry: Entry
    unacked: tuple[str, ...] = ()  # delivery tags of its dead worker's messages in ``unacked``

    @property
    def ref(self) -> str:
        return f"{self.job_id}/{self.slot.name}"


def sweep_once(
    client: redis.Redis,
    send: Send,
    open_storage: OpenStorage,
    lease_s: float,
    confirm_s: float | None = None,
    now: Callable[[], float] = time.time,
    *,
    signer: Signer,
) -> SweepReport:
    """One sweep over every active job (see the module docstring).

    Args:
        client: Redis.
        send: sends a re-built chain.
        open_storage: opens a job's output storage.
        lease_s: how long a chain may go unleased and unqueued before it is lost.
        confirm_s: the pause before a lost chain is confirmed; None: min(1 s, lease_s / 4).
        now: the clock (tests).
        signer: checks each job's spec and cursor.

    Returns:
        What the sweep did: chains re-sent, finishes completed, entries dropped.
    """
    report = SweepReport()
    candidates = _candidates(client, lease_s, now(), report)
    report.candidates = len(candidates)
    lost = _not_waiting(client, candidates, lease_s, now())
    if lost:
        time.sleep(min(1.0, lease_s / 4) if confirm_s is None else confirm_s)
        lost = _not_waiting(client, _still_candidates(client, lost, lease_s, now()), lease_s, now())
    for item in lost:
        if client.set(keys.resend_lock(item.job_id, item.slot.name), "1", nx=True, px=max(1, int(lease_s * 1000))):
            _recover(client, send, open_storage, item, report, signer)
    return report


# --- finding candidates ---------------------------------------------------------------------


def _candidates(client: redis.Redis, lease_s: float, at: float, report: SweepReport) -> list[Lost]:
    jobs = sorted(_text(m) for m in client.smembers(keys.ACTIVE_JOBS) if _is_text(m))
    report.jobs = len(jobs)
    if not jobs:
        return []
    pipe = client.pipeline(transaction=False)
    for job_id in jobs:
        pipe.hmget(keys.job(job_id), "seq", "finished_seq", "finished_at")
        pipe.hgetall(keys.chunks(job_id))
    replies = pipe.execute()
    old: list[Lost] = []
    for i, job_id in enumerate(jobs):
        (seq, finished_seq, finished_at), raw = replies[2 * i], replies[2 * i + 1]
        if seq is None or (finished_at and finished_seq == seq):
            ChunksInFlight(client, job_id).retire()
            report.retired.append(job_id)
            continue
        entries, invalid = parse_entries(raw)
        stale = [s for s in entries if s.seq != int(seq)]
        if invalid or stale:
            client.hdel(keys.chunks(job_id), *invalid, *(s.name for s in stale))
        current = {s: e for s, e in entries.items() if s.seq == int(seq)}
        report.in_flight += len(current)
        old += [Lost(job_id, s, e) for s, e in current.items() if e.quiet_until(lease_s) <= at]
    return _unleased(client, old)


def _unleased(client: redis.Redis, items: list[Lost]) -> list[Lost]:
    if not items:
        return []
    pipe = client.pipeline(transaction=False)
    for item in items:
        pipe.exists(keys.lease(item.job_id, item.slot.name))
    return [item for item, leased in zip(items, pipe.execute(), strict=True) if not leased]


def _still_candidates(client: redis.Redis, items: list[Lost], lease_s: float, at: float) -> list[Lost]:
    """Re-read the entries and leases of ``items``: keep those still old and unleased."""
    pipe = client.pipeline(transaction=False)
    for item in items:
        pipe.hget(keys.chunks(item.job_id), item.slot.name)
    fresh = []
    for item, raw in zip(items, pipe.execute(), strict=True):
        entry = Entry.from_json(raw) if raw is not None else None
        if entry is not None and entry.quiet_until(lease_s) <= at:
            fresh.append(Lost(item.job_id, item.slot, entry))
    return _unleased(client, fresh)


# --- what waits in the broker ---------------------------------------------------------------


def _not_waiting(client: redis.Redis, items: list[Lost], lease_s: float, at: float) -> list[Lost]:
    """Those of ``items`` with no message in a queue and none taken by a worker lately (with
    the tags of the messages that dead workers took)."""
    if not items:
        return []
    wanted = {(i.job_id, i.slot) for i in items}
    recent, dead = _taken(client, wanted, at - lease_s)
    waiting = _queued(client, wanted) | recent
    return [
        Lost(i.job_id, i.slot, i.entry, tuple(dead.get((i.job_id, i.slot), ())))
        for i in items
        if (i.job_id, i.slot) not in waiting
    ]


def _queued(client: redis.Redis, wanted: set[tuple[str, Slot]]) -> set[tuple[str, Slot]]:
    found: set[tuple[str, Slot]] = set()
    for queue in QUEUES:
        for name in keys.kombu_queue_lists(queue):
            for start in range(0, int(client.llen(name)), PAGE):
                found |= {
                    k for k in map(_slot_of, _task_refs(client.lrange(name, start, start + PAGE - 1))) if k in wanted
                }
                if found >= wanted:
                    return found
    return found


def _taken(client: redis.Redis, wanted: set[tuple[str, Slot]], since: float):
    """Slots of messages workers took (``unacked``) at or after ``since``, and the delivery
    tags of those taken before it, by slot."""
    # redis-py types ZRANGE's reply as either form; WITHSCORES gives (member, score) pairs
    scored = cast(list[tuple[bytes, float]], client.zrange(keys.KOMBU_UNACKED_INDEX, 0, -1, withscores=True))
    delivered = {_text(tag): score for tag, score in scored}
    recent: set[tuple[str, Slot]] = set()
    dead: dict[tuple[str, Slot], list[str]] = {}
    for tag, raw in client.hgetall(keys.KOMBU_UNACKED).items():
        envelope = _json(raw)
        ref = _ref(envelope[0]) if isinstance(envelope, list) and envelope else None
        if ref is None or (ref.job_id, ref.slot) not in wanted:
            continue
        if delivered.get(_text(tag), 0.0) >= since:
            recent.add((ref.job_id, ref.slot))
        else:
            dead.setdefault((ref.job_id, ref.slot), []).append(_text(tag))
    return recent, dead


def _forget_unacked(client: redis.Redis, tags: Iterable[str]) -> None:
    """Drop a dead worker's messages from ``unacked``: the re-sent chain replaces them, so
    kombu must not restore them after the visibility timeout (an ack of them is a no-op)."""
    tags = list(tags)
    if tags:
        pipe = client.pipeline()
        pipe.zrem(keys.KOMBU_UNACKED_INDEX, *tags)
        pipe.hdel(keys.KOMBU_UNACKED, *tags)
        pipe.execute()


def _task_refs(raws: Iterable[bytes | str]) -> Iterable[TaskRef]:
    for raw in raws:
        ref = _ref(_json(raw))
        if ref is not None:
            yield ref


def _ref(message: object) -> TaskRef | None:
    headers = message.get("headers") if isinstance(message, dict) else None
    return parse_task_id(headers.get("id")) if isinstance(headers, dict) else None


def _slot_of(ref: TaskRef) -> tuple[str, Slot]:
    return (ref.job_id, ref.slot)


def _json(raw: bytes | str) -> object:
    """An entry of a queue or of ``unacked``, or None for junk (anyone who can write to Redis
    may have put it there; ``workers.screen`` drops it when a worker takes it)."""
    try:
        return json.loads(raw)
    except (ValueError, TypeError, RecursionError):
        return None


def _is_text(value: bytes | str) -> bool:
    if isinstance(value, str):
        return True
    try:
        value.decode()
        return True
    except UnicodeDecodeError:
        return False


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


# --- recovering a lost chain -------------------------------------------------------------


def _recover(
    client: redis.Redis, send: Send, open_storage: OpenStorage, item: Lost, report: SweepReport, signer: Signer
) -> None:
    state = JobState(client, item.job_id, signer)
    try:
        spec = state.spec()
        storage = open_storage(spec.output)
        if _finish_written(state, storage, send, item):
            report.finished.append(item.ref)
        elif state.cancelled():  # a cancelled job's lost chain is dropped, never sent again
            _finish(state, storage, send, item)
            report.finished.append(item.ref)
        elif (msg := _rebuild(state, storage, item)) is None:  # every item done: only the finish is missing
            _finish(state, storage, send, item)
            report.finished.append(item.ref)
        else:
            log.warning(
                "chunk %s lost at %s (no lease, not queued): sending it again from encode", item.ref, item.entry.stage
            )
            tracked(send, client)(msg)
            report.resent.append(item.ref)
        _forget_unacked(client, item.unacked)
    except SignatureError as exc:  # a forged spec or cursor: never acted on
        log.warning("sweep: chunk %s skipped: %s", item.ref, exc)
    except Exception:  # one job's trouble must not stop the sweep; the lock runs out, try later
        log.exception("sweep: cannot recover chunk %s", item.ref)


def _rebuild(state: JobState, storage: Storage, item: Lost) -> ChunkMessage | None:
    spec = state.spec()
    items = read_chunk(storage, spec, item.slot.chunk)
    if item.slot.part:
        items = [i for i in items if str(i.index) == item.slot.part]
    done = state.done_flags([i.index for i in items])
    records = [record_for(i) for i, d in zip(items, done, strict=True) if not d]
    if not records:
        return None
    return ChunkMessage(
        job_id=spec.job_id,
        seq=item.slot.seq,
        chunk=item.slot.chunk,
        output=spec.output,
        options=spec.options,
        backends=spec.backends,
        records=records,
        feeds=item.entry.feeds,
        part=item.slot.part,
    )


def _finish_written(state: JobState, storage: Storage, send: Send, item: Lost) -> bool:
    """If the chain's part is written, complete its finish here; True if it was."""
    spec = state.spec()
    records = read_part(storage, spec.output, spec.job_id, item.slot.chunk, item.slot.seq, item.slot.part)
    if records is None:
        return False
    log.warning("chunk %s lost after its manifest part was written: finishing it", item.ref)
    state.mark(item.slot.seq, [(r.index, r.status) for r in records if r.status])
    _finish(state, storage, send, item)
    return True


def _finish(state: JobState, storage: Storage, send: Send, item: Lost) -> None:
    spec = state.spec()
    if item.entry.feeds:
        feed(send, state, storage, spec, state.seq(), 1)
    merge_group_if_complete(state, storage, spec, item.slot.seq, item.slot.chunk)
    if finalize_if_complete(state, storage, spec, item.slot.seq) or not finish_pending(state, item.slot.seq):
        ChunksInFlight(state.r, item.job_id).untrack(item.slot)  # else kept: a later sweep finishes the job
    finalize_cancelled(state, storage, spec)  # a cancelled job: this may have been its last chain


# --- jobs Redis lost -------------------------------------------------------------------


def rebuild_registered(
    client: redis.Redis, registry: Registry, send: Send, open_storage: OpenStorage, window: int, *, signer: Signer
) -> list[str]:
    """Rebuild every registered job Redis does not know; unlist the finished ones.

    Args:
        client: Redis.
        registry: the storage registry of active jobs.
        send: sends a rebuilt job's chains.
        open_storage: opens a job's output storage.
        window: chains per job in the broker.
        signer: signs a rebuilt job's spec.

    Returns:
        The ids of the jobs rebuilt.
    """
    rebuilt = []
    for entry in registry.entries():
        try:
            seq, finished_seq, finished_at = client.hmget(keys.job(entry.job_id), "seq", "finished_seq", "finished_at")
            if seq is not None and finished_at and finished_seq == seq:
                registry.remove(entry.job_id)
            elif (
                seq is None
                and rebuild(client, open_storage(entry.output), entry.output, entry.job_id, send, window, signer=signer)
                is not None
            ):
                rebuilt.append(entry.job_id)
        except RebuildError as exc:
            log.error("registry: cannot rebuild job %s: %s", entry.job_id, exc)
        except redis.RedisError:
            raise
        except Exception:  # one job's trouble must not stop the others
            log.exception("registry: cannot rebuild job %s", entry.job_id)
    return rebuilt


# --- the timer thread -------------------------------------------------------------------


def sweep_and_log(client: redis.Redis, send: Send, open_storage: OpenStorage, lease_s: float, *, signer: Signer):
    """``sweep_once``, logging what it re-sent or finished (the workers' timer and the
    waiting producers both sweep through this)."""
    report = sweep_once(client, send, open_storage, lease_s, signer=signer)
    if report.resent or report.finished:
        log.warning("sweep: re-sent %s, finished %s", report.resent, report.finished)
    return report


class Sweeper(threading.Thread):
    """Runs ``sweep_once`` every ``interval_s`` (with jitter, so workers spread out)."""

    def __init__(
        self,
        client: redis.Redis,
        send: Send,
        open_storage: OpenStorage,
        interval_s: float,
        lease_s: float,
        registry: Registry | None = None,
        registry_scan_s: float = 30.0,
        window: int = 1,
        *,
        signer: Signer,
    ) -> None:
        """A daemon thread that sweeps, and scans the registry.

        Args:
            client: Redis.
            send: sends a re-built chain.
            open_storage: opens a job's output storage.
            interval_s: seconds between sweeps (jittered).
            lease_s: passed to ``sweep_once``.
            registry: the storage registry of active jobs; None: no scan.
            registry_scan_s: at most one registry scan this often.
            window: chains per job in the broker, for a rebuilt job.
            signer: checks and signs job specs and cursors.
        """
        super().__init__(name="pixelrelay-sweep", daemon=True)
        self.client, self.send, self.open_storage, self.signer = client, send, open_storage, signer
        self.interval_s, self.lease_s = interval_s, lease_s
        self.registry, self.registry_scan_s, self.window = registry, registry_scan_s, window
        self.last_scan = float("-inf")
        self.stopped = threading.Event()

    def _scan_registry(self) -> None:
        if self.registry is None or time.monotonic() - self.last_scan < self.registry_scan_s:
            return
        self.last_scan = time.monotonic()
        try:
            rebuilt = rebuild_registered(
                self.client, self.registry, self.send, self.open_storage, self.window, signer=self.signer
            )
        except redis.RedisError:
            raise
        except Exception:  # e.g. the registry cannot be listed: the sweep itself still runs
            log.exception("sweep: cannot read the job registry")
            return
        if rebuilt:
            log.warning("sweep: rebuilt %s from storage (Redis had lost them)", rebuilt)

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s * random.uniform(0.75, 1.25)):
            try:
                self._scan_registry()
                sweep_and_log(self.client, self.send, self.open_storage, self.lease_s, signer=self.signer)
            except redis.RedisError as exc:
                log.warning("sweep: %s", exc)
            except Exception:
                log.exception("sweep failed")

    def stop(self) -> None:
        self.stopped.set()
