"""Celery workers: one pool per stage (encode, plan, decode), each on its own queue.

Delivery is at-least-once and every stage task is idempotent: see docs/design.md,
"Delivery guarantees" and "Failure and recovery"; the modules are listed under
"Architecture".

``celery -A pixelrelay.workers <command>`` works: the package's ``app`` attribute is
``get_app()``, looked up lazily, so importing the package needs no settings.
"""

from __future__ import annotations


def __getattr__(name: str):
    # `celery -A pixelrelay.workers` asks for `app` (then `celery`); build it only then.
    if name in ("app", "celery"):
        from pixelrelay.workers.celery_app import get_app

        return get_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
