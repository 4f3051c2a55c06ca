"""A worker whose model isn't what it claims does not start: ``pixelrelay worker --stage
decode`` with an ``hf-sr:`` folder whose weights don't fit its config, or a ``spandrel:``
checkpoint holding pickled code, exits promptly with the configuration code and one line on
stderr, no traceback, and the pickled code never runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from pixelrelay.exitcodes import ExitCode
from tests.conftest import REPO, worker_env
from tests.pipeline import spandrel_fixtures as sf
from tests.pipeline.hf_fixtures import make_tiny_swin2sr

pytestmark = pytest.mark.e2e


def _renamed_swin2sr(folder):
    make_tiny_swin2sr(folder)
    weights = folder / "model.safetensors"
    save_file({"x." + k: v for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    return f"hf-sr:{folder}"


def _evil_checkpoint(folder):
    return f"spandrel:{sf.evil_pickle(folder / 'evil.pth', folder / 'PWNED')}"


@pytest.mark.parametrize(
    ("make", "says"),
    [(_renamed_swin2sr, "do not match its config"), (_evil_checkpoint, "would run pickled code")],
    ids=["hf-sr-mismatched-folder", "spandrel-pickled-code"],
)
def test_the_worker_refuses_the_model_with_one_line_and_the_config_exit_code(redis_url, tmp_path, make, says):
    spec = make(tmp_path / "model")
    cmd = [sys.executable, "-m", "pixelrelay", "worker", "--stage", "decode", "--decoder", spec]
    done = subprocess.run(cmd, env=worker_env(redis_url), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == ExitCode.USAGE, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip() and " INFO " not in line]
    assert len(lines) == 1, done.stderr  # the start-up INFO lines aside
    assert lines[0].startswith("pixelrelay worker: stage decode:") and says in lines[0]
    assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "model" / "PWNED").exists()


def test_a_prefork_worker_stops_when_its_children_refuse_the_model(redis_url, tmp_path):
    spec = _renamed_swin2sr(tmp_path / "model")
    cmd = [sys.executable, "-m", "pixelrelay", "worker", "--stage", "decode", "--decoder", spec, "--concurrency", "2"]
    proc = subprocess.Popen(
        cmd,
        env=worker_env(redis_url),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("a prefork worker whose children refuse the model kept running")
    assert proc.returncode == ExitCode.USAGE, err
    lines = [line for line in err.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("pixelrelay worker:")]
    assert ours == lines[-1:], err  # one line, the last (Celery's start-up notes aside)
    assert ours[0].startswith("pixelrelay worker: stage decode:") and "do not match its config" in ours[0]
    assert not [line for line in lines if " ERROR " in line or " CRITICAL " in line], err
    assert "Traceback" not in out + err
