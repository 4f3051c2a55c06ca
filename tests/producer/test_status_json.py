"""``pixelrelay status JOB --json``: one JSON object on stdout and nothing else, the same
object the Python API's ``Job.status()`` gives, and the exit codes of plain ``status``."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

import pixelrelay
from pixelrelay.exitcodes import ExitCode
from tests.conftest import run_cli, worker_env
from tests.images import bad_and_odd_images, good_images

pytestmark = pytest.mark.e2e

FIELDS = {
    "job_id",
    "state",
    "done",
    "failed",
    "cancelled",
    "missing",
    "pending",
    "total",
    "percent",
    "rate",
    "eta_s",
    "stalled_s",
    "submitted_at",
    "finished_at",
    "manifest",
    "workers_missing",
    "ended",
    "exit_code",
}


def _folder(path: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return path


def _one_object(stdout: str) -> dict:
    lines = stdout.splitlines()
    assert len(lines) == 1, stdout
    obj = json.loads(lines[0])
    assert set(obj) == FIELDS
    return obj


def test_wait_json_prints_the_final_object_only(stage_workers, redis_url, tmp_path):
    files = dict(good_images(2))
    files["zero.jpg"] = bad_and_odd_images()[0]["zero.jpg"]  # fails: empty file
    src = _folder(tmp_path / "in", files)
    job = pixelrelay.submit(str(src), str(tmp_path / "out"), redis_url=redis_url)
    env = worker_env(redis_url)

    waited = run_cli(["status", job.job_id, "--wait", "--json"], env, timeout=180)
    assert waited.returncode == ExitCode.FAILED_ITEMS, waited.stderr + stage_workers.logs()
    final = _one_object(waited.stdout)
    assert (final["state"], final["done"], final["failed"], final["pending"], final["total"]) == (
        "failed-items",
        2,
        1,
        0,
        3,
    )
    assert final["percent"] == 100.0 and final["eta_s"] == 0 and final["ended"] and final["exit_code"] == 1
    assert final["manifest"] == str(tmp_path / "out" / "_jobs" / job.job_id / "manifest.jsonl")
    assert final["finished_at"] >= final["submitted_at"] > 0
    assert final == job.status().to_json()  # one source of truth with the Python API

    once = run_cli(["status", job.job_id, "--json"], env, timeout=60)
    assert once.returncode == ExitCode.FAILED_ITEMS and _one_object(once.stdout) == final
    plain = run_cli(["status", job.job_id], env, timeout=60)
    assert plain.returncode == once.returncode  # exit codes unchanged by --json


def test_json_on_a_queued_job_a_timeout_a_cancel_and_an_unknown_job(redis_url, tmp_path):
    url = redis_url.rsplit("/", 1)[0] + "/14"  # no stage worker listens here: the job stays queued
    env = worker_env(url)
    job = pixelrelay.submit(str(_folder(tmp_path / "in", good_images(2))), str(tmp_path / "out"), redis_url=url)

    once = run_cli(["status", job.job_id, "--json"], env, timeout=60)
    assert once.returncode == ExitCode.OK
    queued = _one_object(once.stdout)
    assert (queued["state"], queued["pending"], queued["manifest"], queued["ended"]) == ("queued", 2, None, False)
    assert queued["exit_code"] is None  # not ended: no exit code yet

    timed_out = run_cli(["status", job.job_id, "--wait", "--timeout", "0.5", "--json"], env, timeout=60)
    assert timed_out.returncode == ExitCode.TIMEOUT
    assert _one_object(timed_out.stdout)["state"] == "queued"  # no progress line on stdout
    assert "gave up waiting" in timed_out.stderr and "done=" not in timed_out.stderr

    job.cancel(grace_s=0)
    cancelled = run_cli(["status", job.job_id, "--json"], env, timeout=60)
    assert cancelled.returncode == ExitCode.CANCELLED
    assert (_one_object(cancelled.stdout)["state"], json.loads(cancelled.stdout)["cancelled"]) == ("cancelled", 2)

    unknown = run_cli(["status", "no-such-" + uuid.uuid4().hex[:6], "--json"], env, timeout=60)
    assert unknown.returncode == ExitCode.USAGE and unknown.stdout == "" and "unknown job" in unknown.stderr
