"""An item that kills its worker process fails alone; its neighbours finish."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid

import pytest
import redis

from tests.conftest import REPO, WorkerPool, run_cli, worker_env
from tests.images import photo_like

pytestmark = pytest.mark.e2e


def test_item_that_kills_its_worker_fails_alone(redis_url, tmp_path):
    # A broker of its own (another Redis database), so no other worker takes these tasks.
    isolated = redis_url.rsplit("/", 1)[0] + "/3"
    redis.Redis.from_url(isolated).flushdb()
    env = worker_env(
        isolated, PIXELRELAY_PLUGINS="tests.faults", PIXELRELAY_CHUNK_SIZE="4", PIXELRELAY_MAX_DELIVERIES="2"
    )
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        photo_like(13 if i == 2 else 20 + i, 16, i).save(src / f"{i}.png")

    pool = WorkerPool(env, tmp_path, {"encoder": "analysis", "planner": "rules", "decoder": "crashing"})
    pool.start(decode_args=["--concurrency", "2"])  # prefork: the parent outlives its children
    try:
        job_id = "poison-" + uuid.uuid4().hex[:6]
        result = run_cli(["submit", str(src), "--out", str(tmp_path / "out"), "--job-id", job_id, "--wait"], env)
        assert result.returncode == 1, result.stderr + pool.logs()
    finally:
        pool.stop()
    rows = {
        r["input"].rsplit("/", 1)[1]: r
        for r in map(json.loads, (tmp_path / "out" / "_jobs" / job_id / "manifest.jsonl").read_text().splitlines())
    }
    assert rows["2.png"]["status"] == "failed"
    assert "worker process died" in rows["2.png"]["error"]
    assert all(rows[f"{i}.png"]["status"] == "done" for i in (0, 1, 3, 4, 5))


def test_a_poison_item_that_kills_a_solo_worker_fails_alone_through_sweep_resends(redis_url, tmp_path):
    """Solo worker: a death leaves the message unacked (no redelivery for hours); the sweep's
    re-send counts as the next delivery, so the chunk is split and the poison item fails alone.
    A supervisor loop stands in for systemd / Kubernetes restarting the dead worker."""
    isolated = redis_url.rsplit("/", 1)[0] + "/10"
    redis.Redis.from_url(isolated).flushdb()
    env = worker_env(
        isolated,
        PIXELRELAY_PLUGINS="tests.faults",
        PIXELRELAY_CHUNK_SIZE="3",
        PIXELRELAY_MAX_DELIVERIES="1",
        PIXELRELAY_LEASE_S="1",
        PIXELRELAY_SWEEP_INTERVAL_S="0.3",
    )
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        photo_like(13 if i == 1 else 20 + i, 16, i).save(src / f"{i}.png")

    pool = WorkerPool(env, tmp_path, {"encoder": "analysis", "planner": "rules", "decoder": "crashing"})
    pool.start()  # solo decode worker: the crash kills the whole worker process
    deaths = []

    def supervise() -> None:
        while not stopping.is_set():
            decode = pool.procs[2]
            if decode.poll() is not None and not stopping.is_set():
                deaths.append(decode.returncode)
                log = open(tmp_path / f"decode-{len(deaths)}.log", "wb")
                cmd = [
                    sys.executable,
                    "-m",
                    "pixelrelay",
                    "worker",
                    "--stage",
                    "decode",
                    "--decoder",
                    "crashing",
                    "--loglevel",
                    "WARNING",
                ]
                pool.procs[2] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
            time.sleep(0.05)

    stopping = threading.Event()
    supervisor = threading.Thread(target=supervise)
    supervisor.start()
    try:
        job_id = "poison-solo-" + uuid.uuid4().hex[:6]
        result = run_cli(
            ["submit", str(src), "--out", str(tmp_path / "out"), "--job-id", job_id, "--wait"], env, timeout=120
        )
        assert result.returncode == 1, result.stderr + pool.logs()
    finally:
        stopping.set()
        supervisor.join(10)
        pool.stop()
    assert deaths == [137, 137]  # the whole chunk once, then the poison item's own part once
    rows = {
        r["input"].rsplit("/", 1)[1]: r
        for r in map(json.loads, (tmp_path / "out" / "_jobs" / job_id / "manifest.jsonl").read_text().splitlines())
    }
    assert len(rows) == 3
    assert rows["1.png"]["status"] == "failed" and "worker process died 1 times" in rows["1.png"]["error"]
    assert rows["0.png"]["status"] == rows["2.png"]["status"] == "done"
    names = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name != "_jobs")
    assert names == [
        ".0.png.pixelrelay.json",
        ".2.png.pixelrelay.json",
        "0.png",
        "2.png",
    ]  # outputs, fingerprint sidecars
