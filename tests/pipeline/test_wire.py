"""The chunk message wire format: versions, upgrades, and what a worker of the previous
release can still read."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from pixelrelay.pipeline.messages import (
    WIRE_VERSION,
    ChunkMessage,
    ItemRecord,
    JobOptions,
    WireFormatError,
    WireVersionError,
    upgrade_message,
)


# --- the previous release's schema (version 1), frozen here as it shipped ------------------
class _V1(BaseModel):
    model_config = ConfigDict(extra="forbid")


class V1JobOptions(_V1):
    task: str = "restore"
    scale: int | None = None
    instruction: str = ""
    format: str | None = None


class V1ChunkMessage(_V1):
    job_id: str
    seq: int
    chunk: int
    output: str
    options: V1JobOptions
    backends: dict
    records: list[dict]
    feeds: bool = True
    part: str = ""


def v1_body(**options) -> dict:
    """A body exactly as the previous release's producer wrote it (no ``v``, no quality)."""
    return {
        "job_id": "job-1",
        "seq": 3,
        "chunk": 7,
        "output": "s3://bucket/out",
        "options": {"task": "upscale", "scale": 2, "instruction": "sharper", "format": "jpg", **options},
        "backends": {"encoder": "analysis", "planner": None, "decoder": None},
        "records": [
            {
                "index": 28,
                "input": "s3://bucket/in/a.png",
                "output": "s3://bucket/out/a.jpg",
                "status": None,
                "error": None,
                "notes": [],
                "description": None,
                "plan": None,
                "timings": {},
                "backends": {},
                "output_size": None,
                "source_size": None,
            },
        ],
        "feeds": False,
        "part": "28",
    }


def test_a_version_1_body_is_upgraded():
    msg = upgrade_message(v1_body())
    assert msg.v == WIRE_VERSION == 4
    assert msg.options == JobOptions(
        task="upscale", scale=2, instruction="sharper", format="jpg", quality=92, lossless=False
    )
    assert (msg.job_id, msg.seq, msg.chunk, msg.feeds, msg.part) == ("job-1", 3, 7, False, "28")
    assert msg.records == [ItemRecord(index=28, input="s3://bucket/in/a.png", output="s3://bucket/out/a.jpg")]
    assert upgrade_message({**v1_body(), "v": 1}) == msg  # an explicit v1 reads the same


def test_messages_are_written_in_the_oldest_version_that_carries_them():
    # Default output settings: version 1, byte for byte what the previous release wrote, so
    # its workers read what upgraded workers pass down the chain during a rolling upgrade.
    plain = upgrade_message(v1_body())
    assert plain.model_dump(mode="json") == v1_body()
    assert json.loads(plain.model_dump_json()) == v1_body()
    V1ChunkMessage.model_validate(plain.model_dump(mode="json"))

    # A job that sets quality, lossless or overwrite needs version 2, and says so.
    for options in ({"quality": 70}, {"lossless": True}, {"overwrite": True}):
        msg = plain.model_copy(update={"options": plain.options.model_copy(update=options)})
        wire = msg.model_dump(mode="json")
        assert wire["v"] == 2 and wire["options"].items() >= options.items()
        assert upgrade_message(json.loads(msg.model_dump_json())) == msg  # round trip
        with pytest.raises(ValidationError):  # why producers are upgraded last
            V1ChunkMessage.model_validate(wire)


def test_a_newer_version_is_a_typed_error():
    body = {**upgrade_message(v1_body()).model_dump(mode="json"), "v": WIRE_VERSION + 1, "priority": 5}
    with pytest.raises(WireVersionError) as info:
        upgrade_message(body)
    assert info.value.version == WIRE_VERSION + 1
    assert f"wire version {WIRE_VERSION + 1} is newer" in str(info.value)
    body.pop("priority")
    with pytest.raises(ValidationError) as direct:  # validating directly is no way around it
        ChunkMessage.model_validate(body)
    assert [e["loc"] for e in direct.value.errors()] == [("v",)]


