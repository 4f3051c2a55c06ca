"""What a worker takes off a queue: each raw broker entry is checked before kombu or Celery
decodes any of it, and one that fails is dropped (``JunkEntry``).

The broker is not trusted: anyone who can write to Redis can push an entry. An entry is
bounded in bytes before it is decoded (``max_bytes``: ``PIXELRELAY_MAX_MESSAGE_BYTES``; a
4,096-item chunk with long texts is about 21 MB), must be UTF-8 JSON no deeper than
``MAX_DEPTH``, and must have the shape kombu reads (``properties.delivery_tag``,
``delivery_info``, a ``body`` string). On a stage queue (``pixelrelay.<stage>``) it must also
name that stage's task, be JSON content, and carry a Celery protocol-2 body
(``[args, kwargs, embed]``, bounded the same way): Celery's own tasks (``celery.map``, ...)
and every other name never run there. The signature check (``workers.tasks.verify_body``)
comes after this, on what passed. ``DropLog`` logs drops, rate-limited per reason.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pixelrelay.pipeline import constants as C

MAX_DEPTH = 32  # JSON nesting an entry or body may have (a chunk message's body: 8)
DROP_LOG_INTERVAL_S = 60.0  # one log line per reason per interval; the rest are counted
PREFIX_CHARS = 24  # of a dropped entry, shown in its log line
STAGE_QUEUES = {C.QUEUE_PREFIX + stage: C.TASK_PREFIX + stage for stage in C.STAGES}

log = logging.getLogger("pixelrelay.worker")


class JunkEntry(ValueError):
    """A broker entry that is not a message this worker runs. ``reason`` is its kind (what
    drops are counted by); the text says more (never the entry's content)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}{': ' + detail if detail else ''}")
        self.reason = reason


@dataclass(frozen=True)
class Screen:
    """The checks of one channel's entries (see the module docstring)."""

    max_bytes: int

    def check(self, queue: str, raw: bytes) -> None:
        """Raise ``JunkEntry`` unless ``raw``, taken from ``queue``, may be decoded and run."""
        if len(raw) > self.max_bytes:
            raise JunkEntry("over the limit", f"{len(raw)} bytes, PIXELRELAY_MAX_MESSAGE_BYTES is {self.max_bytes}")
        envelope = _json(raw)
        if not _is_envelope(envelope):
            raise JunkEntry("not a task message", "not a kombu envelope")
        task = STAGE_QUEUES.get(queue)
        if task is not None:
            _check_task(envelope, task)


def _check_task(envelope: dict[str, Any], task: str) -> None:
    named = envelope["headers"].get("task") if isinstance(envelope.get("headers"), dict) else None
    if named != task:
        raise JunkEntry("foreign task", f"{str(named)[:64]!r} is not {task!r}")
    if envelope.get("content-type") != "application/json":
        raise JunkEntry("not a task message", "content type is not JSON")
    body = _json(_body_bytes(envelope))
    args_kwargs_embed = isinstance(body, list) and len(body) == 3
    if not (
        args_kwargs_embed and isinstance(body[0], list) and isinstance(body[1], dict) and isinstance(body[2], dict)
    ):
        raise JunkEntry("not a task message", "the body is not [args, kwargs, embed]")


def _body_bytes(envelope: dict[str, Any]) -> bytes:
    body, encoding = envelope["body"], envelope["properties"].get("body_encoding")
    if encoding is None:
        return body.encode("utf-8")
    if encoding == "base64":
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise JunkEntry("not JSON", "bad base64 body") from None
    raise JunkEntry("not a task message", "unknown body encoding")


def _json(raw: bytes) -> Any:
    try:
        value = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise JunkEntry("nested deeper than", f"{MAX_DEPTH} levels") from None
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise JunkEntry("not JSON", type(exc).__name__) from None
    if _deeper_than(value, MAX_DEPTH):
        raise JunkEntry("nested deeper than", f"{MAX_DEPTH} levels")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists and objects more than ``limit`` deep (walked without
    recursion)."""
    level: list[Any] = [value]
    for _ in range(limit + 1):
        level = [
            child
            for node in level
            if isinstance(node, (dict, list))
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, (dict, list))
        ]
        if not level:
            return False
    return True


def _is_envelope(value: Any) -> bool:
    if not isinstance(value, dict) or not isinstance(value.get("body"), str):
        return False
    properties = value.get("properties")
    if not isinstance(properties, dict) or not isinstance(properties.get("delivery_tag"), str):
        return False
    info = properties.get("delivery_info")
    return isinstance(info, dict) and all(isinstance(info.get(k), str) for k in ("exchange", "routing_key"))


@dataclass
class DropLog:
    """Logs dropped entries: the first of each reason at once, then at most one line per
    reason per ``interval_s``, with the count of those not logged. A line gives the queue,
    the reason, the size and a short prefix of the entry (``ascii``), never more of it."""

    interval_s: float = DROP_LOG_INTERVAL_S
    clock: Callable[[], float] = time.monotonic
    _last: dict[str, float] = field(default_factory=dict)
    _held: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def drop(self, queue: str, raw: bytes, exc: JunkEntry) -> None:
        now = self.clock()
        with self._lock:
            last = self._last.get(exc.reason)
            if last is not None and now - last < self.interval_s:
                self._held[exc.reason] = self._held.get(exc.reason, 0) + 1
                return
            self._last[exc.reason] = now
            held = self._held.pop(exc.reason, 0)
        more = f"; {held} more dropped for this reason since the last line" if held else ""
        prefix = ascii(raw[:PREFIX_CHARS])
        log.warning("%s: dropped a queue entry (%s; %d bytes, starting %s)%s", queue, exc, len(raw), prefix, more)


DROPS = DropLog()  # this process's
