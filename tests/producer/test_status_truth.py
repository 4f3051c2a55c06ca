"""``status`` tells the truth: ``running`` while a worker holds a lease on one of the job's
chains, ``stalled`` only once nothing moved and no lease is live for ``stall_s``, ``queued``
only before a worker took a chain; a stage with no worker seen lately is named; counts move
per decoded batch. In-process, against the session's real Redis (a database no worker uses)."""

from __future__ import annotations

import io
import json
import time
import uuid

import pytest
import redis

from pixelrelay.jobs import keys
from pixelrelay.jobs.activity import report_batch
from pixelrelay.jobs.chunks import ChunksInFlight, Slot
from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline.messages import JobSpec
from pixelrelay.pipeline.settings import Settings
from pixelrelay.producer.control import recent_jobs
from pixelrelay.producer.status import show_status
from tests.conftest import TEST_SIGNER, wait_until

STAGES = ("encode", "plan", "decode")


@pytest.fixture()
def url(redis_url):
    """Database 7: no stage worker listens there; its workers' presence is the test's own."""
    url = redis_url.rsplit("/", 1)[0] + "/7"
    client = redis.Redis.from_url(url)
    client.delete(*(keys.workers(stage) for stage in STAGES))
    yield url
    client.delete(*(keys.workers(stage) for stage in STAGES))


def _job(url: str, age_s: float, total: int = 8) -> tuple[JobState, Slot]:
    """A job submitted ``age_s`` ago whose first chain entered decode then, nothing marked."""
    state = JobState(redis.Redis.from_url(url), "truth-" + uuid.uuid4().hex[:8], TEST_SIGNER)
    state.start_submission(JobSpec(job_id=state.job_id, input="/in", output="/out", total=total, chunk_size=8))
    then = time.time() - age_s
    state.r.hset(state.key, "submitted_at", then)
    slot = Slot(state.seq(), 0)
    ChunksInFlight(state.r, state.job_id).track(slot, "decode", True, now=then)
    return state, slot


def _all_seen(client: redis.Redis, ago_s: dict[str, float] | None = None) -> None:
    now = time.time()
    for stage in STAGES:
        client.zadd(keys.workers(stage), {f"host:{stage}": now - (ago_s or {}).get(stage, 0.0)})


def _status(url: str, job_id: str, as_json: bool = False) -> str:
    stream = io.StringIO()
    show_status(Settings.from_env(redis_url=url, stall_s=30), job_id, wait=False, stream=stream, as_json=as_json)
    return stream.getvalue()


def test_a_job_mid_chunk_with_a_live_lease_is_running_and_stalls_once_the_lease_lapses(url):
    state, slot = _job(url, age_s=120)  # deep in a long decode chunk: nothing marked for 120 s
    state.r.hset(state.key, "started_at", time.time() - 120)
    _all_seen(state.r)
    lease = keys.lease(state.job_id, slot.name)
    state.r.set(lease, "host:1", px=60_000)
    line = _status(url, state.job_id)
    assert "state=running" in line and "stalled=" not in line, line
    assert json.loads(_status(url, state.job_id, as_json=True))["stalled_s"] is None
    row = next(r for r in recent_jobs(state.r, keys.JOBS_KEEP, stall_s=30) if r.job_id == state.job_id)
    assert row.state.value == "running"  # ``pixelrelay jobs`` agrees
    state.r.pexpire(lease, 1)  # the worker died: its lease runs out
    wait_until(lambda: not state.r.exists(lease), timeout=5, interval=0.01)
    line = _status(url, state.job_id)
    assert "state=stalled" in line and " stalled=1" in line, line  # idle since the chain entered decode


def test_a_job_is_queued_only_until_a_worker_takes_a_chain(url):
    state, slot = _job(url, age_s=100)  # behind other jobs for 100 s: waiting, not stalled
    _all_seen(state.r)
    line = _status(url, state.job_id)
    assert "state=queued" in line and "stalled=" not in line, line
    state.r.hset(state.key, "started_at", time.time())  # what the delivery policy writes with the lease
    state.r.set(keys.lease(state.job_id, slot.name), "host:1", px=60_000)
    assert "state=running" in _status(url, state.job_id)  # no item finished yet


def test_a_stage_with_no_worker_seen_is_named(url):
    state, _ = _job(url, age_s=120)
    _all_seen(state.r, {"encode": 90.0})  # the encode worker stopped 90 s ago
    text = _status(url, state.job_id)
    assert "no_worker=encode" in text and "no encode worker seen for 90 s" in text, text
    assert "no decode worker" not in text and "no plan worker" not in text
    assert json.loads(_status(url, state.job_id, as_json=True))["workers_missing"] == ["encode"]
    state.r.delete(keys.workers("plan"))
    state.r.zadd(keys.workers("decode"), {"forged": "inf"})  # the broker is untrusted: not a time
    assert json.loads(_status(url, state.job_id, as_json=True))["workers_missing"] == ["encode", "plan"]


def test_counts_move_per_decoded_batch_and_the_bits_take_over_at_the_finish(url):
    state, slot = _job(url, age_s=5)
    _all_seen(state.r)
    state.r.hset(state.key, "started_at", time.time())
    report_batch(state.r, state.job_id, slot, done=3, failed=1)  # the first batch of four
    assert _status(url, state.job_id).startswith("done=3 failed=1 pending=4 total=8")
    state.mark(slot.seq, [(i, "done") for i in range(7)] + [(7, "failed")], slot=slot.name)
    assert _status(url, state.job_id).startswith("done=7 failed=1 pending=0 total=8")  # never both
    state.r.hset(keys.batches(state.job_id), slot.name, json.dumps({"done": 10**9, "failed": -1, "at": 1}))
    assert _status(url, state.job_id).startswith("done=7 failed=1")  # a forged entry is ignored
