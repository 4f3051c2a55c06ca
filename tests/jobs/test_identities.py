"""Published model identities in a real Redis: one live entry answers; none, expired,
malformed or disagreeing entries mean "unknown"."""

from __future__ import annotations

import uuid

import redis

from pixelrelay.jobs import identities, keys
from pixelrelay.jobs.identities import Published


def test_lookup_answers_only_one_live_well_formed_entry(redis_url):
    client = redis.Redis.from_url(redis_url)
    stage = "decode-" + uuid.uuid4().hex[:6]  # a stage name of its own: no real worker writes it
    a, b = Published(spec="classic", identity="classic@a"), Published(spec="classic", identity="classic@b")
    assert identities.lookup(client, stage, "classic") is None and identities.lookup(client, stage, None) is None

    identities.publish(client, stage, a, default=True, now=1000.0)
    assert identities.lookup(client, stage, "classic", now=1001.0) == a
    assert identities.lookup(client, stage, None, now=1001.0) == a
    assert identities.lookup(client, stage, "classic", now=1000.0 + keys.MODELS_TTL_S + 1) is None  # expired
    assert 0 < client.ttl(keys.models(stage, "classic")) <= keys.MODELS_TTL_S

    identities.publish(client, stage, b, default=False, now=1002.0)  # a rolling model change
    assert identities.lookup(client, stage, "classic", now=1003.0) is None
    assert identities.lookup(client, stage, None, now=1003.0) == a  # b is not a default
    identities.withdraw(client, stage, a, default=True)
    assert identities.lookup(client, stage, "classic", now=1003.0) == b
    assert identities.lookup(client, stage, None, now=1003.0) is None

    client.hset(keys.models(stage, "classic"), "not json", "1e12")
    assert identities.lookup(client, stage, "classic", now=1003.0) is None
    client.delete(keys.models(stage, "classic"))
    identities.publish(client, stage, a, default=False, now=1004.0)
    identities.publish(client, stage, b, default=False, now=1004.0 + keys.MODELS_TTL_S + 1)  # prunes a
    assert client.hlen(keys.models(stage, "classic")) == 1
