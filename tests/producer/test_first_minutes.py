"""A new user's first minutes: help on every option, 80-column usage, suggestions for typos,
one-line usage errors, the warning for a misspelt ``PIXELRELAY_*`` variable, ``run``
refusing a wrong input or device before it starts anything, and the API example running
on its own (``local_services``)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pixelrelay
from pixelrelay.exitcodes import ExitCode
from pixelrelay.pipeline.settings import ConfigError, unknown_env
from pixelrelay.producer import models_cli
from pixelrelay.producer.cli import build_parser, main
from pixelrelay.producer.run import check_device
from pixelrelay.producer.runstate import state_dir
from tests.conftest import REPO, run_cli, worker_env


def _parsers(parser: argparse.ArgumentParser):
    """``parser`` and every subcommand parser under it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


ALL_PARSERS = [*_parsers(build_parser()), *_parsers(models_cli.build_parser())]


def _exit(argv: list[str]) -> int:
    try:
        return int(main(argv))
    except SystemExit as exc:
        return int(exc.code or 0)


def test_every_option_and_positional_has_help():
    missing = [
        f"{parser.prog}: {action.option_strings or action.dest}"
        for parser in ALL_PARSERS
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction) and not (action.help or "").strip()
    ]
    assert not missing, missing
    assert len(ALL_PARSERS) > 15


@pytest.mark.parametrize("stage", ["encoder", "planner", "decoder"])
def test_backend_flags_list_their_kinds_and_default(stage):
    from pixelrelay.pipeline import constants as C
    from pixelrelay.pipeline.stages.registry import known_backends

    run = next(p for p in _parsers(build_parser()) if p.prog == "pixelrelay run")  # the kinds registered now
    text = " ".join(run._option_string_actions[f"--{stage}"].help.split())
    assert all(kind in text for kind in known_backends(stage)), text
    assert f"default {getattr(C, 'DEFAULT_' + stage.upper())}" in text


