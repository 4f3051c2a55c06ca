"""Whole jobs through real stage workers (subprocesses), Redis and S3 (moto over HTTP)."""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pytest
import redis
from PIL import Image

from pixelrelay.exitcodes import ExitCode
from tests.conftest import run_cli, worker_env
from tests.images import bad_and_odd_images, good_images

pytestmark = pytest.mark.e2e

MANIFEST_FIELDS = {"input", "output", "status", "error", "description", "plan", "timings", "backends"}


def _upload(s3_client, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        s3_client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=data)


def _manifest(s3_client, bucket: str, job_id: str) -> list[dict]:
    body = s3_client.get_object(Bucket=bucket, Key=f"out/_jobs/{job_id}/manifest.jsonl")["Body"].read()
    return [json.loads(line) for line in body.splitlines()]


def _image(s3_client, uri: str) -> Image.Image:
    bucket, key = uri[len("s3://") :].split("/", 1)
    return Image.open(io.BytesIO(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()))


def _submit(redis_url, bucket, job_id, *extra):
    env = worker_env(redis_url)
    args = ["submit", f"s3://{bucket}/in", "--out", f"s3://{bucket}/out", "--job-id", job_id, "--wait", *extra]
    return run_cli(args, env)


def test_s3_to_s3_job_through_all_three_stages(stage_workers, redis_url, s3_bucket, s3_client):
    files = good_images(24)
    _upload(s3_client, s3_bucket, "in", files)
    job_id = "e2e-" + uuid.uuid4().hex[:8]
    result = _submit(redis_url, s3_bucket, job_id, "--task", "upscale", "--scale", "2")
    assert result.returncode == 0, result.stderr + stage_workers.logs()
    assert result.stdout.strip() == job_id

    rows = _manifest(s3_client, s3_bucket, job_id)
    assert len(rows) == 24
    assert [r["index"] for r in rows] == list(range(24))
    for row in rows:
        assert MANIFEST_FIELDS <= row.keys()
        assert row["status"] == "done" and row["error"] is None
        assert row["plan"]["scale"] == 2
        assert set(row["timings"]) == {"encode_s", "plan_s", "decode_s"}
        assert row["backends"] == {"encoder": "analysis", "planner": "rules", "decoder": "classic"}
        assert row["description"]["text"]
        rel = row["input"].split("/in/", 1)[1]
        assert row["output"] == f"s3://{s3_bucket}/out/{rel}"  # same name, same format kept
        source = Image.open(io.BytesIO(files[rel]))
        assert _image(s3_client, row["output"]).size == (source.width * 2, source.height * 2)

    # Redis keeps bits and a small hash for the job, not per-item results.
    client = redis.Redis.from_url(redis_url)
    job_keys = client.keys(f"pixelrelay:job:{job_id}*")
    assert sum(client.memory_usage(k) or 0 for k in job_keys) < 4096


def test_bad_files_fail_alone_with_reasons(stage_workers, redis_url, s3_bucket, s3_client):
    files, expected_failures = bad_and_odd_images()
    _upload(s3_client, s3_bucket, "in", files)
    job_id = "bad-" + uuid.uuid4().hex[:8]
    result = _submit(redis_url, s3_bucket, job_id)
    assert result.returncode == 1, result.stderr + stage_workers.logs()
    assert "failed" in result.stderr
    assert stage_workers.alive(), stage_workers.logs()

    rows = {r["input"].rsplit("/", 1)[1]: r for r in _manifest(s3_client, s3_bucket, job_id)}
    assert set(rows) == set(files)
    for name, row in rows.items():
        if name in expected_failures:
            assert row["status"] == "failed", name
            assert expected_failures[name] in row["error"], (name, row["error"])
            assert row["output"] is None
        else:
            assert row["status"] == "done", (name, row["error"])

    assert any("first frame" in n for n in rows["animated.gif"]["notes"])
    assert rows["animated.gif"]["output"].endswith("animated.png")
    rotated = _image(s3_client, rows["rotated.jpg"]["output"])
    assert rotated.size == (20, 40)  # upright
    out_alpha = np.asarray(_image(s3_client, rows["alpha.png"]["output"]).convert("RGBA"))[..., 3]
    assert out_alpha[:, :10].max() < 20 and out_alpha[:, 20:].min() > 235
    assert _image(s3_client, rows["tiny.png"]["output"]).size == (2, 1)
    assert _image(s3_client, rows["cmyk.jpg"]["output"]).mode == "RGB"


def test_resubmitting_resumes_and_skips_finished_items(stage_workers, redis_url, s3_bucket, s3_client):
    files = good_images(6)
    files["broken.png"] = b"\x89PNG\r\n\x1a\n not really"
    _upload(s3_client, s3_bucket, "in", files)
    job_id = "resume-" + uuid.uuid4().hex[:8]
    first = _submit(redis_url, s3_bucket, job_id)
    assert first.returncode == 1, first.stderr + stage_workers.logs()
    done_before = {r["output"]: r for r in _manifest(s3_client, s3_bucket, job_id) if r["status"] == "done"}
    assert len(done_before) == 6
    stamps = {
        uri: s3_client.head_object(Bucket=s3_bucket, Key=uri.split("/", 3)[3])["LastModified"] for uri in done_before
    }

    # Fix the broken input, and lose the job's Redis state: storage is the source of truth.
    _upload(s3_client, s3_bucket, "in", {"broken.png": good_images(1)["nested/img000.png"]})
    client = redis.Redis.from_url(redis_url)
    client.delete(*client.keys(f"pixelrelay:job:{job_id}*"))

    second = _submit(redis_url, s3_bucket, job_id)
    assert second.returncode == 0, second.stderr + stage_workers.logs()
    assert "6 of 7 items already done" in second.stderr
    rows = _manifest(s3_client, s3_bucket, job_id)
    assert len(rows) == 7 and all(r["status"] == "done" for r in rows)
    for uri, stamp in stamps.items():  # finished items were not redone
        assert s3_client.head_object(Bucket=s3_bucket, Key=uri.split("/", 3)[3])["LastModified"] == stamp
    fixed = next(r for r in rows if r["input"].endswith("broken.png"))
    assert _image(s3_client, fixed["output"]).size == Image.open(io.BytesIO(good_images(1)["nested/img000.png"])).size


def test_resubmitting_with_other_options_is_a_usage_error(stage_workers, redis_url, s3_bucket, s3_client):
    _upload(s3_client, s3_bucket, "in", good_images(2))
    job_id = "opts-" + uuid.uuid4().hex[:8]
    assert _submit(redis_url, s3_bucket, job_id).returncode == 0
    again = _submit(redis_url, s3_bucket, job_id, "--scale", "4")
    assert again.returncode == 2 and "different options" in again.stderr


def test_unwritable_output_is_a_clear_storage_error(redis_url, s3_bucket, s3_client):
    _upload(s3_client, s3_bucket, "in", good_images(1))
    result = run_cli(["submit", f"s3://{s3_bucket}/in", "--out", "s3://no-such-bucket-here/out"], worker_env(redis_url))
    assert result.returncode == ExitCode.STORAGE
    assert "no-such-bucket-here" in result.stderr and "Traceback" not in result.stderr
