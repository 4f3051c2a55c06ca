"""``pixelrelay health``: is this container's worker alive and consuming?

``problem`` reads only heartbeat files' mtimes (touched by ``pixelrelay.workers.observe``):
no Redis, no Celery remote control. Stdlib only. Each worker keeps its own file, named by
its stage from ``PIXELRELAY_HEALTH_FILE`` (``/tmp/w.health`` -> ``/tmp/w-decode.health``),
so that workers sharing a host (``pixelrelay run``) are checked one by one.
"""

from __future__ import annotations

import os
import tempfile
import time

DEFAULT_MAX_AGE_S = 60.0
DEFAULT_INTERVAL_S = 5.0


STAGES = ("encode", "plan", "decode")  # pixelrelay.pipeline.constants.STAGES (stdlib only here)


def health_path(stage: str | None = None) -> str:
    """The heartbeat file of ``stage``'s worker; None: the base name the stage files derive from."""
    base = os.environ.get("PIXELRELAY_HEALTH_FILE") or os.path.join(tempfile.gettempdir(), "pixelrelay-worker.health")
    if stage is None:
        return base
    root, ext = os.path.splitext(base)
    return f"{root}-{stage}{ext}"


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


def stage_problem(stage: str | None, max_age_s: float, now: float | None = None) -> str | None:
    """Why this host's worker of ``stage`` is not healthy; None when it is. ``stage`` None:
    every stage that has a heartbeat file here must be fresh, and one must exist."""
    if stage is not None:
        return problem(health_path(stage), max_age_s, now)
    paths = [health_path(s) for s in STAGES if os.path.exists(health_path(s))]
    if not paths:
        return f"no heartbeat file {health_path('<stage>')}: no worker started here (or PIXELRELAY_HEALTH_FILE differs)"
    problems = [why for why in (problem(path, max_age_s, now) for path in paths) if why]
    return "; ".join(problems) or None
