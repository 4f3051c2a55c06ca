"""Attacks from the security issue (#11), written as an attacker would; the first slice.

Each row here failed on the code before the fix:

* #3  ``job_id="../../x"`` in a message: every ``ChunkMessage`` and ``JobSpec`` now checks the
  job id against the submit rule (a full match), so a worker refuses such a message at
  validation, before it touches storage.
* #8  ``--job-id $'x\\n'`` was accepted (the regex used ``$``, not a full match).
* #9  ``pixelrelay run`` started in a folder holding an ``argparse.py`` ran that file inside
  all three workers (``python -m`` puts the current folder first on ``sys.path``).
* #10 a 120 KB ``--instruction`` was copied into every queued message; now at most 2,000
  characters, refused with exit 2.
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
from pydantic import ValidationError

from pixelrelay.exitcodes import ExitCode
from pixelrelay.pipeline.messages import ChunkMessage, JobSpec, upgrade_message
from tests.conftest import REPO, run_cli, worker_env


def _body(job_id: str, output: str) -> dict:
    return ChunkMessage(
        job_id="placeholder",
        seq=1,
        chunk=0,
        output=output,
        options={},
        backends={},
        records=[{"index": 0, "input": output + "/in.png", "output": output + "/in.png"}],
    ).model_dump(mode="json") | {"job_id": job_id}


@pytest.mark.parametrize("job_id", ["../../x", "x\n", "a/b", "", ".hidden", "x" * 129])
def test_a_bad_job_id_is_refused_in_messages_and_specs(job_id, tmp_path):
    with pytest.raises(ValidationError):
        upgrade_message(_body(job_id, str(tmp_path)))
    with pytest.raises(ValidationError):
        JobSpec(job_id=job_id, input="in", output="out")


@pytest.mark.e2e
def test_a_job_id_with_a_newline_is_a_usage_error(redis_url, tmp_path):
    (tmp_path / "in").mkdir()
    result = run_cli(
        ["submit", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--job-id", "x\n"], worker_env(redis_url)
    )
    assert result.returncode == ExitCode.USAGE and "--job-id" in result.stderr


@pytest.mark.e2e
def test_a_huge_instruction_is_a_usage_error(redis_url, tmp_path):
    (tmp_path / "in").mkdir()
    result = run_cli(
        ["submit", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--instruction", "a" * 120_000],
        worker_env(redis_url),
    )
    assert result.returncode == ExitCode.USAGE and "at most 2000 characters" in result.stderr
    with pytest.raises(ValidationError):
        upgrade_message(_body("ok", str(tmp_path)) | {"options": {"instruction": "a" * 2001}})


@pytest.mark.e2e
def test_run_never_imports_modules_from_the_folder_it_was_started_in(tmp_path):
    """An ``argparse.py`` in the current folder must not run in the workers."""
    marker = tmp_path / "pwned"
    (tmp_path / "argparse.py").write_text(f"open({str(marker)!r}, 'a').write('ran\\n')\nraise SystemExit(99)\n")
    env = worker_env("")
    env.pop("PIXELRELAY_REDIS_URL")
    env.pop("PYTHONPATH", None)
    assert run_cli(["demo", str(tmp_path / "in"), "--count", "2"], env, timeout=60).returncode == 0
    job_id = "cwd-" + uuid.uuid4().hex[:6]
    # The parent runs as the console script would (-P: no cwd on sys.path); the workers it
    # starts are the subject of the test.
    result = subprocess.run(
        [
            sys.executable,
            "-P",
            "-m",
            "pixelrelay",
            "run",
            str(tmp_path / "in"),
            "--out",
            str(tmp_path / "out"),
            "--encoder",
            "analysis",
            "--decoder",
            "classic",
            "--job-id",
            job_id,
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == ExitCode.OK, result.stderr
    assert not marker.exists()
    assert REPO.exists()  # (the repository is not the working folder here)
