"""``benchmarks/bench_overhead.py`` runs end to end on a tiny job (real Redis, three real
worker subprocesses with the null backends) and prints its table. Its figures are not
checked here (speed is measured in benchmarks, not in tests): only that every item was done
and that each row it promises is there, with a value."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.e2e
@pytest.mark.slow
def test_bench_overhead_runs_and_prints_its_table():
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "bench_overhead.py"),
        "--items",
        "24",
        "--repeats",
        "1",
        "--warmup",
        "4",
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr  # 0: every item done
    assert "24/24 done" in result.stderr
    values = dict(re.findall(r"^(\S.*?)\s{2,}([0-9.]+)$", result.stdout, re.M))
    for row in (
        "producer CPU, ms/item",
        "encode CPU, ms/item",
        "plan CPU, ms/item",
        "decode CPU, ms/item",
        "total (producer + workers), ms/item",
        "Redis commands/item (all)",
    ):
        assert row in values, result.stdout
    assert float(values["decode CPU, ms/item"]) > 0 and float(values["Redis commands/item (all)"]) > 0
    assert re.search(r"^  lpush\s+[0-9.]+$", result.stdout, re.M), result.stdout  # commands by name
