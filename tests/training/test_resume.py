"""Resumable training (``training.checkpoint``): a run stopped by SIGTERM or killed by SIGKILL
goes on from its checkpoint when started again, and ends with exactly the weights of a run
that never stopped; a checkpoint from another config is refused."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from pixelrelay.pipeline import nets
from pixelrelay.training import checkpoint, train
from tests.conftest import wait_until
from tests.training.helpers import TINY, write_images

STEPS = 12


def _setup(tmp_path, kind="decoder", **overrides):
    write_images(tmp_path / "data" / "set", 6)
    cfg = {**TINY[kind], "steps": STEPS, "val_every": 4, "log_every": 2, "checkpoint_every": 2, **overrides}
    path = tmp_path / f"{kind}.json"
    path.write_text(json.dumps(cfg))
    return ["--data", str(tmp_path / "data"), "--config", str(path), "--quiet"]


def _weights(path):
    net, _ = nets.load_model(str(path))
    return {k: v.clone() for k, v in net.state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_sigterm_saves_and_the_next_run_ends_where_an_unbroken_one_does(tmp_path, kind, monkeypatch):
    args = [kind, *_setup(tmp_path, kind)]
    assert train.main(args + ["--out", str(tmp_path / "straight.safetensors")]) == 0

    out = tmp_path / "resumed.safetensors"
    real_loss = train.optimise
    calls = {"n": 0}

    def optimise_with_sigterm(run, objective, *a, **kw):
        def loss_then_signal():
            calls["n"] += 1
            if calls["n"] == 5:  # mid-run, between checkpoints (every 2 steps)
                os.kill(os.getpid(), signal.SIGTERM)
            return objective.batch_loss()

        return real_loss(run, dataclasses.replace(objective, batch_loss=loss_then_signal), *a, **kw)

    monkeypatch.setattr(train, "optimise", optimise_with_sigterm)
    assert train.main(args + ["--out", str(out)]) == 128 + signal.SIGTERM
    monkeypatch.undo()
    log = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert log[-1]["event"] == "stopped" and log[-1]["step"] == 5  # the step under way finished, then saved
    assert train.main(args + ["--out", str(out)]) == 0
    log = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r.get("event") == "resume"] == [5]
    assert [r["step"] for r in log if "loss" in r] == [2, 4, 6, 8, 10, 12]  # one log, appended
    _assert_same(_weights(out), _weights(tmp_path / "straight.safetensors"))


@pytest.mark.e2e
def test_sigkill_loses_only_the_steps_since_the_last_checkpoint(tmp_path):
    args = ["decoder", *_setup(tmp_path, steps=160, val_every=80, log_every=10, checkpoint_every=10)]
    out = tmp_path / "killed.safetensors"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pixelrelay", "train", *args, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    ckpt = checkpoint.path_for(out)
    wait_until(lambda: ckpt.exists() or proc.poll() is not None, timeout=120, interval=0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    assert train.main(args + ["--out", str(out)]) == 0
    log = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    resumed = [r["step"] for r in log if r.get("event") == "resume"]
    assert len(resumed) == 1 and 10 <= resumed[0] < 160 and resumed[0] % 10 == 0
    assert train.main(args + ["--out", str(tmp_path / "straight.safetensors")]) == 0
    _assert_same(_weights(out), _weights(tmp_path / "straight.safetensors"))


def test_a_checkpoint_from_another_config_is_refused_unless_fresh(tmp_path, capsys):
    args = ["decoder", *_setup(tmp_path, steps=4)]
    out = tmp_path / "m.safetensors"
    assert train.main(args + ["--out", str(out)]) == 0
    other = json.loads((tmp_path / "decoder.json").read_text()) | {"lr": 5e-4}
    (tmp_path / "decoder.json").write_text(json.dumps(other))
    assert train.main(args + ["--out", str(out)]) == 2
    assert "another kind, seed or config" in capsys.readouterr().err
    assert train.main(args + ["--out", str(out), "--fresh"]) == 0


def test_a_checkpoint_is_read_without_running_pickled_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"format": 1, "payload": Payload()}, path)
    net = nets.build("decoder", TINY["decoder"]["net"])
    opt = torch.optim.Adam(net.parameters())
    import pickle

    import numpy as np

    with pytest.raises(pickle.UnpicklingError):  # weights_only: the payload is refused, never run
        checkpoint.load(path, "x", net, opt, np.random.default_rng(0))
    assert not (tmp_path / "pwned").exists()
