"""What a worker shows its operators besides its work: one INFO line per chunk (``chunk_done``,
in place of Celery's result dump: ``quiet_task_success``) and the health heartbeat file.

The heartbeat is touched from the consumer's event loop, so a worker that lost Redis, is
stopped or hung goes stale, and between batches of a running chunk (``beat``). Each worker
keeps its own file, named by its stage (``pixelrelay.health.health_path``). The same beats,
and the lease thread's renewals, mark the worker seen in Redis (``present``: one sorted set
per stage, read by ``status``); the decode stage reports its items per batch
(``batch_progress``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import redis
from celery import Celery, bootsteps

from pixelrelay import health
from pixelrelay.jobs.activity import mark_seen, report_batch
from pixelrelay.jobs.chunks import Slot
from pixelrelay.pipeline.messages import ChunkMessage, ItemRecord

log = logging.getLogger("pixelrelay.worker")
_health_file: str | None = None  # set by enable_health; inherited by prefork children
_stage: str | None = None  # this worker's stage, set by enable_health
_presence: redis.Redis | None = None  # this process's client for ``present`` (made on first use)
PRESENT_EVERY_S = 5.0  # ``present`` writes at most this often per process
_last_present = float("-inf")


class _DropTaskSuccess(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        from celery.app.trace import LOG_SUCCESS

        return record.msg != LOG_SUCCESS


def quiet_task_success() -> None:
    """Stop Celery logging every task's return value (idempotent)."""
    trace_log = logging.getLogger("celery.app.trace")
    if not any(isinstance(f, _DropTaskSuccess) for f in trace_log.filters):
        trace_log.addFilter(_DropTaskSuccess())


def chunk_done(stage: str, job_id: str, chunk: int, items: int, seconds: float, failed: int, outcome: str) -> None:
    """Log the one INFO line of a chunk's stage.

    Args:
        stage: the stage.
        job_id: the job.
        chunk: the chunk.
        items: items the stage handled.
        seconds: how long it took.
        failed: items of the chunk that are failed.
        outcome: how the delivery ended ("done", or the outcome's kind: "retry", "split"...).
    """
    log.info(
        "%s: job %s chunk %d: %s, %d items in %.2fs, %d failed", stage, job_id, chunk, outcome, items, seconds, failed
    )


def json_shutdown_notes() -> None:
    """With JSON logs, Celery's own notes written straight to stdout from its signal handlers
    ("worker: Warm shutdown (MainProcess)", ``celery.apps.worker.safe_say``) become JSON lines
    too, written the same signal-safe way (one ``os.write``, no logging lock)."""
    import datetime as dt
    import json
    import os

    from celery.apps import worker as celery_worker

    def say(msg, f=None):
        line = {
            "ts": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "level": "WARNING",
            "logger": "celery.apps.worker",
            "message": str(msg).strip(),
        }
        try:
            os.write(2, (json.dumps(line) + "\n").encode())
        except OSError:
            pass

    celery_worker.safe_say = say


BEAT_MIN_INTERVAL_S = 1.0  # ``beat`` touches the file at most this often (a chunk calls it per batch)
_last_beat = float("-inf")


def beat() -> None:
    """Touch the heartbeat file, if this worker keeps one, unless it was touched less than
    ``BEAT_MIN_INTERVAL_S`` ago (well inside any health check's ``max_age``); and ``present``."""
    global _last_beat
    now = time.monotonic()
    if _health_file and now - _last_beat >= BEAT_MIN_INTERVAL_S:
        _last_beat = now
        health.touch(_health_file)
    present()


def _presence_client() -> redis.Redis | None:
    global _presence
    if _presence is None:
        from pixelrelay.pipeline.settings import Settings

        url = Settings.from_env().redis
        if url:
            _presence = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
    return _presence


def present(client: redis.Redis | None = None) -> None:
    """Mark this worker seen for its stage in Redis (at most every ``PRESENT_EVERY_S``); never
    raises: a Redis outage shows in ``status`` as the stage going unseen."""
    global _last_present
    now = time.monotonic()
    if _stage is None or now - _last_present < PRESENT_EVERY_S:
        return
    _last_present = now
    try:
        client = client or _presence_client()
        if client is not None:
            from pixelrelay.workers.lease import worker_id

            mark_seen(client, _stage, worker_id())
    except (redis.RedisError, OSError) as exc:
        log.debug("cannot mark worker seen: %s", exc)


def batch_progress(client: redis.Redis, msg: ChunkMessage, processed: Sequence[ItemRecord]) -> None:
    """Report the decode stage's items of ``msg`` finished so far (display only; never raises)."""
    failed = sum(1 for record in processed if record.failed)
    try:
        report_batch(client, msg.job_id, Slot.of(msg), len(processed) - failed, failed)
    except (redis.RedisError, OSError) as exc:
        log.debug("cannot report batch progress of %s/%d: %s", msg.job_id, msg.chunk, exc)


def enable_health(app: Celery, path: str, interval_s: float, stage: str | None = None) -> None:
    """Keep the heartbeat file ``path`` fresh from the consumer's loop, and (``stage``) mark
    this worker seen in Redis."""
    global _health_file, _stage
    _health_file, _stage = path, stage

    class HealthBeat(bootsteps.StartStopStep):
        """Touches the heartbeat file from the consumer's loop while it consumes."""

        requires = ("celery.worker.consumer.tasks:Tasks",)

        def __init__(self, c, **kwargs):
            super().__init__(c, **kwargs)
            self.tref = None

        def start(self, c):
            beat()
            self.tref = c.timer.call_repeatedly(interval_s, beat)

        def stop(self, c):
            if self.tref is not None:
                self.tref.cancel()
                self.tref = None

        shutdown = stop

    app.steps["consumer"].add(HealthBeat)
