"""Operating the workers (#12 sections 1 and 3): Celery task events seen by an events
receiver, one INFO line per chunk instead of Celery's result dump, JSON log lines, and
``pixelrelay health`` from the worker's heartbeat file.

The events test uses the session's stage workers. The log and health tests start one
encode worker of their own (INFO, ``PIXELRELAY_LOG_FORMAT=json``, its own heartbeat file) on
another Redis database, so its chunks are not taken by the session's encode worker; its job
needs no plan or decode worker to show its encode chunks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from pixelrelay.jobs import keys
from pixelrelay.pipeline.settings import Settings
from pixelrelay.workers.celery_app import create_app, task_name
from tests.conftest import REPO, run_cli, wait_until, worker_env
from tests.images import good_images

pytestmark = pytest.mark.e2e

STAGES = ("encode", "plan", "decode")


def _upload(s3_client, bucket: str, n: int) -> None:
    for rel, data in good_images(n).items():
        s3_client.put_object(Bucket=bucket, Key=f"in/{rel}", Body=data)


def _subscriptions(url: str) -> int:
    r = redis.Redis.from_url(url)
    return r.pubsub_numpat() + len(r.pubsub_channels())


def test_an_events_receiver_sees_tasks_succeed_at_all_three_stages(stage_workers, redis_url, s3_bucket, s3_client):
    _upload(s3_client, s3_bucket, 4)
    app = create_app(Settings(redis_url=redis_url))
    names: dict[str, str] = {}
    succeeded: list[str] = []
    with app.connection() as conn:
        handlers = {
            "task-received": lambda e: names.__setitem__(e["uuid"], e["name"]),
            "task-succeeded": lambda e: succeeded.append(e["uuid"]),
        }
        receiver = app.events.Receiver(conn, handlers=handlers)
        before = _subscriptions(redis_url)
        thread = threading.Thread(target=lambda: receiver.capture(limit=None, timeout=None, wakeup=False), daemon=True)
        thread.start()
        wait_until(lambda: _subscriptions(redis_url) > before, timeout=20, interval=0.05)
        job_id = "ev-" + uuid.uuid4().hex[:8]
        args = ["submit", f"s3://{s3_bucket}/in", "--out", f"s3://{s3_bucket}/out", "--job-id", job_id, "--wait"]
        result = run_cli(args, worker_env(redis_url))
        assert result.returncode == 0, result.stderr + stage_workers.logs()
        wanted = {task_name(s) for s in STAGES}
        try:
            wait_until(lambda: wanted <= {names.get(u) for u in succeeded}, timeout=20)
        finally:
            receiver.should_stop = True
            thread.join(10)
    assert wanted <= {names.get(u) for u in succeeded}
    # Flower asks every worker to enable events every few seconds: refused (remote control is
    # off), noted once per command, not an ERROR traceback each time.
    workers = len(stage_workers.procs)
    for _ in range(3):  # each worker's error reply comes after its log line
        refused = app.control.broadcast("enable_events", reply=True, timeout=30, limit=workers)
        assert len(refused) == workers and all(set(r) == {"error"} for row in refused for r in row.values()), refused
    note = "refused Celery remote-control command 'enable_events'"
    logs = "".join(p.read_text(errors="replace") for p in stage_workers.logdir.glob("*.log"))
    assert logs.count(note) == workers and "pidbox command error" not in logs


@pytest.fixture(scope="module")
def json_encode_worker(redis_url, s3_server, tmp_path_factory):
    """One encode worker at INFO with JSON logs and a heartbeat file, on Redis database 1
    (the health test, last, stops it)."""
    tmp_path = tmp_path_factory.mktemp("json-worker")
    url = redis_url.rsplit("/", 1)[0] + "/1"
    health_file = tmp_path / "worker-encode.health"  # the encode worker's own (PIXELRELAY_HEALTH_FILE + stage)
    env = worker_env(
        url,
        PIXELRELAY_LOG_FORMAT="json",
        PIXELRELAY_HEALTH_FILE=str(tmp_path / "worker.health"),
        PIXELRELAY_HEALTH_INTERVAL_S="0.5",
        PIXELRELAY_SWEEP_INTERVAL_S="0",
    )
    log_path = tmp_path / "encode.log"
    with open(log_path, "wb") as log:
        cmd = [
            sys.executable,
            "-m",
            "pixelrelay",
            "worker",
            "--stage",
            "encode",
            "--encoder",
            "analysis",
            "--loglevel",
            "INFO",
        ]
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        yield proc, env, log_path, health_file
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(20)
        redis.Redis.from_url(url).flushdb()


def test_worker_logs_one_json_line_per_chunk_and_no_result_body(json_encode_worker, s3_bucket, s3_client):
    proc, env, log_path, _ = json_encode_worker
    _upload(s3_client, s3_bucket, 8)  # two chunks of 4
    job_id = "log-" + uuid.uuid4().hex[:8]
    result = run_cli(["submit", f"s3://{s3_bucket}/in", "--out", f"s3://{s3_bucket}/out", "--job-id", job_id], env)
    assert result.returncode == 0, result.stderr

    def chunk_lines():
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        return [r for r in lines if r.get("job") == job_id and "items in" in r["message"]]

    try:
        chunks = wait_until(lambda: len(chunk_lines()) >= 2 and chunk_lines(), timeout=60)
    except (TimeoutError, json.JSONDecodeError):
        pytest.fail(log_path.read_text())
    text = log_path.read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON
    assert all({"ts", "level", "logger", "message"} <= r.keys() for r in records)
    assert sorted(r["chunk"] for r in chunks) == [0, 1]
    assert {r["stage"] for r in chunks} == {"encode"} and {r["level"] for r in chunks} == {"INFO"}
    assert all("4 items in" in r["message"] and "0 failed" in r["message"] for r in chunks)
    assert "succeeded in" not in text and "records" not in text and "sig" not in text  # no result body
    assert "testing-secret" not in text and env["PIXELRELAY_SIGNING_KEY"] not in text


def backdate(path: Path, seconds: float) -> None:
    """Age a file's mtime by ``seconds``, as that long without a touch would."""
    then = path.stat().st_mtime - seconds
    os.utime(path, (then, then))


