"""``workers.balance``: ``pixelrelay run`` splits the cores by each stage's measured cost.

The worker side (``Reporter``) and ``run``'s side (``Balancer``) meet in a real folder; the
thread count is applied to the real torch. The end-to-end check (real workers under ``run``
record their costs) is in tests/producer/test_cli.py."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pixelrelay.workers import balance
from pixelrelay.workers.balance import Balancer, Reporter, prior, split


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_split_follows_the_cost_with_at_least_one_thread_each():
    assert split({"encode": 25.0, "plan": 0.1, "decode": 225.0}, 2) == {"encode": 1, "plan": 1, "decode": 2}
    assert split({"encode": 25.0, "plan": 0.1, "decode": 225.0}, 16) == {"encode": 2, "plan": 1, "decode": 14}
    assert split({"encode": 100.0, "plan": 1.0, "decode": 100.0}, 8) == {"encode": 4, "plan": 1, "decode": 4}
    assert split({"encode": 0.0, "plan": 0.0, "decode": 0.0}, 8) == prior(8)
    assert prior(2) == {"encode": 1, "plan": 1, "decode": 2} and prior(16) == {"encode": 4, "plan": 1, "decode": 12}


def _write_cost(folder, stage, items, cpu_s):
    with open(balance.cost_file(str(folder), stage), "w") as f:
        json.dump({"items": items, "cpu_s": cpu_s}, f)


def test_the_balancer_waits_for_enough_items_then_writes_a_changed_split_once(tmp_path):
    balancer = Balancer(str(tmp_path), 16)
    assert balancer.current == prior(16)
    _write_cost(tmp_path, "encode", 40, 4.0)
    _write_cost(tmp_path, "plan", 40, 0.004)
    assert balancer.tick() is None  # decode has not reported yet
    _write_cost(tmp_path, "decode", 4, 1.0)
    assert balancer.tick() is None  # too few decode items to trust
    _write_cost(tmp_path, "decode", 40, 4.0)
    assert balancer.tick() == {"encode": 8, "plan": 1, "decode": 8}
    assert json.loads((tmp_path / balance.THREADS_FILE).read_text()) == {"encode": 8, "plan": 1, "decode": 8}
    balancer.last = 0.0
    assert balancer.tick() is None  # the same split: nothing written again


@pytest.mark.parametrize("cost", [{"items": "40", "cpu_s": 1.0}, {"items": 40, "cpu_s": -1.0}, [1, 2], "x"])
def test_malformed_cost_files_are_ignored(tmp_path, cost):
    for stage in ("encode", "plan", "decode"):
        _write_cost(tmp_path, stage, 40, 1.0)
    with open(balance.cost_file(str(tmp_path), "decode"), "w") as f:
        json.dump(cost, f)
    assert Balancer(str(tmp_path), 4).tick() is None


def test_a_worker_records_its_cost_and_applies_its_share(tmp_path, threads):
    reporter = Reporter(str(tmp_path), "decode")
    sum(i * i for i in range(200_000))  # some CPU to measure
    reporter.after_chunk(16)
    cost = json.loads(open(balance.cost_file(str(tmp_path), "decode")).read())
    assert cost["items"] == 16 and cost["cpu_s"] > 0
    torch.set_num_threads(1)
    (tmp_path / balance.THREADS_FILE).write_text(json.dumps({"encode": 1, "plan": 1, "decode": 2}))
    reporter.after_chunk(16)
    assert torch.get_num_threads() == 2
    assert json.loads(open(balance.cost_file(str(tmp_path), "decode")).read())["items"] == 32


@pytest.mark.parametrize("value", [{"decode": 0}, {"decode": 2.0}, {"decode": "2"}, {"decode": 10**6}, [2], "{"])
def test_a_bad_threads_file_leaves_the_threads_alone(tmp_path, threads, value):
    torch.set_num_threads(1)
    reporter = Reporter(str(tmp_path), "decode")
    path = tmp_path / balance.THREADS_FILE
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    reporter.after_chunk(4)
    assert torch.get_num_threads() == 1


def test_balancing_is_off_without_the_folder_and_skips_the_first_chunk(tmp_path, monkeypatch):
    monkeypatch.delenv(balance.ENV_DIR, raising=False)
    monkeypatch.setattr(balance, "_reporter", None)
    balance.after_chunk("encode", 16)
    assert balance._reporter is None
    monkeypatch.setenv(balance.ENV_DIR, str(tmp_path))
    balance.after_chunk("encode", 16)  # the first chunk (model loading, warm-up) is not counted
    assert not os.path.exists(balance.cost_file(str(tmp_path), "encode"))
    balance.after_chunk("encode", 16)
    assert json.loads(open(balance.cost_file(str(tmp_path), "encode")).read())["items"] == 16
