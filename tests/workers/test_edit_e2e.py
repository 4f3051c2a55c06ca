"""Edit and style jobs through real stage workers (subprocesses), Redis and S3 (moto):
the outputs are measurably edited, alpha is kept, the manifest records the edit, and an
instruction no planner can map fails its items with the reason (never an unchanged image)."""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pytest
from PIL import Image

from pixelrelay.pipeline.messages import JobOptions
from pixelrelay.pipeline.settings import Settings
from pixelrelay.producer import submit as submit_module
from tests.conftest import run_cli, worker_env
from tests.images import encode, photo_like

pytestmark = pytest.mark.e2e


def _files() -> dict[str, bytes]:
    files = {f"p{i}.png": encode(photo_like(24 + 6 * i, 20 + 4 * i, i), "PNG") for i in range(3)}
    rgba = photo_like(30, 26, 7).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 30, dtype=np.uint8), (26, 1))))
    files["alpha.png"] = encode(rgba, "PNG")
    return files


def _upload(s3_client, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        s3_client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=data)


def _manifest(s3_client, bucket: str, out: str, job_id: str) -> list[dict]:
    body = s3_client.get_object(Bucket=bucket, Key=f"{out}/_jobs/{job_id}/manifest.jsonl")["Body"].read()
    return [json.loads(line) for line in body.splitlines()]


def _read(s3_client, uri: str) -> Image.Image:
    bucket, key = uri[len("s3://") :].split("/", 1)
    return Image.open(io.BytesIO(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()))


def _rb(img: Image.Image) -> float:
    rgb = np.asarray(img.convert("RGB"), dtype=np.float64)
    return float(rgb[..., 0].mean() / rgb[..., 2].mean())


def test_edit_jobs_through_real_workers(stage_workers, redis_url, s3_bucket, s3_client):
    files = _files()
    _upload(s3_client, s3_bucket, "in", files)
    jobs = {  # out prefix -> (extra flags)
        "warm-classic": ["--task", "edit", "--instruction", "make it warmer"],  # the workers' decoder: classic
        "sunset-builtin": ["--task", "style", "--instruction", "warm sunset", "--decoder", "builtin"],
    }
    for out, flags in jobs.items():
        job_id = f"{out}-{uuid.uuid4().hex[:6]}"
        result = run_cli(
            [
                "submit",
                f"s3://{s3_bucket}/in",
                "--out",
                f"s3://{s3_bucket}/{out}",
                "--job-id",
                job_id,
                "--wait",
                *flags,
            ],
            worker_env(redis_url),
        )
        assert result.returncode == 0, result.stderr + stage_workers.logs()
        rows = _manifest(s3_client, s3_bucket, out, job_id)
        assert len(rows) == len(files) and all(r["status"] == "done" for r in rows)
        for row in rows:
            source = Image.open(io.BytesIO(files[row["input"].rsplit("/", 1)[1]]))
            output = _read(s3_client, row["output"])
            edit = row["plan"]["edit"]
            assert output.size == source.size and any(n.startswith("graded: ") for n in row["notes"])
            assert row["plan"]["operations"] == []  # no restoration asked for
            if out == "sunset-builtin":
                assert {op["name"] for op in edit["grading"]} == {"warmth", "saturation", "contrast"}
                assert row["backends"]["decoder"] == "builtin"
            else:
                assert edit["grading"] == [{"name": "warmth", "strength": 0.35}]
            assert _rb(output) > _rb(source) * 1.08  # measurably warmer
            if source.mode == "RGBA":  # alpha kept exactly
                assert output.mode == "RGBA"
                assert np.array_equal(np.asarray(output)[..., 3], np.asarray(source)[..., 3])


def test_an_instruction_no_planner_maps_fails_its_items_with_the_reason(
    stage_workers, redis_url, s3_bucket, s3_client, monkeypatch
):
    _upload(s3_client, s3_bucket, "in", {"a.png": _files()["p0.png"]})
    # submit refuses it; a job that got past it anyway (another submitter's planner setting,
    # a forged message) meets the rules planner in the worker, which refuses it again.
    monkeypatch.setattr(submit_module, "check_instruction", lambda options, planner: None)
    settings = Settings.from_env(redis_url=redis_url)
    job_id = "edit-refused-" + uuid.uuid4().hex[:6]
    submit_module.submit(
        settings,
        f"s3://{s3_bucket}/in",
        f"s3://{s3_bucket}/refused",
        JobOptions(task="edit", instruction="add a hat"),
        job_id=job_id,
    )
    waited = run_cli(["status", job_id, "--wait"], worker_env(redis_url), timeout=120)
    assert waited.returncode == 1, waited.stdout + waited.stderr + stage_workers.logs()
    (row,) = _manifest(s3_client, s3_bucket, "refused", job_id)
    assert row["status"] == "failed" and row["output"] is None
    assert row["error"].startswith("plan: ") and "cannot map 'add a hat'" in row["error"]
    assert stage_workers.alive()
