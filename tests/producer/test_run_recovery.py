"""``pixelrelay run`` survives its own parts dying and leaves nothing behind: a worker
SIGKILLed mid-job is started again (its log is kept); ``run`` itself SIGKILLed takes its
workers and embedded Redis with it, and run again resumes the same job from the embedded
Redis's append-only file, with one Redis on the state folder at any time; a second run on
the same output is refused while one holds it; SIGTERM leaves no redis-server or worker
behind. The embedded Redis is the run's alone: another local user can neither use it nor
read its state, and its password is in no process's argv. Real subprocesses, local folders,
slow test backends.

Measured on a shared, loaded 2-core machine: a SIGKILLed run's workers and Redis are gone
0.1-0.2 s later; a killed decode worker is back in 0.5 s and the job done 15-25 s later; the
resumed run finishes the job 35-55 s after it starts (worker start-up, lease expiry).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, wait_until, worker_env
from tests.images import good_images
from tests.workers.stages import SETTINGS

pytestmark = pytest.mark.e2e

N_ITEMS = 8
SLOW = ["--encoder", "slow", "--planner", "slow", "--decoder", "slow"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = worker_env("", XDG_STATE_HOME=str(tmp_path / "state"), **SETTINGS)
    env.pop("PIXELRELAY_REDIS_URL")
    return env


def _state(tmp_path: Path) -> Path:
    (folder,) = (tmp_path / "state" / "pixelrelay").iterdir()
    return folder


@pytest.fixture
def open_tmp(tmp_path):
    """A tmp_path any local user can reach (pytest's own is 0700): only the run's own
    permissions then stand between another user and its state."""
    top = Path(tempfile.mkdtemp(prefix="pixelrelay-open-"))
    top.chmod(0o755)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def _inputs(folder: Path) -> None:
    folder.mkdir()
    for rel, data in good_images(N_ITEMS).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)


def _start_run(tmp_path: Path, log: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pixelrelay", "run", str(tmp_path / "in"), "--out", str(tmp_path / "out"), *SLOW]
    err = open(tmp_path / log, "w")
    return subprocess.Popen(
        cmd, env=_env(tmp_path), cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True
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


def _alive(pids) -> list[int]:
    return [p for p in pids if Path(f"/proc/{p}").exists() and Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"]


def _redis_servers(folder: Path) -> list[int]:
    """Live redis-server processes working in ``folder``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and "redis-server" in (entry / "cmdline").read_text(errors="replace"):
                if os.readlink(entry / "cwd") == str(folder):
                    found.append(int(entry.name))
        except OSError:
            continue
    return _alive(found)


class _MostRedis:
    """The most redis-server processes seen at once on a state folder, sampled in a thread."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path, self.most, self.done = tmp_path, 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.wait(0.1):
            root = self.tmp_path / "state" / "pixelrelay"
            for folder in root.iterdir() if root.exists() else ():
                self.most = max(self.most, len(_redis_servers(folder)))

    def stop(self) -> int:
        self.done.set()
        self.thread.join(5)
        return self.most


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
    redis_servers = _MostRedis(tmp_path)
    first = _start_run(tmp_path, "run1.log")
    job_id = first.stdout.readline().strip()
    assert job_id, (tmp_path / "run1.log").read_text()
    wait_until(lambda: _parts(tmp_path, job_id) >= 1, timeout=60, interval=0.05)
    children = _children(first.pid)
    assert len(children) == 4 and len(_redis_servers(_state(tmp_path))) == 1, children  # 3 workers, Redis
    killed_at = time.monotonic()
    os.kill(first.pid, signal.SIGKILL)  # `run` alone, mid-job, as the OOM killer would
    first.wait(10)
    wait_until(lambda: not _alive(children), timeout=10, interval=0.05)
    orphans_s = time.monotonic() - killed_at
    assert not (tmp_path / "out" / "_jobs" / job_id / "manifest.jsonl").exists()

    started_at = time.monotonic()
    second = _start_run(tmp_path, "run2.log")
    assert second.stdout.readline().strip() == job_id  # the same job, not a new one
    assert len(_redis_servers(_state(tmp_path))) == 1
    parts = _parts(tmp_path, job_id)
    wait_until(lambda: _parts(tmp_path, job_id) > parts, timeout=60, interval=0.05)  # mid-job again
    _, restarted_s = _kill_decode_worker(second)
    killed_at = time.monotonic()
    assert second.wait(120) == 0, (tmp_path / "run2.log").read_text()
    err = (tmp_path / "run2.log").read_text()
    assert f"resuming job {job_id}" in err
    assert "the decode worker exited with code -9; starting it again" in err
    logdir = err.split("worker logs kept in ", 1)[1].split()[0]  # a worker died: its log is kept
    assert (Path(logdir) / "decode.log").exists()
    _check(tmp_path, job_id, max_redone=4)  # at most the window (2 chunks of 2) was done twice
    assert not _redis_servers(_state(tmp_path)) and redis_servers.stop() == 1  # never two on the folder
    print(
        f"\nrun: SIGKILLed run's workers and Redis gone {orphans_s:.1f} s after; resumed run finished in "
        f"{time.monotonic() - started_at:.1f} s; killed decode worker restarted in {restarted_s:.1f} s, job done "
        f"{time.monotonic() - killed_at:.1f} s after the kill"
    )


_NOBODY = r"""
import json, os, socket, sys
folder, path = sys.argv[1], sys.argv[2]
seen = {}
for name in ("signing.key", "redis.password", "run.json", "appendonlydir", "redis.conf"):
    try:
        open(os.path.join(folder, name)).read()
        seen[name] = "read"
    except OSError as exc:
        seen[name] = type(exc).__name__
with socket.socket(socket.AF_UNIX) as s:
    try:
        s.connect(path)
        seen["connect"] = "connected"
    except OSError as exc:
        seen["connect"] = type(exc).__name__
print(json.dumps(seen))
"""


PYTHON = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)), "")


def _as_nobody(folder: Path, path: str) -> dict[str, str]:
    def drop() -> None:
        os.setgid(65534)
        os.setuid(65534)

    result = subprocess.run(
        [PYTHON, "-I", "-c", _NOBODY, str(folder), path],
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=drop,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another local user (nobody) needs root")
@pytest.mark.skipif(not PYTHON, reason="no system python3 that the user nobody can run")
def test_run_redis_and_state_are_the_operators_alone_and_one_run_at_a_time(open_tmp):
    tmp_path = open_tmp
    _inputs(tmp_path / "in")
    run = _start_run(tmp_path, "run.log")
    assert run.stdout.readline().strip()
    folder = _state(tmp_path)
    password = (folder / "redis.password").read_text()
    assert len(password) >= 32 and stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in folder.iterdir() if p.is_file()), list(folder.iterdir())
    conf = (folder / "redis.conf").read_text().splitlines()
    assert "port 0" in conf  # no TCP listener: a unix socket in the 0700 folder
    path = next(line for line in conf if line.startswith("unixsocket "))[len("unixsocket ") :].strip('"')
    seen = _as_nobody(folder, path)
    assert all(seen[name] == "PermissionError" for name in ("signing.key", "redis.password", "run.json")), seen
    assert seen["connect"] == "PermissionError", seen
    for entry in Path("/proc").iterdir():  # no process shows the password in its argv
        if entry.name.isdigit():
            try:
                assert password not in (entry / "cmdline").read_text(errors="replace"), entry
            except OSError:
                continue
    second = subprocess.run(
        [sys.executable, "-m", "pixelrelay", "run", str(tmp_path / "in"), "--out", str(tmp_path / "out"), *SLOW],
        env=_env(tmp_path),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2 and f"another pixelrelay run (pid {run.pid}) is using this output" in second.stderr
    assert len(_redis_servers(folder)) == 1
    run.send_signal(signal.SIGTERM)
    assert run.wait(60) == 130
    logdir = (tmp_path / "run.log").read_text().split("worker logs kept in ", 1)[1].split()[0]
    assert not any(password in p.read_text(errors="replace") for p in Path(logdir).iterdir())


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