def stopped_state(pid: int) -> bool:
    """Whether every thread of ``pid`` is stopped (SIGSTOP delivered)."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return all(Path(f"{t}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T" for t in tasks)


def test_health_is_0_while_the_worker_consumes_and_1_once_it_is_stopped(json_encode_worker):
    proc, env, log_path, health_file = json_encode_worker
    try:
        wait_until(health_file.exists, timeout=60)
    except TimeoutError:
        pytest.fail(log_path.read_text())
    backdate(health_file, 5)  # older than --max-age 1 unless touched again by a live consumer
    wait_until(lambda: time.time() - health_file.stat().st_mtime < 1, timeout=10, interval=0.05)
    alive = run_cli(["health", "--max-age", "1"], env)
    assert alive.returncode == 0, alive.stderr
    assert run_cli(["health", "--stage", "decode"], env).returncode == 1  # no decode worker here
    seen = redis.Redis.from_url(env["PIXELRELAY_REDIS_URL"]).zrange(keys.workers("encode"), 0, -1, withscores=True)
    assert seen and time.time() - seen[-1][1] < 30, seen  # its presence, which ``status`` reads
    os.kill(proc.pid, signal.SIGSTOP)
    wait_until(lambda: stopped_state(proc.pid), timeout=10, interval=0.01)
    backdate(health_file, 5)  # no consumer touches it again
    stopped = run_cli(["health", "--max-age", "1"], env)
    assert stopped.returncode == 1
    assert stopped.stderr.count("\n") == 1 and "heartbeat file" in stopped.stderr
    proc.kill()
    missing = run_cli(["health", "--file", str(health_file) + ".none"], env)
    assert missing.returncode == 1 and "no heartbeat file" in missing.stderr


def test_json_lines_carry_the_chunk_context_and_never_a_url_password():
    import io
    import logging

    from pixelrelay import logs

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.ContextFilter())
    logger = logging.getLogger("pixelrelay.test-json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with logs.context(job="j1", chunk=3, stage="plan"):
            logger.warning("lost %s", "redis://user:hunter2@redis:6379/0")
        logger.error("no context, rediss://:s3cret%40x@host/1")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert (first["job"], first["chunk"], first["stage"]) == ("j1", 3, "plan")
    assert first["message"] == "lost redis://user:***@redis:6379/0"
    assert "job" not in second and "s3cret" not in second["message"]
