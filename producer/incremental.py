"""``submit --incremental``: a job sends only the inputs that are new or changed since the
last jobs into this output, or whose request changed.

State, in storage: ``OUTPUT/_state/incremental/<source>/index.jsonl`` (per input: version,
request fingerprint, done), ``.../jobs/<job>.jsonl`` (what each job was sent) and
``OUTPUT/_jobs/<job>/incremental.json`` (the counts). Invariants: an item is skipped only
when the index has it done with the same version and request fingerprint; an input whose
version changed under the same request has its output deleted before the job is sent (the
fingerprint does not cover the input's bytes); the index is folded at the next submit, from
jobs that have a manifest, oldest first; memory stays flat (a temporary SQLite index). A
model change is not detected: run once without ``--incremental``. With a signing key each
index and jobs-file row carries ``mac``, an HMAC over the row and its state folder: a line
that is not a well-formed row, or whose MAC fails (edited, moved, unsigned, another key), is
skipped, so its input is sent again; nothing read from these files names a file to read or
delete. Without a key, rows are unsigned and trusted as the output storage is.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeGuard

from pixelrelay.jobs.files import job_root, manifest_uri, read_spec
from pixelrelay.pipeline.fingerprint import request_fingerprint
from pixelrelay.pipeline.imageio import format_for_uri
from pixelrelay.pipeline.messages import Backends, Item, JobOptions
from pixelrelay.pipeline.signing import SignatureError, Signer
from pixelrelay.pipeline.storage import Storage, StorageNotFoundError, join_uri

STATE_DIR = "_state"
INCREMENTAL_DIR = "incremental"
INDEX_NAME = "index.jsonl"
SUMMARY_NAME = "incremental.json"
_BATCH = 10_000
_SENT_FIELDS = ("input", "version", "request")
_INDEX_FIELDS = _SENT_FIELDS
MAC_FIELD = "mac"
UNTRUSTED = "\0untrusted"  # the version of an input whose index row failed its MAC: changed, output dropped
_KIND_INDEX, _KIND_SENT = "incremental:index", "incremental:sent"


def _lines(lines: Iterable[bytes]) -> Iterator[object]:
    """Each non-blank line's JSON value; None for a line that is not JSON (files in storage
    may have been edited by anyone who can write there)."""
    for line in lines:
        if line.strip():
            try:
                yield json.loads(line)
            except ValueError:
                yield None


def _has(row: object, fields: tuple[str, ...]) -> TypeGuard[dict]:
    return isinstance(row, dict) and all(isinstance(row.get(name), str) for name in fields)


def _rows(lines: Iterable[bytes], fields: tuple[str, ...]) -> Iterator[dict]:
    """The lines that are JSON objects with a string at each of ``fields``; the others are
    skipped, so their inputs count as new and are sent again."""
    for row in _lines(lines):
        if _has(row, fields):
            yield row


@dataclass(frozen=True)
class RowSigner:
    """Signs and checks the rows of one state folder (``root``): a row's MAC covers its
    fields and the folder, so no row is valid in another output's or source's index."""

    signer: Signer
    root: str

    def _body(self, row: dict, fields: tuple[str, ...]) -> dict:
        return {"root": self.root, **{name: row.get(name) for name in fields}}

    def sign(self, kind: str, row: dict) -> dict:
        """``row`` plus its ``mac`` (unchanged without a key)."""
        if not self.signer.secure:
            return row
        return {**row, MAC_FIELD: self.signer.mac(kind, self._body(row, tuple(row)))}

    def valid(self, kind: str, row: dict, fields: tuple[str, ...]) -> bool:
        """Whether ``row``'s MAC covers its ``fields`` (always, without a key)."""
        if not self.signer.secure:
            return True
        try:
            self.signer.check(kind, self._body(row, fields), row.get(MAC_FIELD))
        except SignatureError:
            return False
        return True


