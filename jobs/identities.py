"""Which model identity each stage runs, published by the workers in Redis.

``lookup`` answers only when exactly one live, well-formed entry is there: no worker, a
malformed value or workers that disagree all mean "unknown", and an unknown identity never
lets an item be reused.
"""

from __future__ import annotations

import json
import time
from typing import Literal

import redis
from pydantic import BaseModel, ConfigDict, ValidationError

from pixelrelay.jobs import keys


class Published(BaseModel):
    """One stage worker's backend, as published."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: str
    identity: str

    def field(self) -> str:
        return json.dumps({"spec": self.spec, "identity": self.identity}, sort_keys=True)


def publish(client: redis.Redis, stage: str, entry: Published, default: bool, now: float | None = None) -> None:
    """Publish (or refresh) a built backend's identity for its stage.

    Args:
        client: Redis.
        stage: the stage.
        entry: the spec and its identity.
        default: also publish it as the stage's default (the worker's own backend).
        now: the current time (tests); entries stay valid ``pixelrelay.jobs.keys.MODELS_TTL_S`` after it.
    """
    now = now or time.time()
    pipe = client.pipeline(transaction=False)
    for key in [keys.models(stage, entry.spec)] + ([keys.models(stage, None)] if default else []):
        stale = [f for f, until in client.hgetall(key).items() if _parse(f, until, now) is None]
        if stale:  # entries of workers gone without withdrawing
            pipe.hdel(key, *stale)
        pipe.hset(key, entry.field(), now + keys.MODELS_TTL_S)
        pipe.expire(key, keys.MODELS_TTL_S)
    pipe.execute()


def withdraw(client: redis.Redis, stage: str, entry: Published, default: bool) -> None:
    """Remove ``entry`` (a worker shutting down), so that a restart with other weights is
    not "workers disagree" until the old entry expires."""
    pipe = client.pipeline(transaction=False)
    for key in [keys.models(stage, entry.spec)] + ([keys.models(stage, None)] if default else []):
        pipe.hdel(key, entry.field())
    pipe.execute()


def lookup(client: redis.Redis, stage: str, spec: str | None, now: float | None = None) -> Published | None:
    """The identity the workers publish for one spec.

    Args:
        client: Redis.
        stage: the stage.
        spec: the backend spec; None: the stage's default.
        now: the current time (tests).

    Returns:
        The one live identity, or None when there is none, a malformed one, or several.
    """
    return lookup_many(client, [(stage, spec)], now)[0]


def lookup_many(
    client: redis.Redis, wanted: list[tuple[str, str | None]], now: float | None = None
) -> list[Published | None]:
    """``lookup`` of several (stage, spec) pairs in one round trip."""
    now = now or time.time()
    pipe = client.pipeline(transaction=False)
    for stage, spec in wanted:
        pipe.hgetall(keys.models(stage, spec))
    return [_one_live(raw, now) for raw in pipe.execute()]


def _one_live(raw: dict, now: float) -> Published | None:
    live: set[Published] = set()
    for field, until in raw.items():
        entry = _parse(field, until, now)
        if entry is False:
            return None  # something we can't read: don't guess
        if entry is not None:
            live.add(entry)
    return live.pop() if len(live) == 1 else None


def _parse(field: bytes | str, until: bytes | str, now: float) -> Published | None | Literal[False]:
    """The entry if live, None if expired, False if malformed."""
    try:
        expires = float(until)
        entry = Published.model_validate_json(field)
    except (ValueError, ValidationError):
        return False
    return entry if expires > now else None
