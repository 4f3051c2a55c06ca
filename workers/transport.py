"""kombu's Redis transport, with one client per channel for its synchronous commands and
every entry it takes off a queue screened before anything decodes it.

kombu builds a new ``redis.Redis`` for every synchronous command (about 5 % of a stage
worker's CPU with the null backends: ``benchmarks/bench_overhead.py``); this channel builds
one over its own pool and reuses it (again if the pool is rebuilt). Only ``redis://`` brokers
use it; ``rediss://`` keeps kombu's stock transport, whose TLS defaults follow that scheme.

kombu restores (delivers again) an unacked message whose delivery time (its score in
``unacked_index``) is older than the restoring client's visibility timeout, whoever took it.
``delivery_tags`` and ``touch`` let a lease's renewals (``pixelrelay.workers.lease``) move that
time to now, so no client's visibility timeout ever restores a message whose lease is being
renewed (docs/design.md, "Time limits").

Screening: the channel's clients check each raw entry that ``BRPOP`` (a consumer) or
``RPOP`` (``basic_get``) returns against ``workers.screen`` before kombu decodes it. An entry
that fails is logged (rate-limited) and dropped: it has left the list already and never
reaches the unacked set, so kombu sees an empty read and the worker goes on. The limit in
bytes is the transport option ``max_message_bytes`` (``celery_app.configure``).
"""

from __future__ import annotations

import json
from typing import Any

import redis
from kombu.transport import redis as kombu_redis

from pixelrelay.jobs import keys
from pixelrelay.pipeline import constants as C
from pixelrelay.workers.screen import DROPS, JunkEntry, Screen

DEFAULT_MAX_MESSAGE_BYTES = C.DEFAULT_MAX_MESSAGE_BYTES


def _queue_of(key: bytes | str) -> str:
    """The queue a list key belongs to (kombu suffixes priority lists with ``sep`` + N)."""
    name = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
    return name.rsplit(kombu_redis.Channel.sep, 1)[0]


class ScreeningRedis(redis.Redis):
    """A Redis client whose ``BRPOP`` and ``RPOP`` replies pass ``screen`` or read as empty."""

    screen = Screen(DEFAULT_MAX_MESSAGE_BYTES)

    def parse_response(self, connection: Any, command_name: str | bytes, **options: Any) -> Any:
        reply = super().parse_response(connection, command_name, **options)
        if command_name == "BRPOP" and reply:
            key, raw = reply
            return reply if self._admits(_queue_of(key), raw) else None
        return reply

    def rpop(self, name: Any, count: int | None = None) -> Any:
        raw = super().rpop(name, count)
        if count is None and isinstance(raw, (bytes, str)) and not self._admits(_queue_of(name), raw):
            return None
        return raw

    def _admits(self, queue: str, raw: bytes | str) -> bool:
        raw = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
        try:
            self.screen.check(queue, raw)
        except JunkEntry as exc:
            DROPS.drop(queue, raw, exc)
            return False
        except Exception as exc:  # whatever an entry does to the checks, the worker goes on
            DROPS.drop(queue, raw, JunkEntry("unreadable", type(exc).__name__))
            return False
        return True


class Channel(kombu_redis.Channel):
    _sync_client: tuple | None = None  # (the pool it was built over, the client)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    from_transport_options = (*kombu_redis.Channel.from_transport_options, "max_message_bytes")  # type: ignore[assignment]  # one more option than kombu's fixed-length tuple

    def _get_client(self):
        if self.global_keyprefix:  # kombu's prefixed client (pixelrelay sets no prefix): not screened
            return super()._get_client()
        return ScreeningRedis

    def _create_client(self, asynchronous: bool = False):
        if asynchronous:
            return self._screening(super()._create_client(asynchronous=True))
        pool, cached = self.pool, self._sync_client
        if cached is None or cached[0] is not pool:  # first use, or the channel rebuilt its pool
            cached = self._sync_client = (pool, self._screening(super()._create_client()))
        return cached[1]

    def _screening(self, client: Any) -> Any:
        if isinstance(client, ScreeningRedis):
            client.screen = Screen(int(self.max_message_bytes))
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel


class SocketTransport(Transport):
    """The same over a unix socket: kombu keeps the whole ``socket://`` URL as the host, which
    its channel turns into a unix-socket connection (``celery_app.broker_url``)."""

    can_parse_url = True


TRANSPORT = f"{__name__}:Transport"
SOCKET_TRANSPORT = f"{__name__}:SocketTransport"


def delivery_tags(client: redis.Redis, task_id: str) -> list[str]:
    """The delivery tags of the unacked messages of task ``task_id`` (the broker's data is
    input: entries that are not kombu's envelope are passed over)."""
    needle = json.dumps(task_id).encode()
    tags = []
    for tag, raw in client.hscan_iter(keys.KOMBU_UNACKED, count=64):  # in pages: Redis is never held long
        if needle not in raw:  # most entries: no JSON decoded
            continue
        try:
            envelope = json.loads(raw)
            headers = envelope[0]["headers"]
        except (ValueError, TypeError, KeyError, IndexError):
            continue
        if isinstance(headers, dict) and headers.get("id") == task_id:
            tags.append(tag.decode() if isinstance(tag, bytes) else str(tag))
    return tags


def touch(pipe: redis.Redis, tags: list[str], now: float) -> None:
    """Queue on ``pipe`` the move of those tags' delivery time to ``now`` (only of tags still
    unacked: an acked message is never put back)."""
    if tags:
        pipe.zadd(keys.KOMBU_UNACKED_INDEX, dict.fromkeys(tags, now), xx=True)
