"""The documentation holds together: links resolve, no issue numbers, dotted names exist.

* Every relative link in the top-level Markdown files and ``docs/*.md`` names a file that
  exists, and a ``#anchor`` names a heading of its target (GitHub's slug rule).
* No issue reference (a hash and digits, as in ``#14``) is left in the docs or in the
  code, comments and configuration of the package folders, benchmarks, examples and
  deploy; the changelog may keep them. CSS colours (``color:#222``) are not issues.
* Every dotted ``pixelrelay.…`` name in a docstring or in the docs names a module or an
  attribute that exists.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("README.md", "CONTRIBUTING.md", "CHANGELOG.md", "SECURITY.md")
PACKAGE_FOLDERS = ("pixelrelay", "pipeline", "workers", "producer", "jobs", "training")
SCANNED_FOLDERS = (*PACKAGE_FOLDERS, "benchmarks", "examples", "deploy")
SCANNED_SUFFIXES = {".py", ".md", ".json", ".toml", ".yaml", ".yml", ".sh", ".txt", ".cfg", ".ini"}
SCANNED_NAMES = {"Dockerfile", ".dockerignore"}
SKIPPED_PARTS = {".venv", "__pycache__", "node_modules"}

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
ISSUE = re.compile(r"(?<![\w&/#])(?<!\]\()#(\d+)\b")
COLOUR_LENGTHS = {3, 6}  # #rgb, #rrggbb: only where a colour is written (after : " ')
# Dotted names under pixelrelay. that are not modules: Celery queue and task names, the
# plugin entry-point group.
NOT_MODULES = {"pixelrelay.encode", "pixelrelay.plan", "pixelrelay.decode", "pixelrelay.backends"}
DOTTED = re.compile(r"(?<![\w.\-/:])pixelrelay(?:\.[A-Za-z_]\w*)+")


def markdown_files() -> list[Path]:
    files = [REPO / name for name in TOP_LEVEL if (REPO / name).exists()]
    return files + sorted((REPO / "docs").glob("*.md"))


def _prose_lines(text: str) -> list[str]:
    """The lines of a Markdown text outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        lines.append("" if fenced else line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed,
    spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[str]:
    """Link targets of a Markdown file, outside code blocks and code spans."""
    text = "\n".join(_prose_lines(path.read_text(encoding="utf-8")))
    return LINK.findall(INLINE_CODE.sub("", text))


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    return broken


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_the_link_check_finds_a_broken_link_and_a_missing_anchor(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## Some `code` heading: here\n")
    page.write_text(
        "# Page\n\n[ok](other.md#some-code-heading-here) [self](#page) [web](https://example.com/x)\n"
        "[gone](missing.md) [bad anchor](other.md#nowhere)\n\n```\n[in code](nowhere.md)\n```\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "other.md#nowhere: no heading with anchor #nowhere in other.md",
    ]
    assert slug("Nightly runs: `--incremental`") == "nightly-runs---incremental"
    assert slug("The before/after figure") == "the-beforeafter-figure"


# --- issue references ------------------------------------------------------------------


def scanned_files() -> list[Path]:
    files = [REPO / name for name in ("README.md", "CONTRIBUTING.md", "SECURITY.md") if (REPO / name).exists()]
    files += sorted((REPO / "docs").glob("*.md"))
    for folder in SCANNED_FOLDERS:
        for path in sorted((REPO / folder).rglob("*")):
            if not path.is_file() or SKIPPED_PARTS & set(path.parts):
                continue
            if path.suffix in SCANNED_SUFFIXES or path.name in SCANNED_NAMES:
                files.append(path)
    return files


def issue_references(text: str) -> list[str]:
    """Each issue reference in ``text`` as 'line N: #14'; colours like ``color:#222`` and
    ``fill="#888"`` are not references."""
    found = []
    for m in ISSUE.finditer(text):
        before = text[m.start() - 1 : m.start()]
        if len(m.group(1)) in COLOUR_LENGTHS and before in {":", '"', "'"}:
            continue
        found.append(f"line {text.count(chr(10), 0, m.start()) + 1}: #{m.group(1)}")
    return found


def test_issue_reference_rule():
    assert issue_references("fixed in #14 and (#15)") == ["line 1: #14", "line 1: #15"]
    assert issue_references('"comment": "#15, shipped"') == ["line 1: #15"]
    assert issue_references("color:#222; fill=\"#888\" stroke='#444'") == []
    assert issue_references("[x](#010-2026-11-29) &#123; a#1 path/#2 ## 3 # 4") == []


def test_no_issue_references_in_docs_and_code():
    offenders = []
    for path in scanned_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        offenders += [f"{path.relative_to(REPO)} {ref}" for ref in issue_references(text)]
    assert offenders == [], "issue numbers belong in CHANGELOG.md only:\n" + "\n".join(offenders)


# --- dotted pixelrelay.… names ----------------------------------------------------------


def docstrings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef))]
    return [doc for node in nodes if (doc := ast.get_docstring(node))]


