"""How a job moves, without Celery: windowed feeding of chunks, and finishing the job.

A job's listing waits in storage, never as messages in Redis. The producer sends the first
``window`` chunks; every finished chunk sends the next one. So a job has at most ``window``
chunks (``window * chunk_size`` items) in the broker, whatever its size. Chunks whose items
are all done already (a resume) are skipped.

Sending is a callable (``Send``): the workers pass one that enqueues a Celery chain, tests
may pass a list's ``append``. Every chunk sent is tracked first (``jobs.chunks``), so a chain
lost by the broker or with its worker can be found and sent again; a finished job is retired
from that tracking.

Signed state (``pipeline.signing``): the spec a caller passes comes from ``JobState.spec()``
(checked) and ``JobState.next_chunk`` checks the cursor: a forged one raises
``SignatureError`` before anything is read or sent.

Cancelling (``JobState.cancel``): ``feed`` sends nothing for a cancelled job, so no new
chain starts; the chains in flight end at their next stage (``workers.policy``). The
manifest of a cancelled job is written by ``finalize_cancelled`` once no chain of its
submission is in flight: by the last chain to end (after untracking itself, so that of two
chains ending together at least one sees none left), by the sweep when it drops a lost
chain, or by ``pixelrelay cancel`` after its grace (``force``). Items no part names are
written as ``cancelled``: one line per item, always.

The manifest is the concatenation of the job's group files (``jobs.merge``): the finish
reads one object per 10,000 items or more, not every part. The claim to write it
(``JobState.claim_finalize``) is a lease the writer keeps alive: a writer that died gives it
up, and ``finish_pending`` tells the sweep to keep the chain that would finish the job.
"""

from __future__ import annotations

from collections.abc import Callable

from pixelrelay.jobs.chunks import ChunksInFlight, Slot
from pixelrelay.jobs.files import CANCELLED, manifest_uri, read_chunk, record_for
from pixelrelay.jobs.merge import write_manifest
from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline.messages import ChunkMessage, JobSpec
from pixelrelay.pipeline.storage import Storage

Send = Callable[[ChunkMessage], None]


def feed(send: Send, state: JobState, storage: Storage, spec: JobSpec, seq: int, count: int) -> int:
    """Send up to ``count`` more chunks of the job; returns how many were sent."""
    sent = 0
    if state.cancelled():
        return 0
    n_chunks = -(-spec.total // spec.chunk_size)
    in_flight = ChunksInFlight(state.r, spec.job_id)
    while sent < count:
        chunk = state.next_chunk()
        if chunk >= n_chunks:
            break
        # Tracked from the moment the cursor hands it out (so before it is sent): if reading
        # its listing fails (a storage outage), the chunk is not lost with the cursor but
        # re-sent by the sweep.
        in_flight.track(Slot(seq, chunk), "encode", feeds=True)
        items = read_chunk(storage, spec.output, spec.job_id, chunk, spec.chunk_size)
        done = state.done_flags([item.index for item in items])
        records = [record_for(i) for i, d in zip(items, done) if not d]  # listing rejects: failed
        if not records:
            in_flight.untrack(Slot(seq, chunk))
            continue
        send(
            ChunkMessage(
                job_id=spec.job_id,
                seq=seq,
                chunk=chunk,
                output=spec.output,
                options=spec.options,
                backends=spec.backends,
                records=records,
            )
        )
        sent += 1
    return sent


def finalize_if_complete(state: JobState, storage: Storage, spec: JobSpec, seq: int) -> bool:
    """Write the manifest once every item of submission ``seq`` is done or failed.

    Exactly one caller wins the claim; if writing fails the claim is released so that a
    retry (or ``pixelrelay status --wait``) can finish the job. Returns True if written.
    """
    if not state.counts().complete or state.seq() != seq:
        return False
    return _write_manifest(state, storage, spec, seq)


def finalize_cancelled(state: JobState, storage: Storage, spec: JobSpec, force: bool = False) -> bool:
    """Write a cancelled job's manifest once no chain of its current submission is in
    flight (``force``: now, whatever is in flight). Returns True if this call wrote it."""
    if not state.cancelled():
        return False
    seq = state.seq()
    if not force and ChunksInFlight(state.r, spec.job_id).in_flight(seq):
        return False
    return _write_manifest(state, storage, spec, seq)


def finish_pending(state: JobState, seq: int) -> bool:
    """Submission ``seq`` (the current one, not cancelled) has every item done or failed but
    no manifest yet: someone must still write it (the sweep keeps the chain that would)."""
    info = state.info()
    if info.get("cancelled_at") or info.get("seq") != str(seq) or info.get("finished_seq") == str(seq):
        return False
    return state.counts().complete


def _write_manifest(state: JobState, storage: Storage, spec: JobSpec, seq: int) -> bool:
    if not state.claim_finalize(seq):
        return False
    cancelled = state.cancelled()
    try:
        counts = write_manifest(storage, spec, seq, cancelled, keepalive=lambda: state.refresh_finalize(seq))
    except BaseException:
        state.release_finalize(seq)
        raise
    done, failed, dropped = counts.get("done", 0), counts.get("failed", 0), counts.get(CANCELLED, 0)
    missing = spec.total - done - failed - dropped
    state.finish(seq, manifest_uri(spec.output, spec.job_id), done, failed, missing, dropped)
    ChunksInFlight(state.r, spec.job_id).retire()
    return True
