"""Rebuilding a job whose Redis state vanished, from its files in storage (Celery-free).

Invariants: the spec read from storage is validated, and its signature checked, before
anything is written (``RebuildError``); one rebuilder per job (a ``SET NX PX`` lock); a rebuild that fails deletes
the job hash again; the new seq follows the newest part in storage, so older chains are
stale; the feed starts over from chunk 0 and skips done items.
"""

from __future__ import annotations

import logging

import redis
from pydantic import ValidationError

from pixelrelay.jobs import keys
from pixelrelay.jobs.feed import Send, feed
from pixelrelay.jobs.files import latest_seq, read_cancel, read_spec
from pixelrelay.jobs.finish import finalize_if_complete
from pixelrelay.jobs.merge import iter_rows
from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline.messages import JobSpec
from pixelrelay.pipeline.signing import SignatureError, Signer
from pixelrelay.pipeline.storage import Storage, StorageError, StorageNotFoundError

log = logging.getLogger("pixelrelay.recover")

LOCK_MS = 60_000  # longer than reading the parts of a big job; released when done


class RebuildError(Exception):
    """The job cannot be rebuilt from storage: no ``job.json`` there, or not a valid one."""


def load_spec(storage: Storage, output: str, job_id: str, signer: Signer) -> JobSpec:
    """The job's spec from storage, checked to be the job asked for and signed with
    ``signer``'s key (``RebuildError``)."""
    try:
        spec = read_spec(storage, output, job_id, signer)
    except StorageNotFoundError:
        raise RebuildError(f"job {job_id}: no job.json under {output}") from None
    except SignatureError as exc:
        raise RebuildError(f"job {job_id}: job.json under {output} fails its check ({exc}): not used") from None
    except (ValidationError, ValueError, StorageError) as exc:
        raise RebuildError(f"job {job_id}: unreadable job.json under {output}: {exc}") from None
    if spec.job_id != job_id or spec.output.rstrip("/") != output.rstrip("/"):
        raise RebuildError(f"job {job_id}: job.json under {output} names job {spec.job_id!r} at {spec.output!r}")
    if spec.total < 0 or spec.chunk_size < 1:
        raise RebuildError(f"job {job_id}: job.json has total={spec.total}, chunk_size={spec.chunk_size}")
    return spec


def restore_done(state: JobState, storage: Storage, spec: JobSpec) -> int:
    """Give the job its submission counter and done bits back from its parts; returns the
    number of done items found."""
    done = []
    seq = latest_seq(storage, spec.output, spec.job_id)
    for row in iter_rows(storage, spec, seq):  # group files, and the parts written after them
        index = row.get("index") if isinstance(row, dict) else None
        if row.get("status") == "done" and isinstance(index, int) and 0 <= index < spec.total:
            done.append(index)
    state.restore(seq, done, read_cancel(storage, spec.output, spec.job_id))
    return len(done)


def start(state: JobState, storage: Storage, spec: JobSpec, send: Send, window: int) -> int:
    """Begin the job's next submission and feed its first chunks.

    Args:
        state: the job's Redis state.
        storage: the job's output storage.
        spec: the job.
        send: sends a chain.
        window: chunks to feed.

    Returns:
        The new submission's seq.
    """
    seq = state.start_submission(spec)
    if feed(send, state, storage, spec, seq, window) == 0:
        finalize_if_complete(state, storage, spec, seq)  # nothing left to do
    return seq


def rebuild(
    client: redis.Redis, storage: Storage, output: str, job_id: str, send: Send, window: int, *, signer: Signer
) -> int | None:
    """Rebuild job ``job_id`` of ``output`` from storage if Redis does not know it.

    Args:
        client: Redis.
        storage: the job's output storage.
        output: the job's output root.
        job_id: the job.
        send: sends a chain (the feed's first ``window`` chains).
        window: chains of the job kept in the broker.
        signer: signs the spec written to Redis.

    Returns:
        The new submission's seq, or None when Redis knows the job (or another process is
        rebuilding it).

    Raises:
        RebuildError: the job's spec in storage is missing or invalid.
    """
    state = JobState(client, job_id, signer)
    if state.exists():
        return None
    lock = keys.rebuild_lock(job_id)
    if not client.set(lock, "1", nx=True, px=LOCK_MS):
        return None
    try:
        if state.exists():
            return None
        spec = load_spec(storage, output, job_id, signer)
        try:
            done = restore_done(state, storage, spec)
            seq = start(state, storage, spec, send, window)
        except BaseException:
            client.delete(state.key)  # half a rebuild must not pass for a job: the next try starts over
            raise
        log.warning(
            "job %s: Redis had lost it; rebuilt from storage (%d of %d done), submission %d",
            job_id,
            done,
            spec.total,
            seq,
        )
        return seq
    finally:
        client.delete(lock)
