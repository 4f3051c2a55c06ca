"""kombu's Redis transport with one client per channel for its synchronous commands.

kombu's ``Channel.conn_or_acquire`` builds a new ``redis.Redis`` for every synchronous
command it sends (each publish's ``LPUSH``, each ack's ``ZREM``/``HDEL``, each
``visibility`` restore): a ``redis.Redis`` is cheap to use but not to build (its ~250
response callbacks are copied into a new case-insensitive dict each time), about 5 % of a
stage worker's CPU at chunk 16 with the null backends (``benchmarks/bench_overhead.py``).
This channel builds that client once and reuses it. A ``redis.Redis`` over a
``ConnectionPool`` is safe to share between threads (each command checks a connection out
of the pool), the pool is the channel's own, and a channel is never reused after it is
closed (a reconnect makes new channels); should the channel rebuild its pool, a new client
is built over it.

Only ``redis://`` brokers use it (``workers.celery_app.configure``); ``rediss://`` keeps
kombu's stock transport, whose TLS defaults are keyed to that scheme's name.
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
