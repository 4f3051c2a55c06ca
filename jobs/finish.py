"""Finishing a job: its manifest, written once by one caller, when every item is done or failed
or a cancelled job has no chain in flight.

The manifest is the concatenation of the job's group files (``jobs.merge``): one object read
per 10,000 items or more, not every part. Exactly one caller writes it: the claim
(``JobState.claim_finalize``) is a lease the writer keeps alive, released if the write fails
(a later caller retries) and given up by a writer that died. ``finish_pending`` tells the
sweep to keep the chain that would finish the job. A cancelled job's manifest is written by
whoever sees no chain of its submission in flight: the last chain to end (it untracks itself
first, so of two chains ending together at least one sees none left), the sweep, or
``pixelrelay cancel`` after its grace (``force``). Items no part names are written as
``cancelled``: one line per item, always. Who finishes a job, and when: ``docs/design.md``,
"Failure and recovery".
"""

from __future__ import annotations

import logging

from pixelrelay.jobs.chunks import ChunksInFlight
from pixelrelay.jobs.files import CANCELLED, manifest_uri
from pixelrelay.jobs.merge import write_manifest
from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline.messages import JobSpec
from pixelrelay.pipeline.storage import Storage

log = logging.getLogger("pixelrelay.finish")


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
    _remove_debris(storage, spec.output)
    return True


def _remove_debris(storage: Storage, output: str) -> None:
    """Remove the temp files killed writers left in the output (``Storage.remove_debris``);
    a failure is logged, the job is finished either way."""
    try:
        removed = storage.remove_debris(output)
    except Exception as exc:
        log.warning("cannot remove stale temp files under %s: %s", output, exc)
        return
    if removed:
        log.info("removed %d stale temp files under %s", removed, output)
