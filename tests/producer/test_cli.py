"""The CLI surface: exit codes, help, fast start without torch, status, timeouts, empty
inputs, output quality flags, and `pixelrelay run` (and where its worker logs go)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import uuid

import pytest
from PIL import Image

from pixelrelay.exitcodes import ExitCode
from pixelrelay.producer.cli import main
from tests.conftest import REPO, run_cli, worker_env


@pytest.mark.e2e
def test_bad_setting_fails_fast_and_names_itself(tmp_path):
    env = worker_env("redis://127.0.0.1:1/0", PIXELRELAY_REDIS_URL="http://nope", PIXELRELAY_WINDOW="0")
    result = run_cli(["submit", str(tmp_path), "--out", str(tmp_path / "o")], env, timeout=60)
    assert result.returncode == 2
    assert "PIXELRELAY_REDIS_URL" in result.stderr and "PIXELRELAY_WINDOW" in result.stderr
    result = run_cli(["worker", "--stage", "encode", "--device", "tpu"], env, timeout=60)
    assert result.returncode == 2 and "--device" in result.stderr


@pytest.mark.e2e
def test_missing_input_is_a_usage_error(redis_url, tmp_path):
    result = run_cli(
        ["submit", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], worker_env(redis_url), timeout=60
    )
    assert result.returncode == 2 and "not a folder" in result.stderr


@pytest.mark.e2e
def test_submit_never_imports_torch(redis_url, tmp_path):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / "a.png")
    code = (
        "import sys; from producer.cli import main; "
        f"rc = main(['submit', {str(tmp_path / 'in')!r}, '--out', {str(tmp_path / 'out')!r}]); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=worker_env(redis_url), cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()  # the job id


@pytest.mark.e2e
def test_status_of_unknown_job(redis_url):
    result = run_cli(["status", "no-such-job-" + uuid.uuid4().hex[:6]], worker_env(redis_url), timeout=60)
    assert result.returncode == 2 and "unknown job" in result.stdout


@pytest.mark.e2e
def test_run_local_folder_with_embedded_redis_and_default_backends(tmp_path):
    env = worker_env("")
    env.pop("PIXELRELAY_REDIS_URL")
    env.pop("PIXELRELAY_TORCH_THREADS")  # run shares the cores itself (workers.balance)
    assert run_cli(["demo", str(tmp_path / "in"), "--count", "6"], env, timeout=60).returncode == 0
    job_id = "run-" + uuid.uuid4().hex[:6]
    result = run_cli(
        [
            "run",
            str(tmp_path / "in"),
            "--out",
            str(tmp_path / "out"),
            "--task",
            "upscale",
            "--job-id",
            job_id,
            "--chunk-size",
            "2",
            "--keep-logs",
        ],
        env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == job_id
    rows = [
        json.loads(line) for line in (tmp_path / "out" / "_jobs" / job_id / "manifest.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 6 and all(r["status"] == "done" for r in rows)
    # No backend flags: the shipped, trained models are the defaults.
    assert all(r["backends"] == {"encoder": "builtin", "planner": "rules", "decoder": "builtin"} for r in rows)
    for row in rows:
        src, dst = Image.open(row["input"]), Image.open(row["output"])
        assert dst.size == (src.width * 2, src.height * 2)
    assert not list((tmp_path / "out").glob("**/.pixelrelay-*"))  # no temp files visible
    logdir = re.search(r"worker logs: (\S+)", result.stderr).group(1)
    assert f"worker logs kept in {logdir}" in result.stderr  # --keep-logs
    # The thread balance (workers.balance): every worker recorded its cost after each chunk but
    # its first (3 chunks of 2 here), the measure `run` splits the cores by.
    for stage in ("encode", "plan", "decode"):
        cost = json.loads(open(os.path.join(logdir, f"cost-{stage}.json")).read())
        assert cost["items"] == 4 and cost["cpu_s"] > 0, (stage, cost)
    shutil.rmtree(logdir)


# --- rough edges: exit codes, help, timeouts, empty inputs, quality flags, run logs ------


def _exit_code(argv: list[str]) -> int:
    """``main(argv)`` as the shell sees it: its return value, or argparse's SystemExit."""
    try:
        return int(main(argv))
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.mark.e2e
def test_version(capsys):
    assert _exit_code(["--version"]) == ExitCode.OK
    assert capsys.readouterr().out.strip() == f"pixelrelay {importlib.metadata.version('pixelrelay')}"


