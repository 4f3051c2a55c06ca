"""``submit`` for the edit and style tasks: an instruction the rules planner cannot map is
refused before any job exists (exit 2), without torch; a mappable one is a job."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from pixelrelay.exitcodes import ExitCode
from pixelrelay.pipeline.messages import JobOptions
from pixelrelay.pipeline.settings import ConfigError
from pixelrelay.producer.cli import main
from pixelrelay.producer.submit import check_instruction
from tests.conftest import REPO, worker_env


@pytest.fixture()
def folder(tmp_path):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (8, 8), (200, 120, 40)).save(tmp_path / "in" / "a.png")
    return tmp_path


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--task", "edit", "--instruction", "add a hat and make it warmer"], "cannot map 'add a hat'"),
        (["--task", "edit", "--instruction", "make the sky bluer"], "local edit (sky)"),
        (["--task", "style", "--instruction", "cyberpunk"], "a style it knows"),
        (["--task", "edit"], "needs --instruction"),
        (["--task", "style", "--instruction", "  "], "needs --instruction"),
    ],
)
def test_unmappable_or_missing_instruction_exits_2(folder, argv, message, capsys, monkeypatch):
    monkeypatch.setenv("PIXELRELAY_REDIS_URL", "redis://127.0.0.1:1/0")  # never reached when refused
    monkeypatch.setenv("PIXELRELAY_INSECURE_NO_SIGNING", "1")
    code = main(["submit", str(folder / "in"), "--out", str(folder / "out"), *argv])
    err = capsys.readouterr().err
    assert code == ExitCode.USAGE and message in err, err
    assert not (folder / "out").exists()  # no job was created


@pytest.mark.e2e
def test_an_edit_job_is_submitted_without_torch_and_other_planners_are_not_second_guessed(folder, redis_url):
    code = (
        "import sys; from producer.cli import main; "
        "rc = main(['submit', sys.argv[1], '--out', sys.argv[2], '--task', 'edit', '--instruction', sys.argv[3]]"
        " + sys.argv[4:]); assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    base = [sys.executable, "-c", code, str(folder / "in"), str(folder / "out")]
    env = worker_env(redis_url)
    ok = subprocess.run(
        [*base, "make every product photo brighter with a neutral white balance"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0 and ok.stdout.strip(), ok.stderr
    refused = subprocess.run([*base, "add a hat"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "rules planner cannot map 'add a hat'" in refused.stderr
    # another planner maps it itself (or fails the item with its reason)
    check_instruction(JobOptions(task="edit", instruction="add a hat"), "hf-llm:org/model")
    with pytest.raises(ConfigError, match="cannot map 'add a hat'"):
        check_instruction(JobOptions(task="edit", instruction="add a hat"), "rules")
