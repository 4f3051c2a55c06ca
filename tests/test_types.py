"""The whole package type-checks: mypy over every ``pixelrelay`` module finds no error
([tool.mypy] in pyproject.toml holds the settings).

mypy reads the package through a tree of links laid out as the installed namespace
(``pixelrelay/`` holds links to the package root's files, ``pixelrelay/pipeline`` links to
``pipeline/``, ...), built from pyproject.toml's package-dir, so it checks the working tree as
it is, whichever editable mode installed it. mypy's cache (``.mypy_cache`` at the repository
root, beside the tree) keeps a rerun to seconds; a cold run takes a minute or more."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

CACHE = REPO / ".mypy_cache"
TREE = CACHE / "pixelrelay-tree"


def _package_dirs() -> dict[str, Path]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: REPO / folder for name, folder in config["package-dir"].items()}


def _link_tree() -> dict[Path, Path]:
    """Lay out TREE as the installed namespace; returns each link's target (for error paths)."""
    shutil.rmtree(TREE, ignore_errors=True)
    root = TREE / "pixelrelay"
    root.mkdir(parents=True)
    (CACHE / ".gitignore").write_text("*\n")  # as mypy writes it: nothing here is tracked
    links: dict[Path, Path] = {}
    dirs = _package_dirs()
    for entry in dirs.pop("pixelrelay").iterdir():
        if entry.name != "__pycache__":
            links[root / entry.name] = entry
    for name, folder in dirs.items():
        links[root / name.removeprefix("pixelrelay.").replace(".", "/")] = folder
    for link, target in links.items():
        link.symlink_to(target, target_is_directory=target.is_dir())
    return links


def _mypy(*targets: str) -> tuple[int, str]:
    """mypy on TREE, run from it (so no folder of the repository shadows the namespace)."""
    env = {**os.environ, "MYPYPATH": str(TREE)}
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"), "--cache-dir", str(CACHE)]
        + ["--no-color-output", *targets],
        cwd=TREE,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return result.returncode, result.stdout + result.stderr


def _to_repo_paths(output: str, links: dict[Path, Path]) -> str:
    """Error lines name the folders of the repository, not the links mypy read them through."""
    for link, target in sorted(links.items(), key=lambda item: -len(str(item[0]))):
        output = output.replace(str(link.relative_to(TREE)), str(target.relative_to(REPO)))
    return output


@pytest.fixture(scope="module")
def links() -> dict[Path, Path]:
    return _link_tree()


@pytest.mark.slow
@pytest.mark.timeout(900)  # a cold run reads torch, transformers and diffusers: minutes on a busy machine
def test_the_package_type_checks(links):
    code, output = _mypy("-p", "pixelrelay")
    output = _to_repo_paths(output, links)
    errors = [line for line in output.splitlines() if re.match(r"\S+\.py:\d+: error:", line)]
    assert code in (0, 1) and (code == 0) == (not errors), output  # 2: mypy itself failed
    assert not errors, "\n".join(errors)
    checked = re.search(r"(?:no issues found in|checked) (\d+) source files", output)
    modules = [p for folder in _package_dirs().values() for p in folder.rglob("*.py")]
    # mypy counts the data folders (pipeline/weights, ...) as namespace packages too
    assert checked and int(checked[1]) >= len(modules), f"{output}\nthe package has {len(modules)} modules"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_check_catches_a_type_error(links):
    """A module of the namespace that misuses another's typed API is flagged: the package's
    imports resolve to its own hints (an unresolved import would read as Any and pass)."""
    probe = TREE / "pixelrelay" / "_probe.py"
    probe.write_text("from pixelrelay.exitcodes import ExitCode\n\ncode: str = ExitCode.OK\n")
    try:
        code, output = _mypy("-m", "pixelrelay._probe")
    finally:
        probe.unlink()
    assert code == 1 and re.search(r"_probe\.py:3: error: Incompatible types in assignment", output), output


def test_the_install_exposes_every_module():
    """A strict editable install (the one type checkers and editors resolve) links each file
    as it was at install time: a module added since is missing, at run time too, until the
    install is run again (``pip install --no-deps -e . --config-settings editable_mode=strict``)."""
    missing = []
    for name, folder in _package_dirs().items():
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.submodule_search_locations, name
        places = [Path(p) for p in spec.submodule_search_locations]
        for path in folder.rglob("*.py"):
            if not any((place / path.relative_to(folder)).is_file() for place in places):
                missing.append(str(path.relative_to(REPO)))
    assert not missing, f"not in the installed package (install again): {missing}"
