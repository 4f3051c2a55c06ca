"""kombu's Redis transport with one client per channel for its synchronous commands.

kombu builds a new ``redis.Redis`` for every synchronous command (about 5 % of a stage
worker's CPU with the null backends: ``benchmarks/bench_overhead.py``); this channel builds
one over its own pool and reuses it (again if the pool is rebuilt). Only ``redis://`` brokers
use it; ``rediss://`` keeps kombu's stock transport, whose TLS defaults follow that scheme.
"""

from __future__ import annotations

from kombu.transport import redis as kombu_redis


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
