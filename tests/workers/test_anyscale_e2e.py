"""Any output scale through real stage workers (subprocesses), Redis and S3 (moto): outputs
at the exact size for odd sources, the manifest records the plan's target, the native and
final scale and the output size, and a resubmission reuses the outputs."""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pytest
from PIL import Image

from pixelrelay.exitcodes import ExitCode
from pixelrelay.producer.cli import main
from tests.conftest import run_cli, worker_env
from tests.images import encode, photo_like

pytestmark = pytest.mark.e2e


def _files() -> dict[str, bytes]:
    files = {"a.png": encode(photo_like(29, 37, 1), "PNG"), "b.jpg": encode(photo_like(41, 23, 2), "JPEG")}
    rgba = photo_like(30, 27, 3).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 30, dtype=np.uint8), (27, 1))))
    files["c.png"] = encode(rgba, "PNG")
    return files


def _manifest(s3_client, bucket: str, out: str, job_id: str) -> dict[str, dict]:
    body = s3_client.get_object(Bucket=bucket, Key=f"{out}/_jobs/{job_id}/manifest.jsonl")["Body"].read()
    return {json.loads(line)["input"].rsplit("/", 1)[1]: json.loads(line) for line in body.splitlines()}


def _read(s3_client, uri: str) -> Image.Image:
    bucket, key = uri[len("s3://") :].split("/", 1)
    return Image.open(io.BytesIO(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()))


def _submit(redis_url, bucket, out, job_id, *flags):
    return run_cli(
        ["submit", f"s3://{bucket}/in", "--out", f"s3://{bucket}/{out}", "--job-id", job_id, "--wait", *flags],
        worker_env(redis_url),
    )


JOBS = {  # out prefix -> flags, {input: (output size, native scale, final scale)}
    "x1.5": (
        ["--task", "upscale", "--scale", "1.5"],
        {"a.png": ((44, 56), 2, 1.5), "b.jpg": ((62, 35), 2, 1.5), "c.png": ((45, 41), 2, 1.5)},
    ),
    "w50": (
        ["--width", "50"],  # 37*50/29 = 63.8; 23*50/41 = 28.05; 27*50/30 = 45
        {"a.png": ((50, 64), 2, 1.72414), "b.jpg": ((50, 28), 2, 1.21951), "c.png": ((50, 45), 2, 1.66667)},
    ),
}


def test_any_scale_jobs_through_real_workers(stage_workers, redis_url, s3_bucket, s3_client, capsys):
    files = _files()
    for rel, data in files.items():
        s3_client.put_object(Bucket=s3_bucket, Key=f"in/{rel}", Body=data)
    for out, (flags, expected) in JOBS.items():
        job_id = f"anyscale-{out.replace('.', '')}-{uuid.uuid4().hex[:6]}"
        result = _submit(redis_url, s3_bucket, out, job_id, *flags)
        assert result.returncode == 0, result.stderr + stage_workers.logs()
        rows = _manifest(s3_client, s3_bucket, out, job_id)
        assert set(rows) == set(files)
        for rel, (size, native, final) in expected.items():
            row = rows[rel]
            assert row["status"] == "done", row
            assert tuple(row["output_size"]) == size and row["native_scale"] == native
            assert row["final_scale"] == final
            assert row["plan"]["target"] == ({"scale": 1.5} if out == "x1.5" else {"width": 50})
            assert any(
                n.startswith(f"output {'x1.5' if out == 'x1.5' else 'width 50'}: decoder ran x{native}")
                for n in row["notes"]
            ), row["notes"]
            image = _read(s3_client, row["output"])
            assert image.size == size
            if rel == "c.png":  # alpha kept, resampled with the rest
                alpha = np.asarray(image.getchannel("A"))
                assert alpha[:, :3].mean() < 20 and alpha[:, -3:].mean() > 235

        # The report reads the manifest and shows the request and each item's scales.
        assert main(["report", job_id, "--redis-url", redis_url]) == ExitCode.OK
        html_uri = capsys.readouterr().out.split()[0]
        bucket, key = html_uri[len("s3://") :].split("/", 1)
        page = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        assert ("upscale output x1.5" if out == "x1.5" else "restore output width 50") in page
        assert "scale \u00d72 native, \u00d7" in page

        # The same request again: every output already answers it (the target is in the fingerprint).
        again = f"{job_id}-again"
        result = _submit(redis_url, s3_bucket, out, again, *flags)
        assert result.returncode == 0, result.stderr + stage_workers.logs()
        assert {r["outcome"] for r in _manifest(s3_client, s3_bucket, out, again).values()} == {"reused"}
