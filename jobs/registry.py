"""The registry of active jobs in storage (``STATE_URI/active/<job_id>.json``), from which the
workers' sweep rebuilds a job whose Redis state vanished.

No ``PIXELRELAY_STATE_URI``, no registry. Entries are untrusted: a malformed one is skipped.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

from pixelrelay.pipeline.storage import Storage, StorageError, StorageNotFoundError, join_uri

log = logging.getLogger("pixelrelay.registry")

ACTIVE_DIR = "active"
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # as producer.submit allows


@dataclass(frozen=True)
class Entry:
    job_id: str
    output: str


class Registry:
    def __init__(self, storage: Storage, root: str) -> None:
        self.storage, self.root = storage, root.rstrip("/")

    def _uri(self, job_id: str) -> str:
        return join_uri(self.root, ACTIVE_DIR, f"{job_id}.json")

    def add(self, job_id: str, output: str) -> None:
        body = json.dumps({"job_id": job_id, "output": output}).encode()
        self.storage.put(self._uri(job_id), body, "application/json")

    def remove(self, job_id: str) -> None:
        try:
            self.storage.delete(self._uri(job_id))
        except StorageNotFoundError:
            pass

    def entries(self) -> Iterator[Entry]:
        """The valid entries (invalid ones are logged and skipped)."""
        prefix = join_uri(self.root, ACTIVE_DIR, "")
        try:
            uris = list(self.storage.list(prefix))
        except StorageNotFoundError:
            return
        for uri in uris:
            entry = self._read(uri)
            if entry is not None:
                yield entry

    def _read(self, uri: str) -> Entry | None:
        name = uri.rsplit("/", 1)[-1]
        if not name.endswith(".json"):
            return None
        try:
            row = json.loads(self.storage.get(uri))
        except (StorageError, ValueError) as exc:
            log.warning("registry: skipping %s: %s", uri, exc)
            return None
        job_id = row.get("job_id") if isinstance(row, dict) else None
        output = row.get("output") if isinstance(row, dict) else None
        if not (
            isinstance(job_id, str)
            and JOB_ID_RE.match(job_id)
            and name == f"{job_id}.json"
            and isinstance(output, str)
            and output
        ):
            log.warning("registry: skipping %s: not a valid entry", uri)
            return None
        return Entry(job_id, output)


def open_registry(state_uri: str, endpoint_url: str | None = None, settings=None) -> Registry | None:
    """The registry under ``state_uri``; None when it is empty (no registry)."""
    if not state_uri:
        return None
    from pixelrelay.pipeline.storage import open_storage

    return Registry(open_storage(state_uri, endpoint_url, settings), state_uri)
