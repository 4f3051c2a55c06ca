"""What a stage message may tell a worker to do: checked before the worker does any of it.

A message is input from the broker, signed or not: whoever can write to Redis can push one.
So a worker runs a stage body only for a message that asks for nothing the job itself does
not. ``check_message`` reads the job as its submitter recorded it (the ``JobSpec`` in the
job's Redis hash, through ``JobState.spec`` only, and the listing shards written at submit,
``OUTPUT/_jobs/<id>/inputs/``, through ``jobs.files.read_chunk``) and refuses, with
``ForgedMessage``, a message:

* for a job Redis does not know (or whose spec cannot be read);
* whose ``job_id`` is not the submit rule's (pydantic already refuses it, with a full match);
* whose ``output`` root, ``options`` or ``backends`` differ from the job's;
* whose chunk is not one of the job's, or whose records repeat an index or hold one that is
  not in that chunk;
* with a record whose ``(index, input, output)`` is not the job's listing entry at that
  index. This one rule covers "a local input must be under the job's input root or in the
  manifest file's listed set, an S3 input must be in the listing": the listing is that set;
* with a record whose output does not stay under the output root once normalised (no
  ``..`` part, no absolute escape, not inside ``_jobs/``), or, for an input folder or prefix
  (not a manifest file), whose input is not under it (defence in depth, should a listing
  have been written by an older release).

A record whose listing entry carries an error (``Item.error``: a listing line refused at
submit) is failed here with that error: it is never read or written.

Nothing is read from the message's own locations: only from the job's output root, as the
job records it. A refused message is dropped by ``tasks.run_stage`` (acked, never retried,
logged at WARNING with the job, the chunk and the reason). Nothing of the genuine chain is
lost with it: a chain is tracked in Redis (``jobs.chunks``) from the moment it is sent, so
should the dropped message have been the genuine one, the sweep (``workers.sweep``) finds the
chain neither leased nor queued and re-sends it, rebuilt from the listing in storage.

Transient errors (Redis, storage) reading the job propagate; ``transient_retry`` then says
when to retry, as the delivery policy would (logged "transient error", and the wait written
into the chain's entry, when the chain is tracked, so that the sweep does not re-send it
meanwhile; an entry is never created for an unchecked message).
"""

from __future__ import annotations

import logging
import os
import posixpath

from pixelrelay.jobs.chunks import ChunksInFlight, Slot
from pixelrelay.jobs.files import JOBS_DIR, read_chunk
from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline import constants as C
from pixelrelay.pipeline.messages import ChunkMessage, Item, JobSpec
from pixelrelay.pipeline.storage import Storage, StorageError, is_s3, split_uri
from pixelrelay.workers.policy import TRANSIENT_ERRORS, Limits, Seen

log = logging.getLogger("pixelrelay.worker")


class ForgedMessage(ValueError):
    """A message that asks for something its job does not: it is dropped, never run."""


def check_message(state: JobState, storage_for, msg: ChunkMessage, stage: str, seen: Seen | None = None) -> None:
    """Raise ``ForgedMessage`` unless ``msg`` asks only for what its job does (see the module
    docstring). ``storage_for(uri)`` opens the job's output storage. ``seen``: the job as the
    delivery read it already (``workers.policy.look``), else its spec is read here. Fails, in
    place, the records whose listing entry carries an error."""
    spec = _job_spec(state, seen)
    _check_job_fields(spec, msg)
    listing = _listing(storage_for(spec.output), spec, msg.chunk)
    indices: set[int] = set()
    for record in msg.records:
        if record.index in indices:
            raise ForgedMessage(f"item {record.index} is in the message twice")
        indices.add(record.index)
        entry = listing.get(record.index)
        if entry is None:
            raise ForgedMessage(f"item {record.index} is not in chunk {msg.chunk} of the job's listing")
        if (record.input, record.output) != (entry.input, entry.output):
            raise ForgedMessage(f"item {record.index}: input or output differs from the job's listing")
        if entry.error:  # refused at listing: never read or written, whatever it names
            if record.status is None:
                record.fail(stage, str(entry.error))
            continue
        problem = location_problem(spec, entry)
        if problem:
            raise ForgedMessage(f"item {record.index}: {problem}")


