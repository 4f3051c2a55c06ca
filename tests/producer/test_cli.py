"""The CLI surface: exit codes, fast start without torch, status, and `pixelrelay run`."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

from PIL import Image

from tests.conftest import REPO, run_cli, worker_env


def test_bad_setting_fails_fast_and_names_itself(tmp_path):
    env = worker_env("redis://127.0.0.1:1/0", PIXELRELAY_REDIS_URL="http://nope", PIXELRELAY_WINDOW="0")
    result = run_cli(["submit", str(tmp_path), "--out", str(tmp_path / "o")], env, timeout=60)
    assert result.returncode == 2
    assert "PIXELRELAY_REDIS_URL" in result.stderr and "PIXELRELAY_WINDOW" in result.stderr
    result = run_cli(["worker", "--stage", "encode", "--device", "tpu"], env, timeout=60)
    assert result.returncode == 2 and "--device" in result.stderr


def test_missing_input_is_a_usage_error(redis_url, tmp_path):
    result = run_cli(["submit", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], worker_env(redis_url), timeout=60)
    assert result.returncode == 2 and "not a folder" in result.stderr


def test_submit_never_imports_torch(redis_url, tmp_path):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / "a.png")
    code = (
        "import sys; from producer.cli import main; "
        f"rc = main(['submit', {str(tmp_path / 'in')!r}, '--out', {str(tmp_path / 'out')!r}]); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code], env=worker_env(redis_url), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()  # the job id


def test_status_of_unknown_job(redis_url):
    result = run_cli(["status", "no-such-job-" + uuid.uuid4().hex[:6]], worker_env(redis_url), timeout=60)
    assert result.returncode == 2 and "unknown job" in result.stdout


def test_run_local_folder_with_embedded_redis_and_default_backends(tmp_path):
    env = worker_env("")
    env.pop("PIXELRELAY_REDIS_URL")
    assert run_cli(["demo", str(tmp_path / "in"), "--count", "6"], env, timeout=60).returncode == 0
    job_id = "run-" + uuid.uuid4().hex[:6]
    result = run_cli(
        ["run", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--task", "upscale", "--job-id", job_id],
        env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == job_id
    rows = [json.loads(line) for line in (tmp_path / "out" / "_jobs" / job_id / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["status"] == "done" for r in rows)
    # No backend flags: the shipped, trained models are the defaults.
    assert all(r["backends"] == {"encoder": "builtin", "planner": "rules", "decoder": "builtin"} for r in rows)
    for row in rows:
        src, dst = Image.open(row["input"]), Image.open(row["output"])
        assert dst.size == (src.width * 2, src.height * 2)
    assert not list((tmp_path / "out").glob("**/.pixelrelay-*"))  # no temp files visible
