"""Chunk slots, entries and task ids: what the sweep reads back from Redis is validated."""

from __future__ import annotations

import json

import pytest

from pixelrelay.jobs.chunks import Entry, Slot, parse_entries, parse_task_id, task_id
from pixelrelay.pipeline.messages import Backends, ChunkMessage, JobOptions


def _msg(**update) -> ChunkMessage:
    fields = dict(
        job_id="job-1.a_b", seq=3, chunk=17, output="/o", options=JobOptions(), backends=Backends(), records=[]
    )
    return ChunkMessage(**{**fields, **update})


@pytest.mark.parametrize("part", ["", "42"])
@pytest.mark.parametrize("stage", ["encode", "plan", "decode"])
def test_task_ids_name_their_job_slot_and_stage(stage, part):
    msg = _msg(part=part)
    first, second = task_id(msg, stage), task_id(msg, stage)
    assert first != second  # a random suffix: a re-sent chain's messages are new messages
    ref = parse_task_id(first)
    assert (ref.job_id, ref.slot, ref.stage) == ("job-1.a_b", Slot(3, 17, part), stage)


@pytest.mark.parametrize(
    "value",
    [
        None,
        7,
        "",
        "3f1c-uuid-like",
        "pr:job:1:2:-:paint:ab",
        "pr:job:x:2:-:plan:ab",
        "pr::1:2:-:plan:ab",
        "pr:job:1:2:-:plan",
        "xx:job:1:2:-:plan:ab",
        "pr:j:1:2:a b:plan:ab",
    ],
)
def test_other_task_ids_name_nothing(value):
    assert parse_task_id(value) is None


def test_slots_round_trip_and_reject_garbage():
    for slot in (Slot(1, 0), Slot(12, 345, "9")):
        assert Slot.parse(slot.name) == slot
    for bad in ("", "1", "1:x", "1:2:3:4", "1:2:", "-1:2", "1:2:a"):
        with pytest.raises(ValueError):
            Slot.parse(bad)


def test_entries_read_back_are_validated():
    good = Entry("plan", 100.0, 2.5, False)
    assert Entry.from_json(good.to_json()) == good
    assert good.quiet_until(60) == 162.5
    for bad in (
        b"{",
        b"[]",
        b"null",
        json.dumps({"stage": "paint", "since": 1}),
        json.dumps({"stage": "plan", "since": "1"}),
        json.dumps({"stage": "plan", "since": 1, "wait": -1}),
        json.dumps({"stage": "plan", "since": True}),
        json.dumps({"stage": "plan", "since": 1, "feeds": "yes"}),
    ):
        assert Entry.from_json(bad) is None, bad
    valid, invalid = parse_entries(
        {b"1:0": good.to_json().encode(), b"1:1": b"{", b"\xff": good.to_json().encode(), b"x": b"{}"}
    )
    assert valid == {Slot(1, 0): good}
    assert sorted(invalid) == [b"1:1", b"x", b"\xff"]
