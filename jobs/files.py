"""A job's files in its output storage: the source of truth, Redis being only a cache.

    OUTPUT/_jobs/<job_id>/job.json                   the JobSpec
    OUTPUT/_jobs/<job_id>/inputs/<shard>.jsonl       the listing: Items, in index order
    OUTPUT/_jobs/<job_id>/parts/<chunk>-<seq>.jsonl  one ItemRecord per line, per chain
    OUTPUT/_jobs/<job_id>/groups/<group>-<seq>.jsonl merged parts (pixelrelay.jobs.merge)
    OUTPUT/_jobs/<job_id>/manifest.jsonl             one line per item
    OUTPUT/_jobs/<job_id>/cancelled                  {"cancelled_at": t}

Parts are written whole, never appended, and the merge keeps the newest line per item.
``merge_manifest`` is the one-pass reference merge that the group files must equal.
"""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Iterable, Iterator

from pixelrelay.pipeline.messages import Item, ItemRecord, JobSpec
from pixelrelay.pipeline.storage import Storage, StorageNotFoundError, join_uri

JOBS_DIR = "_jobs"  # OUTPUT/_jobs/<job_id>/...
JOB_SPEC_NAME = "job.json"
MANIFEST_NAME = "manifest.jsonl"
CANCEL_NAME = "cancelled"
LISTING_SHARD_SIZE = 4096  # items per listing shard file
CANCELLED = "cancelled"  # the manifest status of an item a cancelled job never finished
CANCELLED_REASON = "job cancelled"


def job_root(output: str, job_id: str) -> str:
    return join_uri(output, JOBS_DIR, job_id)


def spec_uri(output: str, job_id: str) -> str:
    return join_uri(job_root(output, job_id), JOB_SPEC_NAME)


def manifest_uri(output: str, job_id: str) -> str:
    return join_uri(job_root(output, job_id), MANIFEST_NAME)


def _shard_uri(output: str, job_id: str, shard: int) -> str:
    return join_uri(job_root(output, job_id), "inputs", f"{shard:08d}.jsonl")


def _parts_prefix(output: str, job_id: str) -> str:
    return join_uri(job_root(output, job_id), "parts", "")


def part_uri(output: str, job_id: str, chunk: int, seq: int, part: str = "") -> str:
    suffix = f"-{part}" if part else ""
    return join_uri(job_root(output, job_id), "parts", f"{chunk:08d}-{seq:06d}{suffix}.jsonl")


def write_spec(storage: Storage, spec: JobSpec) -> None:
    storage.put(spec_uri(spec.output, spec.job_id), spec.model_dump_json(indent=2).encode(), "application/json")


def read_spec(storage: Storage, output: str, job_id: str) -> JobSpec:
    return JobSpec.model_validate_json(storage.get(spec_uri(output, job_id)))


def cancel_uri(output: str, job_id: str) -> str:
    return join_uri(job_root(output, job_id), CANCEL_NAME)


def write_cancel(storage: Storage, output: str, job_id: str, at: float) -> None:
    storage.put(cancel_uri(output, job_id), json.dumps({"cancelled_at": at}).encode(), "application/json")


def read_cancel(storage: Storage, output: str, job_id: str) -> float | None:
    """When the job was cancelled, as recorded in storage; None if it was not."""
    try:
        data = json.loads(storage.get(cancel_uri(output, job_id)))
    except StorageNotFoundError:
        return None
    except ValueError:  # unreadable: still a cancel marker
        return 0.0
    at = data.get("cancelled_at") if isinstance(data, dict) else None
    return float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else 0.0


