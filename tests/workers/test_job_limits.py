"""Time limits follow the job, not the worker.

Workers whose own settings assume one-item chunks at 0.5 s an item run a job submitted with
6-item chunks at 5 s an item, whose decode batch (6 x 0.8 s, ``tests/faults`` ``slow``) lasts
far longer than those settings' window; meanwhile a broker client whose visibility timeout is
2 s restores every unacked message older than that (kombu's own ``restore_visible``, as any
worker does: the shortest visibility timeout in a fleet applies to all unacked messages). The
batch is never delivered to the second decode worker: each item is decoded once, by one
process, and ends done, once, in the manifest.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
from kombu import Connection

from pixelrelay.jobs import keys
from pixelrelay.jobs.state import JobState
from tests.conftest import REPO, run_cli, wait_until, worker_env
from tests.images import good_images

pytestmark = pytest.mark.e2e

DB = 15
N_ITEMS = 6
FLEET_VISIBILITY_S = 2  # the shortest in the fleet: far under the job's batch (6 x 0.8 s)


def _start_worker(env: dict[str, str], logdir: Path, stage: str, backend: str, n: int) -> subprocess.Popen:
    flag = {"encode": "--encoder", "plan": "--planner", "decode": "--decoder"}[stage]
    log = open(logdir / f"{stage}-{n}.log", "wb")
    cmd = [sys.executable, "-m", "pixelrelay", "worker", "--stage", stage, flag, backend, "--loglevel", "WARNING"]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def _restore_while(url: str, running: threading.Event) -> threading.Thread:
    """A broker client with a short visibility timeout, restoring unacked messages as kombu's
    workers do (every 0.25 s here, not every 10 s)."""

    def loop() -> None:
        with Connection(url, transport_options={"visibility_timeout": FLEET_VISIBILITY_S}) as conn:
            channel = conn.default_channel
            while running.is_set():
                channel.qos.restore_visible(num=100, interval=1)
                time.sleep(0.25)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def test_a_long_chunk_of_the_job_is_never_delivered_twice_whatever_the_workers_settings(redis_url, tmp_path):
    url = redis_url.rsplit("/", 1)[0] + f"/{DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    calls = tmp_path / "decoded.log"
    own = {  # the workers' own settings: one-item chunks, 0.5 s an item
        "PIXELRELAY_CHUNK_SIZE": "1",
        "PIXELRELAY_ITEM_BUDGET_S": "0.5",
        "PIXELRELAY_BATCH_SIZE": "1",
        "PIXELRELAY_LEASE_S": "1",
        "PIXELRELAY_PLUGINS": "tests.faults",
        "PIXELRELAY_TEST_SLOW_S": "0.8",
        "PIXELRELAY_TEST_CALL_LOG": str(calls),
    }
    env = worker_env(url, **own)
    (tmp_path / "in").mkdir()
    for rel, data in good_images(N_ITEMS).items():
        (tmp_path / "in" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / rel).write_bytes(data)
    procs = [
        _start_worker(env, tmp_path, "encode", "analysis", 1),
        _start_worker(env, tmp_path, "plan", "rules", 1),
        _start_worker(env, tmp_path, "decode", "slow", 1),
        _start_worker(env, tmp_path, "decode", "slow", 2),
    ]
    running = threading.Event()
    running.set()
    restorer = _restore_while(url, running)
    job_id = "long-" + uuid.uuid4().hex[:6]
    job_env = {**env, "PIXELRELAY_ITEM_BUDGET_S": "5"}  # the job's: 6 items x 5 s
    started = time.monotonic()
    try:
        args = ["submit", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--job-id", job_id]
        done = run_cli([*args, "--chunk-size", str(N_ITEMS), "--wait", "--timeout", "120"], job_env, timeout=180)
        elapsed = time.monotonic() - started
        logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(tmp_path.glob("*.log")))
        assert done.returncode == 0, done.stdout + done.stderr + logs
        wait_until(lambda: not client.hlen(keys.KOMBU_UNACKED), 10)  # nothing left for any client to deliver again
    finally:
        running.clear()
        restorer.join(10)
        for proc in procs:  # the job is over: nothing of theirs is left to finish
            proc.kill()
            proc.wait(20)
    lines = [line.split() for line in calls.read_text().splitlines()]
    per_size = collections.Counter(size for _, size in lines)
    assert len(per_size) == N_ITEMS and set(per_size.values()) == {1}, per_size  # each item decoded once
    assert len({pid for pid, _ in lines}) == 1, lines  # by one decode worker: the batch was delivered once
    manifest = tmp_path / "out" / "_jobs" / job_id / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(N_ITEMS))  # every item once
    assert all(r["status"] == "done" for r in rows), [r.get("error") for r in rows]
    counts = JobState(client, job_id).counts()
    assert (counts.total, counts.done, counts.failed) == (N_ITEMS, N_ITEMS, 0)
    print(f"a {N_ITEMS}-item chunk at {own['PIXELRELAY_TEST_SLOW_S']} s an item: job done in {elapsed:.1f} s")
