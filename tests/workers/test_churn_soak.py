"""A churn soak: a job of a few hundred small items while a random stage worker is SIGKILLed
or SIGTERMed every few seconds and replaced (real ``pixelrelay worker`` subprocesses, real
Redis, a local output folder), some kills timed to land while the decode worker writes.

The job must end with nobody acting, and then: every item exactly once in the manifest, all
done; one output (and its hidden sidecar) per item in the folder and nothing else, no
``.pixelrelay-*.part`` file; the done bitmap, the counts and the manifest's figures agree
exactly. The kills come from a fixed seed (``PIXELRELAY_SOAK_SEED`` replays another); a
failure prints the seed and the kill log. With leases of 2 s and a sweep every 0.5 s a lost
chunk moves on within ~3 s; the test takes about 75 s on 2 loaded cores.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from pixelrelay.jobs import keys
from pixelrelay.jobs.state import JobState
from tests.conftest import REPO, worker_env
from tests.images import photo_like
from tests.workers.stages import Stages

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DB = 10
ITEMS = 240
KILLS = 12
SEED = int(os.environ.get("PIXELRELAY_SOAK_SEED", "2718"))
SETTINGS = {
    "PIXELRELAY_PLUGINS": "tests.faults",
    "PIXELRELAY_LEASE_S": "2",
    "PIXELRELAY_SWEEP_INTERVAL_S": "0.5",
    "PIXELRELAY_TEST_SLOW_S": "0.02",
    "PIXELRELAY_CHUNK_SIZE": "8",
    "PIXELRELAY_BATCH_SIZE": "4",
    "PIXELRELAY_WINDOW": "4",
}
STAGES = ("encode", "plan", "decode")
PART = ".pixelrelay-"


class Churn:
    """Kills a random worker every few seconds (seeded) and starts its replacement at once."""

    def __init__(self, stages: Stages, out: Path, seed: int) -> None:
        self.stages, self.out, self.rng = stages, out, random.Random(seed)
        self.log: list[str] = []
        self.t0 = time.monotonic()

    def _outputs(self) -> tuple[int, bool]:
        names = [p.name for p in self.out.iterdir()] if self.out.exists() else []
        return sum(1 for n in names if not n.startswith((".", "_"))), any(n.startswith(PART) for n in names)

    def _mid_write(self, until: float) -> bool:
        """Wait (up to ``until``) for the decode worker to be writing: a ``.part`` file or a new output."""
        before, _ = self._outputs()
        while time.monotonic() < until:
            count, part = self._outputs()
            if part or count > before:
                return True
            time.sleep(0.003)
        return False

    def kill_one(self, finished) -> None:
        time.sleep(self.rng.uniform(2.0, 4.0))
        stage = self.rng.choice((*STAGES, "decode"))  # decode twice as often: its kills can land mid-write
        timed = stage == "decode" and self.rng.random() < 0.75
        sig = signal.SIGKILL if timed or self.rng.random() < 0.6 else signal.SIGTERM
        if timed and not self._mid_write(time.monotonic() + 5):
            timed = False
        if finished():
            return
        code = self.stages.stop(stage, sig)
        self.stages.start(stage)
        mark = " mid-write" if timed else ""
        self.log.append(f"{time.monotonic() - self.t0:6.1f}s {stage} {signal.Signals(sig).name}{mark} exit {code}")


def _inputs(folder: Path) -> set[str]:
    folder.mkdir()
    for i in range(ITEMS):
        photo_like(12 + i % 5, 10 + i % 3, i).save(folder / f"{i:03d}.png")
    return {f"{i:03d}.png" for i in range(ITEMS)}


def _finished(client: redis.Redis, job_id: str) -> bool:
    info = JobState(client, job_id).info()
    return bool(info.get("finished_at")) and info.get("finished_seq") == info.get("seq")


def _check(client: redis.Redis, job_id: str, out: Path, names: set[str]) -> None:
    manifest = out / "_jobs" / job_id / "manifest.jsonl"
    assert manifest.exists(), "no manifest"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(ITEMS)), "items lost or duplicated in the manifest"
    assert all(r["status"] == "done" for r in rows), [r.get("error") for r in rows if r["status"] != "done"]
    debris = sorted(str(p.relative_to(out)) for p in out.rglob(f"{PART}*"))
    assert not debris, f"temp files left: {debris}"
    outputs = {p.name for p in out.iterdir() if p.name != "_jobs" and not p.name.startswith(".")}
    assert outputs == names, f"outputs differ: extra {outputs - names}, missing {names - outputs}"
    hidden = {p.name for p in out.iterdir() if p.name.startswith(".")}
    assert hidden == {f".{n}.pixelrelay.json" for n in names}, f"hidden files other than sidecars: {hidden}"
    assert int(client.bitcount(keys.done_bits(job_id))) == ITEMS
    assert int(client.bitcount(keys.failed_bits(job_id))) == 0
    counts = JobState(client, job_id).counts()
    assert (counts.total, counts.done, counts.failed) == (ITEMS, ITEMS, 0)
    info = JobState(client, job_id).info()
    assert (info["manifest_done"], info["manifest_failed"], info["manifest_missing"]) == (str(ITEMS), "0", "0")
    assert not client.sismember(keys.ACTIVE_JOBS, job_id) and not client.exists(keys.chunks(job_id))


def _state(client: redis.Redis, job_id: str, out: Path) -> str:
    counts = JobState(client, job_id).counts()
    parts = sorted(p.name for p in out.rglob(f"{PART}*")) if out.exists() else []
    return (
        f"counts done={counts.done} failed={counts.failed} total={counts.total}; "
        f"info {JobState(client, job_id).info()}; chunks {client.hgetall(keys.chunks(job_id))}; "
        f"queues { {s: client.llen(f'pixelrelay.{s}') for s in STAGES} }; parts {parts[:10]}"
    )


def test_a_churn_of_killed_workers_ends_with_every_item_once_and_nothing_left_behind(redis_url, tmp_path):
    url = redis_url.rsplit("/", 1)[0] + f"/{DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    names = _inputs(tmp_path / "in")
    out = tmp_path / "out"
    logdir = tmp_path / "logs"
    logdir.mkdir()
    stages = Stages(worker_env(url, **SETTINGS), logdir)
    for stage in STAGES:
        stages.start(stage)
    job_id = "soak-" + uuid.uuid4().hex[:8]
    churn = Churn(stages, out, SEED)
    started = time.monotonic()
    try:
        cmd = [sys.executable, "-m", "pixelrelay", "submit", str(tmp_path / "in"), "--out", str(out)]
        submit = subprocess.run([*cmd, "--job-id", job_id], env=stages.env, cwd=REPO, capture_output=True, timeout=60)
        assert submit.returncode == 0, submit.stderr
        while len(churn.log) < KILLS and not _finished(client, job_id):
            churn.kill_one(lambda: _finished(client, job_id))
        deadline = time.monotonic() + 90
        while not _finished(client, job_id) and time.monotonic() < deadline:
            time.sleep(0.2)
        wall = time.monotonic() - started
        replay = f"seed {SEED} (PIXELRELAY_SOAK_SEED), kills:\n" + "\n".join(churn.log)
        if not _finished(client, job_id):
            pytest.fail(f"job not finished {wall:.0f} s after submit; {replay}\n{_state(client, job_id, out)}")
        try:
            _check(client, job_id, out, names)
        except AssertionError as err:
            pytest.fail(f"{err}\n{replay}\n{_state(client, job_id, out)}")
    finally:
        stages.stop_all()
    print(f"\nchurn soak: {ITEMS} items, {len(churn.log)} kills, job done {wall:.1f} s after submit\n{replay}")