def _job_spec(state: JobState, seen: Seen | None) -> JobSpec:
    try:
        return state.spec() if seen is None else state.parse_spec(seen.spec)
    except TRANSIENT_ERRORS:
        raise
    except KeyError:
        raise ForgedMessage("no such job") from None
    except Exception as exc:  # a spec that does not validate (or, signed, does not verify)
        raise ForgedMessage(f"the job's spec cannot be read: {type(exc).__name__}") from None


def _check_job_fields(spec: JobSpec, msg: ChunkMessage) -> None:
    if msg.job_id != spec.job_id:
        raise ForgedMessage("job id differs from the job's")
    if msg.output != spec.output:
        raise ForgedMessage(f"output root {msg.output!r} is not the job's")
    if msg.options != spec.options:
        raise ForgedMessage("options differ from the job's")
    if msg.backends != spec.backends:
        raise ForgedMessage(f"backends {msg.backends.model_dump(exclude_none=True)} differ from the job's")
    n_chunks = -(-spec.total // spec.chunk_size)
    if not 0 <= msg.chunk < n_chunks:
        raise ForgedMessage(f"chunk {msg.chunk} is not one of the job's {n_chunks}")


def _listing(storage: Storage, spec: JobSpec, chunk: int) -> dict[int, Item]:
    try:
        items = read_chunk(storage, spec.output, spec.job_id, chunk, spec.chunk_size)
    except TRANSIENT_ERRORS:
        raise
    except StorageError as exc:
        raise ForgedMessage(f"the job's listing of chunk {chunk} cannot be read: {exc}") from None
    return {item.index: item for item in items}


def location_problem(spec: JobSpec, item: Item) -> str | None:
    """Why ``item`` is not where job ``spec`` may read and write, or None."""
    if not within(spec.output, item.output):
        return "its output is not under the job's output root"
    if _under_jobs_dir(spec.output, item.output):
        return f"its output is inside the job state folder ({JOBS_DIR}/)"
    if not spec.input.lower().endswith(C.MANIFEST_EXTENSIONS) and not within(spec.input, item.input):
        return "its input is not under the job's input root"
    return None


def _relative(root: str, uri: str) -> str | None:
    """``uri`` relative to ``root`` after normalisation ("/"-separated), or None when it is
    not strictly below it, names a ``..`` part, or mixes S3 and local."""
    if is_s3(root) != is_s3(uri):
        return None
    if is_s3(root):
        (root_bucket, root_key), (bucket, key) = split_uri(root.rstrip("/")), split_uri(uri)
        if bucket != root_bucket or not root_bucket:
            return None
        parts = key.split("/")
        root_key = root_key.strip("/")
        base = posixpath.normpath(root_key) if root_key else ""
        path = posixpath.normpath(key) if key else ""
    else:
        if not os.path.isabs(root) or not os.path.isabs(uri):
            return None
        parts = uri.replace(os.sep, "/").split("/")
        base, path = os.path.normpath(root), os.path.normpath(uri)
        base, path = base.replace(os.sep, "/"), path.replace(os.sep, "/")
    if ".." in parts:
        return None
    if not base:
        return path if path and not path.startswith("/") else None
    prefix = base.rstrip("/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) and len(path) > len(prefix) else None


def within(root: str, uri: str) -> bool:
    """Whether ``uri`` lies strictly under ``root`` once both are normalised (local:
    ``os.path.normpath``, no symlinks resolved; S3: the same bucket, ``posixpath.normpath``
    of the key), with no ``..`` part."""
    return _relative(root, uri) is not None


def _under_jobs_dir(root: str, uri: str) -> bool:
    rel = _relative(root, uri)
    return rel is not None and rel.split("/", 1)[0] == JOBS_DIR


def transient_retry(
    state: JobState, stage: str, msg: ChunkMessage, retries: int, exc: BaseException, limits: Limits = Limits()
) -> float:
    """The countdown before checking ``msg`` again after a transient error (see the module
    docstring); the chain's entry, if tracked, waits that long."""
    countdown = limits.countdown(retries)
    log.warning(
        "%s chunk %s/%d: transient error (%s) checking the message, retry %d in %.1fs",
        stage,
        msg.job_id,
        msg.chunk,
        exc,
        retries + 1,
        countdown,
    )
    try:
        chunks, slot = ChunksInFlight(state.r, msg.job_id), Slot.of(msg)
        if chunks.get(slot) is not None:
            chunks.track(slot, stage, msg.feeds, wait=countdown)
    except TRANSIENT_ERRORS:
        pass  # Redis is down: the sweep cannot run either
    return countdown