@pytest.mark.parametrize(
    "body",
    [None, [], "{}", {**v1_body(), "v": "2"}, {**v1_body(), "v": True}, {**v1_body(), "v": 0}, {**v1_body(), "v": 2.0}],
    ids=["null", "list", "string", "v-string", "v-bool", "v-zero", "v-float"],
)
def test_what_is_no_message_is_rejected(body):
    with pytest.raises(WireFormatError):
        upgrade_message(body)


def test_bad_fields_are_rejected_in_every_version():
    with pytest.raises(ValidationError):
        upgrade_message({**v1_body(), "surprise": 1})
    with pytest.raises(ValidationError):
        upgrade_message({**v1_body(quality=0), "v": 2})
    with pytest.raises(ValidationError):
        upgrade_message({k: v for k, v in v1_body().items() if k != "records"})


def test_records_with_fingerprint_fields_are_version_2():
    plain = upgrade_message(v1_body())
    record = plain.records[0].model_copy(update={"models": {"encoder": "analysis"}})
    msg = plain.model_copy(update={"records": [record]})
    wire = msg.model_dump(mode="json")
    assert wire["v"] == 2 and wire["records"][0]["models"] == {"encoder": "analysis"}
    assert upgrade_message(json.loads(msg.model_dump_json())) == msg
    # ...and a version-1 body never carries them, not even empty.
    assert {"models", "fingerprint", "outcome"}.isdisjoint(plain.model_dump(mode="json")["records"][0])


# --- version 4: edit and style tasks, Plan.edit -------------------------------------------

EDIT_PLAN = {
    "scale": 1,
    "edit": {"grading": [{"name": "warmth", "strength": 0.35}, {"name": "vignette", "strength": 0.4}]},
}


def _with_plan(body: dict, plan: dict) -> dict:
    record = {**body["records"][0], "plan": plan}
    return {**body, "records": [record]}


def test_edit_jobs_are_version_4_and_other_jobs_unchanged():
    plain = upgrade_message(v1_body())
    edit = plain.model_copy(update={"options": JobOptions(task="edit", instruction="make it warmer")})
    wire = edit.model_dump(mode="json")
    assert wire["v"] == 4 and wire["options"]["task"] == "edit"
    assert upgrade_message(json.loads(edit.model_dump_json())) == edit

    # a record whose plan carries an edit needs version 4 too, whatever the task says
    carried = upgrade_message(_with_plan({**v1_body(), "v": 4}, EDIT_PLAN))
    assert carried.records[0].plan.edit.strength("warmth") == 0.35
    assert carried.model_dump(mode="json")["v"] == 4

    # a plan without an edit has no "edit" key at all: restore messages stay version 1, byte for byte
    restored = upgrade_message(
        _with_plan(v1_body(), {"scale": 2, "operations": [{"name": "denoise", "strength": 0.5}]})
    )
    dumped = restored.model_dump(mode="json")
    assert "v" not in dumped and "edit" not in dumped["records"][0]["plan"]
    assert upgrade_message(dumped) == restored


def test_a_version_3_body_still_validates():
    body = {**v1_body(strip_metadata=True), "v": 3}
    msg = upgrade_message(body)
    assert msg.v == 4 and msg.options.strip_metadata
    wire = msg.model_dump(mode="json")
    assert wire["v"] == 3 and upgrade_message(wire) == msg  # still written as version 3


@pytest.mark.parametrize(
    "edit",
    [
        {"grading": [{"name": "warmth", "strength": 1.5}]},  # out of range
        {"grading": [{"name": "sepia", "strength": -0.5}]},  # unsigned below 0
        {"grading": [{"name": "warmth", "strength": "NaN"}]},
        {"grading": [{"name": "warmth", "strength": 0}]},  # a no-op
        {"grading": [{"name": "hue_shift", "strength": 0.2}]},  # not an operation
        {"grading": [{"name": "warmth", "strength": 0.2}, {"name": "warmth", "strength": 0.3}]},  # twice
        {"grading": [{"name": "warmth", "strength": 0.2, "code": "rm -rf"}]},  # extra field
        {"grading": []},  # an edit that changes nothing
        {"generative": {"prompt": "a painting", "steps": 100000}},
        {"generative": {"prompt": "a painting", "seed": -1}},
        {"generative": {"prompt": "a painting", "guidance": "Infinity"}},
        {"generative": {"prompt": "a painting", "strength": 0}},
        {"generative": {"prompt": ""}},
        {"generative": {"prompt": "x" * 501}},
    ],
    ids=lambda e: json.dumps(e)[:40],
)
def test_a_forged_edit_is_rejected(edit):
    body = _with_plan({**v1_body(), "v": 4}, {"scale": 1, "edit": edit})
    with pytest.raises(ValidationError):
        upgrade_message(body)