@pytest.mark.parametrize("command", ["run", "submit"])
def test_run_and_submit_name_the_default_task(command, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    assert _exit([command, "--help"]) == ExitCode.OK
    assert "task restore unless --task" in " ".join(capsys.readouterr().out.split())


def test_usage_and_help_fit_80_columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    for parser in ALL_PARSERS:
        long = [line for line in parser.format_help().splitlines() if len(line) > 80]
        assert not long, (parser.prog, long)


def test_models_list_fits_80_columns(monkeypatch, capsys):
    for name in ("PIXELRELAY_ENCODER", "PIXELRELAY_PLANNER", "PIXELRELAY_DECODER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COLUMNS", "80")
    assert models_cli.main(["list"]) == ExitCode.OK
    lines = capsys.readouterr().out.splitlines()
    assert not [line for line in lines if len(line) > 80], lines
    assert any("stable-diffusion-v1-5/stable-diffusion-v1-5" in line for line in lines)  # the longest model
    monkeypatch.delenv("COLUMNS")  # not a terminal: one line per model, for scripts
    models_cli.main(["list"])
    assert any(
        line.startswith("decoder  hf-sr ") and "swin2SR" in line for line in capsys.readouterr().out.splitlines()
    )


@pytest.mark.parametrize(
    "argv, said",
    [
        (
            ["run", "in", "--out", "o", "--sacle", "2"],
            "pixelrelay run: error: unrecognized option --sacle; did you mean --scale?",
        ),
        (["runn", "in"], "pixelrelay: error: unknown command 'runn'; did you mean 'run'?"),
        (
            ["submit", "in", "--out", "o", "--task", "upscal"],
            "pixelrelay submit: error: --task: invalid choice 'upscal'; did you mean 'upscale'?",
        ),
        (
            ["run", "in", "--out", "o", "--scale", "9"],
            "pixelrelay run: error: --scale: expected a number in (0, 8], got 9",
        ),
        (
            ["submit", "in", "--out", "o", "--quality", "101"],
            "pixelrelay submit: error: --quality: expected 1..100, got 101",
        ),
        (["submit", "in", "--out", "o", "--zz", "x"], "pixelrelay submit: error: unrecognized arguments: --zz x"),
        (
            ["submit", "in", "--out", "o", "--fo", "x"],
            "pixelrelay submit: error: ambiguous option: --fo could match --format, --follow-symlinks",
        ),
    ],
)
def test_usage_errors_are_one_line_with_the_nearest_name(argv, said, capsys):
    assert _exit(argv) == ExitCode.USAGE
    assert capsys.readouterr().err.splitlines() == [said]


def test_a_missing_argument_shows_the_usage(capsys):
    assert _exit(["cancel"]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert err.startswith("usage: pixelrelay cancel") and "required: job_id" in err


@pytest.mark.e2e
def test_unknown_env_is_warned_once_with_the_nearest_name_never_its_value(redis_url, tmp_path):
    env = worker_env(redis_url, PIXELRELAY_CHUNKSIZE="secret-value-4", PIXELRELAY_ZZZ="other-secret")
    code = "from pixelrelay.pipeline.settings import Settings; Settings.from_env(); Settings.from_env(chunk_size=2)"
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "PIXELRELAY_CHUNKSIZE" in line]
    assert warned == [
        "PIXELRELAY_CHUNKSIZE is not a pixelrelay setting and is ignored; did you mean PIXELRELAY_CHUNK_SIZE?"
    ]
    assert "PIXELRELAY_ZZZ is not a pixelrelay setting and is ignored" in result.stderr
    assert "secret" not in result.stderr
    # The CLI warns where it loads its settings, in its log format.
    result = run_cli(["submit", str(tmp_path / "none"), "--out", str(tmp_path / "o")], env, timeout=60)
    assert result.returncode == ExitCode.USAGE and "not a folder" in result.stderr
    assert result.stderr.count("did you mean PIXELRELAY_CHUNK_SIZE?") == 1 and "secret" not in result.stderr


@pytest.mark.e2e
def test_unreachable_redis_is_one_line(tmp_path):
    (tmp_path / "in").mkdir()
    env = worker_env("redis://127.0.0.1:1/0")
    result = run_cli(["submit", str(tmp_path / "in"), "--out", str(tmp_path / "o")], env, timeout=60)
    assert result.returncode == ExitCode.USAGE
    assert result.stderr.splitlines() == [
        "pixelrelay submit: cannot reach Redis at redis://127.0.0.1:1/0 (Error 111 connecting to 127.0.0.1:1. "
        "Connection refused.): is PIXELRELAY_REDIS_URL (--redis-url) right, and Redis running?"
    ]


def test_known_variables_are_not_warned_about():
    env = {"PIXELRELAY_CHUNK_SIZE": "4", "PIXELRELAY_PLUGINS": "", "PIXELRELAY_HEALTH_FILE": "x", "PATH": "/bin"}
    assert unknown_env(env) == []
    assert unknown_env({"PIXELRELAY_DEVISE": "cuda"}) == [("PIXELRELAY_DEVISE", "PIXELRELAY_DEVICE")]


def _run_env() -> dict[str, str]:
    env = worker_env("", HF_HUB_OFFLINE="1")
    env.pop("PIXELRELAY_REDIS_URL")
    return env


def _refused(result: subprocess.CompletedProcess, out: Path, why: str) -> None:
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert result.stderr.splitlines() == [why], result.stderr
    assert not out.exists()  # no OUT/_state/, no signing key


@pytest.mark.e2e
def test_run_refuses_a_wrong_input_before_starting_anything(tmp_path):
    out = tmp_path / "out"
    result = run_cli(["run", str(tmp_path / "no-such"), "--out", str(out)], _run_env(), timeout=60)
    _refused(result, out, f"pixelrelay run: input {tmp_path / 'no-such'}: no such folder or manifest file")
    (tmp_path / "file.png").write_bytes(b"x")
    result = run_cli(["run", str(tmp_path), "--out", str(tmp_path / "file.png")], _run_env(), timeout=60)
    assert result.returncode == ExitCode.USAGE and "not a folder" in result.stderr


@pytest.mark.e2e
def test_run_refused_after_start_leaves_nothing_behind(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    result = run_cli(["run", str(tmp_path / "empty"), "--out", str(out)], _run_env(), timeout=120)
    assert result.returncode == ExitCode.USAGE and "lists no images" in result.stderr
    assert not out.exists() and not os.path.exists(state_dir(str(out)))  # no state folder, no key
    logdir = result.stderr.split("worker logs: ", 1)[1].split()[0]
    assert not os.path.exists(logdir)


@pytest.mark.e2e
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present")
def test_run_device_cuda_without_a_gpu_refuses_at_once(tmp_path):
    (tmp_path / "in").mkdir()
    out = tmp_path / "out"
    result = run_cli(["run", str(tmp_path / "in"), "--out", str(out), "--device", "cuda"], _run_env(), timeout=60)
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "--device cuda: " in result.stderr
    assert "use --device cpu" in result.stderr and not out.exists()
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=f"--device {device}: "):
            check_device(device)
    check_device("cpu")


def test_api_without_a_key_names_variables_and_arguments(tmp_path, monkeypatch):
    monkeypatch.delenv("PIXELRELAY_SIGNING_KEY", raising=False)
    with pytest.raises(ConfigError) as caught:
        pixelrelay.submit(str(tmp_path), str(tmp_path / "out"), redis_url="redis://127.0.0.1:1/0")
    text = str(caught.value)
    assert "PIXELRELAY_SIGNING_KEY_FILE" in text and "signing_key_file=" in text and "--" not in text
    with pytest.raises(ConfigError, match="^no Redis: set PIXELRELAY_REDIS_URL or pass redis_url="):
        pixelrelay.submit(str(tmp_path), str(tmp_path / "out"), redis_url="")


@pytest.mark.e2e
def test_api_example_runs_on_its_own(tmp_path):
    """The example as its docstring says to run it, with no Redis, workers or key around."""
    env = {k: v for k, v in worker_env("").items() if k not in ("PIXELRELAY_REDIS_URL", "PIXELRELAY_SIGNING_KEY")}
    src, out = tmp_path / "in", tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "api_example.py"), str(src), str(out), "--demo", "2"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("submitted ") and lines[1].startswith("state=finished done=2 failed=0")
    assert len(lines) == 4 and all(line.startswith("done ") for line in lines[2:])
    assert len(list(out.glob("*.png"))) == 2


def test_api_settings_from_a_key_file_take_overrides(tmp_path, monkeypatch):
    from pixelrelay.api import _settings
    from pixelrelay.pipeline.settings import Settings

    monkeypatch.delenv("PIXELRELAY_SIGNING_KEY", raising=False)
    (tmp_path / "key").write_text("k" * 24 + "\n")
    base = Settings.from_env(signing_key_file=str(tmp_path / "key"))
    settings = _settings(base, {"chunk_size": 3})
    assert settings.chunk_size == 3 and settings.signer().secure
    assert settings.signing_key.get_secret_value() == "k" * 24
