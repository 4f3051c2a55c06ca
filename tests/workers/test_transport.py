"""The broker transport: kombu's Redis transport with one client per channel for its
synchronous commands (``workers.transport``), used for ``redis://`` and not ``rediss://``."""

from __future__ import annotations

import json
import shutil
import tempfile
from queue import Empty

import pytest
import redis

from pixelrelay.pipeline.settings import Settings
from pixelrelay.workers import transport
from pixelrelay.workers.celery_app import create_app


def _entry(body: str) -> dict:
    """The least a queue entry has for kombu to read it (``workers.screen``)."""
    return {"body": body, "properties": {"delivery_tag": body, "delivery_info": {"exchange": "", "routing_key": ""}}}


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
            channel._put(queue, _entry(str(i)))
        got = [channel._get(queue)["body"] for _ in range(20)]
        assert got == [str(i) for i in range(20)]
        assert len(built) == 1 and built[0] is channel.pool
        channel._disconnect_pools()  # the channel drops its pool: the next command builds a client on the new one
        channel._put(queue, _entry("again"))
        assert channel._get(queue)["body"] == "again"
        assert len(built) == 2 and built[1] is channel.pool and built[1] is not built[0]
        redis.Redis.from_url(redis_url).lpush(queue, b"not json")  # basic_get's RPOP is screened too
        with pytest.raises(Empty):
            channel._get(queue)
        assert redis.Redis.from_url(redis_url).llen(queue) == 0


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


def _real_envelope(redis_url: str, task: str, args: list) -> bytes:
    """An entry exactly as a producer writes it (sent to a queue nobody consumes)."""
    app = create_app(Settings.from_env(redis_url=redis_url))
    client = redis.Redis.from_url(redis_url)
    queue = "pixelrelay-test-screen-" + task
    client.delete(queue)
    app.send_task(task, args=args, queue=queue)
    raw = client.rpop(queue)
    assert isinstance(raw, bytes)
    return raw


def test_the_screen_passes_a_stage_task_and_refuses_junk_and_foreign_tasks(redis_url):
    from pixelrelay.workers.screen import JunkEntry, Screen

    screen = Screen(64 * 1024)
    genuine = _real_envelope(redis_url, "pixelrelay.encode", [{"job_id": "j"}])
    screen.check("pixelrelay.encode", genuine)
    builtin = _real_envelope(redis_url, "celery.accumulate", [1, 2])
    screen.check("some-other-queue", builtin)  # off the stage queues only the envelope is checked
    envelope = json.loads(genuine)
    deep_body = {**envelope, "body": "[[" + "[" * 40 + "]" * 40 + "], {}, {}]"}
    not_json_body = {**envelope, "body": "[[{}], {}, {}"}
    wrong_shape = {**envelope, "body": '{"args": []}'}

    def with_header(**headers) -> bytes:
        return json.dumps({**envelope, "headers": {**envelope["headers"], **headers}}).encode()

    def with_body(body: str) -> bytes:
        return json.dumps({**envelope, "body": body}).encode()

    next_task = {"task": "pixelrelay.plan", "args": [], "kwargs": {}, "options": {"task_id": "t"}}
    screen.check("pixelrelay.encode", with_body(json.dumps([[{}], {}, {"chain": [next_task], "chord": None}])))
    screen.check("pixelrelay.encode", with_header(eta="2026-01-01T00:00:00+00:00", retries=3))
    restored = with_header(redelivered=True)  # as kombu puts back a message a worker died with
    restored_envelope = json.loads(restored)
    restored_envelope["properties"]["delivery_info"]["redelivered"] = True
    screen.check("pixelrelay.encode", json.dumps({**restored_envelope, "redelivered": True}).encode())
    cases = {
        with_header(timelimit="x"): "not a task message",  # each of these stopped a worker
        with_header(chord="x"): "not a task message",
        with_header(callbacks="x"): "not a task message",
        with_body(json.dumps([[{}], {}, {"chain": [{**next_task, "options": "x"}]}])): "not a task message",
        with_body(json.dumps([[{}], {}, {"chain": [{**next_task, "task": "celery.map"}]}])): "not a task message",
        with_header(eta="2999-01-01T00:00:00"): "not a task message",  # held unacked until then
        with_header(eta="soon"): "not a task message",
        with_header(id=5): "not a task message",
        with_header(argsrepr="x" * 5000): "not a task message",
        with_body('[[{}], {"x": 1}, {}]'): "not a task message",
        with_body("[[1, 2], {}, {}]"): "not a task message",
        b"this is not json": "not JSON",
        b"\xff\xfe": "not JSON",
        b"[" * 30_000: "nested deeper than",
        b"[]": "not a task message",
        b'{"body": "", "properties": {"delivery_tag": 1}}': "not a task message",
        b"x" * (64 * 1024 + 1): "over the limit",
        builtin: "foreign task",
        genuine.replace(b'"pixelrelay.encode"', b'"pixelrelay.decode"'): "foreign task",
        json.dumps(deep_body).encode(): "nested deeper than",
        json.dumps(not_json_body).encode(): "not JSON",
        json.dumps(wrong_shape).encode(): "not a task message",
    }
    dense = b"[" + b"[]," * 1_000_000 + b"[]]"  # 3 MB that would take about 60 MB decoded
    with pytest.raises(JunkEntry, match="more than 2000000 JSON values"):
        Screen(64 << 20).check("pixelrelay.encode", dense)
    for raw, reason in cases.items():
        try:
            screen.check("pixelrelay.encode", raw)
        except JunkEntry as exc:
            assert exc.reason == reason, (raw[:40], exc)
        else:
            raise AssertionError(f"{raw[:40]!r} passed")


