"""Job control end to end: ``pixelrelay cancel``, ``status --wait`` and ``pixelrelay jobs``
against real stage workers (subprocesses with ``slow`` backends, so the job is mid-flight
when the cancel lands), a Redis database of their own and local folders.

After the cancel: the job ends ``cancelled`` (``status --wait`` exits 4), its manifest has
every item exactly once (done or cancelled), the output folder holds exactly the done
items' outputs (nothing partial, no temp file), no chunk is taken after the cancel (the
feed cursor stays put, no part beyond it), no lost chain is re-sent, and the same workers
then run the next job normally.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

from pixelrelay.exitcodes import ExitCode
from pixelrelay.jobs import keys
from pixelrelay.jobs.state import JobState
from tests.conftest import REPO, TEST_SIGNER, WorkerPool, run_cli, wait_until, worker_env
from tests.images import good_images

pytestmark = pytest.mark.e2e

DB = 12
N_ITEMS = 16
SETTINGS = {
    "PIXELRELAY_PLUGINS": "tests.faults",
    "PIXELRELAY_TEST_SLOW_S": "0.2",
    "PIXELRELAY_CHUNK_SIZE": "2",
    "PIXELRELAY_WINDOW": "2",
    "PIXELRELAY_BATCH_SIZE": "1",
    "PIXELRELAY_LEASE_S": "2",
    "PIXELRELAY_SWEEP_INTERVAL_S": "0.5",
}
RESENT = "sending it again from encode"  # the sweep's log line for a re-sent chunk


@pytest.fixture(scope="module")
def env(redis_url):
    url = redis_url.rsplit("/", 1)[0] + f"/{DB}"
    redis.Redis.from_url(url).flushdb()
    return worker_env(url, **SETTINGS)


@pytest.fixture(scope="module")
def workers(env, tmp_path_factory):
    pool = WorkerPool(
        env, tmp_path_factory.mktemp("control-logs"), {"encoder": "slow", "planner": "slow", "decoder": "slow"}
    )
    yield pool.start()
    pool.stop()


def _folder(root: Path, n: int) -> Path:
    folder = root / "in"
    folder.mkdir(parents=True)
    for rel, data in good_images(n).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def _jobs(env) -> list[dict]:
    result = run_cli(["jobs", "--json"], env, timeout=60)
    assert result.returncode == ExitCode.OK, result.stderr
    return json.loads(result.stdout)


def _manifest(out: Path, job_id: str) -> list[dict]:
    return [json.loads(line) for line in (out / "_jobs" / job_id / "manifest.jsonl").read_text().splitlines()]


def _images(out: Path) -> set[str]:
    """Every file in the output folder but the job's files and the outputs' sidecars."""
    return {
        str(p)
        for p in out.rglob("*")
        if p.is_file() and "_jobs" not in p.parts and not p.name.endswith(".pixelrelay.json")
    }


def test_cancel_mid_job_through_real_workers(workers, env, tmp_path):
    client = redis.Redis.from_url(env["PIXELRELAY_REDIS_URL"])
    src, out = _folder(tmp_path, N_ITEMS), tmp_path / "out"
    job_id = "ctl-" + uuid.uuid4().hex[:8]
    submitted = run_cli(["submit", str(src), "--out", str(out), "--job-id", job_id], env, timeout=60)
    assert submitted.returncode == ExitCode.OK, submitted.stderr
    waiting = subprocess.Popen(
        [sys.executable, "-m", "pixelrelay", "status", job_id, "--wait"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    state = JobState(client, job_id, TEST_SIGNER)
    wait_until(lambda: state.counts().done >= 2, timeout=90, interval=0.05)

    cancelling = subprocess.Popen(
        [sys.executable, "-m", "pixelrelay", "cancel", job_id, "--grace", "30"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(state.cancelled, timeout=30, interval=0.01)
    cursor = state.cursor()
    stdout, stderr = cancelling.communicate(timeout=60)
    assert cancelling.returncode == ExitCode.OK, stderr
    assert (
        f"job {job_id}: cancelled: " in stdout and "manifest written anyway" not in stderr
    )  # the chains ended by themselves
    assert waiting.wait(60) == ExitCode.CANCELLED, waiting.stderr.read()

    rows = _manifest(out, job_id)
    assert [r["index"] for r in rows] == list(range(N_ITEMS))  # every item exactly once
    done = [r for r in rows if r["status"] == "done"]
    cancelled = [r for r in rows if r["status"] == "cancelled"]
    assert len(done) >= 2 and cancelled and len(done) + len(cancelled) == N_ITEMS, [r["status"] for r in rows]
    assert all(r["output"] is None and r["error"] == "job cancelled" for r in cancelled)
    assert _images(out) == {r["output"] for r in done}  # nothing partial, no temp file, nothing extra
    parts = sorted(int(p.name.split("-")[0]) for p in (out / "_jobs" / job_id / "parts").iterdir())
    assert state.cursor() == cursor and max(parts) < cursor  # nothing fed after the cancel
    assert not client.sismember(keys.ACTIVE_JOBS, job_id) and not client.exists(keys.chunks(job_id))
    assert RESENT not in workers.logs()

    status = run_cli(["status", job_id], env, timeout=60)
    assert status.returncode == ExitCode.CANCELLED and "state=cancelled" in status.stdout
    again = run_cli(["submit", str(src), "--out", str(out), "--job-id", job_id], env, timeout=60)
    assert again.returncode == ExitCode.USAGE and "was cancelled" in again.stderr

    # The same workers take the next job normally.
    assert workers.alive(), workers.logs()
    nxt = run_cli(
        ["submit", str(_folder(tmp_path / "next", 4)), "--out", str(tmp_path / "next-out"), "--wait"], env, timeout=120
    )
    assert nxt.returncode == ExitCode.OK, nxt.stderr + workers.logs()
    next_id = nxt.stdout.strip()
    assert [r["status"] for r in _manifest(tmp_path / "next-out", next_id)] == ["done"] * 4

    listed = _jobs(env)
    assert [j["job_id"] for j in listed[:2]] == [next_id, job_id]  # newest first
    first, second = listed[0], listed[1]
    assert (first["state"], first["done"], first["failed"], first["total"]) == ("finished", 4, 0, 4)
    assert (second["state"], second["done"], second["cancelled"], second["total"]) == (
        "cancelled",
        len(done),
        len(cancelled),
        N_ITEMS,
    )
    table = run_cli(["jobs"], env, timeout=60).stdout.splitlines()
    assert table[0].split() == ["JOB", "ID", "STATE", "DONE", "FAILED", "CANCELLED", "TOTAL", "AGE"]
    assert table[1].split()[:2] == [next_id, "finished"] and table[2].split()[:2] == [job_id, "cancelled"]


def test_jobs_lists_queued_and_cancelling_states(env):
    """No worker runs in this database's jobs here: a job that was submitted into it waits."""
    client = redis.Redis.from_url(env["PIXELRELAY_REDIS_URL"].rsplit("/", 1)[0] + "/13")
    client.flushdb()
    from pixelrelay.jobs.state import JobStatus, job_status
    from pixelrelay.pipeline.messages import JobSpec

    state = JobState(client, "q-" + uuid.uuid4().hex[:6], TEST_SIGNER)
    state.start_submission(JobSpec(job_id=state.job_id, input="/in", output="/out", total=3, chunk_size=2))
    info = state.info()
    now = float(info["submitted_at"])
    assert job_status(info, state.counts(), now + 1, 30) == JobStatus.QUEUED
    assert job_status(info, state.counts(), now + 31, 30) == JobStatus.STALLED
    state.cancel()
    assert job_status(state.info(), state.counts(), now + 1, 30) == JobStatus.CANCELLING
    listed = _jobs(dict(env, PIXELRELAY_REDIS_URL=env["PIXELRELAY_REDIS_URL"].rsplit("/", 1)[0] + "/13"))
    assert [(j["job_id"], j["state"], j["total"]) for j in listed] == [(state.job_id, "cancelling", 3)]
    client.flushdb()
