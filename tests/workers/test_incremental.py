"""``submit --incremental`` through real stage workers and Redis, on local folders: a
nightly re-run sends only what is new or changed, and one with nothing new exits 0."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from tests.conftest import run_cli, worker_env
from tests.images import encode, photo_like

pytestmark = pytest.mark.e2e


def _write(folder, name: str, seed: int) -> None:
    (folder / name).write_bytes(encode(photo_like(16, 16, seed), "PNG"))


def _submit(redis_url, src, out):
    env = worker_env(redis_url, PIXELRELAY_CHUNK_SIZE="16", PIXELRELAY_WINDOW="8")
    return run_cli(["submit", str(src), "--out", str(out), "--incremental", "--wait"], env)


def _manifest(out, job_id: str) -> list[dict]:
    text = (out / "_jobs" / job_id / "manifest.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_incremental_rerun_sends_only_new_and_changed(stage_workers, redis_url, tmp_path):
    src, out = tmp_path / "in", tmp_path / f"out-{uuid.uuid4().hex[:6]}"
    src.mkdir()
    for i in range(200):
        _write(src, f"img{i:03d}.png", i)

    first = _submit(redis_url, src, out)
    assert first.returncode == 0, first.stderr + stage_workers.logs()
    job1 = first.stdout.strip()
    rows = _manifest(out, job1)
    assert len(rows) == 200 and all(r["status"] == "done" for r in rows)
    assert "200 items to process (200 new, 0 changed, 0 retried); 0 unchanged items skipped" in first.stderr

    for i in range(200, 210):  # 10 new
        _write(src, f"img{i:03d}.png", i)
    changed = src / "img007.png"  # 1 changed: other bytes, another size
    changed.write_bytes(encode(photo_like(16, 16, 999), "PNG") + b"\0" * 7)

    second = _submit(redis_url, src, out)
    assert second.returncode == 0, second.stderr + stage_workers.logs()
    job2 = second.stdout.strip()
    assert job2 and job2 != job1
    rows = _manifest(out, job2)
    assert len(rows) == 11  # exactly the new and the changed went through the stages
    assert sorted(os.path.basename(r["input"]) for r in rows) == sorted(
        ["img007.png"] + [f"img{i:03d}.png" for i in range(200, 210)]
    )
    assert all(r["status"] == "done" and "encode_s" in r["timings"] for r in rows), rows[:2]
    assert [r["index"] for r in rows] == list(range(11))
    assert all(r["outcome"] == "processed" for r in rows)  # the changed input's old output is not reused
    assert "11 items to process (10 new, 1 changed, 0 retried); 199 unchanged items skipped" in second.stderr
    summary = json.loads((out / "_jobs" / job2 / "incremental.json").read_text())
    assert (summary["sent"], summary["new"], summary["changed"], summary["skipped_unchanged"]) == (11, 10, 1, 199)

    third = _submit(redis_url, src, out)
    assert third.returncode == 0, third.stderr
    assert third.stdout.strip() == ""  # no job
    assert "nothing new: 210 unchanged items skipped" in third.stderr
    assert sorted(os.listdir(out / "_jobs")) == sorted([job1, job2])