def test_junk_is_dropped_off_the_queue_and_the_next_message_comes_through(redis_url, caplog, monkeypatch):
    """Through the transport, as a consumer reads: the junk entries leave the list, none is
    left unacked, one warning per reason is logged, and the message after them is delivered."""
    from kombu import Connection

    from pixelrelay.workers.screen import DropLog

    monkeypatch.setattr(transport, "DROPS", DropLog())  # this process's may hold a reason logged earlier

    app = create_app(Settings.from_env(redis_url=redis_url))
    options = {**app.conf.broker_transport_options, "max_message_bytes": 8192}
    client = redis.Redis.from_url(redis_url)
    queue = "pixelrelay-test-junk"
    client.delete(queue)
    client.lpush(queue, b"this is not json", b"neither is this", b"[" * 5000, b'{"body": 1}', b"0" * 9000)
    with Connection(redis_url, transport=transport.TRANSPORT, transport_options=options) as conn:
        conn.SimpleQueue(queue).put({"genuine": 1}, serializer="json")
        with caplog.at_level("WARNING", logger="pixelrelay.worker"):
            q = conn.SimpleQueue(queue)
            message = q.get(timeout=10)  # BRPOP: a consumer's read
            message.ack()
    assert message.payload == {"genuine": 1}
    assert client.llen(queue) == 0
    assert not any(b"not json" in v or b"[[[[" in v for v in client.hvals("unacked"))
    drops = [r.getMessage() for r in caplog.records if "dropped a queue entry" in r.getMessage()]
    assert [d.split("(")[1].split(":")[0].split(";")[0] for d in drops] == [
        "not JSON",
        "nested deeper than",
        "not a task message",
        "over the limit",
    ], drops  # the second non-JSON entry is counted, not logged
    assert all(len(d) < 300 for d in drops)


def test_the_drop_log_holds_a_reason_for_its_interval_then_counts_what_it_held(caplog):
    from pixelrelay.workers.screen import DropLog, JunkEntry

    now = [0.0]
    drops = DropLog(interval_s=60, clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="pixelrelay.worker"):
        for t in (0, 1, 2, 30, 61):
            now[0] = t
            drops.drop("pixelrelay.encode", b"junk", JunkEntry("not JSON"))
        drops.drop("pixelrelay.encode", b"{}", JunkEntry("foreign task", "'celery.map'"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "3 more dropped" in lines[1] and "foreign task" in lines[2] and "celery.map" in lines[2]


def test_a_unix_socket_broker_reaches_its_socket_with_its_password_and_db(tmp_path):
    """``unix://:PW@/path?db=N`` (redis-py's spelling) is handed to kombu as ``socket://``:
    the channel connects over that socket, authenticates, uses db N, and screens entries."""
    from pixelrelay.producer.embedded import EmbeddedRedis

    folder = tempfile.mkdtemp(prefix="prt-")  # short: a socket path fits in 107 bytes
    password = "p/w+@:x" * 5  # characters a URL must quote
    try:
        with EmbeddedRedis(data_dir=folder, password=password, unix_socket=True) as server:
            url = server.url.replace("?db=0", "?db=3")
            assert url.startswith("unix://") and server.port == 0
            app = create_app(Settings.from_env(redis_url=url))
            assert app.conf.broker_transport == transport.SOCKET_TRANSPORT
            with app.connection_for_write() as conn:
                assert password not in conn.as_uri()
                channel = conn.default_channel
                assert isinstance(channel, transport.Channel)
                channel._put("pixelrelay-test-socket", _entry("one"))
                assert channel._get("pixelrelay-test-socket")["body"] == "one"
                server.client(db=3).lpush("pixelrelay-test-socket", b"not json")
                with pytest.raises(Empty):
                    channel._get("pixelrelay-test-socket")
                channel._put("pixelrelay-test-socket", _entry("two"))
            assert server.client(db=3).llen("pixelrelay-test-socket") == 1
            assert server.client(db=0).dbsize() == 0
            assert redis.Redis.from_url(url).llen("pixelrelay-test-socket") == 1  # redis-py's clients: same URL
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_socket_path_too_long_falls_back_to_loopback_tcp(tmp_path):
    from pixelrelay.producer.embedded import EmbeddedRedis

    deep = tmp_path / ("d" * 120)
    with EmbeddedRedis(data_dir=str(deep), password="x" * 32, unix_socket=True) as server:
        assert server.socket is None and server.port > 0 and server.url.startswith("redis://")
        assert redis.Redis.from_url(server.url).ping()
