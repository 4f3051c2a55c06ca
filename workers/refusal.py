"""A prefork child's refused model stops the whole worker.

The parent opens a pipe before any fork; a child whose model cannot be built writes one line
to it and exits quietly (status 0, so the pool logs nothing), and the parent's consumer loop,
polling the pipe from its timer, sets Celery's terminate flag. The parent reads the reason
back with :func:`reason` once the worker has returned. A line stays under ``PIPE_BUF``, so
lines from several children never interleave.
"""

from __future__ import annotations

import os
from typing import NoReturn

from celery import Celery, bootsteps

from pixelrelay.exitcodes import ExitCode

_POLL_S = 0.2
_MAX_LINE = 1000  # well under PIPE_BUF: one write, one whole line
_pipe: tuple[int, int] | None = None
_reason: str | None = None


def open_pipe() -> None:
    """Open the pipe; call in the parent before the pool forks."""
    global _pipe
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    _pipe = (read_end, write_end)


def report_and_exit(line: str) -> NoReturn:
    """In a child: hand ``line`` to the parent, then leave without running any task."""
    if _pipe is not None:
        text = " ".join(line.split())[:_MAX_LINE] + "\n"
        try:
            os.write(_pipe[1], text.encode("utf-8", "replace"))
        except OSError:
            pass
    os._exit(0)


def poll() -> bool:
    """In the parent: True (and the reason kept) once a child has reported."""
    global _reason
    if _pipe is None or _reason is not None:
        return _reason is not None
    try:
        data = os.read(_pipe[0], 4096)
    except BlockingIOError:
        return False
    _reason = data.decode("utf-8", "replace").partition("\n")[0] or "model not loaded"
    return True


def reason() -> str | None:
    """The first child's line, if one reported (read after the worker returns)."""
    poll()
    return _reason


def _check() -> None:
    if poll():
        from celery.worker import state

        state.should_terminate = int(ExitCode.USAGE)


def watch(app: Celery) -> None:
    """Have the parent's consumer loop stop the worker once a child reports."""

    class RefusalWatch(bootsteps.StartStopStep):
        """Polls the refusal pipe from the consumer's timer."""

        requires = ("celery.worker.consumer.tasks:Tasks",)

        def __init__(self, c, **kwargs):
            super().__init__(c, **kwargs)
            self.tref = None

        def start(self, c):
            self.tref = c.timer.call_repeatedly(_POLL_S, _check)

        def stop(self, c):
            if self.tref is not None:
                self.tref.cancel()
                self.tref = None

        shutdown = stop

    app.steps["consumer"].add(RefusalWatch)
