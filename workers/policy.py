"""What happens to one delivery of a chunk to a stage: the retry, poison-pill and finish
policy, in one place, free of Celery.

``DeliveryPolicy.deliver(delivery, work)`` decides, in this order:

0. a chain no longer in flight whose part is written ends as ``Stale``; otherwise its entry
   is set to this stage before any work, with the delivery count and the lease (``_enter``);
1. a cancelled job's chain ends as ``Cancelled`` (``end_cancelled``);
2. past ``Limits.max_deliveries`` a chunk is split: its pending items go on as single-item
   chains and the chain itself finishes the items that already have a result (``Split``),
   or its one item fails;
3. ``work(msg)``: a transient error gives a ``Retry`` until ``max_retries``; any failure
   leaves every pending item with a reason;
4. the finish (decode only, ``finish_chunk``); the chain's entry is deleted only after it, so
   a worker that dies earlier leaves the chain for the sweep;
5. the hand-off writes a retry's countdown, or the next stage, into the chain's entry.

``time_out`` is the watchdog's end of a delivery. See docs/design.md, "Delivery guarantees".
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis

from pixelrelay.jobs import keys
from pixelrelay.jobs.chunks import ChunksInFlight, Entry, Slot, tracked
from pixelrelay.jobs.feed import Send, feed
from pixelrelay.jobs.files import part_uri, write_part
from pixelrelay.jobs.finish import finalize_cancelled, finalize_if_complete
from pixelrelay.jobs.merge import merge_group_if_complete
from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline import constants as C
from pixelrelay.pipeline.messages import ChunkMessage, ItemRecord, ItemStatus, JobSpec
from pixelrelay.pipeline.storage import Storage, StorageError, TransientStorageError

if TYPE_CHECKING:
    from pixelrelay.workers.lease import Lease

log = logging.getLogger("pixelrelay.worker")

TRANSIENT_ERRORS = (TransientStorageError, redis.ConnectionError, redis.TimeoutError)

Work = Callable[[ChunkMessage], None]  # a stage body: fills in the message's records


@dataclass(frozen=True)
class Retry:
    """Deliver the same message to the same stage again in ``countdown`` seconds."""

    countdown: float
    reason: str
    error: BaseException | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Split:
    """The chunk went on as ``parts`` single-item chains; this chain ends here."""

    parts: int


@dataclass(frozen=True)
class Stale:
    """The chain was finished already (its part is written): this delivery ends it."""


@dataclass(frozen=True)
class Cancelled:
    """The job was cancelled: the chain ended here, ``dropped`` items left unfinished."""

    dropped: int


Outcome = ChunkMessage | Retry | Split | Stale | Cancelled


@dataclass(frozen=True)
class Limits:
    """How often a chunk may kill its worker, and how often a transient error is retried."""

    max_deliveries: int = C.DEFAULT_MAX_DELIVERIES
    max_retries: int = C.DEFAULT_MAX_RETRIES
    backoff_base_s: float = C.RETRY_BACKOFF_BASE_S
    backoff_max_s: float = C.RETRY_BACKOFF_MAX_S
    jitter: tuple[float, float] = (0.5, 1.0)  # the countdown is backoff x uniform(*jitter)

    def backoff(self, retries: int) -> float:
        """The longest wait before retry number ``retries + 1``: base x 2^retries, capped."""
        return min(self.backoff_max_s, self.backoff_base_s * 2**retries)

    def countdown(self, retries: int) -> float:
        return self.backoff(retries) * random.uniform(*self.jitter)


@dataclass(frozen=True)
class Seen:
    """What a delivery reads before it does anything, in one round trip (``look``): the job
    hash's raw ``spec`` (checked by whoever parses it), its submission, whether that
    submission's manifest is written, whether the job is cancelled, and the chain's entry."""

    spec: bytes | None
    seq: int
    finished: bool
    cancelled: bool
    entry: Entry | None


def look(state: JobState, slot: Slot) -> Seen:
    """Read a delivery's ``Seen``: one pipeline of an ``HMGET`` and an ``HGET``."""
    pipe = state.r.pipeline(transaction=False)
    pipe.hmget(state.key, "spec", "seq", "finished_seq", "cancelled_at")
    pipe.hget(keys.chunks(state.job_id), slot.name)
    (spec, seq, finished_seq, cancelled_at), entry = pipe.execute()
    return Seen(
        spec,
        int(seq or 0),
        finished_seq is not None and finished_seq == seq,
        cancelled_at is not None,
        None if entry is None else Entry.from_json(entry),
    )


