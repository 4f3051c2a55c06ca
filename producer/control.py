"""Job control: ``pixelrelay cancel`` (``cancel_job``) and ``pixelrelay jobs`` (``recent_jobs``).

A cancel needs no Celery remote control. It is recorded in storage first
(``OUTPUT/_jobs/<id>/cancelled``, so a job rebuilt from storage is cancelled too), then in
Redis (``JobState.cancel``); a failed storage write leaves the job untouched. ``cancel_job``
returns once the manifest is written: by the last chain in flight as it ends, by the sweep,
or after ``grace_s`` by ``cancel_job`` itself (``forced``, ``jobs.finish.finalize_cancelled``).
What a cancel guarantees: ``docs/design.md``, "Failure and recovery".

``recent_jobs`` reads the ``pixelrelay:jobs`` sorted set (newest submission first) and each
job's hash; a job whose keys expired (7 days after its manifest) is left out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import Enum
from typing import cast

import redis

from pixelrelay.jobs import keys
from pixelrelay.jobs.activity import Activity, read_activity
from pixelrelay.jobs.files import read_cancel, write_cancel
from pixelrelay.jobs.finish import finalize_cancelled
from pixelrelay.jobs.state import Counts, JobState, JobStatus, is_finished, job_status
from pixelrelay.pipeline.settings import ConfigError, Settings
from pixelrelay.pipeline.storage import open_storage

DEFAULT_GRACE_S = 30.0


class UnknownJobError(ConfigError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"unknown job {job_id}")
        self.job_id = job_id


class JobFinishedError(ConfigError):
    """The job ended before it was cancelled: there is nothing to cancel."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} already finished; nothing to cancel")
        self.job_id = job_id


class CancelOutcome(str, Enum):  # noqa: UP042 (public API: StrEnum would change str() and format() to the bare value)
    ENDED = "ended"  # the last chain in flight (or the sweep) wrote the manifest
    FORCED = "forced"  # the grace ran out: the canceller wrote the manifest
    ALREADY = "already"  # the job was cancelled (and its manifest written) before


def cancel_job(
    client: redis.Redis,
    settings: Settings,
    job_id: str,
    grace_s: float = DEFAULT_GRACE_S,
    poll_s: float = 0.2,
    clock: Callable[[], float] = time.monotonic,
) -> CancelOutcome:
    """Cancel the job and see its manifest written (see the module docstring)."""
    state = JobState(client, job_id, settings.signer())
    if not state.exists():
        raise UnknownJobError(job_id)
    info = state.info()
    if is_finished(info):
        if info.get("cancelled_at"):
            return CancelOutcome.ALREADY
        raise JobFinishedError(job_id)
    spec = state.spec()
    storage = open_storage(spec.output, settings.s3_endpoint_url)
    at = read_cancel(storage, spec.output, job_id)
    if at is None:
        at = time.time()
        write_cancel(storage, spec.output, job_id, at)
    state.cancel(at)
    deadline = clock() + grace_s
    while clock() < deadline:
        if finalize_cancelled(state, storage, spec) or is_finished(state.info()):
            return CancelOutcome.ENDED
        time.sleep(poll_s)
    if finalize_cancelled(state, storage, spec) or is_finished(state.info()):
        return CancelOutcome.ENDED
    finalize_cancelled(state, storage, spec, force=True)
    return CancelOutcome.FORCED


# --- listing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobRow:
    job_id: str
    state: JobStatus
    done: int
    failed: int
    cancelled: int  # items the manifest lists as cancelled (0 until a cancelled job ends)
    total: int
    submitted_at: float
    age_s: float

    def to_json(self) -> dict:
        return {**asdict(self), "state": self.state.value, "age_s": round(self.age_s, 1)}


def recent_jobs(client: redis.Redis, limit: int, stall_s: float, now: float | None = None) -> list[JobRow]:
    """The ``limit`` most recently submitted jobs, newest first."""
    now = time.time() if now is None else now
    # redis-py types ZREVRANGE's reply as either form; without WITHSCORES it lists the members
    members = cast(list[bytes | str], client.zrevrange(keys.JOBS, 0, max(0, limit - 1)))
    ids = [keys.text(m) for m in members]
    pipe = client.pipeline(transaction=False)
    for job_id in ids:
        pipe.hgetall(keys.job(job_id))
        pipe.bitcount(keys.done_bits(job_id))
        pipe.bitcount(keys.failed_bits(job_id))
    replies = pipe.execute()
    rows = []
    for i, job_id in enumerate(ids):
        raw, done, failed = replies[3 * i : 3 * i + 3]
        if raw:
            info = {k.decode(): v.decode() for k, v in raw.items() if k != b"spec"}
            activity = None if is_finished(info) else read_activity(client, job_id, _seq(info), now)
            rows.append(_row(job_id, info, done, failed, now, stall_s, activity))
    return rows


def _seq(info: dict[str, str]) -> int:
    return int(info["seq"]) if info.get("seq", "").isdigit() else 0


def _row(
    job_id: str,
    info: dict[str, str],
    done: int,
    failed: int,
    now: float,
    stall_s: float,
    activity: Activity | None = None,
) -> JobRow:
    counts = Counts(int(info.get("total", 0) or 0), int(done), int(failed))
    submitted = float(info.get("submitted_at", 0) or 0)
    return JobRow(
        job_id=job_id,
        state=job_status(info, counts, now, stall_s, activity),
        done=counts.done,
        failed=counts.failed,
        cancelled=int(info.get("manifest_cancelled", 0) or 0),
        total=counts.total,
        submitted_at=submitted,
        age_s=max(0.0, now - submitted),
    )


def age_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def jobs_table(rows: list[JobRow]) -> str:
    """Plain columns, one job a line, newest first."""
    header = ("JOB ID", "STATE", "DONE", "FAILED", "CANCELLED", "TOTAL", "AGE")
    table = [header] + [
        (r.job_id, r.state.value, str(r.done), str(r.failed), str(r.cancelled), str(r.total), age_text(r.age_s))
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table)
