"""The Python API (``pixelrelay.api``) against real parts: the session Redis, the session stage
workers (subprocesses), moto's S3 server, and an idle Redis database no worker listens on
(jobs there stay queued until cancelled)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

import pixelrelay
from pixelrelay.api import CancelOutcome, ConfigError, InputError, ManifestRow, UnknownJobError
from pixelrelay.exitcodes import ExitCode
from pixelrelay.jobs.state import JobStatus
from tests.conftest import REPO, worker_env
from tests.images import bad_and_odd_images, good_images

IDLE_DB = 14  # no stage worker listens here


def _idle(redis_url: str) -> str:
    return redis_url.rsplit("/", 1)[0] + f"/{IDLE_DB}"


def _folder(path: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return path


def test_import_pixelrelay_stays_cheap():
    code = (
        "import sys, pixelrelay; heavy = [m for m in ('pydantic', 'celery', 'redis', 'torch') if m in sys.modules]; "
        "assert not heavy, heavy; assert callable(pixelrelay.submit) and 'celery' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_storage_streams_lines_locally_and_from_s3(tmp_path, s3_bucket, s3_client):
    from pixelrelay.pipeline.storage import StorageNotFoundError, open_storage

    body = b'{"a":1}\r\n\n{"b":2}\n' + b"x" * 200_000 + b"\nlast"  # CRLF, a blank line, a long line, no final newline
    want = [b'{"a":1}', b"", b'{"b":2}', b"x" * 200_000, b"last"]
    (tmp_path / "m.jsonl").write_bytes(body)
    s3_client.put_object(Bucket=s3_bucket, Key="m.jsonl", Body=body)
    for uri in (str(tmp_path / "m.jsonl"), f"s3://{s3_bucket}/m.jsonl"):
        storage = open_storage(uri)
        assert list(storage.iter_lines(uri)) == want
        with pytest.raises(StorageNotFoundError):
            next(storage.iter_lines(uri + ".missing"))


def test_submit_wait_status_and_manifest_on_s3(stage_workers, redis_url, s3_bucket, s3_client):
    files = dict(good_images(5))
    files["notes.png"] = bad_and_odd_images()[0]["notes.png"]  # fails: not an image
    for rel, data in files.items():
        s3_client.put_object(Bucket=s3_bucket, Key=f"in/{rel}", Body=data)

    job = pixelrelay.submit(f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out/", redis_url=redis_url, chunk_size=2)
    assert job.output == f"s3://{s3_bucket}/out" and job.submission.total == 6
    early = job.status()
    assert early.job_id == job.job_id and early.total == 6 and early.done + early.failed + early.pending == 6

    status = job.wait(timeout=120)
    assert status.state == JobStatus.FAILED_ITEMS, stage_workers.logs()
    assert (status.done, status.failed, status.cancelled, status.pending) == (5, 1, 0, 0)
    assert status.exit_code == ExitCode.FAILED_ITEMS and status.ended and status.eta_s == 0
    assert status.manifest == f"s3://{s3_bucket}/out/_jobs/{job.job_id}/manifest.jsonl"

    # The rows are the manifest's lines, validated, nothing lost, streamed from S3.
    rows = list(job.manifest())
    body = s3_client.get_object(Bucket=s3_bucket, Key=f"out/_jobs/{job.job_id}/manifest.jsonl")["Body"].read()
    assert [r.model_dump(mode="json") for r in rows] == [json.loads(line) for line in body.splitlines()]
    assert all(isinstance(r, ManifestRow) for r in rows) and [r.index for r in rows] == list(range(6))
    (failed,) = [r for r in rows if r.status == "failed"]
    assert failed.input.endswith("/notes.png") and failed.output is None and "not a recognised image" in failed.error
    for row in rows:
        if row.status == "done":
            bucket, key = row.output[len("s3://") :].split("/", 1)
            assert s3_client.head_object(Bucket=bucket, Key=key)["ContentLength"] > 0

    # Redis loses the job: attaching by id alone fails, with its output it is rebuilt from
    # storage (the failed item is tried again) and ends the same way.
    client = redis.Redis.from_url(redis_url)
    client.delete(*client.keys(f"pixelrelay:job:{job.job_id}*"))
    with pytest.raises(UnknownJobError):
        pixelrelay.Job.attach(job.job_id, redis_url=redis_url)
    again = pixelrelay.Job.attach(job.job_id, out=f"s3://{s3_bucket}/out", redis_url=redis_url)
    assert again.status().total == 6
    final = again.wait(timeout=120)
    assert (final.state, final.done, final.failed) == (JobStatus.FAILED_ITEMS, 5, 1)


def test_queued_job_times_out_then_cancels(redis_url, tmp_path):
    url = _idle(redis_url)
    src = _folder(tmp_path / "in", good_images(3))
    job = pixelrelay.submit(str(src), str(tmp_path / "out"), redis_url=url, chunk_size=1, window=1)

    status = job.status()
    assert (status.state, status.total, status.done, status.pending) == (JobStatus.QUEUED, 3, 0, 3)
    assert status.manifest is None and not status.ended and status.eta_s is None and status.exit_code is None
    with pytest.raises(pixelrelay.ManifestNotReady):
        job.manifest()

    started = time.monotonic()
    with pytest.raises(TimeoutError) as caught:  # WaitTimeout is a TimeoutError
        job.wait(timeout=0.3, poll_s=0.05)
    assert isinstance(caught.value, pixelrelay.WaitTimeout) and time.monotonic() - started < 5
    assert job.status().state == JobStatus.QUEUED  # the job goes on

    attached = pixelrelay.Job.attach(job.job_id, redis_url=url)
    assert (attached.job_id, attached.output) == (job.job_id, str(tmp_path / "out"))
    assert attached.cancel(grace_s=0) == CancelOutcome.FORCED  # nothing is in flight to end it
    status = job.status()
    assert (status.state, status.cancelled, status.pending) == (JobStatus.CANCELLED, 3, 0)
    assert status.exit_code == ExitCode.CANCELLED and status.ended
    rows = list(job.manifest())
    assert [(r.status, r.output) for r in rows] == [("cancelled", None)] * 3
    assert job.cancel() == CancelOutcome.ALREADY
    assert job.wait(timeout=5).state == JobStatus.CANCELLED


def test_bad_arguments_fail_fast_with_typed_errors(redis_url, tmp_path):
    url = _idle(redis_url)
    src = _folder(tmp_path / "in", good_images(1))
    with pytest.raises(ConfigError, match="chunk_sise"):
        pixelrelay.submit(str(src), str(tmp_path / "out"), redis_url=url, chunk_sise=4)
    with pytest.raises(ConfigError, match="chunk_size: Input should be greater"):
        pixelrelay.submit(str(src), str(tmp_path / "out"), redis_url=url, chunk_size=0)
    with pytest.raises(ConfigError, match="quality"):
        pixelrelay.submit(str(src), str(tmp_path / "out"), redis_url=url, quality=0)
    with pytest.raises(ConfigError, match="^job_id: "):
        pixelrelay.submit(str(src), str(tmp_path / "out"), redis_url=url, job_id="../escape")
    for size, why in (
        ({"scale": 9}, "scale"),
        ({"scale": 0}, "scale"),
        ({"scale": float("nan")}, "scale"),
        ({"width": 0}, "width"),
        ({"height": 70000}, "height"),
        ({"scale": 2, "width": 100}, "not both"),
    ):
        with pytest.raises(ConfigError, match=why):
            pixelrelay.submit(str(src), str(tmp_path / "out"), redis_url=url, **size)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError):
        pixelrelay.submit(str(tmp_path / "empty"), str(tmp_path / "out"), redis_url=url)
    with pytest.raises(UnknownJobError):
        pixelrelay.Job.attach("no-such-" + uuid.uuid4().hex[:6], redis_url=url)
    with pytest.raises(ConfigError, match="timeout"):
        pixelrelay.Job("x", str(tmp_path), pixelrelay.api.Settings.from_env(redis_url=url)).wait(timeout=0)


def test_example_script_runs_against_the_workers(stage_workers, redis_url, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "api_example.py"),
            str(src),
            str(out),
            "--demo",
            "3",
            "--timeout",
            "120",
        ],
        env=worker_env(redis_url),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr + stage_workers.logs()
    lines = result.stdout.splitlines()
    job_id = lines[0].removeprefix("submitted ")
    assert lines[1] == (
        f"state=finished done=3 failed=0 cancelled=0 total=3 manifest={out}/_jobs/{job_id}/manifest.jsonl"
    )
    assert len(lines) == 5
    for line in lines[2:]:
        status, source, arrow, output = line.split()
        assert status == "done" and arrow == "->" and Path(source).parent == src and Path(output).is_file()
