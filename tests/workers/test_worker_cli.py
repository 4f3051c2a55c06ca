"""The worker's command lines: the lazily created Celery app (in-process and through
``celery -A pixelrelay.workers``), and ``--device`` checked before any model loads."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pixelrelay.workers.celery_app import get_app, task_name
from tests.conftest import REPO, run_cli, worker_env


def test_importing_the_workers_needs_no_settings_and_the_app_comes_on_first_use(redis_url, monkeypatch):
    code = "import pixelrelay.workers, pixelrelay.workers.tasks, pixelrelay.workers.policy; print('ok')"
    env = worker_env(redis_url)
    del env["PIXELRELAY_REDIS_URL"]
    imported = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert imported.stdout.strip() == "ok", imported.stderr

    monkeypatch.setenv("PIXELRELAY_REDIS_URL", redis_url)
    get_app.cache_clear()
    try:
        import pixelrelay.workers as workers

        app = workers.app
        assert app is get_app() is workers.celery  # one app per process
        assert {task_name(s) for s in ("encode", "plan", "decode")} <= set(app.tasks)
        assert app.conf.broker_url == redis_url
    finally:
        get_app.cache_clear()


def _celery(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "pixelrelay.workers", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_celery_cli_finds_the_app_and_the_stage_workers_ignore_remote_control(stage_workers, redis_url):
    # Remote control is off unless `pixelrelay worker --remote-control` (tests/test_signing.py
    # starts one that answers): the app loads, and every stage worker refuses the ping.
    env = worker_env(redis_url)
    replies = _celery(["inspect", "ping", "--timeout", "2"], env)
    assert "pong" not in replies.stdout + replies.stderr, replies.stdout
    assert "Unable to load celery application" not in replies.stdout + replies.stderr


@pytest.mark.e2e
def test_worker_on_a_machine_without_cuda_exits_2_with_one_line(redis_url):
    import torch

    if torch.cuda.device_count() > 0:
        pytest.skip("this machine has a CUDA device")
    result = run_cli(["worker", "--stage", "encode", "--device", "cuda"], worker_env(redis_url), timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("pixelrelay worker: --device cuda: no usable CUDA device (torch ")