def resolves(name: str) -> bool:
    """Whether ``name`` is a module, or a module's attribute (nested attributes too)."""
    if name in NOT_MODULES:
        return True
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def dotted_names(text: str) -> set[str]:
    return set(DOTTED.findall(text))


def test_dotted_name_rule():
    assert dotted_names("see ``pixelrelay.jobs.state`` and pixelrelay.submit(...).") == {
        "pixelrelay.jobs.state",
        "pixelrelay.submit",
    }
    assert dotted_names("x-amz-meta-pixelrelay.x .a.pixelrelay.json pixelrelay:job:1") == set()
    assert resolves("pixelrelay.jobs.state.JobState") and resolves("pixelrelay.workers.policy")
    assert not resolves("pixelrelay.jobs.nonexistent") and not resolves("pixelrelay.jobs.state.NoSuchThing")


def _names_in_docs() -> dict[str, set[str]]:
    where: dict[str, set[str]] = {}
    for path in markdown_files():
        for name in dotted_names(path.read_text(encoding="utf-8")):
            where.setdefault(name, set()).add(str(path.relative_to(REPO)))
    for folder in (*PACKAGE_FOLDERS, "benchmarks", "examples"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if SKIPPED_PARTS & set(path.parts):
                continue
            for doc in docstrings(path):
                for name in dotted_names(doc):
                    where.setdefault(name, set()).add(str(path.relative_to(REPO)))
    return where


def test_dotted_pixelrelay_names_exist():
    missing = [f"{name} (in {', '.join(sorted(files))})" for name, files in sorted(_names_in_docs().items())]
    missing = [m for m in missing if not resolves(m.split(" ")[0])]
    assert missing == [], "names that are no module or attribute:\n" + "\n".join(missing)


# --- the docs against the code ----------------------------------------------------------


def test_readme_shows_the_ci_test_command_and_the_quick_start():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    ci_test = [line.strip() for line in ci.splitlines() if line.strip().startswith("python -m pytest")]
    assert ci_test and all(cmd in readme for cmd in ci_test)
    assert 'python -m pytest -m "not e2e"' in readme
    assert "pixelrelay demo demo-in && pixelrelay run demo-in --out demo-out --task upscale --scale 2" in readme


def documented_commands() -> list[tuple[list[str], list[str]]]:
    """(command words, options) of each row of the CLI reference in docs/operations.md."""
    text = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    section = text[text.index("## CLI reference") : text.index("## Exit codes")]
    rows = []
    for line in section.splitlines():
        m = re.match(r"^\| `pixelrelay ([^`]*)`", line)
        if not m:
            continue
        words = []
        for token in m.group(1).split():
            if not re.fullmatch(r"[a-z]+(\\\|[a-z]+)*", token):
                break
            words.append(token.split("\\|")[0])
        rows.append((words, re.findall(r"--[a-z][a-z0-9-]*", m.group(1))))
    return rows


def test_documented_cli_options_exist(capsys):
    from pixelrelay.producer.cli import main

    rows = documented_commands()
    assert len(rows) >= 15
    unknown = []
    for words, options in rows:
        with pytest.raises(SystemExit):
            main([*words, "--help"])
        help_text = capsys.readouterr().out
        listed = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_text))
        unknown += [f"pixelrelay {' '.join(words)} {opt}" for opt in options if opt not in listed]
    assert unknown == [], "documented options that --help does not list:\n" + "\n".join(unknown)
