"""The finish that scales: parts are folded into group files while the job runs, and the
manifest is the concatenation of the group files.

A group is ``per_group`` consecutive chunks (``Groups``: 1, 2 or 5 x 10^k, at least
``GROUP_ITEMS`` items). Invariants: a group file holds what the one-pass merge
(``pixelrelay.jobs.files.merge_manifest``) writes for its items and is written whole; it is
merged once, under a claim per (seq, group), by whoever marks its last item; the finish
(``write_manifest``) merges any group that has no file of this submission, so a re-run after
a crash writes the same manifest. Every line read back is checked; a bad one is skipped.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pixelrelay.jobs.files import CANCELLED, cancelled_row, job_root, manifest_uri, part_uri, read_chunk
from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline.messages import JobSpec
from pixelrelay.pipeline.storage import Storage, StorageNotFoundError, is_s3, join_uri

log = logging.getLogger("pixelrelay.merge")

GROUP_ITEMS = 10_000  # the least number of items per group (the last group may have fewer)
GROUPS_DIR = "groups"
READ_THREADS = 8  # parts fetched at once (S3 latency, not bandwidth, bounds a merge)
GROUP_READ_THREADS = 4  # group files (MBs each) fetched and held at once by the finish
STATUSES = frozenset({"done", "failed", CANCELLED})

Keepalive = Callable[[], None]


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class Groups:
    """Which chunks and items make up each group of a job."""

    total: int
    chunk_size: int

    @classmethod
    def of(cls, spec: JobSpec) -> Groups:
        return cls(spec.total, spec.chunk_size)

    @property
    def per_group(self) -> int:
        """Chunks per group: the smallest 1, 2 or 5 x 10^k with that many items >= GROUP_ITEMS."""
        scale = 1
        while True:
            for m in (1, 2, 5):
                if m * scale * self.chunk_size >= GROUP_ITEMS:
                    return m * scale
            scale *= 10

    @property
    def n_chunks(self) -> int:
        return -(-self.total // self.chunk_size)

    @property
    def count(self) -> int:
        return -(-self.n_chunks // self.per_group)

    def of_chunk(self, chunk: int) -> int:
        return chunk // self.per_group

    def chunks(self, group: int) -> range:
        return range(group * self.per_group, min(self.n_chunks, (group + 1) * self.per_group))

    def items(self, group: int) -> range:
        span = self.per_group * self.chunk_size
        return range(group * span, min(self.total, (group + 1) * span))

    def name_prefixes(self, group: int) -> list[str]:
        """Prefixes of the part names (``<chunk:08d>-...``) that cover the group's chunks."""
        per = self.per_group
        step = 10 ** (len(str(per)) - 1)  # per = m x step, m in (1, 2, 5)
        digits = len(str(step)) - 1
        out = []
        for first in range(group * per, min(self.n_chunks, (group + 1) * per), step):
            name = f"{first:08d}"
            out.append(name[: len(name) - digits] if digits else name + "-")
        return out


# --- where the files are -----------------------------------------------------------------


def groups_prefix(output: str, job_id: str) -> str:
    return join_uri(job_root(output, job_id), GROUPS_DIR, "")


def group_uri(output: str, job_id: str, group: int, seq: int) -> str:
    return join_uri(job_root(output, job_id), GROUPS_DIR, f"{group:06d}-{seq:06d}.jsonl")


def _name_fields(uri: str) -> list[str] | None:
    name = uri.rsplit("/", 1)[-1]
    if not name.endswith(".jsonl"):
        return None
    fields = name[: -len(".jsonl")].split("-")
    return fields if len(fields) >= 2 and fields[0].isdigit() and fields[1].isdigit() else None


def list_group_files(storage: Storage, output: str, job_id: str) -> dict[int, list[int]]:
    """Group number -> the submissions that wrote a file for it (one listing)."""
    found: dict[int, list[int]] = {}
    for uri in storage.list(groups_prefix(output, job_id)):
        fields = _name_fields(uri)
        if fields is not None and len(fields) == 2:
            found.setdefault(int(fields[0]), []).append(int(fields[1]))
    return found


