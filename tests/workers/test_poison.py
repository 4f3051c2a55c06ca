"""An item that kills its worker process fails alone; its neighbours finish."""

from __future__ import annotations

import json
import uuid

import redis

from tests.conftest import WorkerPool, run_cli, worker_env
from tests.images import photo_like


def test_item_that_kills_its_worker_fails_alone(redis_url, tmp_path):
    # A broker of its own (another Redis database), so no other worker takes these tasks.
    isolated = redis_url.rsplit("/", 1)[0] + "/3"
    redis.Redis.from_url(isolated).flushdb()
    env = worker_env(isolated, PIXELRELAY_PLUGINS="tests.faults", PIXELRELAY_CHUNK_SIZE="4", PIXELRELAY_MAX_DELIVERIES="2")
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
    rows = {r["input"].rsplit("/", 1)[1]: r for r in map(json.loads, (tmp_path / "out" / "_jobs" / job_id / "manifest.jsonl").read_text().splitlines())}
    assert rows["2.png"]["status"] == "failed"
    assert "worker process died" in rows["2.png"]["error"]
    assert all(rows[f"{i}.png"]["status"] == "done" for i in (0, 1, 3, 4, 5))