@pytest.mark.parametrize(
    "argv, usage",
    [
        (["--help"], "usage: pixelrelay [-h] [--version]"),
        (["bench", "--help"], "usage: pixelrelay bench"),
        (["bench", "-h"], "usage: pixelrelay bench"),
        (["bench", "quality", "--help"], "usage: pixelrelay bench quality"),
        (["train", "--help"], "usage: pixelrelay train"),
        (["models", "--help"], "usage: pixelrelay models"),
        (["status", "--help"], "usage: pixelrelay status"),
        (["run", "--help"], "usage: pixelrelay run"),
    ],
)
def test_help_works_for_every_command(argv, usage, capsys):
    assert _exit_code(argv) == ExitCode.OK
    out = capsys.readouterr().out
    assert out.startswith(usage), out
    if argv[0] == "bench" and len(argv) == 2:
        assert "quality" in out


@pytest.mark.parametrize("argv", [["bench"], ["bench", "speed"], ["train"], ["status"]])
def test_incomplete_commands_are_usage_errors(argv, capsys):
    assert _exit_code(argv) == ExitCode.USAGE
    assert "usage: pixelrelay" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["submit", "run"])
@pytest.mark.parametrize("value", ["0", "101", "-5", "high", "92.5"])
def test_bad_quality_is_a_usage_error(command, value, tmp_path, capsys):
    assert _exit_code([command, str(tmp_path), "--out", str(tmp_path / "o"), "--quality", value]) == ExitCode.USAGE
    assert "--quality" in capsys.readouterr().err


def test_timeout_needs_wait(redis_url, tmp_path, capsys):
    argv = ["status", "some-job", "--timeout", "5", "--redis-url", redis_url]
    assert _exit_code(argv) == ExitCode.USAGE and "--timeout: only with --wait" in capsys.readouterr().err
    assert _exit_code(["status", "some-job", "--wait", "--timeout", "0"]) == ExitCode.USAGE


def _idle(redis_url: str) -> str:
    return redis_url.rsplit("/", 1)[0] + "/7"  # no stage worker listens on this database


