"""The broker transport: kombu's Redis transport with one client per channel for its
synchronous commands (``workers.transport``), used for ``redis://`` and not ``rediss://``."""

from __future__ import annotations

import redis

from pixelrelay.pipeline.settings import Settings
from pixelrelay.workers import transport
from pixelrelay.workers.celery_app import create_app


def test_a_channel_builds_its_command_client_once_and_again_for_a_new_pool(redis_url, monkeypatch):
    built = []
    real_init = redis.Redis.__init__

    def counting_init(self, *args, **kwargs):
        built.append(kwargs.get("connection_pool"))
        real_init(self, *args, **kwargs)

    app = create_app(Settings.from_env(redis_url=redis_url))
    assert app.conf.broker_transport == transport.TRANSPORT
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        assert isinstance(channel, transport.Channel)
        monkeypatch.setattr(redis.Redis, "__init__", counting_init)
        queue = "pixelrelay-test-transport"
        for i in range(20):  # each put and get takes a synchronous client
            channel._put(queue, {"body": str(i)})
        got = [channel._get(queue)["body"] for _ in range(20)]
        assert got == [str(i) for i in range(20)]
        assert len(built) == 1 and built[0] is channel.pool
        channel._disconnect_pools()  # the channel drops its pool: the next command builds a client on the new one
        channel._put(queue, {"body": "again"})
        assert channel._get(queue)["body"] == "again"
        assert len(built) == 2 and built[1] is channel.pool and built[1] is not built[0]


def test_a_tls_broker_keeps_kombus_own_transport(redis_url):
    tls = create_app(Settings.from_env(redis_url="rediss://:secret@redis.example:6380/0"))
    assert tls.conf.broker_transport in (None, "")
