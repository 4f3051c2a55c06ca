"""The output folder on a full disk (a small tmpfs), then space comes back.

While the disk is full no output and no manifest part can be written: each chain's finish
retries its part, then leaves the chain in flight, its items unmarked (never failed without
their reason). Once the filler is removed the job completes by itself (retries, then the
sweep) with every item in the manifest exactly once. Needs root to mount the tmpfs; skipped
otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
import redis

from pixelrelay.exitcodes import ExitCode
from pixelrelay.jobs.state import JobState
from tests.conftest import WorkerPool, run_cli, wait_until, worker_env
from tests.images import good_images

pytestmark = pytest.mark.e2e

N_ITEMS = 12


@pytest.fixture()
def small_disk(tmp_path):
    """A 1 MiB tmpfs at ``tmp_path/out``, unmounted afterwards."""
    mount = tmp_path / "out"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> Path:
    """Fill the disk of ``folder`` to the last byte; returns the filler."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    with pytest.raises(OSError):  # nothing more fits
        (folder / "probe").write_bytes(b"x" * 4096)
    return filler


def _inputs(folder: Path, n: int) -> Path:
    for rel, data in good_images(n).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def test_a_full_disk_loses_no_manifest_line_and_the_job_completes_when_space_comes_back(
    redis_url, tmp_path, small_disk
):
    url = redis_url.rsplit("/", 1)[0] + "/15"
    client = redis.Redis.from_url(url)
    client.flushdb()
    env = worker_env(
        url,
        PIXELRELAY_CHUNK_SIZE="4",
        PIXELRELAY_LEASE_S="1",
        PIXELRELAY_SWEEP_INTERVAL_S="0.5",
        PIXELRELAY_MAX_RETRIES="1",
    )
    src = _inputs(tmp_path / "in", N_ITEMS)
    job_id = "full-" + uuid.uuid4().hex[:6]
    submitted = run_cli(["submit", str(src), "--out", str(small_disk), "--job-id", job_id], env, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    filler = _fill(small_disk)
    pool = WorkerPool(env, tmp_path, {"encoder": "analysis", "planner": "rules", "decoder": "classic"}).start()
    try:
        # two failed part writes: the first one's finish has gone as far as it goes
        wait_until(lambda: pool.logs(tail=None).count("cannot write the manifest part") >= 2, timeout=120, interval=0.5)
        state = JobState(client, job_id)
        counts = state.counts()
        assert (counts.done, counts.failed) == (0, 0), pool.logs()  # nothing marked without its line
        assert state.info().get("finished_at") is None

        full = run_cli(["status", job_id, "--wait", "--timeout", "3"], env, timeout=60)
        assert full.returncode == ExitCode.TIMEOUT, full.stderr  # the job waits for space; so does a watcher
        os.unlink(filler)  # space comes back
        waited = run_cli(["status", job_id, "--wait", "--timeout", "120"], env, timeout=180)
        assert waited.returncode in (0, 1), waited.stdout + waited.stderr + pool.logs()
    finally:
        pool.stop()
    rows = [json.loads(line) for line in (small_disk / "_jobs" / job_id / "manifest.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(N_ITEMS))  # every item exactly once
    failed = [r for r in rows if r["status"] == "failed"]
    # An output that could not be written fails with its reason; none fails for want of a part.
    assert all("cannot write output: StorageFullError: No space left" in r["error"] for r in failed), failed
    assert all(Path(r["output"]).exists() for r in rows if r["status"] == "done")
    counts = JobState(client, job_id).counts()
    assert (counts.total, counts.done, counts.failed) == (N_ITEMS, N_ITEMS - len(failed), len(failed))
    assert waited.returncode == (1 if failed else 0)


def test_submitting_to_a_full_disk_exits_with_the_storage_code(redis_url, tmp_path, small_disk):
    src = _inputs(tmp_path / "in", 2)
    _fill(small_disk)
    env = worker_env(redis_url.rsplit("/", 1)[0] + "/15")
    result = run_cli(["submit", str(src), "--out", str(small_disk), "--wait"], env, timeout=60)
    assert result.returncode == ExitCode.STORAGE, result.stderr  # not USAGE: nothing is wrong with the command
    assert "storage error" in result.stderr and "No space left on device" in result.stderr
