"""kombu's Redis transport with one client per channel for its synchronous commands.

kombu builds a new ``redis.Redis`` for every synchronous command (about 5 % of a stage
worker's CPU with the null backends: ``benchmarks/bench_overhead.py``); this channel builds
one over its own pool and reuses it (again if the pool is rebuilt). Only ``redis://`` brokers
use it; ``rediss://`` keeps kombu's stock transport, whose TLS defaults follow that scheme.

kombu restores (delivers again) an unacked message whose delivery time (its score in
``unacked_index``) is older than the restoring client's visibility timeout, whoever took it.
``delivery_tags`` and ``touch`` let a lease's renewals (``pixelrelay.workers.lease``) move that
time to now, so no client's visibility timeout ever restores a message whose lease is being
renewed (docs/design.md, "Time limits").
"""

from __future__ import annotations

import json

import redis
from kombu.transport import redis as kombu_redis

from pixelrelay.jobs import keys


class Channel(kombu_redis.Channel):
    _sync_client: tuple | None = None  # (the pool it was built over, the client)

    def _create_client(self, asynchronous: bool = False):
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool, cached = self.pool, self._sync_client
        if cached is None or cached[0] is not pool:  # first use, or the channel rebuilt its pool
            cached = self._sync_client = (pool, super()._create_client())
        return cached[1]


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"


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
