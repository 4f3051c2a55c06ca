"""What a job's chains are doing now, and which stages have live workers: what ``status``
reads besides the counts to tell ``running`` from ``stalled`` and ``queued``.

Reads: the chunks-in-flight hash (``pixelrelay.jobs.chunks``), each chain's lease, the decode
stage's per-batch progress (``keys.BATCHES``, display only: the bits stay the one account) and
the workers' presence (``keys.WORKERS``, a sorted set per stage). Everything read is untrusted:
a malformed value is ignored, a time from the future counts as now.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeGuard

import redis

from pixelrelay.jobs import keys
from pixelrelay.jobs.chunks import Entry, Slot, parse_entries

MAX_LEASES_READ = 1000  # leases looked at per read: one live one is enough to say "running"
MAX_BATCH_ITEMS = 1_000_000  # a per-batch count above this is not one a worker wrote
CLOCK_SKEW_S = 60.0  # a worker's clock may run this far ahead; a later "last seen" is forged
WORKER_GONE_S = 60.0  # a stage none of whose workers was seen this long is named by ``status``


@dataclass(frozen=True)
class Activity:
    """A job's chains of its current submission, as one read saw them."""

    started: bool = False  # a worker took one of them (the job hash's ``started_at``)
    live_leases: int = 0  # chains a worker holds a live lease on
    moved_at: float = 0.0  # latest sign of life: a chain entering a stage, a decoded batch
    batch_done: int = 0  # items the decode stage finished in chains not yet marked
    batch_failed: int = 0


@dataclass(frozen=True)
class BatchProgress:
    done: int
    failed: int
    at: float

    def to_json(self) -> str:
        return json.dumps({"done": self.done, "failed": self.failed, "at": round(self.at, 3)})

    @classmethod
    def from_json(cls, raw: bytes | str | None) -> BatchProgress | None:
        try:
            data = json.loads(raw) if raw is not None else None
        except (ValueError, TypeError):
            return None
        if not isinstance(data, dict):
            return None
        done, failed, at = data.get("done"), data.get("failed"), data.get("at")
        if not (_count(done) and _count(failed) and _time(at)):
            return None
        return cls(done, failed, float(at))


def _count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_BATCH_ITEMS


def _time(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def report_batch(client: redis.Redis, job_id: str, slot: Slot, done: int, failed: int) -> None:
    """Record that the decode stage has finished ``done`` and failed ``failed`` items of
    ``slot`` so far (display only; a re-run of the chain writes its own)."""
    pipe = client.pipeline(transaction=False)
    pipe.hset(keys.batches(job_id), slot.name, BatchProgress(done, failed, time.time()).to_json())
    pipe.expire(keys.batches(job_id), keys.CHUNKS_TTL_S)
    pipe.execute()


def read_activity(client: redis.Redis, job_id: str, seq: int, now: float | None = None) -> Activity:
    """The job's chains of submission ``seq``: one snapshot of the hashes, then their leases."""
    now = time.time() if now is None else now
    pipe = client.pipeline()
    pipe.hgetall(keys.chunks(job_id))
    pipe.hgetall(keys.batches(job_id))
    pipe.hget(keys.job(job_id), "started_at")
    raw_entries, raw_batches, started_at = pipe.execute()
    entries = {slot: e for slot, e in parse_entries(raw_entries)[0].items() if slot.seq == seq}
    batches = {keys.text(k): v for k, v in raw_batches.items()}
    done = failed = 0
    moved = max((e.since for e in entries.values()), default=0.0)
    for slot, entry in entries.items():
        progress = _batch(batches.get(slot.name), entry)
        if progress is not None:
            done, failed, moved = done + progress.done, failed + progress.failed, max(moved, progress.at)
    return Activity(
        started=_number(started_at) > 0,
        live_leases=_live_leases(client, job_id, entries),
        moved_at=min(moved, now),
        batch_done=done,
        batch_failed=failed,
    )


def _batch(raw: bytes | str | None, entry: Entry) -> BatchProgress | None:
    """A chain's per-batch progress, if it belongs to its current decode (not an earlier run)."""
    progress = BatchProgress.from_json(raw)
    if progress is None or entry.stage != "decode" or progress.at < entry.since:
        return None
    return progress


def _number(raw: bytes | str | None) -> float:
    try:
        value = float(keys.text(raw)) if raw is not None else 0.0
    except ValueError:
        return 0.0
    return value if math.isfinite(value) else 0.0


def _live_leases(client: redis.Redis, job_id: str, entries: dict[Slot, Entry]) -> int:
    slots = sorted(entries)[:MAX_LEASES_READ]
    if not slots:
        return 0
    pipe = client.pipeline(transaction=False)
    for slot in slots:
        pipe.exists(keys.lease(job_id, slot.name))
    return sum(1 for live in pipe.execute() if live)


# --- workers' presence -------------------------------------------------------------------


def mark_seen(client: redis.Redis, stage: str, worker: str, now: float | None = None) -> None:
    """Record that ``worker`` of ``stage`` is up now (its heartbeat)."""
    key = keys.workers(stage)
    pipe = client.pipeline(transaction=False)
    pipe.zadd(key, {worker: round(time.time() if now is None else now, 3)})
    pipe.zremrangebyrank(key, 0, -(keys.WORKERS_KEEP + 1))
    pipe.expire(key, keys.WORKERS_TTL_S)
    pipe.execute()


def last_seen(client: redis.Redis, stages: Iterable[str], now: float | None = None) -> dict[str, float | None]:
    """When some worker of each stage was last seen (None: never, or not in a day); a time
    far in the future, or not a time, is passed over."""
    now = time.time() if now is None else now
    names = list(stages)
    pipe = client.pipeline(transaction=False)
    for stage in names:
        pipe.zrevrangebyscore(keys.workers(stage), now + CLOCK_SKEW_S, 0, start=0, num=1, withscores=True)
    seen: dict[str, float | None] = {}
    for stage, newest in zip(names, pipe.execute(), strict=True):
        score = newest[0][1] if isinstance(newest, list) and newest and isinstance(newest[0], tuple) else None
        seen[stage] = min(float(score), now) if isinstance(score, float) and _time(score) else None
    return seen


@dataclass(frozen=True)
class MissingStage:
    """A stage with no worker seen for ``gone_s`` or more (``None``: never seen)."""

    stage: str
    gone_s: float | None

    def text(self) -> str:
        if self.gone_s is None:
            return f"no {self.stage} worker seen"
        return f"no {self.stage} worker seen for {int(self.gone_s)} s"


def missing_stages(seen: dict[str, float | None], now: float, gone_s: float = WORKER_GONE_S) -> list[MissingStage]:
    """The stages of ``seen`` (``last_seen``) whose newest worker is ``gone_s`` old or more."""
    return [
        MissingStage(stage, None if at is None else now - at)
        for stage, at in seen.items()
        if at is None or now - at >= gone_s
    ]
