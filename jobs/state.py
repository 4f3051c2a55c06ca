"""Job state in Redis: a small hash per job plus two bitmaps (one bit per item).

Invariants: counts are BITCOUNTs, exact under duplicate delivery; ``progress_at`` moves only
when an item's bit changes; ``cancelled_at`` is set once and never cleared; the job's state
(``job_status``) is derived, never stored. The hash's ``spec`` and the chunk cursor are
signed (kinds ``spec`` and ``cursor``, with the ``Signer`` passed in): a failed check raises
``SignatureError``, and a ``JobState`` without a signer reads and writes neither.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import redis

from pixelrelay.jobs import keys
from pixelrelay.jobs.activity import Activity
from pixelrelay.pipeline.messages import JobSpec
from pixelrelay.pipeline.settings import ConfigError
from pixelrelay.pipeline.signing import SignatureError, Signer

# KEYS: job hash, done bits, failed bits. ARGV: seq, now, then index/status pairs.
# Items of a stale submission may only be marked done (never failed), so that a late
# duplicate from an older submission cannot end the current one early. ``progress_at``
# moves only when a bit changes.
_MARK_SCRIPT = """
local current = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local stale = tonumber(ARGV[1]) < current
local moved = false
for i = 3, #ARGV, 2 do
  local index = tonumber(ARGV[i])
  if ARGV[i + 1] == 'done' then
    if redis.call('SETBIT', KEYS[2], index, 1) == 0 then moved = true end
    redis.call('SETBIT', KEYS[3], index, 0)
  elseif not stale and redis.call('GETBIT', KEYS[2], index) == 0 then
    if redis.call('SETBIT', KEYS[3], index, 1) == 0 then moved = true end
  end
end
if moved then redis.call('HSET', KEYS[1], 'progress_at', ARGV[2]) end
return {redis.call('BITCOUNT', KEYS[2]), redis.call('BITCOUNT', KEYS[3])}
"""


class JobStatus(str, Enum):  # noqa: UP042 (public API: StrEnum would change str() and format() to the bare value)
    """A job's state, as ``pixelrelay jobs`` and ``status`` show it (derived: ``job_status``)."""

    QUEUED = "queued"  # submitted; no worker took any of its chains yet
    RUNNING = "running"  # a worker holds a chain's lease, or the job moved within ``stall_s``
    STALLED = "stalled"  # nothing moved for ``stall_s`` seconds and no chain's lease is live
    CANCELLING = "cancelling"  # cancelled; chains in flight are ending, no manifest yet
    CANCELLED = "cancelled"  # cancelled; manifest written (finished items + cancelled ones)
    FINISHED = "finished"  # manifest written, every item done
    FAILED_ITEMS = "failed-items"  # manifest written, some items failed (or have no line)


class JobCancelledError(ConfigError):
    """The job was cancelled: it cannot be submitted again (use a new job id)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} was cancelled; submit it under a new job id")
        self.job_id = job_id


@dataclass
class Counts:
    total: int
    done: int
    failed: int

    @property
    def pending(self) -> int:
        return max(0, self.total - self.done - self.failed)

    @property
    def complete(self) -> bool:
        return self.done + self.failed >= self.total


def is_finished(info: dict[str, str]) -> bool:
    """The manifest of the job's current submission is written (``info``: JobState.info())."""
    return bool(info.get("finished_at")) and info.get("finished_seq") == info.get("seq")


def idle_since(info: dict[str, str], activity: Activity | None = None) -> float:
    """When the job last moved: its last finished item, its submission, or (``activity``) a
    chain entering a stage or a decoded batch, whichever is latest."""
    moved = max(float(info.get("progress_at", 0) or 0), float(info.get("submitted_at", 0) or 0))
    return max(moved, activity.moved_at) if activity is not None else moved


def _waiting(info: dict[str, str], activity: Activity) -> bool:
    """No worker took a chain of this submission yet and none of its items finished: queued
    (behind other jobs, or for a stage with no worker, which ``status`` names), not stalled."""
    return not activity.started and float(info.get("progress_at", 0) or 0) < float(info.get("submitted_at", 0) or 0)


def stalled_for(info: dict[str, str], now: float, stall_s: float, activity: Activity | None = None) -> float | None:
    """Seconds since the job last moved, once that is ``stall_s`` or more and no worker holds a
    live lease on one of its chains (``activity``); else None. A finished or cancelled job
    never stalls, nor (``activity``) one still queued."""
    if is_finished(info) or info.get("cancelled_at"):
        return None
    if activity is not None and (activity.live_leases or _waiting(info, activity)):
        return None
    idle = now - idle_since(info, activity)
    return idle if idle >= stall_s else None


