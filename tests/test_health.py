"""``pixelrelay health`` checks this host's own worker: each worker keeps a heartbeat file
named by its stage, so a stopped encode worker fails ``--stage encode`` while decode's
passes, and a check without ``--stage`` fails while any worker started here is stale."""

from __future__ import annotations

import os
import time

from pixelrelay.health import health_path
from pixelrelay.producer.cli import main


def _beat(path: str, age_s: float) -> None:
    with open(path, "a"):
        pass
    then = time.time() - age_s
    os.utime(path, (then, then))


def test_each_worker_has_its_own_heartbeat_and_a_stopped_one_fails_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIXELRELAY_HEALTH_FILE", str(tmp_path / "worker.health"))
    assert health_path("decode") == str(tmp_path / "worker-decode.health")
    assert main(["health"]) == 1 and "no heartbeat file" in capsys.readouterr().err  # no worker here
    _beat(health_path("decode"), 1)
    _beat(health_path("encode"), 1)
    assert main(["health", "--stage", "encode"]) == 0 and main(["health"]) == 0
    _beat(health_path("encode"), 300)  # the encode worker was stopped 5 minutes ago
    assert main(["health", "--stage", "encode", "--max-age", "60"]) == 1
    assert "worker-encode.health is 300s old" in capsys.readouterr().err
    assert main(["health", "--stage", "decode", "--max-age", "60"]) == 0
    assert main(["health", "--max-age", "60"]) == 1  # this host runs a stale worker
    assert main(["health", "--stage", "plan"]) == 1  # none started here
