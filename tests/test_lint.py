"""The repository is ruff clean: ``ruff check`` (the rules in pyproject.toml's ``[tool.ruff]``)
and ``ruff format --check`` report nothing. ``make format`` fixes most of what they report."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def _ruff(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--no-cache", "."],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ruff_check_is_clean():
    result = _ruff(REPO, "check", "--output-format", "concise")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean():
    result = _ruff(REPO, "format", "--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_gate_catches_a_lint_error_and_unformatted_code(tmp_path):
    """With the repository's settings, a ``zip`` without ``strict`` (B905) and a cramped line
    are reported, by file and rule."""
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "bad.py").write_text("def pairs(a, b):\n    return list(zip(a,b))\n")
    check = _ruff(tmp_path, "check", "--output-format", "concise")
    assert check.returncode == 1 and "bad.py:2:17: B905" in check.stdout, check.stdout + check.stderr
    fmt = _ruff(tmp_path, "format", "--check")
    assert fmt.returncode == 1 and "bad.py" in fmt.stdout, fmt.stdout + fmt.stderr