@pytest.mark.e2e
def test_submit_wait_timeout_exits_3_and_the_job_goes_on(redis_url, tmp_path):
    (tmp_path / "in").mkdir()
    for name in ("a.png", "b.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / "in" / name)
    env = worker_env(_idle(redis_url))
    result = run_cli(
        ["submit", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--wait", "--timeout", "1"], env, timeout=60
    )
    assert result.returncode == ExitCode.TIMEOUT, result.stderr
    job_id = result.stdout.strip()
    assert f"gave up waiting after 1 s; job {job_id} goes on" in result.stderr
    # Off a TTY: plain lines, not one per tick (about 2 s of 0.5 s ticks here).
    progress = [line for line in result.stderr.splitlines() if line.startswith("done=")]
    assert 1 <= len(progress) <= 2 and "pending=2 total=2" in progress[-1]
    status = run_cli(["status", job_id], env, timeout=60)
    assert status.returncode == ExitCode.OK and "pending=2 total=2" in status.stdout


@pytest.mark.e2e
def test_empty_local_folder_is_a_usage_error(redis_url, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    (tmp_path / "empty" / ".hidden.png").write_bytes(b"x")
    result = run_cli(
        ["submit", str(tmp_path / "empty"), "--out", str(tmp_path / "o")], worker_env(redis_url), timeout=60
    )
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert "lists no images" in result.stderr and "is the path right?" in result.stderr
    assert not (tmp_path / "o").exists()  # nothing written for a job that has nothing to do


@pytest.mark.e2e
def test_empty_s3_prefix_is_a_usage_error(redis_url, s3_bucket, s3_client, tmp_path):
    s3_client.put_object(Bucket=s3_bucket, Key="photos/a.png", Body=b"x")
    env = worker_env(redis_url)
    result = run_cli(["submit", f"s3://{s3_bucket}/Photos", "--out", f"s3://{s3_bucket}/out"], env, timeout=60)
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert f"input s3://{s3_bucket}/Photos lists no images" in result.stderr and "is the prefix right?" in result.stderr
    assert "Contents" not in s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="out/")


@pytest.mark.e2e
def test_run_keeps_and_prints_worker_logs_when_a_worker_fails(tmp_path):
    env = worker_env("", HF_HUB_OFFLINE="1")
    env.pop("PIXELRELAY_REDIS_URL")
    assert run_cli(["demo", str(tmp_path / "in"), "--count", "2"], env, timeout=60).returncode == 0
    missing = tmp_path / "no-such-model"  # the decode worker can't load it and exits at start
    result = run_cli(
        [
            "run",
            str(tmp_path / "in"),
            "--out",
            str(tmp_path / "out"),
            "--encoder",
            "analysis",
            "--decoder",
            f"hf-sr:{missing}",
        ],
        env,
        timeout=120,
    )
    assert result.returncode == ExitCode.WORKER_EXITED, result.stderr
    assert "the decode worker exited with code 2" in result.stderr
    logdir = re.search(r"worker logs kept in (\S+)", result.stderr).group(1)
    assert sorted(os.listdir(logdir)) == ["decode.log", "encode.log", "plan.log"]
    assert str(missing) in open(os.path.join(logdir, "decode.log")).read()
    shutil.rmtree(logdir)


@pytest.mark.parametrize("ok, keep, kept", [(True, False, False), (True, True, True), (False, False, True)])
def test_run_log_folder_is_deleted_only_after_a_clean_run(ok, keep, kept, capsys):
    from pixelrelay.producer.run import LocalWorkers

    workers = LocalWorkers(dict(os.environ), {})
    workers.finish_logs(ok, keep)
    assert os.path.isdir(workers.logdir) == kept
    assert (f"worker logs kept in {workers.logdir}" in capsys.readouterr().err) == kept
    shutil.rmtree(workers.logdir, ignore_errors=True)


@pytest.mark.parametrize("command", ["submit", "run"])
@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--scale", "9"], "--scale"),
        (["--scale", "0"], "--scale"),
        (["--scale", "nan"], "--scale"),
        (["--scale", "inf"], "--scale"),
        (["--scale", "-1"], "--scale"),
        (["--scale", "x2"], "--scale"),
        (["--width", "0"], "--width"),
        (["--width", "65536"], "--width"),
        (["--height", "1.5"], "--height"),
        (["--scale", "2", "--width", "100"], "--scale: not with --width/--height"),
        (["--scale", "1.5", "--height", "100"], "--scale: not with --width/--height"),
    ],
)
def test_a_bad_output_size_is_a_usage_error(command, flags, flag, tmp_path, capsys):
    assert _exit_code([command, str(tmp_path), "--out", str(tmp_path / "o"), *flags]) == ExitCode.USAGE
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, options",
    [
        (["--scale", "1.5"], {"scale": 1.5}),
        (["--scale", "2.0"], {"scale": 2}),
        (["--scale", "8"], {"scale": 8}),
        (["--scale", "0.5"], {"scale": 0.5}),
        (["--width", "800"], {"width": 800}),
        (["--height", "600"], {"height": 600}),
        (["--width", "800", "--height", "600"], {"width": 800, "height": 600}),
    ],
)
def test_output_size_flags_make_job_options(flags, options, tmp_path):
    from pixelrelay.producer.cli import _job_options, build_parser

    got = _job_options(build_parser().parse_args(["submit", str(tmp_path), "--out", str(tmp_path / "o"), *flags]))
    assert {k: v for k, v in got.model_dump().items() if k in ("scale", "width", "height") and v is not None} == options
    assert type(got.scale) is type(options.get("scale"))  # 2.0 is the integer 2 (as version 3 wrote it)
