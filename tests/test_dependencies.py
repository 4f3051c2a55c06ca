"""Every third-party module the package imports is declared in pyproject.toml (deptry, which
maps import names to installed distributions and reads the package-dir folders at the root)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

from tests.conftest import REPO


def _deptry(root, config) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deptry", ".", "--config", str(config), "--no-ansi"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_imported_distribution_is_declared():
    result = _deptry(REPO, REPO / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No dependency issues found" in result.stdout + result.stderr


def test_the_check_catches_an_undeclared_import(tmp_path):
    """Drop ``rich`` (imported by producer/status.py) from a copy of the dependencies: flagged
    (as missing, or as transitive where another package happens to pull it in)."""
    for folder in ("pixelrelay", "pipeline", "jobs", "workers", "producer", "training"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    text = (REPO / "pyproject.toml").read_text()
    stripped = re.sub(r'^\s*"rich[^"]*",\n', "", text, flags=re.M)
    assert stripped != text
    (tmp_path / "pyproject.toml").write_text(stripped)
    result = _deptry(tmp_path, tmp_path / "pyproject.toml")
    output = result.stdout + result.stderr
    assert result.returncode == 1 and re.search(
        r"producer/status\.py:\d+:\d+: DEP00[13] 'rich' imported but", output
    ), output