def write_listing(storage: Storage, output: str, job_id: str, items: Iterable[Item]) -> int:
    """Stream a job's items into its listing shards.

    Args:
        storage: the job's output storage.
        output: the job's output root.
        job_id: the job.
        items: the items, in index order.

    Returns:
        How many items were written.
    """
    total = 0
    shard: list[str] = []
    for item in items:
        shard.append(item.model_dump_json(exclude_none=True))  # no "error" key: as older shards
        total += 1
        if len(shard) == LISTING_SHARD_SIZE:
            storage.put(_shard_uri(output, job_id, total // LISTING_SHARD_SIZE - 1), _lines(shard))
            shard = []
    if shard:
        storage.put(_shard_uri(output, job_id, total // LISTING_SHARD_SIZE), _lines(shard))
    return total


def _lines(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


@functools.lru_cache(maxsize=8)
def _read_shard(storage: Storage, uri: str) -> tuple[Item, ...]:
    # Shards are immutable once written, so caching them per process is safe.
    return tuple(Item.model_validate_json(line) for line in storage.get(uri).splitlines() if line.strip())


def read_chunk(storage: Storage, output: str, job_id: str, chunk: int, chunk_size: int) -> list[Item]:
    """The listed items of one chunk, from the listing shards (the last chunk may hold fewer).

    Args:
        storage: the job's output storage.
        output: the job's output root.
        job_id: the job.
        chunk: the chunk.
        chunk_size: the job's items per chunk.

    Returns:
        The chunk's items, in index order.

    Raises:
        StorageNotFoundError: the chunk's first shard is missing.
    """
    start, stop = chunk * chunk_size, (chunk + 1) * chunk_size
    items: list[Item] = []
    for shard in range(start // LISTING_SHARD_SIZE, (stop - 1) // LISTING_SHARD_SIZE + 1):
        try:
            rows = _read_shard(storage, _shard_uri(output, job_id, shard))
        except StorageNotFoundError:
            if items:
                break  # the chunk runs past the last shard
            raise
        base = shard * LISTING_SHARD_SIZE
        items.extend(rows[max(0, start - base) : max(0, stop - base)])
    return items


def write_part(
    storage: Storage, output: str, job_id: str, chunk: int, seq: int, records: list[ItemRecord], part: str = ""
) -> None:
    """Write a chain's manifest part, whole (a redelivered chain rewrites it).

    Args:
        storage: the job's output storage.
        output: the job's output root.
        job_id: the job.
        chunk: the chain's chunk.
        seq: the submission that wrote it.
        records: one ``ItemRecord`` per line.
        part: the item's index for a split chunk's single-item chain, else "".
    """
    lines = [manifest_line(r) for r in records]
    storage.put(part_uri(output, job_id, chunk, seq, part), _lines(lines), "application/x-ndjson")


def read_part(
    storage: Storage, output: str, job_id: str, chunk: int, seq: int, part: str = ""
) -> list[ItemRecord] | None:
    """A chain's manifest part as written.

    Args:
        storage: the job's output storage.
        output: the job's output root.
        job_id: the job.
        chunk: the chain's chunk.
        seq: the submission that wrote it.
        part: the item's index for a split chunk's single-item chain, else "".

    Returns:
        The part's records, or None if it was not written.
    """
    try:
        body = storage.get(part_uri(output, job_id, chunk, seq, part))
    except StorageNotFoundError:
        return None
    return [ItemRecord.model_validate_json(line) for line in body.splitlines() if line.strip()]


def manifest_line(record: ItemRecord) -> str:
    row = record.model_dump(mode="json")
    if record.status != "done":
        row["output"] = None  # never point at an object that was not written
    return json.dumps(row, separators=(",", ":"))


def _parts_by_chunk(storage: Storage, output: str, job_id: str) -> dict[int, list[tuple[int, str]]]:
    by_chunk: dict[int, list[tuple[int, str]]] = {}
    for uri in storage.list(_parts_prefix(output, job_id)):
        name = uri.rsplit("/", 1)[-1]
        if not name.endswith(".jsonl"):
            continue
        chunk, seq = name[: -len(".jsonl")].split("-")[:2]
        by_chunk.setdefault(int(chunk), []).append((int(seq), uri))
    return by_chunk


def latest_seq(storage: Storage, output: str, job_id: str) -> int:
    """The newest submission number that wrote a part (0 if none)."""
    return max((seq for parts in _parts_by_chunk(storage, output, job_id).values() for seq, _ in parts), default=0)


def iter_part_records(storage: Storage, output: str, job_id: str) -> Iterator[dict]:
    """Yield the newest manifest row per item, in index order."""
    by_chunk = _parts_by_chunk(storage, output, job_id)
    for chunk in sorted(by_chunk):
        newest: dict[int, tuple[int, dict]] = {}
        for seq, uri in sorted(by_chunk[chunk]):
            for line in storage.get(uri).splitlines():
                if line.strip():
                    row = json.loads(line)
                    newest[row["index"]] = (seq, row)
        for index in sorted(newest):
            yield newest[index][1]


def iter_listing(storage: Storage, output: str, job_id: str, total: int) -> Iterator[Item]:
    """The job's items in index order, from its listing shards."""
    for shard in range(-(-total // LISTING_SHARD_SIZE)):
        yield from _read_shard(storage, _shard_uri(output, job_id, shard))


def record_for(item: Item) -> ItemRecord:
    """The chain's record of a listed item: pending, or already failed with the listing's
    reason (``listing: ...``) when the listing rejected it."""
    record = ItemRecord(index=item.index, input=item.input, output=item.output)
    if item.error is not None:
        record.fail("listing", item.error)
    return record


def cancelled_row(item: Item) -> dict:
    row = ItemRecord(index=item.index, input=item.input, output=item.output).model_dump(mode="json")
    return {**row, "output": None, "status": CANCELLED, "error": CANCELLED_REASON}


def with_cancelled(rows: Iterable[dict], items: Iterable[Item]) -> Iterator[dict]:
    """``rows`` (in index order) with a cancelled row for every listed item they lack."""
    rows = iter(rows)
    row = next(rows, None)
    for item in items:
        while row is not None and row["index"] < item.index:  # not listed (cannot happen): kept
            yield row
            row = next(rows, None)
        if row is not None and row["index"] == item.index:
            yield row
            row = next(rows, None)
        else:
            yield cancelled_row(item)


def merge_manifest(storage: Storage, output: str, job_id: str, cancelled_total: int | None = None) -> dict[str, int]:
    """Merge every part into manifest.jsonl (atomically), reading each one: the one-pass
    reference that the group files of ``pixelrelay.jobs.merge`` must equal, not the finish.

    Args:
        storage: the job's output storage.
        output: the job's output root.
        job_id: the job.
        cancelled_total: a cancelled job's item count: items no part names get a ``cancelled``
            line; None: the job was not cancelled.

    Returns:
        Counts by status.
    """
    counts = {"done": 0, "failed": 0, CANCELLED: 0}
    rows = iter_part_records(storage, output, job_id)
    if cancelled_total is not None:
        rows = with_cancelled(rows, iter_listing(storage, output, job_id, cancelled_total))
    with tempfile.TemporaryFile() as tmp:
        for row in rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
            tmp.write(json.dumps(row, separators=(",", ":")).encode() + b"\n")
        tmp.seek(0)
        storage.put_file(manifest_uri(output, job_id), tmp)
    return counts
