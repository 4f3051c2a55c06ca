"""Solo stage workers that tests stop, kill and replace one at a time (``Stages``), with the
settings of a fast-healing deployment (``SETTINGS``: short leases, a frequent sweep, slow
backends and small chunks, so a worker is caught mid-chunk)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from tests.conftest import REPO

SETTINGS = {
    "PIXELRELAY_PLUGINS": "tests.faults",
    "PIXELRELAY_LEASE_S": "2",
    "PIXELRELAY_SWEEP_INTERVAL_S": "0.5",
    "PIXELRELAY_TEST_SLOW_S": "0.15",
    "PIXELRELAY_CHUNK_SIZE": "2",
    "PIXELRELAY_WINDOW": "2",
    "PIXELRELAY_BATCH_SIZE": "2",
}


class Stages:
    """One solo ``pixelrelay worker`` per stage, with ``slow`` backends; any can be replaced."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env, self.logdir = env, logdir
        self.procs: dict[str, subprocess.Popen] = {}
        self.started = 0
        self.supervisors: list[tuple[threading.Event, threading.Thread]] = []

    def start(self, stage: str, *backend: str) -> None:
        """Start ``stage``'s worker; ``backend`` is its flag and value (default: ``slow``)."""
        self.started += 1
        log = open(self.logdir / f"{stage}-{self.started}.log", "wb")
        flag = {"encode": "--encoder", "plan": "--planner", "decode": "--decoder"}[stage]
        cmd = [
            sys.executable,
            "-m",
            "pixelrelay",
            "worker",
            "--stage",
            stage,
            *(backend or (flag, "slow")),
            "--loglevel",
            "WARNING",
        ]
        self.procs[stage] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

    def supervise(self, stage: str, backend: tuple[str, ...], exits: list[int]) -> threading.Event:
        """Restart ``stage``'s worker whenever it exits (recording its code) until the event is set."""
        stopping = threading.Event()

        def loop() -> None:
            while not stopping.wait(0.05):
                proc = self.procs.get(stage)
                if proc is not None and proc.poll() is not None and not stopping.is_set():
                    exits.append(proc.returncode)
                    self.start(stage, *backend)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        self.supervisors.append((stopping, thread))
        return stopping

    def stop(self, stage: str, sig: int) -> int:
        proc = self.procs.pop(stage)
        proc.send_signal(sig)
        return proc.wait(30)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(self.logdir.glob("*.log")))

    def stop_all(self) -> None:
        for stopping, thread in self.supervisors:
            stopping.set()
            thread.join(10)
        for stage in list(self.procs):
            proc = self.procs.pop(stage)
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