@dataclass(frozen=True)
class Delivery:
    """One delivery of ``msg`` to ``stage``; ``retries`` is how many retries came before.
    ``seen``: what was read for it already (else the policy reads it); ``lease``: the lease
    (``pixelrelay.workers.lease.Lease``) whose first write joins the policy's admission transaction."""

    stage: str
    msg: ChunkMessage
    retries: int = 0
    seen: Seen | None = None
    lease: Lease | None = None

    @property
    def key(self) -> str:
        """Names this delivery in the poison-pill count (one count per retry)."""
        return f"{self.msg.chunk}:{self.msg.part or 'all'}:{self.retries}"

    def pending(self) -> list[ItemRecord]:
        return [r for r in self.msg.records if r.status is None]


def reason(exc: BaseException) -> str:
    """An exception as one line: ``Type: first line of the message``."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def fail_pending(msg: ChunkMessage, stage: str, why: str) -> None:
    for record in msg.records:
        if record.status is None:
            record.fail(stage, why)


def split_chunk(msg: ChunkMessage, send: Send) -> int:
    """Re-send every pending item as its own chain; returns how many were sent. (``send``
    should track each part: see ``pixelrelay.jobs.chunks.tracked``.)"""
    pending = [r for r in msg.records if r.status is None]
    for i, record in enumerate(pending):
        send(msg.model_copy(update={"records": [record], "feeds": msg.feeds and i == 0, "part": str(record.index)}))
    return len(pending)


def hung_items(msg: ChunkMessage, suspects: Collection[int]) -> tuple[list[ItemRecord], list[ItemRecord]]:
    """A hung delivery's pending items as (the one that fails, those sent on one by one).

    The suspects are the items of the model call that overran (all pending items if it hung
    outside one). One suspect fails; several are all sent on, each in a chain of its own, so
    the next hang names one item. Pending items that are no suspect are sent on too."""
    pending = [r for r in msg.records if r.status is None]
    suspected = [r for r in pending if r.index in suspects] or pending
    hung = suspected if len(suspected) == 1 else []
    return hung, [r for r in pending if not any(r is h for h in hung)]


def resend_singly(msg: ChunkMessage, records: list[ItemRecord], send: Send) -> None:
    """Send each of ``records`` on as a single-item chain of ``msg``'s chunk (part: its
    index), from encode. None feeds the job: ``msg``'s own finish does, once."""
    for record in records:
        send(msg.model_copy(update={"records": [record], "feeds": False, "part": str(record.index)}))


def ended(msg: ChunkMessage) -> ChunkMessage:
    """The chain with only the items that have a result (done, reused or failed), feeding
    nothing: what a split chain's own part holds (``split_chunk`` sends the others on)."""
    return msg.model_copy(update={"records": [r for r in msg.records if r.status is not None], "feeds": False})


class PartNotWritten(TransientStorageError):
    """A chain's manifest part could not be written (a full disk, a denied write): its items
    stay unmarked and the chain in flight; the delivery is retried, then the sweep sends the
    chain again, until the part is durable."""


@dataclass(frozen=True)
class PartWrites:
    """How a finish tries to write its part: ``tries`` writes, ``backoff_s`` x 2^n apart."""

    tries: int = 3
    backoff_s: float = 0.5


