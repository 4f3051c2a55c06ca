"""A job's files in its output storage: the source of truth, Redis being only a cache.

    OUTPUT/_jobs/<job_id>/job.json                   the JobSpec, signed
    OUTPUT/_jobs/<job_id>/inputs/<shard>.jsonl       the listing: Items, in index order; each
                                                     shard's sha256 is in the signed spec
    OUTPUT/_jobs/<job_id>/parts/<chunk>-<seq>.jsonl  one ItemRecord per line, per chain
    OUTPUT/_jobs/<job_id>/groups/<group>-<seq>.jsonl merged parts (pixelrelay.jobs.merge)
    OUTPUT/_jobs/<job_id>/manifest.jsonl             one line per item
    OUTPUT/_jobs/<job_id>/cancelled                  {"cancelled_at": t}

Parts are written whole, never appended, and the merge keeps the newest line per item.
``merge_manifest`` is the one-pass reference merge that the group files must equal.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from pixelrelay.pipeline.messages import Item, ItemRecord, JobSpec
from pixelrelay.pipeline.signing import SIG_FIELD, Signer
from pixelrelay.pipeline.storage import Storage, StorageNotFoundError, join_uri

JOBS_DIR = "_jobs"  # OUTPUT/_jobs/<job_id>/...
JOB_SPEC_NAME = "job.json"
MANIFEST_NAME = "manifest.jsonl"
CANCEL_NAME = "cancelled"
LISTING_SHARD_SIZE = 4096  # items per listing shard file
CANCELLED = "cancelled"  # the manifest status of an item a cancelled job never finished
CANCELLED_REASON = "job cancelled"
TAMPERED_REASON = "listing shard {shard} does not match the job's signed digest"

log = logging.getLogger("pixelrelay.jobs")


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


def write_spec(storage: Storage, spec: JobSpec, signer: Signer) -> None:
    """Write ``job.json``, signed as the spec in Redis is (so its listing digests bind the
    listing for a job rebuilt from storage too)."""
    body = signer.sign("spec", spec.model_dump(mode="json"))
    storage.put(spec_uri(spec.output, spec.job_id), json.dumps(body, indent=2).encode(), "application/json")


def read_spec(storage: Storage, output: str, job_id: str, signer: Signer | None = None) -> JobSpec:
    """``job.json``, its signature checked by ``signer`` (``SignatureError``); with None it is
    stripped unchecked: for what is only shown (``report``), never for what a job reads or writes."""
    body = json.loads(storage.get(spec_uri(output, job_id)))
    if signer is None:
        body = {k: v for k, v in body.items() if k != SIG_FIELD} if isinstance(body, dict) else body
        return JobSpec.model_validate(body)
    return JobSpec.model_validate(signer.verify("spec", body))


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


@dataclass(frozen=True)
class Listing:
    """What ``write_listing`` wrote: the item count and each shard's sha256 (hex, of its exact
    bytes, in shard order): the digests go into the signed ``JobSpec.listing_sha256``."""

    total: int
    digests: tuple[str, ...]


def write_listing(storage: Storage, output: str, job_id: str, items: Iterable[Item]) -> Listing:
    """Stream a job's items into its listing shards.

    Args:
        storage: the job's output storage.
        output: the job's output root.
        job_id: the job.
        items: the items, in index order.

    Returns:
        How many items were written, and each shard's digest.
    """
    total = 0
    shard: list[str] = []
    digests: list[str] = []
    for item in items:
        shard.append(item.model_dump_json(exclude_none=True))  # no "error" key: as older shards
        total += 1
        if len(shard) == LISTING_SHARD_SIZE:
            digests.append(_put_shard(storage, _shard_uri(output, job_id, len(digests)), shard))
            shard = []
    if shard:
        digests.append(_put_shard(storage, _shard_uri(output, job_id, len(digests)), shard))
    return Listing(total, tuple(digests))


def _put_shard(storage: Storage, uri: str, lines: list[str]) -> str:
    body = _lines(lines)
    storage.put(uri, body)
    return hashlib.sha256(body).hexdigest()


def _lines(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


class ListingDigestError(ValueError):
    """A listing shard whose bytes are not those the job's signed spec names."""


@functools.lru_cache(maxsize=8)
def _read_shard(storage: Storage, uri: str, sha256: str | None) -> tuple[Item, ...]:
    # Cached per expected digest: only bytes that matched it (or an unsigned listing) are served.
    body = storage.get(uri)
    if sha256 is not None and hashlib.sha256(body).hexdigest() != sha256:
        raise ListingDigestError(uri)
    return tuple(Item.model_validate_json(line) for line in body.splitlines() if line.strip())


