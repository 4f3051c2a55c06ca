"""The one table of exit codes that every ``pixelrelay`` command uses.

Codes are never reused: a new outcome gets a new number at the end of the table, and the
table in docs/operations.md ("Exit codes") is kept in step with this one (a test compares them).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0  # every item done (or nothing to do, where that is not an error)
    FAILED_ITEMS = 1  # the job ended and some items failed (a summary is printed)
    USAGE = 2  # usage or configuration error: bad flag, bad setting, input lists nothing
    TIMEOUT = 3  # gave up waiting (``--timeout``); the job goes on
    CANCELLED = 4  # the job was cancelled
    WORKER_EXITED = 5  # ``pixelrelay run``: a local worker exited early (its log is kept)
    MODELS_MISSING = 6  # ``pixelrelay models``: a configured model is missing or could not be pulled
    STORAGE = 7  # the input or output storage refused a read or write (full, denied, unreachable)
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it


DESCRIPTIONS: dict[ExitCode, str] = {
    ExitCode.OK: "every item done",
    ExitCode.FAILED_ITEMS: "some items failed (a summary is printed)",
    ExitCode.USAGE: "usage or configuration error",
    ExitCode.TIMEOUT: "gave up waiting (`--timeout`); the job goes on",
    ExitCode.CANCELLED: "the job was cancelled",
    ExitCode.WORKER_EXITED: "`pixelrelay run`: a local worker exited early; its log folder is kept and printed",
    ExitCode.MODELS_MISSING: "`pixelrelay models list --check` / `pull`: a model is missing or could not be pulled",
    ExitCode.STORAGE: "storage error: the input or output storage refused a read or write (full, denied, unreachable)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
}