class PartLister:
    """(seq, uri) of every part of a group's chunks up to submission ``seq``, in (seq, uri)
    order: the order in which the one-pass merge lets a newer line replace an older one.

    S3 lists the group's name prefixes (1, 2 or 5 listings). A local folder cannot be listed
    by name prefix, and listing all its parts per group would cost O(parts) each time: there
    every name a part of the group can have is looked up instead (per chunk and submission,
    the chain's part and one per item for a split chunk: ``part_uri``), a ``stat`` each."""

    def __init__(self, storage: Storage, spec: JobSpec, geo: Groups) -> None:
        self.storage, self.spec, self.geo = storage, spec, geo
        self.folder = part_uri(spec.output, spec.job_id, 0, 0).rsplit("/", 1)[0] + "/"

    def of(self, group: int, seq: int, after: int = 0) -> list[tuple[int, str]]:
        """The parts of submissions ``after`` < s <= ``seq``."""
        found = self._listed(group) if is_s3(self.folder) else self._looked_up(group, range(after + 1, seq + 1))
        return sorted((s, uri) for s, uri in found if after < s <= seq)

    def _listed(self, group: int) -> Iterator[tuple[int, str]]:
        chunks = self.geo.chunks(group)
        for prefix in self.geo.name_prefixes(group):
            for uri in self.storage.list(self.folder + prefix):
                fields = _name_fields(uri)
                if fields is not None and int(fields[0]) in chunks:
                    yield int(fields[1]), uri

    def _looked_up(self, group: int, seqs: range) -> Iterator[tuple[int, str]]:
        out, job, size = self.spec.output, self.spec.job_id, self.geo.chunk_size
        for chunk in self.geo.chunks(group):
            for s in seqs:
                names = [""] + [str(i) for i in range(chunk * size, min(self.geo.total, (chunk + 1) * size))]
                for name in names:
                    uri = part_uri(out, job, chunk, s, name)
                    if self.storage.exists(uri):
                        yield s, uri


# --- reading lines back -----------------------------------------------------------------


def check_row(line: bytes, items: range) -> dict | None:
    """The row a manifest line holds, or None (logged) when it is not a valid row of ``items``."""
    try:
        row = json.loads(line)
    except ValueError:
        row = None
    index = row.get("index") if isinstance(row, dict) else None
    if not isinstance(index, int) or isinstance(index, bool) or index not in items or row.get("status") not in STATUSES:
        log.warning(
            "skipping a manifest line that is not a row of items %d..%d: %.80r", items.start, items.stop - 1, line
        )
        return None
    return row


def _row_line(row: dict) -> bytes:
    return json.dumps(row, separators=(",", ":")).encode() + b"\n"


def _fetch(
    storage: Storage, uris: list[str], threads: int = READ_THREADS, window: int = 4 * READ_THREADS
) -> Iterator[bytes | None]:
    """The bodies of ``uris`` in order, ``threads`` at a time, at most ``window`` held at
    once (None for one that is gone)."""

    def get(uri: str) -> bytes | None:
        try:
            return storage.get(uri)
        except StorageNotFoundError:
            return None

    if len(uris) <= 1 or threads <= 1:
        yield from map(get, uris)
        return
    with ThreadPoolExecutor(max_workers=min(threads, len(uris))) as pool:
        for start in range(0, len(uris), window):  # a bounded window: memory stays small
            yield from pool.map(get, uris[start : start + window])


# --- merging one group ------------------------------------------------------------------


@dataclass
class Merged:
    """One group's lines (index order) and how many rows each status has."""

    lines: list[bytes]
    counts: dict[str, int]


def merge_group(
    storage: Storage,
    spec: JobSpec,
    geo: Groups,
    group: int,
    seq: int,
    older: dict[int, list[int]] | None = None,
    keepalive: Keepalive = _nothing,
    parts: PartLister | None = None,
) -> Merged:
    """Merge the group's lines as of submission ``seq``. Reads nothing it does not need; writes
    nothing.

    Args:
        storage: the job's output storage.
        spec: the job.
        geo: the job's group geometry.
        group: the group to merge.
        seq: the submission merged up to.
        older: ``list_group_files``' answer, to find the group's newest older file; None: list it.
        keepalive: called now and then, to keep a claim alive during a long merge.
        parts: lists the group's parts; None: a lister for ``storage``.

    Returns:
        The group's rows: its newest older group file plus the parts of later submissions.
    """
    items = geo.items(group)
    older = list_group_files(storage, spec.output, spec.job_id) if older is None else older
    base_seq = max((s for s in older.get(group, ()) if s < seq), default=0)
    newest: dict[int, tuple[str, bytes]] = {}  # index -> (status, the line as written)
    if base_seq:
        _fold(newest, storage.get(group_uri(spec.output, spec.job_id, group, base_seq)), items)
    lister = parts or PartLister(storage, spec, geo)
    for body in _fetch(storage, [uri for _, uri in lister.of(group, seq, after=base_seq)]):
        if body is not None:  # gone since the listing (gc): as if never written
            _fold(newest, body, items)
        keepalive()
    lines: list[bytes] = []
    counts: dict[str, int] = {}
    for index in sorted(newest):
        status, line = newest[index]
        counts[status] = counts.get(status, 0) + 1
        lines.append(line + b"\n")
    return Merged(lines, counts)


