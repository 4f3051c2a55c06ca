"""What a worker shows its operators besides its work: one INFO line per chunk (``chunk_done``,
in place of Celery's result dump: ``quiet_task_success``) and the health heartbeat file.

The heartbeat is touched from the consumer's event loop, so a worker that lost Redis, is
stopped or hung goes stale, and between batches of a running chunk (``beat``).
"""

from __future__ import annotations

import logging
import time

from celery import Celery, bootsteps

from pixelrelay import health

log = logging.getLogger("pixelrelay.worker")
_health_file: str | None = None  # set by enable_health; inherited by prefork children


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
    ``BEAT_MIN_INTERVAL_S`` ago (well inside any health check's ``max_age``)."""
    global _last_beat
    now = time.monotonic()
    if _health_file and now - _last_beat >= BEAT_MIN_INTERVAL_S:
        _last_beat = now
        health.touch(_health_file)


def enable_health(app: Celery, path: str, interval_s: float) -> None:
    global _health_file
    _health_file = path

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
