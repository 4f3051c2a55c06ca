"""Chunks in flight: where each chain of a job is, from the moment its message is sent until
its manifest part is written. The sweep reads this to find lost chains.

    pixelrelay:job:<id>:chunks   hash   slot -> JSON {"stage", "since", "wait", "feeds"}
    pixelrelay:jobs:active       set    ids of jobs that have chunks in flight

A slot is ``<seq>:<chunk>``, or ``<seq>:<chunk>:<part>`` for a split chunk's single items.
Invariants: an entry is written before its chain's message is sent; each stage rewrites it
when it starts, waits for a retry and hands off; it is deleted only after the manifest part
is written. Entries read back are untrusted: malformed ones are ignored.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeGuard

import redis

from pixelrelay.jobs import keys
from pixelrelay.pipeline import constants as C
from pixelrelay.pipeline.messages import ChunkMessage

STAGES = C.STAGES
TASK_ID_PREFIX = "pr"
_PART_RE = re.compile(r"^[0-9]{1,12}$")


@dataclass(frozen=True, order=True)
class Slot:
    """One chain of one submission of a job."""

    seq: int
    chunk: int
    part: str = ""  # "" for a whole chunk, else the index of the one item of a split part

    @property
    def name(self) -> str:
        return f"{self.seq}:{self.chunk}:{self.part}" if self.part else f"{self.seq}:{self.chunk}"

    @classmethod
    def of(cls, msg: ChunkMessage) -> Slot:
        return cls(msg.seq, msg.chunk, msg.part)

    @classmethod
    def parse(cls, name: str) -> Slot:
        """The slot a field name stands for; ``ValueError`` when it is not one."""
        fields = name.split(":")
        if len(fields) not in (2, 3) or not all(f.isdigit() and len(f) <= 12 for f in fields[:2]):
            raise ValueError(f"not a chunk slot: {name!r}")
        part = fields[2] if len(fields) == 3 else ""
        if len(fields) == 3 and not _PART_RE.match(part):
            raise ValueError(f"not a chunk slot: {name!r}")
        return cls(int(fields[0]), int(fields[1]), part)


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Entry:
    """Where a slot's chain was last seen: ``stage`` since ``since`` (epoch seconds)."""

    stage: str
    since: float
    wait: float = 0.0  # a retry countdown: the chain is expected to be quiet this long
    feeds: bool = True  # whether finishing the chain feeds the job's next chunk

    def to_json(self) -> str:
        return json.dumps({"stage": self.stage, "since": round(self.since, 3), "wait": self.wait, "feeds": self.feeds})

    @classmethod
    def from_json(cls, raw: bytes | str) -> Entry | None:
        """The entry, or None when ``raw`` is not a valid one."""
        try:
            data = json.loads(raw)
        except (ValueError, TypeError):
            return None
        if not isinstance(data, dict) or data.get("stage") not in STAGES:
            return None
        since, wait, feeds = data.get("since"), data.get("wait", 0.0), data.get("feeds", True)
        if not (_number(since) and _number(wait)):
            return None
        if not isinstance(feeds, bool) or wait < 0:
            return None
        return cls(data["stage"], float(since), float(wait), feeds)

    def quiet_until(self, lease_s: float) -> float:
        """Before this time, no lease and no queued message is no cause for alarm."""
        return self.since + self.wait + lease_s


class ChunksInFlight:
    """The chunks-in-flight hash of one job, and the active-jobs set."""

    def __init__(self, client: redis.Redis, job_id: str) -> None:
        self.r = client
        self.job_id = job_id
        self.key = keys.chunks(job_id)

    def track(
        self,
        slot: Slot,
        stage: str,
        feeds: bool,
        wait: float = 0.0,
        now: float | None = None,
        pipe: redis.client.Pipeline | None = None,
    ) -> None:
        """Set the chain's entry to ``stage``, written before its message is sent.

        Args:
            slot: the chain.
            stage: the stage the chain is at, or is sent to.
            feeds: whether finishing the chain feeds the job's next chunk.
            wait: a retry's countdown in seconds (the sweep leaves the chain alone meanwhile).
            now: the entry's ``since``; None: the current time.
            pipe: queue the write on this pipeline (its caller runs it) instead of writing now.
        """
        entry = Entry(stage, time.time() if now is None else now, wait, feeds)
        own = pipe is None
        if pipe is None:
            pipe = self.r.pipeline()
        pipe.hset(self.key, slot.name, entry.to_json())
        pipe.expire(self.key, keys.CHUNKS_TTL_S)
        pipe.sadd(keys.ACTIVE_JOBS, self.job_id)
        if own:
            pipe.execute()

    def get(self, slot: Slot) -> Entry | None:
        raw = self.r.hget(self.key, slot.name)
        return None if raw is None else Entry.from_json(raw)

    def in_flight(self, seq: int) -> int:
        """How many chains of submission ``seq`` are in flight (valid entries only)."""
        entries, _ = parse_entries(self.r.hgetall(self.key))
        return sum(1 for slot in entries if slot.seq == seq)

    def untrack(self, *slots: Slot) -> None:
        if slots:
            self.r.hdel(self.key, *(s.name for s in slots))

    def retire(self) -> None:
        """The job's manifest is written: forget its chunks and take it off the active set."""
        pipe = self.r.pipeline()
        pipe.delete(self.key, keys.batches(self.job_id))
        pipe.srem(keys.ACTIVE_JOBS, self.job_id)
        pipe.execute()


def parse_entries(raw: dict) -> tuple[dict[Slot, Entry], list[bytes]]:
    """A chunks hash as read (``HGETALL``): the valid entries, and the fields that are not."""
    valid: dict[Slot, Entry] = {}
    invalid: list[bytes] = []
    for field, value in raw.items():
        try:
            slot = Slot.parse(field.decode() if isinstance(field, bytes) else field)
        except (ValueError, UnicodeDecodeError):
            invalid.append(field)
            continue
        entry = Entry.from_json(value)
        if entry is None:
            invalid.append(field)
        else:
            valid[slot] = entry
    return valid, invalid


def tracked(send: Callable[[ChunkMessage], None], client: redis.Redis) -> Callable[[ChunkMessage], None]:
    """``send``, writing each chain's entry (stage encode) before its message goes out."""

    def send_tracked(msg: ChunkMessage) -> None:
        ChunksInFlight(client, msg.job_id).track(Slot.of(msg), "encode", msg.feeds)
        send(msg)

    return send_tracked


# --- task ids ---------------------------------------------------------------------------


def task_id(msg: ChunkMessage, stage: str) -> str:
    """A stage message's task id: ``pr:<job>:<seq>:<chunk>:<part or ->:<stage>:<random>``.

    Job ids never contain ':' (see ``pixelrelay.producer.submit``), so the id splits back unambiguously."""
    return ":".join(
        [TASK_ID_PREFIX, msg.job_id, str(msg.seq), str(msg.chunk), msg.part or "-", stage, secrets.token_hex(6)]
    )


@dataclass(frozen=True)
class TaskRef:
    job_id: str
    slot: Slot
    stage: str


def parse_task_id(value: object) -> TaskRef | None:
    """The job, slot and stage a task id names; None for any other id (or non-string)."""
    if not isinstance(value, str):
        return None
    fields = value.split(":")
    if len(fields) != 7 or fields[0] != TASK_ID_PREFIX or fields[5] not in STAGES or not fields[1]:
        return None
    name = f"{fields[2]}:{fields[3]}" + ("" if fields[4] == "-" else f":{fields[4]}")
    try:
        return TaskRef(fields[1], Slot.parse(name), fields[5])
    except ValueError:
        return None
