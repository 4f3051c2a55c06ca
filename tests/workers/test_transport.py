"""The broker transport: kombu's Redis transport with one client per channel for its
synchronous commands (``workers.transport``), used for ``redis://`` and not ``rediss://``."""

from __future__ import annotations

import json

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


def test_message_bodies_go_unencoded_and_base64_ones_are_still_read(redis_url):
    """Our messages carry their JSON body as it is (``body_encoding`` None); one written the
    kombu default way (base64, an older producer or worker) is read all the same."""
    from kombu import Connection

    app = create_app(Settings.from_env(redis_url=redis_url))
    options = app.conf.broker_transport_options
    client = redis.Redis.from_url(redis_url)
    queue = "pixelrelay-test-body-encoding"
    client.delete(queue)
    with Connection(redis_url, transport=transport.TRANSPORT, transport_options=options) as ours:
        ours.SimpleQueue(queue).put({"new": 1}, serializer="json")
    with Connection(redis_url, transport_options={"body_encoding": "base64"}) as older:
        older.SimpleQueue(queue).put({"old": 2}, serializer="json")
    envelopes = [json.loads(raw) for raw in client.lrange(queue, 0, -1)]
    encodings = sorted(str(e["properties"].get("body_encoding")) for e in envelopes)
    assert encodings == ["None", "base64"]
    plain = next(e for e in envelopes if e["properties"].get("body_encoding") is None)
    assert json.loads(plain["body"]) == {"new": 1}  # readable JSON in Redis, not base64
    with Connection(redis_url, transport=transport.TRANSPORT, transport_options=options) as ours:
        q = ours.SimpleQueue(queue)
        got = []
        for _ in range(2):
            message = q.get(timeout=5)
            got.append(message.payload)
            message.ack()
    assert sorted(got, key=str) == [{"new": 1}, {"old": 2}]
    client.delete(queue)
