"""Junk on the stage queues, pushed as an attacker who can write to Redis would: entries
that are not JSON, nested too deep, too big, or that name a task other than the queue's
stage task (Celery's own among them). Each is dropped (gone from the queue, never unacked),
the worker stays up (the same process), and a genuine job that follows finishes every item."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import redis
from celery import Celery

from tests.conftest import WorkerPool, run_cli, wait_until, worker_env
from tests.images import photo_like

pytestmark = pytest.mark.e2e

NULL_BACKENDS = {"encoder": "null", "planner": "null", "decoder": "null"}
STAGE_QUEUES = ("pixelrelay.encode", "pixelrelay.plan", "pixelrelay.decode")
BIG_BODY_BYTES = 100 * 1024 * 1024


@pytest.fixture(scope="module")
def broker(redis_url):
    url = redis_url.rsplit("/", 1)[0] + "/15"  # a database of its own: no other worker takes these entries
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="module")
def workers(broker, tmp_path_factory):
    pool = WorkerPool(worker_env(broker), tmp_path_factory.mktemp("junk-logs"), NULL_BACKENDS).start()
    client = redis.Redis.from_url(broker)
    try:  # each worker consumes (a BRPOP from its client) before junk is pushed
        wait_until(lambda: _consumers(client) >= 3 or not pool.alive(), timeout=120, interval=0.3)
        assert pool.alive(), pool.logs()
        yield pool
    finally:
        pool.stop()


def _consumers(client: redis.Redis) -> int:
    return sum("cmd=brpop" in str(c.get("cmd", "")) or c.get("cmd") == "brpop" for c in client.client_list())


def _envelope(task: str, body: str, queue: str = "pixelrelay.encode") -> str:
    """A kombu envelope as ``LPUSH`` writes it: headers naming ``task``, the body as given."""
    tag = str(uuid.uuid4())
    headers = {"lang": "py", "task": task, "id": tag, "root_id": tag, "parent_id": None, "group": None}
    properties = {
        "correlation_id": tag,
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": queue},
        "priority": 0,
        "body_encoding": None,
        "delivery_tag": tag,
    }
    return json.dumps(
        {
            "body": body,
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": properties,
        }
    )


def _celery_builtin_entries(broker: str) -> list[bytes]:
    """Celery's own tasks, sent the ordinary way to the encode queue, as entries."""
    attacker = Celery("attacker", broker=broker)
    client = redis.Redis.from_url(broker)
    sig = {
        "task": "pixelrelay.encode",
        "args": [],
        "kwargs": {},
        "options": {},
        "subtask_type": None,
        "immutable": False,
    }
    attacker.send_task("celery.map", args=[sig, [[{"forged": 1}]]], queue="pixelrelay.encode")
    attacker.send_task("celery.accumulate", args=[1, 2], queue="pixelrelay.encode")
    attacker.send_task("celery.chord_unlock", args=["group-id", []], queue="pixelrelay.encode")
    attacker.send_task("celery.backend_cleanup", queue="pixelrelay.encode")
    entries = client.lrange("pixelrelay.encode", 0, -1)
    client.delete("pixelrelay.encode")
    return entries


def _unacked(client: redis.Redis) -> int:
    return client.hlen("unacked") + client.zcard("unacked_index")


def _genuine_job(broker: str, tmp_path: Path, pool: WorkerPool) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(5):
        photo_like(12 + i, 10, i).save(src / f"{i}.png")
    job_id = "junk-" + uuid.uuid4().hex[:8]
    args = ["submit", str(src), "--out", str(out), "--job-id", job_id, "--wait", "--timeout", "120"]
    args += [f"--{kind}={spec}" for kind, spec in NULL_BACKENDS.items()]
    result = run_cli(args, worker_env(broker))
    assert result.returncode == 0, result.stdout + result.stderr + pool.logs()
    rows = [json.loads(line) for line in (out / "_jobs" / job_id / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(5))
    assert all(r["status"] == "done" for r in rows), rows


def _vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_junk_entries_are_dropped_and_the_worker_stays_up(broker, workers, tmp_path):
    client = redis.Redis.from_url(broker)
    pids = [p.pid for p in workers.procs]
    junk = [
        b"this is not json",
        b"\xff\xfe not utf-8",
        b"[]",
        b'{"body": 1}',
        b"[" * 200_000,  # deeper than the JSON decoder goes
        json.dumps(
            {
                "properties": {"delivery_tag": "x", "delivery_info": {}},
                "x": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[0]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
            }
        ).encode(),
        _envelope("pixelrelay.encode", "[[{}], {}, " + "[" * 5000 + "]" * 5000 + "]").encode(),  # a body nested deep
        _envelope("pixelrelay.encode", "not json either").encode(),
        _envelope("evil.task", "[[], {}, {}]").encode(),
        _envelope("pixelrelay.encode", "[[{}], {}, {}]").replace('"group": null', '"timelimit": "x"').encode(),
        _envelope("pixelrelay.encode", '[[{}], {}, {"chain": [{"task": "pixelrelay.plan", "options": "x"}]}]').encode(),
        _envelope("pixelrelay.decode", "[[{}], {}, {}]").encode(),  # another stage's task on the encode queue
        *_celery_builtin_entries(broker),
    ]
    client.lpush("pixelrelay.encode", *junk)
    client.lpush("pixelrelay.plan", b"junk on the plan queue", _envelope("celery.accumulate", "[[1], {}, {}]", "x"))
    client.lpush("pixelrelay.decode", b"{", _envelope("pixelrelay.encode", "[[{}], {}, {}]", "pixelrelay.decode"))
    wait_until(lambda: sum(client.llen(q) for q in STAGE_QUEUES) == 0 or not workers.alive(), timeout=60)

    _genuine_job(broker, tmp_path, workers)

    assert workers.alive() and [p.pid for p in workers.procs] == pids, workers.logs()
    assert sum(client.llen(q) for q in STAGE_QUEUES) == 0 and _unacked(client) == 0
    logs = workers.logs(tail=None)
    assert "Task celery." not in logs and "Received unregistered task" not in logs, logs  # none of them ran
    for reason in ("not JSON", "nested deeper than", "not a task message", "foreign task"):
        assert reason in logs, logs
    assert "this is not json" in logs and "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[" not in logs  # a short prefix only


def test_an_oversized_body_is_dropped_before_it_is_decoded(broker, workers, tmp_path):
    client = redis.Redis.from_url(broker)
    encode = workers.procs[0]
    before = _vm_hwm_kb(encode.pid)
    pad = "x" * BIG_BODY_BYTES
    client.lpush("pixelrelay.encode", _envelope("pixelrelay.encode", f'[[{{"pad": "{pad}"}}], {{}}, {{}}]'))
    del pad
    wait_until(lambda: client.llen("pixelrelay.encode") == 0 or not workers.alive(), timeout=60)

    _genuine_job(broker, tmp_path, workers)  # taken after the big entry: that one was handled by then

    grown_mb = (_vm_hwm_kb(encode.pid) - before) / 1024
    print(f"encode worker VmHWM {before >> 10} MB, then {_vm_hwm_kb(encode.pid) >> 10} MB: {grown_mb:.0f} MB more")
    assert workers.alive() and client.llen("pixelrelay.encode") == 0 and _unacked(client) == 0
    # redis-py's reply parser holds about 4 copies of the entry as it reads it; decoding it (kombu,
    # then Celery) took about 4 more: 808 MB for this body.
    assert grown_mb < 6 * (BIG_BODY_BYTES >> 20), f"grew by {grown_mb:.0f} MB"
    assert "over the limit" in workers.logs(tail=None)