def _fold(newest: dict[int, tuple[str, bytes]], body: bytes, items: range) -> None:
    """Keep each valid row's line as written (``manifest_line``'s compact JSON, the bytes a
    re-serialisation would give), the newest per item: parsed once, never encoded again."""
    for line in body.splitlines():
        line = line.strip()
        if line and (row := check_row(line, items)) is not None:
            newest[row["index"]] = (row["status"], line)


def write_group(storage: Storage, spec: JobSpec, group: int, seq: int, merged: Merged) -> None:
    storage.put(group_uri(spec.output, spec.job_id, group, seq), b"".join(merged.lines), "application/x-ndjson")


def merge_group_if_complete(state: JobState, storage: Storage, spec: JobSpec, seq: int, chunk: int) -> bool:
    """Merge and write the group of ``chunk`` if every one of its items is done or failed in
    submission ``seq`` and nobody claimed it yet. Never raises: a group left unmerged is
    merged by the finish.

    Args:
        state: the job's Redis state (bitmaps and claims).
        storage: the job's output storage.
        spec: the job.
        seq: the current submission.
        chunk: a chunk whose items were just marked.

    Returns:
        True if this call wrote the group.
    """
    try:
        geo = Groups.of(spec)
        group = geo.of_chunk(chunk)
        items = geo.items(group)
        if not items or state.marked_in(items.start, items.stop) < len(items) or state.seq() != seq:
            return False
        if not state.claim_group(seq, group):
            return False
    except Exception as exc:
        log.warning(
            "job %s: cannot tell whether the group of chunk %d is complete (%s): the finish merges it",
            spec.job_id,
            chunk,
            exc,
        )
        return False
    try:
        write_group(storage, spec, group, seq, merge_group(storage, spec, geo, group, seq))
        return True
    except Exception as exc:
        log.warning("job %s: cannot merge group %d (%s): the finish merges it", spec.job_id, group, exc)
        try:
            state.release_group(seq, group)
        except Exception:  # the claim only saves work: the finish merges the group anyway
            pass
        return False


def iter_rows(storage: Storage, spec: JobSpec, seq: int) -> Iterator[dict]:
    """The newest row per item as of submission ``seq`` (every part up to it), in index
    order: each group's newest file plus the parts written after it (a job rebuilt from
    storage reads this, not every part)."""
    geo = Groups.of(spec)
    older, parts = list_group_files(storage, spec.output, spec.job_id), PartLister(storage, spec, geo)
    for group in range(geo.count):
        for line in merge_group(storage, spec, geo, group, seq + 1, older, parts=parts).lines:
            yield json.loads(line)


# --- the finish ---------------------------------------------------------------------------


class _Throttled:
    """Calls ``fn`` at most every ``every_s`` seconds."""

    def __init__(self, fn: Keepalive, every_s: float = 5.0) -> None:
        self.fn, self.every_s, self.last = fn, every_s, time.monotonic()

    def __call__(self) -> None:
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            self.fn()


def write_manifest(
    storage: Storage,
    spec: JobSpec,
    seq: int,
    cancelled: bool = False,
    keepalive: Keepalive = _nothing,
) -> dict[str, int]:
    """Write manifest.jsonl (atomically) from the group files of submission ``seq``, merging any
    group that has none.

    Args:
        storage: the job's output storage.
        spec: the job.
        seq: the submission.
        cancelled: items no part names get a ``cancelled`` line.
        keepalive: called now and then, to keep the manifest claim alive.

    Returns:
        Counts by status.
    """
    geo = Groups.of(spec)
    keepalive = _Throttled(keepalive)
    counts = {"done": 0, "failed": 0, CANCELLED: 0}
    with tempfile.TemporaryFile() as tmp:
        for merged in _groups(storage, spec, geo, seq, cancelled, keepalive):
            for status, n in merged.counts.items():
                counts[status] = counts.get(status, 0) + n
            tmp.writelines(merged.lines)
            keepalive()
        tmp.seek(0)
        storage.put_file(manifest_uri(spec.output, spec.job_id), tmp)
    return counts