def write_part_durably(storage: Storage, msg: ChunkMessage, writes: PartWrites = PartWrites()) -> None:
    """Write the chain's manifest part, retrying a failed write a few times (bounded); then
    ``PartNotWritten``. Never turns the items into failures: their reasons wait for the part."""
    for attempt in range(writes.tries):
        try:
            write_part(storage, msg.output, msg.job_id, msg.chunk, msg.seq, msg.records, msg.part)
            return
        except (StorageError, TransientStorageError) as exc:
            error: Exception = exc
            log.warning(
                "cannot write the manifest part of chunk %s/%d (try %d): %s", msg.job_id, msg.chunk, attempt + 1, exc
            )
            if attempt + 1 < writes.tries:
                time.sleep(writes.backoff_s * 2**attempt)
    raise PartNotWritten(f"manifest part of chunk {msg.job_id}/{msg.chunk} not written: {reason(error)}") from error


def finish_chunk(state: JobState, storage: Storage, send: Send, msg: ChunkMessage, spec: JobSpec | None = None) -> bool:
    """End a chain: write its manifest part, mark its items, feed the next chunk, merge its group
    if complete, and write the manifest if the job is complete.

    Args:
        state: the job's Redis state.
        storage: the job's output storage.
        send: sends the next chunk.
        msg: the chain's last message.
        spec: the job's, when the caller has checked it already; None: read here.

    Returns:
        True if this call wrote the manifest.
    """
    fail_pending(msg, "decode", "item left the chain without a result")  # defensive: never lose one
    if msg.records:  # a duplicate whose items were all done must not blank the part
        write_part_durably(storage, msg)  # before any bit: an item is marked only once its line is durable
    state.mark(msg.seq, results(msg.records), slot=Slot.of(msg).name)
    spec = spec or state.spec()
    if msg.feeds:
        feed(send, state, storage, spec, state.seq(), 1)
    merge_group_if_complete(state, storage, spec, msg.seq, msg.chunk)  # the chunk's group, once all of it is in
    wrote = finalize_if_complete(state, storage, spec, msg.seq)
    ChunksInFlight(state.r, msg.job_id).untrack(Slot.of(msg))
    return wrote or finalize_cancelled(state, storage, spec)  # the watchdog's end of a cancelled job's last chain


def results(records: list[ItemRecord]) -> list[tuple[int, ItemStatus]]:
    """The (index, status) pairs of the records that have a result."""
    return [(r.index, r.status) for r in records if r.status is not None]


def end_cancelled(state: JobState, storage: Storage, msg: ChunkMessage) -> bool:
    """End a chain of a cancelled job: write the part of its finished items, mark them,
    untrack the chain, then write the manifest if no chain is left in flight. Sends
    nothing. Returns True if this call wrote the manifest."""
    finished = [r for r in msg.records if r.status is not None]
    try:
        if finished:
            write_part(storage, msg.output, msg.job_id, msg.chunk, msg.seq, finished, msg.part)
    except StorageError as exc:  # the manifest then lists these items as cancelled
        log.error("cannot write the manifest part of chunk %s/%d: %s", msg.job_id, msg.chunk, exc)
        finished = []
    if finished:
        state.mark(msg.seq, results(finished))
    ChunksInFlight(state.r, msg.job_id).untrack(Slot.of(msg))
    return finalize_cancelled(state, storage, state.spec())


def snapshot(msg: ChunkMessage, attempts: int = 5) -> ChunkMessage:
    """A deep copy of a message another thread may be changing (the watchdog's view)."""
    for _ in range(attempts - 1):
        try:
            return msg.model_copy(deep=True)
        except RuntimeError:  # "changed size during iteration": try again
            continue
    return msg.model_copy(deep=True)


