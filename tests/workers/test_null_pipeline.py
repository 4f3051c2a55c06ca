"""The null backends end to end: real stage workers (subprocesses), real Redis, local
folders. The job names them per job (``--encoder null ...``: weight-free kinds every worker
allows), so the session's workers run it; the output is the input, pixel for pixel, written
through the normal output path (encode, fingerprint, conditional write, manifest)."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli, worker_env

pytestmark = pytest.mark.e2e

ITEMS = 8  # two chunks of 4 (worker_env's PIXELRELAY_CHUNK_SIZE)


def _inputs(folder) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    arrays = {}
    for i in range(ITEMS):
        mode = "RGBA" if i % 3 == 0 else "RGB"
        shape = (9 + i, 13 + 2 * i, 4 if mode == "RGBA" else 3)
        arrays[f"img{i}.png"] = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(arrays[f"img{i}.png"], mode).save(folder / f"img{i}.png")
    return arrays


def test_null_backends_give_back_the_inputs_pixel_for_pixel(stage_workers, redis_url, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    arrays = _inputs(src)
    job_id = "null-" + uuid.uuid4().hex[:8]
    args = [
        "submit",
        str(src),
        "--out",
        str(out),
        "--job-id",
        job_id,
        "--encoder",
        "null",
        "--planner",
        "null",
        "--decoder",
        "null",
        "--wait",
    ]
    result = run_cli(args, worker_env(redis_url))
    assert result.returncode == 0, result.stderr + stage_workers.logs()

    rows = [json.loads(line) for line in (out / "_jobs" / job_id / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == ITEMS and len(list((out / "_jobs" / job_id / "parts").iterdir())) == 2  # two chunks
    for row in rows:
        assert row["status"] == "done" and row["outcome"] == "processed", row
        assert row["backends"] == {"encoder": "null", "planner": "null", "decoder": "null"}
        assert row["plan"]["operations"] == [] and row["plan"]["scale"] == 1
        name = row["input"].rsplit("/", 1)[1]
        assert row["output"] == str(out / name)
        with Image.open(row["output"]) as written:
            assert written.mode == ("RGBA" if arrays[name].shape[2] == 4 else "RGB")
            assert np.array_equal(np.asarray(written), arrays[name]), name
