"""What a worker takes off a queue: each raw broker entry is checked before kombu or Celery
decodes any of it, and one that fails is dropped (``JunkEntry``).

The broker is not trusted: anyone who can write to Redis can push an entry. An entry is
bounded in bytes before it is decoded (``max_bytes``: ``PIXELRELAY_MAX_MESSAGE_BYTES``; a
4,096-item chunk with long texts is about 21 MB) and in JSON values (``MAX_VALUES``), must be
UTF-8 JSON no deeper than
``MAX_DEPTH``, and must have the shape kombu reads (``properties.delivery_tag``,
``delivery_info``, a ``body`` string). On a stage queue (``pixelrelay.<stage>``) it must also
name that stage's task (Celery's own, ``celery.map`` and the rest, and every other name never
run there), be JSON content, and carry a Celery protocol-2 body ``[[object], {}, embed]``
(bounded the same way). Its headers and the body's ``embed`` hold only the fields Celery
writes, each of the type Celery reads (Celery copies headers into the task's request, and a
header of another type stopped the worker: ``HEADER_RULES``), an ``eta`` at most
``MAX_ETA_AHEAD_S`` ahead, and a chain of stage tasks only (Celery sends it on after the
task). A Celery upgrade that writes a new field needs it added here (the transport tests send
real messages through these checks). The signature check (``workers.tasks.verify_body``)
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
from datetime import UTC, datetime
from typing import Any

from pixelrelay.pipeline import constants as C

MAX_DEPTH = 32  # JSON nesting an entry or body may have (a chunk message's body: 8)
# JSON values an entry may hold, counted before it is decoded: each costs about 60-100 bytes
# once decoded, so a dense entry under the byte limit (``[[],[],...]``) would take 15-25 times
# its size. A 4,096-item chunk with every record field set has about 530,000.
MAX_VALUES = 2_000_000
DROP_LOG_INTERVAL_S = 60.0  # one log line per reason per interval; the rest are counted
PREFIX_CHARS = 24  # of a dropped entry, shown in its log line
MAX_ETA_AHEAD_S = 3600.0  # retries and re-queues wait minutes at most
MAX_HEADER_CHARS = 1024  # of a text header or property (Celery logs some of them)
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
        if _values(raw) > MAX_VALUES:
            raise JunkEntry("over the limit", f"more than {MAX_VALUES} JSON values")
        envelope = _json(raw)
        if not _is_envelope(envelope):
            raise JunkEntry("not a task message", "not a kombu envelope")
        task = STAGE_QUEUES.get(queue)
        if task is not None:
            _check_task(envelope, task)


def _check_task(envelope: dict[str, Any], task: str) -> None:
    headers = envelope.get("headers")
    named = headers.get("task") if isinstance(headers, dict) else None
    if named != task:
        raise JunkEntry("foreign task", f"{str(named)[:64]!r} is not {task!r}")
    if envelope.get("content-type") != "application/json" or envelope.get("content-encoding") != "utf-8":
        raise JunkEntry("not a task message", "not JSON content in UTF-8")
    _check_fields("header", headers, HEADER_RULES, strict=True)  # Celery copies every header into the request
    _check_fields("property", envelope["properties"], PROPERTY_RULES)
    body = _json(_body_bytes(envelope))
    if not (isinstance(body, list) and len(body) == 3):
        raise JunkEntry("not a task message", "the body is not [args, kwargs, embed]")
    args, kwargs, embed = body
    if not (isinstance(args, list) and len(args) == 1 and isinstance(args[0], dict) and kwargs == {}):
        raise JunkEntry("not a task message", "a stage task takes one object")
    _check_fields("embed", embed, EMBED_RULES, strict=True)


def _check_fields(kind: str, fields: Any, rules: dict[str, Callable[[Any], bool]], strict: bool = False) -> None:
    """Each known field as Celery reads it; an unknown one a scalar, or (``strict``) none."""
    if not isinstance(fields, dict):
        raise JunkEntry("not a task message", f"the {kind}s are not an object")
    for name, value in fields.items():
        rule = rules.get(name)
        if rule is None and (strict or not _scalar(value)):
            raise JunkEntry("not a task message", f"unexpected {kind} {str(name)[:32]!r}")
        if rule is not None and not rule(value):
            raise JunkEntry("not a task message", f"bad {kind} {name!r}")


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


def _values(raw: bytes) -> int:
    """About how many JSON values ``raw`` holds, counted without decoding it (an over-count:
    commas and brackets inside strings count too)."""
    return raw.count(b",") + raw.count(b"[") + raw.count(b"{")


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


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _text(value: Any) -> bool:
    return value is None or (isinstance(value, str) and len(value) <= MAX_HEADER_CHARS)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 1 << 31


def _when(value: Any) -> bool:
    return value is None or _instant(value) is not None


def _soon(value: Any) -> bool:
    """An ``eta`` no further ahead than ``MAX_ETA_AHEAD_S`` (Celery holds such a message,
    unacked, until then)."""
    when = _instant(value)
    return value is None or (when is not None and when.timestamp() <= time.time() + MAX_ETA_AHEAD_S)


def _instant(value: Any) -> datetime | None:
    try:
        when = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _time_limits(value: Any) -> bool:
    if not (isinstance(value, list) and len(value) == 2):
        return False
    return all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0) for v in value)


def _chain(value: Any) -> bool:
    """A chain's next tasks, as Celery serializes them: stage tasks only, their argument the
    result of the one before."""
    return value is None or (isinstance(value, list) and len(value) < len(C.STAGES) and all(map(_next_task, value)))


def _next_task(sig: Any) -> bool:
    if not (isinstance(sig, dict) and set(sig) <= SIGNATURE_FIELDS and sig.get("task") in STAGE_QUEUES.values()):
        return False
    options = sig.get("options", {})
    return (
        sig.get("args", []) == []
        and sig.get("kwargs", {}) == {}
        and isinstance(options, dict)
        and all(map(_scalar, options.values()))
        and sig.get("subtask_type") is None
        and isinstance(sig.get("immutable", False), bool)
    )


def _delivery_info(value: Any) -> bool:
    """Where kombu delivered the message from (it marks a restored one ``redelivered``)."""
    return (
        isinstance(value, dict)
        and isinstance(value.get("exchange"), str)
        and isinstance(value.get("routing_key"), str)
        and (value.get("priority") is None or _count(value.get("priority")))
        and value.get("redelivered") in (None, True, False)
        and all(map(_scalar, value.values()))
    )


HEADER_RULES: dict[str, Callable[[Any], bool]] = {
    "lang": lambda v: v in (None, "py"),
    "task": lambda v: isinstance(v, str),
    "id": lambda v: isinstance(v, str) and 0 < len(v) <= MAX_HEADER_CHARS,
    **dict.fromkeys(("shadow", "group", "root_id", "parent_id", "origin", "argsrepr", "kwargsrepr"), _text),
    "eta": _soon,
    "expires": _when,
    "group_index": lambda v: v is None or _count(v),
    "retries": _count,
    "replaced_task_nesting": _count,
    "timelimit": _time_limits,
    "ignore_result": lambda v: v is None or isinstance(v, bool),
    "stamped_headers": lambda v: v is None or v == [],
    "stamps": lambda v: v is None or v == {},
    "redelivered": lambda v: v is None or isinstance(v, bool),  # kombu's mark on a restored message
}
PROPERTY_RULES: dict[str, Callable[[Any], bool]] = {
    **dict.fromkeys(("correlation_id", "reply_to", "argsrepr", "kwargsrepr"), _text),
    "delivery_tag": lambda v: isinstance(v, str) and 0 < len(v) <= MAX_HEADER_CHARS,
    "delivery_info": _delivery_info,
    "delivery_mode": lambda v: v is None or _count(v),
    "priority": lambda v: v is None or _count(v),
    "body_encoding": lambda v: v in (None, "base64"),
}
EMBED_RULES: dict[str, Callable[[Any], bool]] = {
    "callbacks": lambda v: v is None,
    "errbacks": lambda v: v is None,
    "chain": _chain,
    "chord": lambda v: v is None,
}
SIGNATURE_FIELDS = {"task", "args", "kwargs", "options", "subtask_type", "immutable"}


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