def state_root(output: str, input_uri: str) -> str:
    source = hashlib.sha256(input_uri.encode()).hexdigest()[:16]
    return join_uri(output, STATE_DIR, INCREMENTAL_DIR, source)


def summary_uri(output: str, job_id: str) -> str:
    return join_uri(job_root(output, job_id), SUMMARY_NAME)


@dataclass
class Counts:
    """What an incremental listing found."""

    sent: int = 0
    new: int = 0
    changed: int = 0  # another version, or another request
    retried: int = 0  # sent before, not done (failed, cancelled, rejected) or never folded
    skipped: int = 0  # unchanged and done
    folded_jobs: list[str] = field(default_factory=list)

    def line(self) -> str:
        if not self.sent:
            return f"nothing new: {self.skipped} unchanged items skipped"
        return (
            f"incremental: {self.sent} items to process ({self.new} new, {self.changed} changed, "
            f"{self.retried} retried); {self.skipped} unchanged items skipped"
        )


class Incremental:
    """One ``--incremental`` submission's view of the index (see the module docstring)."""

    def __init__(self, storage: Storage, output: str, input_uri: str, signer: Signer) -> None:
        self.storage, self.output = storage, output
        self.root = state_root(output, input_uri)
        self.rows = RowSigner(signer, self.root)
        self.folder = tempfile.mkdtemp(prefix="pixelrelay-incremental-")
        self.db = sqlite3.connect(os.path.join(self.folder, "index.sqlite"))
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=FILE"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute("CREATE TABLE idx (input TEXT PRIMARY KEY, version TEXT, request TEXT, done INTEGER)")
        self.counts = Counts()
        self._sent = tempfile.TemporaryFile(dir=self.folder)
        self._load()

    # --- the index ----------------------------------------------------------------------

    def _index_uri(self) -> str:
        return join_uri(self.root, INDEX_NAME)

    def _jobs_prefix(self) -> str:
        return join_uri(self.root, "jobs", "")

    def _load(self) -> None:
        try:
            rows = _rows(self.storage.iter_lines(self._index_uri()), _INDEX_FIELDS)
            self._upsert(self._loaded(r) for r in rows)
        except StorageNotFoundError:
            pass

    def _loaded(self, row: dict) -> tuple[str, str, str, int]:
        """An index row as stored; one whose MAC fails counts as a changed input."""
        if not self.rows.valid(_KIND_INDEX, row, (*_INDEX_FIELDS, "done")):
            return row["input"], UNTRUSTED, "", 1
        return row["input"], row["version"], row["request"], int(row.get("done") is True)

    def _upsert(self, rows: Iterable[tuple[str, str, str, int]]) -> None:
        sql = "INSERT OR REPLACE INTO idx (input, version, request, done) VALUES (?, ?, ?, ?)"
        batch = []
        for row in rows:
            batch.append(row)
            if len(batch) >= _BATCH:
                self.db.executemany(sql, batch)
                batch = []
        self.db.executemany(sql, batch)

    def fold(self) -> None:
        """Merge every ended job's results into the index, and store it. A pending jobs file
        whose job has a manifest is merged in, oldest job first (``job.json``'s
        ``created_at``), then deleted; one whose job has no manifest yet stays pending; one
        whose job has no ``job.json`` is deleted. An item is marked done only when its
        manifest line is ``done`` with this request's fingerprint."""
        pending = []
        for uri in self.storage.list(self._jobs_prefix()):
            job_id = uri.rsplit("/", 1)[-1].removesuffix(".jsonl")
            try:
                created = read_spec(self.storage, self.output, job_id).created_at
            except StorageNotFoundError:
                self.storage.delete(uri)  # never started
                continue
            if self.storage.exists(manifest_uri(self.output, job_id)):
                pending.append((created, job_id, uri))
        for _, job_id, uri in sorted(pending):
            self._fold_job(job_id, uri)
        if pending:
            self._store()
            for _, job_id, uri in pending:
                self.storage.delete(uri)
                self.counts.folded_jobs.append(job_id)

    def _fold_job(self, job_id: str, uri: str) -> None:
        sent = _lines(self.storage.iter_lines(uri))
        rows = _lines(self.storage.iter_lines(manifest_uri(self.output, job_id)))

        def folded() -> Iterator[tuple[str, str, str, int]]:
            # Both in the job's index order, one line per item; an edited file that no longer
            # pairs up marks nothing done (its items are sent again), it never fails the submit.
            for listed, row in itertools.zip_longest(sent, rows):
                if not _has(listed, _SENT_FIELDS) or not self.rows.valid(_KIND_SENT, listed, _SENT_FIELDS):
                    continue
                fingerprint = row.get("fingerprint") if isinstance(row, dict) else None
                done = (
                    isinstance(row, dict)
                    and isinstance(fingerprint, dict)
                    and row.get("status") == "done"
                    and row.get("input") == listed["input"]
                    and fingerprint.get("request") == listed["request"]
                )
                yield listed["input"], listed["version"], listed["request"], int(done)

        self._upsert(folded())

    def _store(self) -> None:
        with tempfile.TemporaryFile(dir=self.folder) as tmp:
            query = "SELECT input, version, request, done FROM idx ORDER BY input"
            for input_uri, version, request, done in self.db.execute(query):
                row = self.rows.sign(
                    _KIND_INDEX, {"input": input_uri, "version": version, "request": request, "done": bool(done)}
                )
                tmp.write(json.dumps(row, separators=(",", ":")).encode() + b"\n")
            tmp.seek(0)
            self.storage.put_file(self._index_uri(), tmp, "application/x-ndjson")

    # --- the listing --------------------------------------------------------------------

    def select(self, pairs: Iterable[tuple[Item, str]], options: JobOptions, backends: Backends) -> Iterator[Item]:
        """The items to send, renumbered from 0; the others are counted as skipped."""
        for item, version in pairs:
            request = (
                request_fingerprint(options, backends, item.input, format_for_uri(item.output))
                if item.error is None
                else ""
            )
            known = self.db.execute("SELECT version, request, done FROM idx WHERE input = ?", (item.input,)).fetchone()
            if item.error is None and known is not None and version and known == (version, request, 1):
                self.counts.skipped += 1
                continue
            if known is None:
                self.counts.new += 1
            elif known[2]:
                self.counts.changed += 1
                if (known[1] == request or known[0] == UNTRUSTED) and item.output:
                    self._drop_stale(item.output)
            else:
                self.counts.retried += 1
            row = self.rows.sign(_KIND_SENT, {"input": item.input, "version": version, "request": request})
            self._sent.write(json.dumps(row, separators=(",", ":")).encode() + b"\n")
            yield item.model_copy(update={"index": self.counts.sent})
            self.counts.sent += 1

    def _drop_stale(self, output: str) -> None:
        """Delete the output of an input whose bytes changed under the same request (and its
        sidecar): the output fingerprint does not cover the input's bytes, so the encode stage
        would otherwise reuse it."""
        try:
            self.storage.delete(output)
        except StorageNotFoundError:
            pass

    def record(self, job_id: str) -> None:
        """Store what this job is sent, before its spec, for ``fold`` to merge once it ends."""
        self._sent.seek(0)
        self.storage.put_file(join_uri(self._jobs_prefix(), f"{job_id}.jsonl"), self._sent, "application/x-ndjson")

    def write_summary(self, job_id: str) -> None:
        data = {
            "sent": self.counts.sent,
            "new": self.counts.new,
            "changed": self.counts.changed,
            "retried": self.counts.retried,
            "skipped_unchanged": self.counts.skipped,
            "line": self.counts.line(),
        }
        self.storage.put(summary_uri(self.output, job_id), json.dumps(data).encode(), "application/json")

    def close(self) -> None:
        self._sent.close()
        self.db.close()
        shutil.rmtree(self.folder, ignore_errors=True)
