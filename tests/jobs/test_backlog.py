"""The true backlog (``jobs.backlog``), in-process against a real Redis: chains at each stage
of a job with a signed spec, and a forged chunk-size that cannot move the numbers."""

from __future__ import annotations

import uuid

import redis

from pixelrelay.jobs.backlog import active_backlogs, job_backlog
from pixelrelay.jobs.chunks import ChunksInFlight, Slot
from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline.messages import JobSpec
from tests.conftest import TEST_SIGNER


def _job(r: redis.Redis, total: int, chunk_size: int) -> tuple[JobState, int]:
    job_id = "bk-" + uuid.uuid4().hex[:8]
    state = JobState(r, job_id, TEST_SIGNER)
    seq = state.start_submission(JobSpec(job_id=job_id, input="in", output="out", total=total, chunk_size=chunk_size))
    return state, seq


def test_backlog_counts_items_not_yet_through_each_stage_not_queue_length(redis_url):
    r = redis.Redis.from_url(redis_url)
    state, seq = _job(r, total=10, chunk_size=4)  # chunks of 4, 4 and 2 items
    chunks = ChunksInFlight(r, state.job_id)
    chunks.track(Slot(seq, 0), "decode", True)  # 4 items past encode and plan
    chunks.track(Slot(seq, 2), "plan", True)  # 2 items past encode (the last, short chunk)
    chunks.track(Slot(seq - 1, 1), "decode", True)  # an older submission's chain: not counted
    r.hset(chunks.key, "junk", "not json")  # malformed entries are ignored
    state.mark(seq, [(9, "done")])  # one item finished: 9 pending

    backlog = job_backlog(r, state.job_id, TEST_SIGNER)
    assert backlog.pending == 9
    assert backlog.stages == {"encode": 9 - 6, "plan": 9 - 4, "decode": 9}
    assert backlog.chains == {"encode": 0, "plan": 1, "decode": 1}
    assert state.job_id in {b.job_id for b in active_backlogs(r, TEST_SIGNER)}

    # A spec in Redis without a valid signature (a forged chunk size): every pending item
    # counts at every stage, never fewer.
    r.hset(state.key, "spec", '{"job_id": "x", "chunk_size": 100000}')
    assert job_backlog(r, state.job_id, TEST_SIGNER).stages == {"encode": 9, "plan": 9, "decode": 9}
    chunks.retire()
    assert state.job_id not in {b.job_id for b in active_backlogs(r, TEST_SIGNER)}
