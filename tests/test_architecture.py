"""The layout and its import rules, checked on the source (AST) and on a built wheel.

Which folder may import which (docs/design.md, "Architecture"):

    pipeline/  (compute path)   no Celery, no Redis, nothing of jobs/workers/producer/training
    jobs/      (bookkeeping)    no Celery, no torch; may use pipeline's messages and storage
    workers/   (Celery)         no producer, no training
    producer/  (CLI, submit)    no training at import time of submit/status (torch-free: see
                                tests/producer/test_cli.py); delegates train/bench lazily
    training/                   no workers, no producer

Nothing imports the bare folder names (``pipeline``, ``workers``, ...): the one namespace is
``pixelrelay``.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {
    "pixelrelay": "pixelrelay",
    "pipeline": "pixelrelay.pipeline",
    "jobs": "pixelrelay.jobs",
    "workers": "pixelrelay.workers",
    "producer": "pixelrelay.producer",
    "training": "pixelrelay.training",
}
BARE = {"pipeline", "jobs", "workers", "producer", "training"}

FORBIDDEN = {
    "pipeline": {
        "celery",
        "kombu",
        "redis",
        "pixelrelay.jobs",
        "pixelrelay.workers",
        "pixelrelay.producer",
        "pixelrelay.training",
    },
    "jobs": {"celery", "kombu", "torch", "pixelrelay.workers", "pixelrelay.producer", "pixelrelay.training"},
    "workers": {"pixelrelay.producer", "pixelrelay.training"},
    "training": {"pixelrelay.workers", "pixelrelay.producer"},
}


def _modules(folder: str) -> list[Path]:
    return sorted(p for p in (REPO / folder).rglob("*.py") if ".venv" not in p.parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module an import statement names, top-level or inside a function."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.lineno, node.module)]
            out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return out


def _matches(module: str, banned: str) -> bool:
    return module == banned or module.startswith(banned + ".")


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_import_rules(folder):
    problems = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in _modules(folder)
        for line, module in _imports(path)
        if any(_matches(module, banned) for banned in FORBIDDEN[folder])
    ]
    assert not problems, "\n".join(problems)


def test_nothing_imports_the_bare_folder_names():
    problems = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for folder in [*FOLDERS, "tests", "benchmarks"]
        for path in _modules(folder)
        for line, module in _imports(path)
        if module.split(".")[0] in BARE
    ]
    assert not problems, "\n".join(problems)


def _declared_packages() -> list[str]:
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {name: folder for folder, name in FOLDERS.items()}
    return config["packages"]


def test_every_package_folder_is_declared():
    on_disk = set()
    for folder, name in FOLDERS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            on_disk.add(".".join((name, *rel)))
    assert sorted(on_disk) == sorted(_declared_packages())


@pytest.mark.slow
def test_wheel_installs_one_top_level_name(tmp_path):
    """`pip install .` puts `pixelrelay` (and its dist-info) in site-packages, nothing else:
    no `pipeline`, `workers` or `producer` to collide with other distributions."""
    src = tmp_path / "src"  # a copy, so that no stale build/ folder of the checkout leaks in
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__"))
    # The installed setuptools builds it when it is new enough (torch pulls one in), else
    # pip builds in isolation, fetching what pyproject's [build-system] asks for.
    import setuptools

    fast = ["--no-build-isolation"] if int(setuptools.__version__.split(".")[0]) >= 70 else []
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *fast, "-q", "-w", str(tmp_path), str(src)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("pixelrelay-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"pixelrelay"}
    for needed in (
        "pixelrelay/pipeline/weights/builtin_restorer.safetensors",
        "pixelrelay/training/configs/decoder.json",
        "pixelrelay/workers/tasks.py",
        "pixelrelay/jobs/keys.py",
        "pixelrelay/__main__.py",
    ):
        assert needed in names


def test_docs_exit_code_table_matches_the_enum():
    from pixelrelay.exitcodes import DESCRIPTIONS, ExitCode

    text = (REPO / "docs" / "operations.md").read_text()
    table = text[text.index("**Exit codes**") :]
    table = table[: table.index("\n\n", table.index("| code |"))]
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "code" not in line]
    assert [int(r) for r in rows] == [int(c) for c in ExitCode]
    assert set(DESCRIPTIONS) == set(ExitCode)


def test_help_lists_every_exit_code():
    from pixelrelay.exitcodes import ExitCode
    from pixelrelay.producer.cli import build_parser

    epilog = build_parser().epilog
    assert all(f"{int(code)} " in epilog for code in ExitCode)
