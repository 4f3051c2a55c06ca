"""What a stage message may tell a worker to do: checked before the worker does any of it.

Whoever can write to Redis can push a message, so ``check_message`` compares it with the job
as its submitter recorded it (the signed ``JobSpec`` and the listing shards in storage, never
the message's own locations) and raises ``ForgedMessage`` for an unknown job; another output
root, options or backends; a chunk or index that is not the job's; a record that differs from
its listing entry; or an output that leaves the output root. A listed item with an ``error``
fails here, unread, whatever the message names for it: so do the items of a listing shard that
does not match the spec's signed digest (``read_chunk``). A dropped genuine message is re-sent
by the sweep, from storage.

``InputRoot`` says how the stages then read a local input: below the job's input folder with
no symlink followed (a link swapped in after the listing fails its item), unless the job was
submitted with ``follow_symlinks``. A manifest's entries are read as named, as its listing
took them (links followed).
"""

from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass

from pixelrelay.jobs.chunks import ChunksInFlight, Slot
from pixelrelay.jobs.files import JOBS_DIR, read_chunk
from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline import constants as C
from pixelrelay.pipeline.messages import ChunkMessage, Item, ItemRecord, JobSpec
from pixelrelay.pipeline.storage import Storage, StorageError, is_s3, split_uri
from pixelrelay.workers.policy import TRANSIENT_ERRORS, Limits, Seen

log = logging.getLogger("pixelrelay.worker")
DEFAULT_LIMITS = Limits()


class ForgedMessage(ValueError):
    """A message that asks for something its job does not: it is dropped, never run."""


@dataclass(frozen=True)
class InputRoot:
    """How a job's local inputs are read: with ``follow``, as named; else no symlink is
    followed, in any folder below ``folder`` (None: in the file's own name only)."""

    folder: str | None = None
    follow: bool = False


NAME_NOT_FOLLOWED = InputRoot()  # a source's own name is never a symlink followed


def input_root(spec: JobSpec) -> InputRoot:
    """How the job ``spec``'s local inputs are read (see the module docstring)."""
    if spec.follow_symlinks or is_s3(spec.input) or not os.path.isabs(spec.input) or not os.path.isdir(spec.input):
        return InputRoot(follow=True)  # as listed: a manifest's entries are read as named, links and all
    return InputRoot(folder=spec.input)


def check_message(state: JobState, storage_for, msg: ChunkMessage, stage: str, seen: Seen | None = None) -> JobSpec:
    """Check that ``msg`` asks only for what its job does; fails, in place, the records whose
    listing entry carries an error. Returns the job's spec.

    Args:
        state: the message's job.
        storage_for: opens the job's output storage, given its URI.
        msg: the message.
        stage: the stage it was delivered to.
        seen: the job as the delivery read it already (``pixelrelay.workers.policy.look``); None:
            its spec is read here.

    Raises:
        ForgedMessage: the message asks for anything else.
    """
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
        if entry.error:  # refused at listing (or its shard edited): never read or written
            _fail_as_listed(record, entry, stage)
            continue
        if (record.input, record.output) != (entry.input, entry.output):
            raise ForgedMessage(f"item {record.index}: input or output differs from the job's listing")
        problem = location_problem(spec, entry)
        if problem:
            raise ForgedMessage(f"item {record.index}: {problem}")
    return spec


def _fail_as_listed(record: ItemRecord, entry: Item, stage: str) -> None:
    """Fail ``record`` with its listing entry's error, naming only what the entry names."""
    record.input, record.output = entry.input, entry.output
    if record.status is None:
        record.fail("listing", str(entry.error))


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
        items = read_chunk(storage, spec, chunk)
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
    state: JobState, stage: str, msg: ChunkMessage, retries: int, exc: BaseException, limits: Limits = DEFAULT_LIMITS
) -> float:
    """The countdown before checking ``msg`` again after a transient error (Redis, storage), as the
    delivery policy would retry it; logged "transient error". The wait is written into the
    chain's entry when the chain is tracked, so that the sweep does not re-send it meanwhile;
    an entry is never created for an unchecked message.

    Args:
        state: the message's job.
        stage: the stage checking it.
        msg: the message.
        retries: retries spent so far.
        exc: the transient error.
        limits: the backoff.

    Returns:
        Seconds to wait.
    """
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