def _groups(
    storage: Storage, spec: JobSpec, geo: Groups, seq: int, cancelled: bool, keepalive: Keepalive
) -> Iterator[Merged]:
    """Every group's lines, in order: read from its file, or merged when it has none."""
    uris = [group_uri(spec.output, spec.job_id, g, seq) for g in range(geo.count)]
    older: dict[int, list[int]] | None = None
    parts = PartLister(storage, spec, geo)
    for group, body in enumerate(_fetch(storage, uris, GROUP_READ_THREADS, GROUP_READ_THREADS)):
        if body is not None:
            merged = _parse_group(body, geo.items(group))
        else:
            if older is None:
                older = list_group_files(storage, spec.output, spec.job_id)
            log.warning("job %s: group %d has no file of submission %d: merging its parts now", spec.job_id, group, seq)
            merged = merge_group(storage, spec, geo, group, seq, older, keepalive, parts)
            if not cancelled:
                write_group(storage, spec, group, seq, merged)  # a re-run reads it
        if cancelled and sum(merged.counts.values()) < len(geo.items(group)):
            merged = _with_cancelled(storage, spec, geo, group, merged)
        yield merged


_INDEX_KEY, _STATUS_KEY = b'{"index":', b',"status":"'


def _index_status(line: bytes, items: range) -> tuple[int, str] | None:
    """A group line's index and status, read from the shape ``_row_line`` writes (index the
    first key, ``"status"`` the first key after the input and output strings, in which a
    quote is always escaped); None when the line has another shape or its values are not
    a row of ``items``. The fast check of the finish: no full JSON parse per line."""
    if not line.startswith(_INDEX_KEY):
        return None
    end = line.find(b",", len(_INDEX_KEY))
    at = line.find(_STATUS_KEY, end)
    digits = line[len(_INDEX_KEY) : end]
    if end < 0 or at < 0 or not digits.isdigit() or not line.endswith(b"}"):
        return None
    status = line[at + len(_STATUS_KEY) : line.find(b'"', at + len(_STATUS_KEY))].decode("ascii", "replace")
    index = int(digits)
    return (index, status) if index in items and status in STATUSES else None


def _parse_group(body: bytes, items: range) -> Merged:
    lines: list[bytes] = []
    counts: dict[str, int] = {}
    last = -1
    for line in body.splitlines():
        if not line.strip():
            continue
        found = _index_status(line, items)
        if found is None:  # not as written: parsed and checked in full, or skipped
            row = check_row(line, items)
            if row is None:
                continue
            found, line = (row["index"], row["status"]), _row_line(row).rstrip(b"\n")
        if found[0] <= last:  # out of order or twice: never written so
            log.warning("skipping a group line out of index order: %.80r", line)
            continue
        last = found[0]
        counts[found[1]] = counts.get(found[1], 0) + 1
        lines.append(line + b"\n")
    return Merged(lines, counts)


def _with_cancelled(storage: Storage, spec: JobSpec, geo: Groups, group: int, merged: Merged) -> Merged:
    """``merged`` with a ``cancelled`` line for each listed item of the group it lacks (the
    group's listing shards are read: the group's span is one "chunk" of ``read_chunk``)."""
    have = {json.loads(line)["index"]: line for line in merged.lines}
    lines, counts = [], dict(merged.counts)
    for item in read_chunk(storage, spec, group, geo.per_group * geo.chunk_size):
        if item.index in have:
            lines.append(have.pop(item.index))
        else:
            row = cancelled_row(item)  # failed instead, with the reason, where the listing refused it
            lines.append(_row_line(row))
            counts[row["status"]] = counts.get(row["status"], 0) + 1
    lines.extend(have[i] for i in sorted(have))  # named by a part, not listed: cannot happen; kept
    return Merged(lines, counts)
