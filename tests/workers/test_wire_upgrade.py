"""Rolling upgrades: upgraded workers finish what the previous release's producer sent, and
a message from a newer release is put back on its queue, never lost."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime

import pytest
import redis
from celery import chain
from celery.exceptions import Retry as CeleryRetry

from pixelrelay.pipeline import constants as C
from pixelrelay.pipeline.messages import WIRE_VERSION, ChunkMessage, JobOptions
from pixelrelay.pipeline.settings import Settings
from pixelrelay.producer import submit as submit_module
from pixelrelay.workers import tasks
from pixelrelay.workers.celery_app import create_app, queue_name, task_name
from tests.conftest import TEST_SIGNER, run_cli, worker_env
from tests.images import good_images


def _v1_body(msg: ChunkMessage) -> dict:
    """The chunk as the previous release's producer wrote it: no ``v``, no quality/lossless."""
    return {
        "job_id": msg.job_id,
        "seq": msg.seq,
        "chunk": msg.chunk,
        "output": msg.output,
        "options": {"task": "restore", "scale": None, "instruction": "", "format": None},
        "backends": {"encoder": None, "planner": None, "decoder": None},
        "records": [
            {
                "index": r.index,
                "input": r.input,
                "output": r.output,
                "status": None,
                "error": None,
                "notes": [],
                "description": None,
                "plan": None,
                "timings": {},
                "backends": {},
                "output_size": None,
                "source_size": None,
            }
            for r in msg.records
        ],
        "feeds": True,
        "part": "",
    }


def test_a_version_1_chunk_completes_on_upgraded_workers(stage_workers, redis_url, s3_bucket, s3_client, monkeypatch):
    for rel, data in good_images(3).items():
        s3_client.put_object(Bucket=s3_bucket, Key=f"in/{rel}", Body=data)
    settings = Settings.from_env(redis_url=redis_url, chunk_size=2, window=1)
    sent: list[ChunkMessage] = []
    hold = lambda app, signer, budget=None: sent.append  # noqa: E731 (hold the first chunk back)
    monkeypatch.setattr(submit_module, "sender", hold)
    job_id = "wire-v1-" + uuid.uuid4().hex[:6]
    submit_module.submit(settings, f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out", JobOptions(), job_id=job_id)
    assert [m.chunk for m in sent] == [0]

    # Chunk 0 goes out in the old format; the workers then feed chunk 1 themselves.
    app = create_app(settings)
    body = TEST_SIGNER.sign("chunk:encode", _v1_body(sent[0]))
    chain(
        app.signature(task_name("encode"), args=(body,), immutable=True),
        app.signature(task_name("plan")),
        app.signature(task_name("decode")),
    ).apply_async()
    waited = run_cli(["status", job_id, "--wait"], worker_env(redis_url), timeout=120)
    assert waited.returncode == 0, waited.stdout + waited.stderr + stage_workers.logs()
    manifest = s3_client.get_object(Bucket=s3_bucket, Key=f"out/_jobs/{job_id}/manifest.jsonl")["Body"].read()
    rows = [json.loads(line) for line in manifest.splitlines()]
    assert [(r["index"], r["status"]) for r in rows] == [(0, "done"), (1, "done"), (2, "done")]
    for row in rows:
        bucket, key = row["output"][len("s3://") :].split("/", 1)
        assert s3_client.head_object(Bucket=bucket, Key=key)["ContentLength"] > 0


def test_a_newer_wire_version_is_requeued_with_its_chain(redis_url):
    url = redis_url.rsplit("/", 1)[0] + "/8"  # no stage worker listens on this database
    client = redis.Redis.from_url(url)
    client.flushdb()
    app = create_app(Settings.from_env(redis_url=url))
    tasks.register(app)
    task = app.tasks[task_name("encode")]
    body = {"v": WIRE_VERSION + 1, "job_id": "from-the-future", "chunk": 0, "records": [], "new_field": {}}
    body = TEST_SIGNER.sign("chunk:encode", body)
    rest = [app.signature(task_name("decode")), app.signature(task_name("plan"))]  # Celery's order
    task.push_request(
        id="task-1",
        retries=2,
        args=[body],
        kwargs={},
        chain=[dict(s) for s in rest],
        delivery_info={"exchange": "", "routing_key": queue_name("encode")},
    )
    try:
        with pytest.raises(CeleryRetry):  # the worker acks this delivery: the copy carries on
            tasks.run_stage(task, "encode", body)
    finally:
        task.pop_request()
        app.close()

    queued = client.lrange(queue_name("encode"), 0, -1)
    assert len(queued) == 1
    message = json.loads(queued[0])
    headers = message["headers"]
    assert headers["id"] == "task-1" and headers["task"] == task_name("encode")
    assert headers["retries"] == 2  # the policy's transient-error retries are not spent
    wait = datetime.fromisoformat(headers["eta"]) - datetime.now(UTC)  # not at once
    assert C.WIRE_REQUEUE_DELAY_S - 10 < wait.total_seconds() <= C.WIRE_REQUEUE_DELAY_S
    raw = message["body"]  # as the message's own body_encoding says (ours: none, kombu's default: base64)
    if message["properties"].get("body_encoding") == "base64":
        raw = base64.b64decode(raw)
    args, kwargs, embed = json.loads(raw)
    assert args == [body]  # untouched, for an upgraded worker to read
    assert [s["task"] for s in embed["chain"]] == [task_name("decode"), task_name("plan")]
    client.flushdb()