def test_edit_tasks_need_an_instruction():
    for task in ("edit", "style"):
        with pytest.raises(ValidationError, match="needs an instruction"):
            JobOptions(task=task, instruction="   ")
    with pytest.raises(ValidationError):
        upgrade_message({**v1_body(task="edit", instruction=""), "v": 4})


# --- version 4: any output scale (JobOptions.scale, .width, .height, Plan.target, scales) ----

V3_OPTIONS_JSON = (
    '{"task":"upscale","scale":2,"instruction":"","format":null,"quality":92,"lossless":false,'
    '"overwrite":false,"strip_metadata":false}'
)  # JobOptions(task="upscale", scale=2), as v3 wrote it


def test_an_integral_scale_is_written_and_fingerprinted_as_version_3_did():
    from pixelrelay.pipeline.fingerprint import request_fingerprint
    from pixelrelay.pipeline.messages import Backends

    old = JobOptions.model_validate_json(V3_OPTIONS_JSON)
    for options in (JobOptions(task="upscale", scale=2), JobOptions(task="upscale", scale=2.0), old):
        assert options.model_dump_json() == V3_OPTIONS_JSON  # 2, not 2.0; no width/height keys
        assert isinstance(options.scale, int) and options.target() is None
        # what pipeline.fingerprint hashed before any output scale existed (computed with
        # that release's code): reuse still finds the outputs of old jobs
        assert request_fingerprint(options, Backends(), "s3://b/in/a.png", "png") == (
            "4eeb8e9792f0798a40a5f23e1ba4881a8b8a42c99707c87c91ee419f5c2d434e"
        )
    plain = upgrade_message(v1_body())
    for scale in (1, 2, 4, 2.0):
        msg = plain.model_copy(
            update={"options": JobOptions(task="upscale", scale=scale, instruction="sharper", format="jpg")}
        )
        assert msg.model_dump(mode="json") == {**v1_body(), "options": {**v1_body()["options"], "scale": int(scale)}}
    # a new request hashes differently from the old ones
    new = {
        request_fingerprint(JobOptions(**o), Backends(), "s3://b/in/a.png", "png")
        for o in (
            {"scale": 2},
            {"scale": 1.5},
            {"scale": 3},
            {"width": 800},
            {"height": 800},
            {"width": 800, "height": 600},
        )
    }
    assert len(new) == 6


@pytest.mark.parametrize(
    "options",
    [
        {"scale": 1.5},
        {"scale": 3},
        {"scale": 0.5},
        {"scale": 8},
        {"width": 800},
        {"height": 600},
        {"width": 800, "height": 600},
    ],
    ids=str,
)
def test_any_other_scale_or_a_size_is_version_4(options, monkeypatch):
    plain = upgrade_message(v1_body())
    msg = plain.model_copy(update={"options": JobOptions(task="upscale", **options)})
    wire = msg.model_dump(mode="json")
    assert wire["v"] == 4 and wire["options"].items() >= options.items()
    assert upgrade_message(json.loads(msg.model_dump_json())) == msg
    from pixelrelay.pipeline import messages

    monkeypatch.setattr(messages, "WIRE_VERSION", 3)  # a version-3 worker's reader
    with pytest.raises(WireVersionError):  # its worker re-queues it for an upgraded one, never fails it
        upgrade_message(wire)
    upgrade_message(plain.model_dump(mode="json"))  # while it still reads what it always read