def job_status(
    info: dict[str, str], counts: Counts, now: float, stall_s: float, activity: Activity | None = None
) -> JobStatus:
    """The job's state. With ``activity`` (``pixelrelay.jobs.activity.read_activity``): running
    while a lease is live, queued only until a worker took a chain; without it, from the
    hash alone."""
    if info.get("cancelled_at"):
        return JobStatus.CANCELLED if is_finished(info) else JobStatus.CANCELLING
    if is_finished(info):
        bad = int(info.get("manifest_failed", 0) or 0) + int(info.get("manifest_missing", 0) or 0)
        return JobStatus.FAILED_ITEMS if bad else JobStatus.FINISHED
    if stalled_for(info, now, stall_s, activity) is not None:
        return JobStatus.STALLED
    moved = float(info.get("progress_at", 0) or 0) >= float(info.get("submitted_at", 0) or 0)
    finished_some = moved and counts.done + counts.failed > 0
    if activity is not None and (activity.started or activity.live_leases):
        return JobStatus.RUNNING
    return JobStatus.RUNNING if finished_some else JobStatus.QUEUED


@functools.lru_cache(maxsize=64)
def _checked_spec(signer: Signer, job_id: str, raw: bytes) -> JobSpec:
    """A raw ``spec`` field checked (signature, job id) and parsed; cached per exact bytes,
    so only a value that passed is ever served from the cache (a failure raises, uncached)."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise SignatureError(f"job {job_id}: its spec in Redis is not JSON") from None
    try:
        spec = JobSpec.model_validate(signer.verify("spec", body))
    except SignatureError as exc:
        raise SignatureError(f"job {job_id}: the spec in Redis fails its check ({exc}): ignored") from None
    if spec.job_id != job_id:
        raise SignatureError(f"job {job_id}: the spec in Redis names job {spec.job_id!r}: ignored")
    return spec


class JobState:
    _bitfield_ro = True  # the server has BITFIELD_RO (Redis >= 6.0); learnt once per process

    def __init__(self, client: redis.Redis, job_id: str, signer: Signer | None = None) -> None:
        self.r = client
        self.job_id = job_id
        self._signer = signer
        self.key = keys.job(job_id)
        self.done_key = keys.done_bits(job_id)
        self.failed_key = keys.failed_bits(job_id)
        self.cursor_key = keys.cursor(job_id)
        self._mark = client.register_script(_MARK_SCRIPT)

    # --- lifecycle ------------------------------------------------------------------
    def exists(self) -> bool:
        return bool(self.r.exists(self.key))

    @property
    def signer(self) -> Signer:
        if self._signer is None:
            raise SignatureError(
                f"job {self.job_id}: this JobState has no signer: it cannot read or write signed fields"
            )
        return self._signer

    def spec(self) -> JobSpec:
        """The job's spec, once its signature checks out (``SignatureError`` otherwise)."""
        signer = self.signer
        return self.parse_spec(self.r.hget(self.key, "spec"), signer)

    def parse_spec(self, raw: bytes | str | None, signer: Signer | None = None) -> JobSpec:
        """The spec from the hash's raw ``spec`` field (``KeyError`` when None), checked as
        ``spec`` checks it. A raw value seen before (the same bytes, this job, this signer) is
        not checked and parsed again: a worker reads the same spec at every delivery."""
        signer = signer or self.signer
        if raw is None:
            raise KeyError(f"unknown job {self.job_id!r}")
        return _checked_spec(signer, self.job_id, keys.raw(raw)).model_copy()

    def _signed_spec(self, spec: JobSpec) -> str:
        return json.dumps(self.signer.sign("spec", spec.model_dump(mode="json")), separators=(",", ":"))

    def seq(self) -> int:
        return int(self.r.hget(self.key, "seq") or 0)

    def n_chunks(self) -> int:
        return int(self.r.hget(self.key, "n_chunks") or 0)

    def start_submission(self, spec: JobSpec) -> int:
        """Create the job, or begin its next submission (a resume). Returns the new seq.
        A cancelled job raises ``JobCancelledError``."""
        if self.cancelled():
            raise JobCancelledError(self.job_id)
        n_chunks = -(-spec.total // spec.chunk_size)
        signed = self._signed_spec(spec)
        now = time.time()
        pipe = self.r.pipeline()
        pipe.hset(
            self.key,
            mapping={
                "spec": signed,
                "total": spec.total,
                "n_chunks": n_chunks,
                "submitted_at": round(now, 3),  # as precise as progress_at, so the two compare in order
                "done_at_submit": self.r.bitcount(self.done_key),
            },
        )
        pipe.hdel(self.key, "finished_at", "started_at")
        pipe.hincrby(self.key, "seq", 1)
        pipe.delete(self.failed_key, self.cursor_key)
        for key in (self.key, self.done_key):
            pipe.persist(key)
        pipe.zadd(keys.JOBS, {self.job_id: now})
        pipe.zremrangebyrank(keys.JOBS, 0, -(keys.JOBS_KEEP + 1))
        seq = pipe.execute()[2]
        return int(seq)

    def restore(self, last_seq: int, done_indices: list[int], cancelled_at: float | None = None) -> None:
        """Rebuild the job from storage (its Redis state was lost): the submission counter
        continues after the newest part, done items get their bits back, and a job
        cancelled in storage (``pixelrelay.jobs.files.read_cancel``) is cancelled again."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(self.key, "seq", last_seq)
        for index in done_indices:
            pipe.setbit(self.done_key, index, 1)
        if cancelled_at is not None:
            pipe.hsetnx(self.key, "cancelled_at", cancelled_at)
        pipe.execute()

    # --- cancelling -------------------------------------------------------------------
    def cancel(self, at: float | None = None) -> bool:
        """Set the cancelled flag; True if this call set it (False: it was set already)."""
        return bool(self.r.hsetnx(self.key, "cancelled_at", time.time() if at is None else at))

    def cancelled(self) -> bool:
        return bool(self.r.hexists(self.key, "cancelled_at"))

    # --- items ----------------------------------------------------------------------
    def done_flags(self, indices: list[int]) -> list[bool]:
        """Whether each item is done: one ``BITFIELD_RO`` for all of them (read-only, so it
        is served under ``maxmemory`` too); a pipeline of ``GETBIT``s on a Redis without it
        (before 6.0)."""
        if not indices:
            return []
        if self._bitfield_ro:
            args = [arg for index in indices for arg in ("GET", "u1", index)]
            try:
                bits = self.r.execute_command("BITFIELD_RO", self.done_key, *args)
            except redis.ResponseError as exc:
                if "unknown command" not in str(exc).lower():
                    raise
                type(self)._bitfield_ro = False
            else:
                if not isinstance(bits, list) or len(bits) != len(indices):
                    raise redis.ResponseError(f"BITFIELD_RO returned {type(bits).__name__}, not {len(indices)} bits")
                return [bool(bit) for bit in bits]
        pipe = self.r.pipeline(transaction=False)
        for index in indices:
            pipe.getbit(self.done_key, index)
        return [bool(bit) for bit in pipe.execute()]

    def mark(self, seq: int, results: Sequence[tuple[int, str]], slot: str | None = None) -> tuple[int, int]:
        """Record (index, 'done'|'failed') pairs; returns (done, failed) counts. ``slot``: the
        chain's per-batch progress (``pixelrelay.jobs.activity``) goes with it, atomically."""
        args: list = [seq, round(time.time(), 3)]
        for index, status in results:
            args += [index, status]
        mark_keys = [self.key, self.done_key, self.failed_key]
        if slot is None:
            done, failed = self._mark(keys=mark_keys, args=args)
            return int(done), int(failed)
        pipe = self.r.pipeline()
        self._mark(keys=mark_keys, args=args, client=pipe)
        pipe.hdel(keys.batches(self.job_id), slot)
        done, failed = pipe.execute()[0]
        return int(done), int(failed)

    def counts(self) -> Counts:
        pipe = self.r.pipeline(transaction=False)
        pipe.hget(self.key, "total")
        pipe.bitcount(self.done_key)
        pipe.bitcount(self.failed_key)
        total, done, failed = pipe.execute()
        return Counts(int(total or 0), int(done), int(failed))

    def next_chunk(self) -> int:
        """Hand out the next chunk number (0, 1, ...); ``SignatureError`` for a forged cursor."""
        signer = self.signer
        if not signer.secure:
            return int(self.r.incr(self.cursor_key)) - 1
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self.cursor_key)
                    n = self._cursor_value(pipe.get(self.cursor_key))
                    pipe.multi()
                    pipe.set(self.cursor_key, f"{n + 1}:{signer.mac('cursor', [self.job_id, n + 1])}")
                    pipe.execute()
                    return n
                except redis.WatchError:
                    continue

    def cursor(self) -> int:
        """How many chunk numbers were handed out (checked like ``next_chunk``)."""
        raw = self.r.get(self.cursor_key)
        return self._cursor_value(raw) if self.signer.secure else int(raw or 0)

    def _cursor_value(self, raw: bytes | str | None) -> int:
        if raw is None:
            return 0
        text, _, sig = keys.text(raw).partition(":")
        try:
            n = int(text)
            self.signer.check("cursor", [self.job_id, n], sig)
        except (ValueError, SignatureError) as exc:
            raise SignatureError(
                f"job {self.job_id}: its chunk cursor in Redis fails its check ({exc}): ignored"
            ) from None
        return n

    # --- delivery accounting (poison pills) -------------------------------------------
    def count_delivery(self, stage: str, seq: int, chunk: str, pipe: redis.client.Pipeline | None = None) -> int | None:
        """Count one more delivery; returns the count, or None when ``pipe`` is given (the
        count is then the first result of that pipeline's ``execute`` from here)."""
        key = keys.deliveries(self.job_id, stage, seq, chunk)
        own = pipe is None
        if pipe is None:
            pipe = self.r.pipeline()
        pipe.incr(key)
        pipe.expire(key, keys.DELIVERIES_TTL_S)
        return int(pipe.execute()[0]) if own else None

    def clear_delivery(self, stage: str, seq: int, chunk: str, pipe: redis.client.Pipeline | None = None) -> None:
        (pipe if pipe is not None else self.r).delete(keys.deliveries(self.job_id, stage, seq, chunk))

    # --- finishing ------------------------------------------------------------------
    def claim_finalize(self, seq: int, lease_s: float = keys.FINALIZE_LEASE_S) -> bool:
        """True for exactly one caller at a time per submission: that one writes the
        manifest. The claim is a lease: the writer keeps it alive (``refresh_finalize``),
        ``finish`` turns it into "written" for good; a writer that died gives it up after
        ``lease_s``, so that the sweep (or ``status --wait``) can finish the job."""
        key = keys.finalized(self.job_id, seq)
        return bool(self.r.set(key, "writing", nx=True, ex=max(1, int(lease_s))))

    def refresh_finalize(self, seq: int, lease_s: float = keys.FINALIZE_LEASE_S) -> None:
        self.r.expire(keys.finalized(self.job_id, seq), max(1, int(lease_s)))

    def release_finalize(self, seq: int) -> None:
        self.r.delete(keys.finalized(self.job_id, seq))

    def claim_group(self, seq: int, group: int) -> bool:
        """True for one caller per group of submission ``seq``: that one merges the group's
        parts (``pixelrelay.jobs.merge``). Never released but on an error: a merger that died leaves
        its group to the finish, which merges what has no file."""
        return bool(self.r.set(keys.group_claim(self.job_id, seq, group), "1", nx=True, ex=keys.JOB_TTL_S))

    def release_group(self, seq: int, group: int) -> None:
        self.r.delete(keys.group_claim(self.job_id, seq, group))

    def marked_in(self, start: int, stop: int) -> int:
        """How many items of ``start <= index < stop`` are done or failed (two ``GETRANGE``s
        of the bitmaps, ``stop - start`` bits each: no item-by-item reads)."""
        if stop <= start:
            return 0
        first, last = start // 8, (stop - 1) // 8
        pipe = self.r.pipeline(transaction=False)
        pipe.getrange(self.done_key, first, last)
        pipe.getrange(self.failed_key, first, last)
        done, failed = pipe.execute()
        size = last - first + 1
        bits = int.from_bytes(done.ljust(size, b"\0"), "big") | int.from_bytes(failed.ljust(size, b"\0"), "big")
        lo, hi = start - first * 8, stop - first * 8  # bit 0 of the range is the top bit
        return ((bits >> (size * 8 - hi)) & ((1 << (hi - lo)) - 1)).bit_count()

    def finish(self, seq: int, manifest: str, done: int, failed: int, missing: int = 0, cancelled: int = 0) -> None:
        """Record that the manifest of submission ``seq`` is written, and let the job's keys expire.

        Args:
            seq: the submission.
            manifest: the manifest's URI.
            done: items done.
            failed: items failed.
            missing: the job's items that the manifest has no row for.
            cancelled: items left unfinished by a cancel.
        """
        pipe = self.r.pipeline()
        pipe.hset(
            self.key,
            mapping={
                "finished_at": time.time(),
                "finished_seq": seq,
                "manifest": manifest,
                "manifest_done": done,
                "manifest_failed": failed,
                "manifest_missing": missing,
                "manifest_cancelled": cancelled,
            },
        )
        pipe.set(keys.finalized(self.job_id, seq), "written", ex=keys.JOB_TTL_S)
        for key in (self.key, self.done_key, self.failed_key, self.cursor_key):
            pipe.expire(key, keys.JOB_TTL_S)
        pipe.execute()

    def info(self) -> dict[str, str]:
        return {keys.text(k): keys.text(v) for k, v in self.r.hgetall(self.key).items() if k != b"spec"}
