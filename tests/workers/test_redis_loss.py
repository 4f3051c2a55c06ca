"""Losing Redis is not losing the job: a real redis-server of its own (fixed port, no
persistence) is SIGKILLed mid-job and restarted **empty**, with real stage workers and a
real ``pixelrelay submit --wait`` left running, and nobody re-submits. Workers and the waiting
producer reconnect; the producer (or, with no producer at all, the workers' sweep reading the
storage registry) rebuilds the job from storage; the job finishes with every item in the
manifest exactly once, one output object per item and exact counts.

Measured on a 2-core machine (lease 2 s, sweep every 0.5 s): the job finishes about 3-6 s
after the restart (printed by each test).
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest
import redis

from pixelrelay.jobs.state import JobState
from pixelrelay.producer.embedded import EmbeddedRedis, free_port
from tests.conftest import REPO, run_cli, wait_until, worker_env
from tests.images import good_images
from tests.workers.stages import SETTINGS, Stages

pytestmark = pytest.mark.e2e

N_ITEMS = 8


@pytest.fixture()
def server():
    srv = EmbeddedRedis(port=free_port()).start()
    yield srv
    srv.stop()


def _restart_empty(srv: EmbeddedRedis, down_s: float = 0.0) -> None:
    srv.process.kill()  # SIGKILL: nothing is saved (--save '' and no AOF anyway)
    srv.process.wait(10)
    time.sleep(down_s)  # an outage everyone notices
    srv.start()


@pytest.fixture()
def env(server, s3_server, tmp_path):
    return worker_env(
        server.url, **SETTINGS, PIXELRELAY_STATE_URI=str(tmp_path / "state"), PIXELRELAY_REGISTRY_SCAN_S="0.5"
    )


@pytest.fixture()
def stages(env, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    pool = Stages(env, logs)
    for stage in ("encode", "plan", "decode"):
        pool.start(stage)
    yield pool
    _kill_all(pool)


def _kill_all(pool: Stages) -> None:
    """Test workers need no warm shutdown: SIGKILL saves seconds per test."""
    for proc in pool.procs.values():
        proc.kill()
    pool.stop_all()


def _inputs(s3_client, bucket: str) -> dict[str, bytes]:
    files = dict(list(good_images(N_ITEMS).items()))
    for rel, data in files.items():
        s3_client.put_object(Bucket=bucket, Key=f"in/{rel}", Body=data)
    return files


def _check(client: redis.Redis, s3_client, bucket: str, job_id: str, files: dict[str, bytes]) -> list[dict]:
    import json

    body = s3_client.get_object(Bucket=bucket, Key=f"out/_jobs/{job_id}/manifest.jsonl")["Body"].read()
    rows = [json.loads(line) for line in body.splitlines()]
    assert [r["index"] for r in rows] == list(range(N_ITEMS))  # every item exactly once
    assert all(r["status"] == "done" for r in rows), [r["error"] for r in rows]
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]
    outputs = {o["Key"] for o in listed if not o["Key"].startswith("out/_jobs/")}
    assert outputs == {f"out/{rel}" for rel in files}  # one object per item, nothing partial or extra
    counts = JobState(client, job_id).counts()
    assert (counts.total, counts.done, counts.failed) == (N_ITEMS, N_ITEMS, 0)
    info = JobState(client, job_id).info()
    assert (info["manifest_done"], info["manifest_failed"], info["manifest_missing"]) == (str(N_ITEMS), "0", "0")
    return rows


def _finished(client: redis.Redis, job_id: str) -> bool:
    info = JobState(client, job_id).info()
    return bool(info.get("finished_at")) and info.get("finished_seq") == info.get("seq")


def _kill_mid_job(server: EmbeddedRedis, client: redis.Redis, job_id: str) -> float:
    wait_until(lambda: 2 <= JobState(client, job_id).counts().done < N_ITEMS, timeout=60, interval=0.02)
    client.set("test:sentinel", "1")
    _restart_empty(server, down_s=1.5)
    assert not client.exists("test:sentinel")  # it did restart empty (the job may be rebuilt already)
    return time.monotonic()


def test_redis_restarted_empty_under_a_waiting_submit(server, env, stages, s3_client, s3_bucket):
    env = {k: v for k, v in env.items() if k != "PIXELRELAY_STATE_URI"}  # only the producer may rebuild
    files = _inputs(s3_client, s3_bucket)
    job_id = "lost-" + uuid.uuid4().hex[:8]
    cmd = [
        sys.executable,
        "-m",
        "pixelrelay",
        "submit",
        f"s3://{s3_bucket}/in",
        "--out",
        f"s3://{s3_bucket}/out",
        "--job-id",
        job_id,
        "--wait",
    ]
    waiting = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = redis.Redis.from_url(server.url)
    try:
        restarted_at = _kill_mid_job(server, client, job_id)
        out, err = waiting.communicate(timeout=90)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    recovered_s = time.monotonic() - restarted_at
    assert waiting.returncode == 0, err + stages.logs()
    assert "Redis unreachable, retrying" in err and "rebuilt from storage" in err, err
    _check(client, s3_client, s3_bucket, job_id, files)
    print(f"\nRedis restarted empty under submit --wait: job finished {recovered_s:.1f} s after the restart")


def env_state(env: dict[str, str]):
    from pathlib import Path

    return Path(env["PIXELRELAY_STATE_URI"])


def test_the_workers_sweep_rebuilds_a_registered_job(server, env, stages, s3_client, s3_bucket):
    files = _inputs(s3_client, s3_bucket)
    job_id = "reg-" + uuid.uuid4().hex[:8]
    result = run_cli(["submit", f"s3://{s3_bucket}/in", "--out", f"s3://{s3_bucket}/out", "--job-id", job_id], env)
    assert result.returncode == 0, result.stderr
    assert (env_state(env) / "active" / f"{job_id}.json").exists()
    client = redis.Redis.from_url(server.url)
    restarted_at = _kill_mid_job(server, client, job_id)
    try:
        wait_until(lambda: _finished(client, job_id), timeout=90, interval=0.1)
    except TimeoutError:
        pytest.fail("not finished: " + stages.logs())
    recovered_s = time.monotonic() - restarted_at
    _check(client, s3_client, s3_bucket, job_id, files)
    info = JobState(client, job_id).info()
    assert info["finished_seq"] == "2", info  # submission 1 lost with Redis; 2 is the sweep's rebuild from storage
    wait_until(lambda: not (env_state(env) / "active" / f"{job_id}.json").exists(), timeout=10)  # unlisted
    print(f"\nRedis restarted empty, no producer: the sweep's rebuild finished the job {recovered_s:.1f} s later")


def test_status_with_out_rebuilds_a_job_by_hand(server, s3_server, s3_client, s3_bucket, tmp_path):
    # No workers at first: the job waits in the broker; Redis then restarts empty.
    env = worker_env(server.url, **SETTINGS)
    files = _inputs(s3_client, s3_bucket)
    job_id = "hand-" + uuid.uuid4().hex[:8]
    out = f"s3://{s3_bucket}/out"
    assert run_cli(["submit", f"s3://{s3_bucket}/in", "--out", out, "--job-id", job_id], env).returncode == 0
    _restart_empty(server)
    unknown = run_cli(["status", job_id], env)
    assert unknown.returncode == 2 and "--out" in unknown.stdout
    client = redis.Redis.from_url(server.url)
    rebuilt = run_cli(["status", job_id, "--out", out], env)
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert "rebuilt" in rebuilt.stderr and f"total={N_ITEMS}" in rebuilt.stdout
    assert JobState(client, job_id).seq() == 1  # no part written yet: the first submission again
    logs = tmp_path / "logs"
    logs.mkdir()
    pool = Stages(env, logs)
    for stage in ("encode", "plan", "decode"):
        pool.start(stage)
    try:
        done = run_cli(["status", job_id, "--out", out, "--wait", "--timeout", "90"], env)
        assert done.returncode == 0, done.stderr + pool.logs()
    finally:
        _kill_all(pool)
    _check(client, s3_client, s3_bucket, job_id, files)
