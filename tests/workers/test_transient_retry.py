"""Storage that drops every connection for a while: tasks retry with backoff and finish."""

from __future__ import annotations

import json
import uuid

import boto3
import pytest
import redis

from pixelrelay.jobs import keys
from pixelrelay.jobs.chunks import Entry
from tests.conftest import WorkerPool, run_cli, wait_until, worker_env
from tests.images import good_images
from tests.netfaults import FlakyProxy

pytestmark = pytest.mark.e2e


def _retrying(client: redis.Redis, job_id: str) -> bool:
    """Whether some chain of the job waits out a retry's backoff (its entry's ``wait``)."""
    entries = (Entry.from_json(raw) for raw in client.hvals(keys.chunks(job_id)))
    return any(entry and entry.wait > 0 for entry in entries)


def test_storage_outage_is_retried_with_backoff(redis_url, s3_server, s3_bucket, tmp_path):
    proxy = FlakyProxy(int(s3_server.rsplit(":", 1)[1]))
    isolated = redis_url.rsplit("/", 1)[0] + "/5"
    client = redis.Redis.from_url(isolated)
    client.flushdb()
    env = worker_env(isolated, PIXELRELAY_S3_ENDPOINT_URL=proxy.url, PIXELRELAY_MAX_RETRIES="8")
    s3 = boto3.client("s3", endpoint_url=s3_server)
    for rel, data in good_images(4).items():
        s3.put_object(Bucket=s3_bucket, Key=f"in/{rel}", Body=data)
    job_id = "flaky-" + uuid.uuid4().hex[:6]
    submitted = run_cli(["submit", f"s3://{s3_bucket}/in", "--out", f"s3://{s3_bucket}/out", "--job-id", job_id], env)
    assert submitted.returncode == 0, submitted.stderr

    proxy.go_down()  # the workers start into an outage
    pool = WorkerPool(env, tmp_path, {"encoder": "analysis", "planner": "rules", "decoder": "classic"})
    pool.start()
    try:
        wait_until(lambda: _retrying(client, job_id), timeout=120)  # a task's own retry, with its backoff
        met = len(proxy.met)
        wait_until(lambda: len(proxy.met) > met, timeout=60)  # and a request after it met the outage too
        proxy.come_up()
        waited = run_cli(["status", job_id, "--wait"], env)
        assert waited.returncode == 0, waited.stdout + waited.stderr + pool.logs()
    finally:
        pool.stop()
        proxy.close()
    assert proxy.resets > 0 and set(proxy.met) <= set(proxy.passed), (proxy.met, proxy.passed)  # each sent again
    body = s3.get_object(Bucket=s3_bucket, Key=f"out/_jobs/{job_id}/manifest.jsonl")["Body"].read()
    rows = [json.loads(line) for line in body.splitlines()]
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows)
