"""Job state in a real Redis: exact counts under duplicate delivery, few bytes per item."""

from __future__ import annotations

import uuid

import pytest
import redis

from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline.messages import JobSpec
from tests.conftest import TEST_SIGNER


@pytest.fixture()
def state(redis_url):
    client = redis.Redis.from_url(redis_url)
    job = JobState(client, "js-" + uuid.uuid4().hex[:8], TEST_SIGNER)
    yield job
    client.delete(*(client.keys(f"pixelrelay:job:{job.job_id}*") or [b"none"]))


def _spec(job_id: str, total: int) -> JobSpec:
    return JobSpec(job_id=job_id, input="/in", output="/out", total=total, chunk_size=4)


def test_duplicate_marks_do_not_double_count(state):
    seq = state.start_submission(_spec(state.job_id, 10))
    assert state.mark(seq, [(0, "done"), (1, "failed")]) == (1, 1)
    assert state.mark(seq, [(0, "done"), (1, "failed")]) == (1, 1)  # redelivered
    assert state.mark(seq, [(1, "done")]) == (2, 0)  # a later success clears the failure
    assert state.mark(seq, [(1, "failed")]) == (2, 0)  # a late duplicate failure can't undo it
    counts = state.counts()
    assert (counts.total, counts.done, counts.failed, counts.pending) == (10, 2, 0, 8)


def test_resubmission_retries_failures_and_ignores_stale_failures(state):
    seq1 = state.start_submission(_spec(state.job_id, 3))
    state.mark(seq1, [(0, "done"), (1, "failed"), (2, "failed")])
    seq2 = state.start_submission(_spec(state.job_id, 3))
    assert seq2 == seq1 + 1
    assert state.counts().failed == 0  # failed items are pending again
    state.mark(seq1, [(1, "failed")])  # late duplicate from the old submission
    assert state.counts().failed == 0
    state.mark(seq1, [(2, "done")])  # but a late success still counts
    assert state.counts().done == 2


def test_finalize_claim_is_exclusive(state):
    seq = state.start_submission(_spec(state.job_id, 1))
    assert state.claim_finalize(seq) is True
    assert state.claim_finalize(seq) is False
    state.release_finalize(seq)
    assert state.claim_finalize(seq) is True


def test_redis_memory_per_finished_item_is_bits(state):
    total = 100_000
    seq = state.start_submission(_spec(state.job_id, total))
    for start in range(0, total, 5000):
        state.mark(seq, [(i, "done") for i in range(start, start + 5000)])
    assert state.counts().done == total
    used = sum(state.r.memory_usage(k) or 0 for k in state.r.keys(f"pixelrelay:job:{state.job_id}*"))
    assert used / total < 1.0  # bytes per finished item


def test_done_flags_in_one_command_and_without_bitfield_ro(state, monkeypatch):
    seq = state.start_submission(_spec(state.job_id, 40))
    state.mark(seq, [(0, "done"), (3, "failed"), (17, "done"), (39, "done")])
    indices = [0, 1, 3, 17, 38, 39, 100]  # past the bitmap's end: not done
    expected = [True, False, False, True, False, True, False]
    assert state.done_flags(indices) == expected and state.done_flags([]) == []
    monkeypatch.setattr(JobState, "_bitfield_ro", False)  # a Redis before 6.0: GETBITs
    assert state.done_flags(indices) == expected


def test_the_spec_is_checked_once_per_value_and_a_forged_one_still_fails(state, monkeypatch):
    """A worker reads the same spec at every delivery: the same bytes are checked and parsed
    once. A changed value (forged: signed with another key, or altered) is checked again
    and refused, however often the genuine one was read before."""
    import json

    from pixelrelay.pipeline.signing import SignatureError, Signer

    state.start_submission(_spec(state.job_id, 8))
    checks = []
    real_verify = Signer.verify
    monkeypatch.setattr(Signer, "verify", lambda self, kind, body: checks.append(kind) or real_verify(self, kind, body))
    first, again = state.spec(), state.spec()
    assert first == again and first.total == 8 and checks == ["spec"]
    first.total = 99  # a caller's copy: the cached spec is not changed through it
    assert state.spec().total == 8

    forged = Signer("another-key-of-32-characters-long").sign("spec", _spec(state.job_id, 1000).model_dump(mode="json"))
    state.r.hset(state.key, "spec", json.dumps(forged))
    with pytest.raises(SignatureError):
        state.spec()
    genuine = TEST_SIGNER.sign("spec", _spec(state.job_id, 8).model_dump(mode="json"))
    state.r.hset(state.key, "spec", json.dumps({**genuine, "total": 1000}))
    with pytest.raises(SignatureError):
        state.spec()
    state.r.hset(state.key, "spec", json.dumps(genuine))
    assert state.spec().total == 8


def test_an_item_marked_in_the_submissions_millisecond_counts_as_progress(state, monkeypatch):
    """``progress_at`` is kept to the millisecond; ``submitted_at`` must be too, or an item
    finished within the same millisecond reads as older than its submission (queued, never
    stalled)."""
    import pixelrelay.jobs.state as state_module

    monkeypatch.setattr(state_module.time, "time", lambda: 1_800_000_000.0004)
    seq = state.start_submission(_spec(state.job_id, 4))
    state.mark(seq, [(0, "done")])
    info = state.info()
    assert float(info["progress_at"]) >= float(info["submitted_at"])
