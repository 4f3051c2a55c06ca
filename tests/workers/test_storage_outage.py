"""S3 unreachable for 20 s in the middle of a job, while outputs are being written.

Every connection to the endpoint is reset (``tests/netfaults.FlakyProxy``) from the moment a
worker sends the PUT of the third output object until 20 s later: that write and every read
and write of all three stages meanwhile fail with connection resets, the tasks retry with the
default backoff (2, 4, 8, 16 ... s, which outlasts 20 s within the default 5 retries), and
the job finishes with every item exactly once, one object per item and nothing partial. A
chunk whose listing read failed while the cursor handed it out is re-sent by the sweep
(lease 5 s here, so that case stays quick).
"""

from __future__ import annotations

import io
import json
import time
import uuid

import boto3
import pytest
import redis
from PIL import Image

from pixelrelay.jobs.state import JobState
from tests.conftest import WorkerPool, run_cli, worker_env
from tests.images import good_images
from tests.netfaults import FlakyProxy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N_ITEMS = 12
OUTAGE_S = 20.0
TRIP_AT = 3  # the outage starts with the PUT of this output


def _output_put(bucket: str):
    """Whether a request line is the PUT of an output image (not of a job file)."""
    return lambda line: line.startswith(f"PUT /{bucket}/out/") and f"/{bucket}/out/_jobs/" not in line


def _outputs(s3, bucket: str) -> set[str]:
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="out/").get("Contents", [])
    return {o["Key"] for o in listed if not o["Key"].startswith("out/_jobs/")}


def test_s3_unreachable_for_20_s_mid_job_while_writing(redis_url, s3_server, s3_bucket, tmp_path):
    proxy = FlakyProxy(int(s3_server.rsplit(":", 1)[1]))
    url = redis_url.rsplit("/", 1)[0] + "/12"
    client = redis.Redis.from_url(url)
    client.flushdb()
    env = worker_env(
        url,
        PIXELRELAY_S3_ENDPOINT_URL=proxy.url,
        PIXELRELAY_PLUGINS="tests.faults",
        PIXELRELAY_TEST_SLOW_S="1.0",
        PIXELRELAY_CHUNK_SIZE="2",
        PIXELRELAY_BATCH_SIZE="2",
        PIXELRELAY_WINDOW="2",
        PIXELRELAY_LEASE_S="5",
        PIXELRELAY_SWEEP_INTERVAL_S="1",
    )
    s3 = boto3.client("s3", endpoint_url=s3_server)
    files = good_images(N_ITEMS)
    for rel, data in files.items():
        s3.put_object(Bucket=s3_bucket, Key=f"in/{rel}", Body=data)
    pool = WorkerPool(env, tmp_path, {"encoder": "analysis", "planner": "rules", "decoder": "slow"}).start()
    job_id = "outage-" + uuid.uuid4().hex[:6]
    proxy.trip_on(_output_put(s3_bucket), count=TRIP_AT)
    try:
        submitted = run_cli(
            ["submit", f"s3://{s3_bucket}/in", "--out", f"s3://{s3_bucket}/out", "--job-id", job_id], env
        )
        assert submitted.returncode == 0, submitted.stderr
        assert proxy.tripped.wait(120), f"no output PUT {TRIP_AT}: {proxy.passed}\n{pool.logs()}"
        down_at = time.monotonic()
        time.sleep(OUTAGE_S)  # the outage itself
        proxy.come_up()
        waited = run_cli(["status", job_id, "--wait", "--timeout", "240"], env)
        recovered_s = time.monotonic() - down_at - OUTAGE_S
        assert waited.returncode == 0, waited.stdout + waited.stderr + pool.logs()
    finally:
        pool.stop()
        proxy.close()
    is_output_put = _output_put(s3_bucket)
    before, after = proxy.passed[: proxy.passed_at_trip], proxy.passed[proxy.passed_at_trip :]
    assert sum(map(is_output_put, before)) == TRIP_AT - 1 < N_ITEMS, before  # the outage hit the middle of the job
    assert is_output_put(proxy.tripped_by) and proxy.tripped_by in proxy.met  # it met a write of an output
    assert proxy.tripped_by in after, after  # and that write was sent again after it
    body = s3.get_object(Bucket=s3_bucket, Key=f"out/_jobs/{job_id}/manifest.jsonl")["Body"].read()
    rows = [json.loads(line) for line in body.splitlines()]
    assert [r["index"] for r in rows] == list(range(N_ITEMS))  # every item exactly once
    assert all(r["status"] == "done" for r in rows), [r["error"] for r in rows]
    assert _outputs(s3, s3_bucket) == {f"out/{rel}" for rel in files}  # one object per item, nothing extra
    for rel, data in files.items():  # nothing partial: every output is a whole image of the source's size
        obj = s3.get_object(Bucket=s3_bucket, Key=f"out/{rel}")
        assert obj["Metadata"].get("pixelrelay-fingerprint")
        with Image.open(io.BytesIO(obj["Body"].read())) as out, Image.open(io.BytesIO(data)) as src:
            out.load()
            assert out.size == src.size
    counts = JobState(client, job_id).counts()
    assert (counts.total, counts.done, counts.failed) == (N_ITEMS, N_ITEMS, 0)
    print(f"{len(proxy.met)} requests met the outage; recovered {recovered_s:.1f} s after the endpoint came back")