@dataclass(frozen=True)
class _Shards:
    """Where a job's listing lies and what its signed spec says of it (``digests`` None: a
    spec without digests, which trusts the shards as found)."""

    output: str
    job_id: str
    total: int
    digests: Sequence[str] | None

    def items(self, storage: Storage, shard: int) -> tuple[Item, ...]:
        """Shard ``shard``'s items; a shard that does not match its digest gives its index
        range as items failed with ``TAMPERED_REASON``, never its content."""
        expected = None if self.digests is None else self.digests[shard]
        try:
            return _read_shard(storage, _shard_uri(self.output, self.job_id, shard), expected)
        except ListingDigestError:
            log.error(
                "job %s: listing shard %d does not match the job's signed digest: its items fail unread",
                self.job_id,
                shard,
            )
            base = shard * LISTING_SHARD_SIZE
            reason = TAMPERED_REASON.format(shard=shard)
            span = range(base, base + max(0, min(LISTING_SHARD_SIZE, self.total - base)))
            return tuple(Item(index=i, input="", output="", error=reason) for i in span)


def _shards_of(spec: JobSpec) -> _Shards:
    return _Shards(spec.output, spec.job_id, spec.total, spec.listing_sha256)


def read_chunk(storage: Storage, spec: JobSpec, chunk: int, chunk_size: int | None = None) -> list[Item]:
    """The listed items of one chunk, from the listing shards (the last chunk may hold fewer),
    each shard checked against the spec's signed digest (see ``_Shards.items``).

    Args:
        storage: the job's output storage.
        spec: the job (its output, id, total and shard digests).
        chunk: the chunk.
        chunk_size: items per chunk; None: the job's.

    Returns:
        The chunk's items, in index order.

    Raises:
        StorageNotFoundError: the chunk's first shard is missing (or is not one the spec names).
    """
    size = spec.chunk_size if chunk_size is None else chunk_size
    shards, limit = _shards_of(spec), len(spec.listing_sha256) if spec.listing_sha256 is not None else None
    start, stop = chunk * size, (chunk + 1) * size
    items: list[Item] = []
    for shard in range(start // LISTING_SHARD_SIZE, (stop - 1) // LISTING_SHARD_SIZE + 1):
        try:
            if limit is not None and shard >= limit:  # a shard the spec does not name: none
                raise StorageNotFoundError(_shard_uri(spec.output, spec.job_id, shard))
            rows = shards.items(storage, shard)
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


def iter_listing(
    storage: Storage, output: str, job_id: str, total: int, digests: Sequence[str] | None = None
) -> Iterator[Item]:
    """The job's items in index order, from its listing shards (checked against ``digests``,
    the spec's ``listing_sha256``, as ``read_chunk`` does)."""
    shards = _Shards(output, job_id, total, digests)
    for shard in range(-(-total // LISTING_SHARD_SIZE)):
        yield from shards.items(storage, shard)


def record_for(item: Item) -> ItemRecord:
    """The chain's record of a listed item: pending, or already failed with the listing's
    reason (``listing: ...``) when the listing rejected it."""
    record = ItemRecord(index=item.index, input=item.input, output=item.output)
    if item.error is not None:
        record.fail("listing", item.error)
    return record


def cancelled_row(item: Item) -> dict:
    """The manifest row of a listed item a cancelled job never finished: ``cancelled``, or
    failed with the listing's reason when the listing rejected it (or its shard was edited)."""
    if item.error is not None:
        return json.loads(manifest_line(record_for(item)))
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


def merge_manifest(
    storage: Storage,
    output: str,
    job_id: str,
    cancelled_total: int | None = None,
    digests: Sequence[str] | None = None,
) -> dict[str, int]:
    """Merge every part into manifest.jsonl (atomically), reading each one: the one-pass
    reference that the group files of ``pixelrelay.jobs.merge`` must equal, not the finish.

    Args:
        storage: the job's output storage.
        output: the job's output root.
        job_id: the job.
        cancelled_total: a cancelled job's item count: items no part names get a ``cancelled``
            line; None: the job was not cancelled.
        digests: the spec's ``listing_sha256``, which the listing read for them must match.

    Returns:
        Counts by status.
    """
    counts = {"done": 0, "failed": 0, CANCELLED: 0}
    rows = iter_part_records(storage, output, job_id)
    if cancelled_total is not None:
        rows = with_cancelled(rows, iter_listing(storage, output, job_id, cancelled_total, digests))
    with tempfile.TemporaryFile() as tmp:
        for row in rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
            tmp.write(json.dumps(row, separators=(",", ":")).encode() + b"\n")
        tmp.seek(0)
        storage.put_file(manifest_uri(output, job_id), tmp)
    return counts
