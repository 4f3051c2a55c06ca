"""Log output for every ``pixelrelay`` command: text (default) or JSON lines.

``configure`` installs the one root handler; ``context`` adds job, chunk and stage to JSON
lines. Invariant: the password of any ``scheme://user:password@host`` URL in a message is
replaced by ``***`` (``redact``). Stdlib only.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONTEXT_FIELDS = ("job", "chunk", "stage")
_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "pixelrelay_log_context", default=MappingProxyType({})
)
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@", re.IGNORECASE)


class LogFormatError(ValueError):
    """An unknown log format (flag or ``PIXELRELAY_LOG_FORMAT``)."""


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    return _URL_PASSWORD.sub(r"\1***@", text)


@contextlib.contextmanager
def context(**fields):
    """Attach ``fields`` (job, chunk, stage) to every record logged in this context."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Adds the current context's fields to each record and redacts its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _context.get().items():
            setattr(record, name, value)
        try:
            message = record.getMessage()
        except Exception:  # a bad format call: let the handler report it as logging does
            return True
        safe = redact(message)
        if safe != message or record.args:
            record.msg, record.args = safe, None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


class _RedactingText(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def resolve(fmt: str | None) -> str:
    """The format to use: ``fmt`` if given, else ``PIXELRELAY_LOG_FORMAT``, else text."""
    value = (fmt or os.environ.get("PIXELRELAY_LOG_FORMAT") or "text").strip().lower()
    if value not in FORMATS:
        raise LogFormatError(f"PIXELRELAY_LOG_FORMAT / --log-format: must be text or json, not {value!r}")
    return value


class _Handler(logging.StreamHandler):
    """The handler ``configure`` installs (so a second call replaces it)."""


def configure(fmt: str | None = None, level: int | str = logging.INFO) -> str:
    """Install one stderr handler in the chosen format on the root logger. ``text`` leaves a
    root logger that has someone else's handlers alone, as ``logging.basicConfig`` does (an
    embedding program's or pytest's); ``json`` replaces them, so every line is JSON."""
    fmt = resolve(fmt)
    root = logging.getLogger()
    foreign = [h for h in root.handlers if not isinstance(h, _Handler)]
    if fmt == "text" and foreign:
        return fmt
    handler = _Handler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else _RedactingText(TEXT_FORMAT))
    handler.addFilter(ContextFilter())
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(fmt == "json")
    return fmt
