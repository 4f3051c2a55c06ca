"""``pixelrelay run`` survives its own parts dying: a worker SIGKILLed mid-job is started
again; the whole run (its process group: run, workers, embedded Redis) SIGKILLed and run
again resumes the same job from the embedded Redis's append-only file; SIGTERM leaves no
redis-server or worker behind. Real subprocesses, local folders, slow test backends.

Measured on a 2-core machine: a killed decode worker is back and the job done about 5-10 s
later; the resumed run finishes the job about 10-15 s after it starts (worker start-up).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, wait_until, worker_env
from tests.images import good_images
from tests.workers.stages import SETTINGS

pytestmark = pytest.mark.e2e

N_ITEMS = 8
SLOW = ["--encoder", "slow", "--planner", "slow", "--decoder", "slow"]


def _env() -> dict[str, str]:
    env = worker_env("", **SETTINGS)
    env.pop("PIXELRELAY_REDIS_URL")
    return env


def _inputs(folder: Path) -> None:
    folder.mkdir()
    for rel, data in good_images(N_ITEMS).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)


def _start_run(tmp_path: Path, log: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pixelrelay", "run", str(tmp_path / "in"), "--out", str(tmp_path / "out"), *SLOW]
    err = open(tmp_path / log, "w")
    return subprocess.Popen(
        cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True
    )  # its own process group, with its workers and Redis


def _children(pid: int) -> dict[int, str]:
    """Processes whose parent is ``pid``: pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return found


def _in_group(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid and (entry / "stat").read_text().split()[2] != "Z":
                    pids.append(int(entry.name))
            except (OSError, IndexError):
                continue
    return pids


def _parts(tmp_path: Path, job_id: str) -> int:
    return len(list((tmp_path / "out" / "_jobs" / job_id / "parts").glob("*.jsonl")))


def _check(tmp_path: Path, job_id: str, max_redone: int) -> None:
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "_jobs" / job_id / "manifest.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(N_ITEMS))  # every item exactly once
    assert all(r["status"] == "done" for r in rows), [r["error"] for r in rows]
    outcomes = [r["outcome"] for r in rows]
    assert set(outcomes) <= {"processed", "reused"} and outcomes.count("reused") <= max_redone, outcomes
    images = sorted(
        str(p)
        for p in out.rglob("*")
        if p.is_file() and not str(p.relative_to(out)).startswith("_") and not p.name.startswith(".")
    )
    assert images == sorted(r["output"] for r in rows)  # one output per item
    assert not list(out.glob("**/.pixelrelay-*"))  # nothing partial


def _kill_decode_worker(run: subprocess.Popen) -> tuple[int, float]:
    decode = next(pid for pid, cmd in _children(run.pid).items() if "--stage decode" in cmd)
    killed_at = time.monotonic()
    os.kill(decode, signal.SIGKILL)
    wait_until(lambda: any("--stage decode" in c for p, c in _children(run.pid).items() if p != decode), timeout=10)
    return decode, time.monotonic() - killed_at


def test_run_resumes_after_being_killed_and_restarts_a_killed_worker(tmp_path):
    _inputs(tmp_path / "in")
    first = _start_run(tmp_path, "run1.log")
    job_id = first.stdout.readline().strip()
    assert job_id, (tmp_path / "run1.log").read_text()
    wait_until(lambda: _parts(tmp_path, job_id) >= 1, timeout=60, interval=0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the run and everything it started, mid-job
    first.wait(10)
    wait_until(lambda: not _in_group(first.pid), timeout=10)
    assert not (tmp_path / "out" / "_jobs" / job_id / "manifest.jsonl").exists()

    started_at = time.monotonic()
    second = _start_run(tmp_path, "run2.log")
    assert second.stdout.readline().strip() == job_id  # the same job, not a new one
    parts = _parts(tmp_path, job_id)
    wait_until(lambda: _parts(tmp_path, job_id) > parts, timeout=60, interval=0.05)  # mid-job again
    _, restarted_s = _kill_decode_worker(second)
    killed_at = time.monotonic()
    assert second.wait(120) == 0, (tmp_path / "run2.log").read_text()
    err = (tmp_path / "run2.log").read_text()
    assert f"resuming job {job_id}" in err
    assert "the decode worker exited with code -9; starting it again" in err
    _check(tmp_path, job_id, max_redone=4)  # at most the window (2 chunks of 2) was done twice
    print(
        f"\nrun: resumed run finished in {time.monotonic() - started_at:.1f} s; killed decode worker restarted "
        f"in {restarted_s:.1f} s, job done {time.monotonic() - killed_at:.1f} s after the kill"
    )


def test_run_sigterm_leaves_no_orphans(tmp_path):
    _inputs(tmp_path / "in")
    run = _start_run(tmp_path, "run.log")
    assert run.stdout.readline().strip()
    group = _in_group(run.pid)
    assert any("redis-server" in (Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")) for p in group)
    assert len(group) >= 5  # run, three workers, redis-server
    run.send_signal(signal.SIGTERM)
    assert run.wait(60) == 130
    wait_until(lambda: not _in_group(run.pid), timeout=10)
    assert "worker logs kept in" in (tmp_path / "run.log").read_text()