def test_a_plan_target_and_record_scales_are_version_4_and_absent_otherwise():
    target = {"scale": 4, "target": {"scale": 3}}
    carried = upgrade_message(_with_plan({**v1_body(), "v": 4}, target))
    assert carried.records[0].plan.target.scale == 3 and carried.model_dump(mode="json")["v"] == 4
    record = carried.records[0].model_copy(
        update={
            "plan": carried.records[0].plan.model_copy(update={"target": None}),
            "native_scale": 4,
            "final_scale": 3.0,
        }
    )
    scaled = carried.model_copy(update={"records": [record]})
    wire = scaled.model_dump(mode="json")
    assert wire["v"] == 4 and (wire["records"][0]["native_scale"], wire["records"][0]["final_scale"]) == (4, 3.0)
    assert upgrade_message(wire) == scaled
    plain = upgrade_message(_with_plan(v1_body(), {"scale": 2}))
    dumped = plain.model_dump(mode="json")
    assert "v" not in dumped and "target" not in dumped["records"][0]["plan"]
    assert {"native_scale", "final_scale"}.isdisjoint(dumped["records"][0])


@pytest.mark.parametrize(
    "options",
    [
        {"scale": 0},
        {"scale": 9},
        {"scale": "NaN"},
        {"scale": "Infinity"},
        {"scale": -1.5},
        {"scale": True},
        {"scale": "2"},
        {"scale": 8.000001},
        {"width": 0},
        {"width": 65536},
        {"width": 5.5},
        {"width": 5.0},
        {"width": "800"},
        {"height": False},
        {"scale": 2, "width": 800},
        {"scale": 1.5, "height": 10},
    ],
    ids=str,
)
def test_a_forged_output_size_is_rejected(options):
    with pytest.raises(ValidationError):
        upgrade_message({**v1_body(**options), "v": 4})
    with pytest.raises(ValidationError):
        JobOptions.model_validate_json(json.dumps({"task": "upscale", **options}))


@pytest.mark.parametrize(
    "plan",
    [
        {"scale": 2, "target": {}},
        {"scale": 2, "target": {"scale": 0}},
        {"scale": 2, "target": {"scale": 9}},
        {"scale": 2, "target": {"scale": "NaN"}},
        {"scale": 2, "target": {"width": 0}},
        {"scale": 2, "target": {"scale": 1.5, "width": 3}},
        {"scale": 2, "target": {"scale": 1.5, "extra": 1}},
        {"scale": 3},
        {"scale": 8},  # a plan's own scale stays native: 1, 2 or 4
    ],
    ids=lambda p: json.dumps(p),
)
def test_a_forged_plan_target_is_rejected(plan):
    with pytest.raises(ValidationError):
        upgrade_message(_with_plan({**v1_body(), "v": 4}, plan))


@pytest.mark.parametrize(
    "fields",
    [
        {"native_scale": 0},
        {"native_scale": 33},
        {"native_scale": 2.5},
        {"final_scale": 0},
        {"final_scale": "NaN"},
        {"final_scale": -1},
    ],
    ids=str,
)
def test_forged_record_scales_are_rejected(fields):
    body = {**v1_body(), "v": 4}
    body["records"] = [{**body["records"][0], **fields}]
    with pytest.raises(ValidationError):
        upgrade_message(body)


@pytest.mark.parametrize("version", [None, 1, 2, 3])
@pytest.mark.parametrize("change", ["scale", "width", "target", "record", "edit"])
def test_an_older_body_with_version_4_fields_is_refused(version, change):
    """No writer makes one: it would mean a version-3 worker got a message it cannot serve."""
    body = (
        v1_body(scale=1.5)
        if change == "scale"
        else v1_body(scale=None, width=800)
        if change == "width"
        else (v1_body(task="edit") if change == "edit" else v1_body())
    )
    if change == "target":
        body = _with_plan(body, {"scale": 4, "target": {"scale": 3}})
    if change == "record":
        body["records"] = [{**body["records"][0], "native_scale": 4}]
    if version is not None:
        body = {**body, "v": version}
    with pytest.raises(WireFormatError, match="carries version 4 fields"):
        upgrade_message(body)
    assert upgrade_message({**body, "v": 4}).wire_version() == 4
