"""``pixelrelay health``: is this container's worker alive and consuming?

``check`` reads only the heartbeat file's mtime (``PIXELRELAY_HEALTH_FILE``, touched by
``pixelrelay.workers.observe``): no Redis, no Celery remote control. Stdlib only.
"""

from __future__ import annotations

import os
import tempfile
import time

DEFAULT_MAX_AGE_S = 60.0
DEFAULT_INTERVAL_S = 5.0


def health_path() -> str:
    return os.environ.get("PIXELRELAY_HEALTH_FILE") or os.path.join(tempfile.gettempdir(), "pixelrelay-worker.health")


def touch(path: str) -> None:
    """Mark the worker alive now; never raises (a full or read-only disk must not stop work)."""
    try:
        with open(path, "a"):
            pass
        os.utime(path)
    except OSError:
        pass


def problem(path: str, max_age_s: float, now: float | None = None) -> str | None:
    """Why the worker behind ``path`` is not healthy, in one line; None when it is."""
    try:
        mtime = os.stat(path).st_mtime
    except FileNotFoundError:
        return f"no heartbeat file {path}: no worker started here (or PIXELRELAY_HEALTH_FILE differs)"
    except OSError as exc:
        return f"cannot read heartbeat file {path}: {exc}"
    age = (time.time() if now is None else now) - mtime
    if age > max_age_s:
        return (
            f"heartbeat file {path} is {age:.0f}s old (over {max_age_s:g}s): "
            "the worker is stuck, stopped or not consuming"
        )
    return None