@dataclass
class DeliveryPolicy:
    """Decides the outcome of a delivery (see the module docstring for the rules)."""

    state: JobState
    send: Send
    storage: Callable[[str], Storage]  # opens the storage of a job's output root
    limits: Limits = Limits()

    def deliver(self, delivery: Delivery, work: Work) -> Outcome:
        state, stage, msg = self.state, delivery.stage, delivery.msg
        chunks = self._admit(delivery)
        if isinstance(chunks, (Stale, Cancelled)):
            return chunks
        deliveries = self._enter(delivery, chunks)
        if deliveries > self.limits.max_deliveries:
            if len(delivery.pending()) > 1:
                return self._split(delivery, deliveries - 1)
            fail_pending(
                msg, stage, f"worker process died {deliveries - 1} times on this item (crash or out of memory)"
            )
        else:
            retry = self._work(delivery, work)
            if retry is not None:
                return self._waiting(delivery, chunks, retry)
        pipe = state.r.pipeline()  # the delivery's count goes, and the entry moves on, together
        state.clear_delivery(stage, msg.seq, delivery.key, pipe=pipe)
        if stage == "decode":
            pipe.hexists(state.key, "cancelled_at")
            if pipe.execute()[-1]:  # cancelled while decoding: record what finished
                return self._cancelled(delivery)
            retry = self._finish(delivery)
            if retry is not None:
                return self._waiting(delivery, chunks, retry)
            return msg
        if chunks:
            chunks.track(Slot.of(msg), C.STAGES[C.STAGES.index(stage) + 1], msg.feeds, pipe=pipe)
        pipe.execute()
        return msg

    def _enter(self, delivery: Delivery, chunks: ChunksInFlight | None) -> int:
        """One transaction before the work: count the delivery, take the lease (before the
        entry names this stage: the same transaction), set the chain's entry to this stage.
        Returns the delivery count."""
        msg = delivery.msg
        pipe = self.state.r.pipeline()
        self.state.count_delivery(delivery.stage, msg.seq, delivery.key, pipe=pipe)  # first: its result is [0]
        if delivery.lease is not None:
            delivery.lease.take(pipe)
        if chunks:
            chunks.track(Slot.of(msg), delivery.stage, msg.feeds, pipe=pipe)
            pipe.hsetnx(self.state.key, "started_at", round(time.time(), 3))  # ``status``: no longer queued
        return int(pipe.execute()[0])

    def time_out(self, delivery: Delivery, budget_s: float, suspects: Collection[int] = ()) -> None:
        """The watchdog's end of a delivery that spent its budget (see ``hung_items``): the one
        item that hung fails with "timed out after N s", the other pending items go on as
        single-item chains, and the chain finishes with what it holds (part, bits, next chunk,
        manifest). ``suspects``: the indices of the items in the model call that overran."""
        msg = snapshot(delivery.msg)
        done = self.state.done_flags([r.index for r in msg.records])
        msg.records = [r for r, d in zip(msg.records, done, strict=True) if not d or r.status == "done"]
        hung, resent = hung_items(msg, suspects)
        for record in hung:
            record.fail(delivery.stage, f"timed out after {budget_s:g} s")
        log.error(
            "%s chunk %s/%d%s timed out after %g s%s; %d item(s) go on one by one",
            delivery.stage,
            msg.job_id,
            msg.chunk,
            f" part {msg.part}" if msg.part else "",
            budget_s,
            f" on item {hung[0].index}" if hung else "",
            len(resent),
        )
        resend_singly(msg, resent, tracked(self.send, self.state.r))  # tracked before the chain's entry goes
        storage = self.storage(msg.output)
        gone = {id(r) for r in resent}
        msg.records = [r for r in msg.records if id(r) not in gone]
        if not msg.records and not self._part_written(msg):  # a redelivery of this chain is then stale
            write_part(storage, msg.output, msg.job_id, msg.chunk, msg.seq, [], msg.part)
        finish_chunk(self.state, storage, self.send, msg)

    def _admit(self, delivery: Delivery) -> ChunksInFlight | Stale | Cancelled | None:
        """``Stale`` for a duplicate of a finished chain, ``Cancelled`` for a chain of a
        cancelled job (ended here); else the chain's tracking, to be set to this stage by
        ``_enter`` (None for a chain of an older submission, which is not tracked)."""
        msg, slot = delivery.msg, Slot.of(delivery.msg)
        seen = delivery.seen or look(self.state, slot)
        if msg.seq < seen.seq:
            return self._cancelled(delivery) if seen.cancelled else None
        if seen.entry is None and (seen.finished or self._part_written(msg)):
            log.warning(
                "%s: chunk %s/%d%s was finished already: dropping a duplicate",
                delivery.stage,
                msg.job_id,
                msg.chunk,
                f" part {msg.part}" if msg.part else "",
            )
            return Stale()
        if seen.cancelled:
            return self._cancelled(delivery)
        return ChunksInFlight(self.state.r, msg.job_id)

    def _cancelled(self, delivery: Delivery) -> Cancelled:
        msg = delivery.msg
        if delivery.lease is not None:  # held while the chain ends
            delivery.lease.renew()
        log.info(
            "%s: job %s is cancelled: chunk %d%s ends here",
            delivery.stage,
            msg.job_id,
            msg.chunk,
            f" part {msg.part}" if msg.part else "",
        )
        end_cancelled(self.state, self.storage(msg.output), msg)
        return Cancelled(len(delivery.pending()))

    def _split(self, delivery: Delivery, deaths: int) -> Split:
        """Send the pending items on as single-item chains, then finish this chain with the
        items an earlier attempt ended (``ended``), so each gets its part line and its bit.
        In that order: a death in between leaves the chain tracked, and the sweep re-sends
        what is not done."""
        msg = delivery.msg
        log.error("chunk %s/%d killed its %s worker %d times: splitting", msg.job_id, msg.chunk, delivery.stage, deaths)
        parts = split_chunk(msg, tracked(self.send, self.state.r))  # the parts are tracked before they are sent
        try:
            finish_chunk(self.state, self.storage(msg.output), self.send, ended(msg), self._spec(delivery))
        except TRANSIENT_ERRORS as exc:  # the chain stays tracked: the sweep finishes it
            log.warning("chunk %s/%d: cannot finish its ended items yet (%s)", msg.job_id, msg.chunk, exc)
        return Split(parts)

    def _part_written(self, msg: ChunkMessage) -> bool:
        try:
            return self.storage(msg.output).exists(part_uri(msg.output, msg.job_id, msg.chunk, msg.seq, msg.part))
        except (StorageError, *TRANSIENT_ERRORS):
            return False  # when in doubt, do the work again (it is idempotent)

    def _waiting(self, delivery: Delivery, chunks: ChunksInFlight | None, retry: Retry) -> Retry:
        if chunks:
            chunks.track(Slot.of(delivery.msg), delivery.stage, delivery.msg.feeds, wait=retry.countdown)
        return retry

    def _work(self, delivery: Delivery, work: Work) -> Retry | None:
        try:
            work(delivery.msg)
        except TRANSIENT_ERRORS as exc:
            if delivery.retries < self.limits.max_retries:
                return self._retry(delivery, exc)
            fail_pending(delivery.msg, delivery.stage, f"gave up after {delivery.retries} retries: {reason(exc)}")
        except Exception as exc:  # a bug or a permanent fault: the items still get a reason
            log.exception("%s chunk %s/%d failed", delivery.stage, delivery.msg.job_id, delivery.msg.chunk)
            fail_pending(delivery.msg, delivery.stage, f"internal error: {reason(exc)}")
        return None

    def _finish(self, delivery: Delivery) -> Retry | None:
        try:
            finish_chunk(self.state, self.storage(delivery.msg.output), self.send, delivery.msg, self._spec(delivery))
        except TRANSIENT_ERRORS as exc:
            # The retry redoes nothing costly: outputs already written are skipped.
            if delivery.retries >= self.limits.max_retries:
                raise
            return self._retry(delivery, exc)
        return None

    def _spec(self, delivery: Delivery) -> JobSpec | None:
        """The job's spec from what the delivery read already (checked, cached), or None."""
        if delivery.seen is None or delivery.seen.spec is None:
            return None
        return self.state.parse_spec(delivery.seen.spec)

    def _retry(self, delivery: Delivery, exc: Exception) -> Retry:
        countdown = self.limits.countdown(delivery.retries)
        msg = delivery.msg
        log.warning(
            "%s chunk %s/%d: transient error (%s), retry %d in %.1fs",
            delivery.stage,
            msg.job_id,
            msg.chunk,
            exc,
            delivery.retries + 1,
            countdown,
        )
        return Retry(countdown, reason(exc), exc)
