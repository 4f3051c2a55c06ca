"""Someone who can write the output storage edits the ``--incremental`` index and swaps an
output (bytes and fingerprint sidecar) for another item's, then the nightly re-run comes: the
submit does not fail, the input whose index row was spoilt is sent again, and the encode
stage, finding a fingerprint made for another input, processes it anew, so the job reports it
done with its own bytes, never with the ones planted."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from pixelrelay.producer.listing import local_version
from tests.conftest import run_cli, worker_env
from tests.images import encode, photo_like

pytestmark = pytest.mark.e2e


def _submit(redis_url, src, out):
    env = worker_env(redis_url, PIXELRELAY_CHUNK_SIZE="4", PIXELRELAY_WINDOW="4")
    return run_cli(["submit", str(src), "--out", str(out), "--incremental", "--wait"], env)


def _manifest(out, job_id: str) -> list[dict]:
    text = (out / "_jobs" / job_id / "manifest.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _sidecar(out, name: str):
    return out / f".{name}.pixelrelay.json"


def test_an_edited_index_and_a_swapped_output_cost_a_reprocess_not_the_planted_bytes(
    stage_workers, redis_url, tmp_path
):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        (src / f"img{i}.png").write_bytes(encode(photo_like(16, 16, i), "PNG"))
    first = _submit(redis_url, src, out)
    assert first.returncode == 0, first.stderr + stage_workers.logs()
    genuine = (out / "img0.png").read_bytes()
    folded = _submit(redis_url, src, out)  # nothing new; the first job is folded into the index
    assert folded.returncode == 0 and "nothing new: 3 unchanged items skipped" in folded.stderr, folded.stderr

    # The attacker: img0's index row spoilt, a row that is not an object, one with wrong types;
    # img0's output and sidecar replaced by img2's (another input's bytes, a genuine sidecar).
    (index,) = (out / "_state" / "incremental").glob("*/index.jsonl")
    rows = index.read_text().splitlines()
    assert len(rows) == 3 and '"img0.png"' not in rows[0] and "img0.png" in rows[0]
    rows[0] = '{"input": "' + str(src / "img0.png") + '", "version": '
    rows += ["[1, 2]", '{"input": 7, "version": null, "request": {}, "done": "yes"}']
    index.write_text("\n".join(rows) + "\n")
    planted = (out / "img2.png").read_bytes()
    (out / "img0.png").write_bytes(planted)
    shutil.copyfile(_sidecar(out, "img2.png"), _sidecar(out, "img0.png"))

    second = _submit(redis_url, src, out)

    assert second.returncode == 0, second.stderr + stage_workers.logs()
    assert "Traceback" not in second.stderr
    assert "1 items to process (1 new, 0 changed, 0 retried); 2 unchanged items skipped" in second.stderr
    (row,) = _manifest(out, second.stdout.strip())
    assert row["input"] == str(src / "img0.png") and row["status"] == "done"
    assert row["outcome"] == "overwritten", row  # not "reused": the planted fingerprint is another input's
    assert (out / "img0.png").read_bytes() == genuine != planted


def test_a_manifest_edited_before_its_job_is_folded_costs_a_reprocess(stage_workers, redis_url, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(2):
        (src / f"img{i}.png").write_bytes(encode(photo_like(16, 16, i), "PNG"))
    first = _submit(redis_url, src, out)
    assert first.returncode == 0, first.stderr + stage_workers.logs()
    manifest = out / "_jobs" / first.stdout.strip() / "manifest.jsonl"
    manifest.write_text("not json\n" + manifest.read_text())  # one line more, and out of step

    second = _submit(redis_url, src, out)

    assert second.returncode == 0, second.stderr + stage_workers.logs()
    assert "2 items to process (0 new, 0 changed, 2 retried); 0 unchanged items skipped" in second.stderr
    rows = _manifest(out, second.stdout.strip())
    assert [r["status"] for r in rows] == ["done", "done"]


def test_an_index_row_edited_to_mark_a_changed_input_done_sends_it_again(stage_workers, redis_url, tmp_path):
    """img0 changes; the attacker rewrites its index row to the new version, still done (the
    row's MAC cannot follow): the re-run sends img0 again, and its output is made from the
    new bytes, not reused from the old ones."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(2):
        (src / f"img{i}.png").write_bytes(encode(photo_like(16, 16, i), "PNG"))
    first = _submit(redis_url, src, out)
    assert first.returncode == 0, first.stderr + stage_workers.logs()
    old = (out / "img0.png").read_bytes()
    folded = _submit(redis_url, src, out)
    assert "nothing new: 2 unchanged items skipped" in folded.stderr, folded.stderr

    (src / "img0.png").write_bytes(encode(photo_like(24, 20, 7), "PNG"))
    (index,) = (out / "_state" / "incremental").glob("*/index.jsonl")
    rows = [json.loads(line) for line in index.read_text().splitlines()]
    assert rows[0]["input"] == str(src / "img0.png") and rows[0]["done"] is True
    rows[0]["version"] = local_version(os.stat(src / "img0.png"))
    index.write_text("".join(json.dumps(row) + "\n" for row in rows))

    second = _submit(redis_url, src, out)

    assert second.returncode == 0, second.stderr + stage_workers.logs()
    assert "1 items to process (0 new, 1 changed, 0 retried); 1 unchanged items skipped" in second.stderr
    (row,) = _manifest(out, second.stdout.strip())
    assert row["input"] == str(src / "img0.png") and row["status"] == "done" and row["outcome"] == "processed"
    assert (out / "img0.png").read_bytes() != old
