"""Windowed feeding of a job's chunks, without Celery (``feed``).

A job's listing waits in storage, never as messages in Redis. The producer sends the first
``window`` chunks; every finished chunk sends the next one. So a job has at most ``window``
chunks (``window * chunk_size`` items) in the broker, whatever its size. Chunks whose items
are all done already (a resume) are skipped.

Sending is a callable (``Send``): the workers pass one that enqueues a Celery chain, tests
may pass a list's ``append``. Every chunk sent is tracked first (``jobs.chunks``), so a chain
lost by the broker or with its worker can be sent again (``docs/design.md``, "Failure and
recovery"). The spec a caller passes comes from ``JobState.spec()`` (checked), and
``JobState.next_chunk`` checks the cursor: a forged one raises ``SignatureError`` before
anything is read or sent. A cancelled job is sent nothing. Finishing a job is ``jobs.finish``.
"""

from __future__ import annotations

from collections.abc import Callable

from pixelrelay.jobs.chunks import ChunksInFlight, Slot
from pixelrelay.jobs.files import read_chunk, record_for
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
        items = read_chunk(storage, spec, chunk)
        done = state.done_flags([item.index for item in items])
        records = [record_for(i) for i, d in zip(items, done, strict=True) if not d]  # listing rejects: failed
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
