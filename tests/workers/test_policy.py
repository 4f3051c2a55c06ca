"""The delivery policy in-process: a real Redis and real ``JobState``, local-folder storage,
and a stub ``send`` that collects chains instead of a broker (dramatiq's stub broker).

Worker deaths are simulated by a stage body that raises ``WorkerDied``, a BaseException
the policy does not catch: like a killed process, it leaves the delivery counted.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import redis

from pixelrelay.jobs import keys
from pixelrelay.jobs.files import manifest_uri
from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline.messages import ChunkMessage
from pixelrelay.pipeline.settings import Settings
from pixelrelay.pipeline.storage import TransientStorageError
from pixelrelay.workers.policy import Delivery, Limits, Retry, Split, Stale, finish_chunk
from pixelrelay.workers.runtime import Runtime
from tests.conftest import TEST_SIGNER
from tests.workers.policy_jobs import BAD_WIDTH, Job, WorkerDied, run_chains


def test_an_item_that_fails_its_batch_fails_alone(make_job, redis_url):
    job = make_job([20, 21, BAD_WIDTH, 23, 24, 25], chunk_size=4)
    rt = Runtime(
        Settings.from_env(redis_url=redis_url, encoder="analysis", planner="rules", decoder="raising", batch_size=4)
    )
    job.feed(window=1)  # one chain at a time: finishing chunk 0 must send chunk 1
    run_chains(job, rt)

    rows = job.manifest()
    assert sorted(rows) == list(range(6))
    assert rows[2]["status"] == "failed"
    assert rows[2]["error"] == "decode: ValueError: cannot restore this one"
    assert all(rows[i]["status"] == "done" for i in (0, 1, 3, 4, 5)), rows
    assert all(Path(rows[i]["output"]).exists() for i in (0, 1, 3, 4, 5))
    counts = job.state.counts()
    assert (counts.done, counts.failed) == (5, 1)
    assert job.state.info()["manifest_failed"] == "1"
    assert job.delivery_keys() == []  # finished deliveries leave no count behind


def _dies(msg: ChunkMessage) -> None:
    raise WorkerDied()


def test_a_chunk_that_keeps_killing_its_worker_is_split_into_single_items(make_job):
    job = make_job([20] * 4, max_deliveries=2)
    msg = job.message([0, 1, 2, 3])
    msg.records[1].fail("encode", "unreadable")  # already failed: not re-sent
    for _ in range(2):
        with pytest.raises(WorkerDied):
            job.policy.deliver(Delivery("plan", msg), _dies)

    outcome = job.policy.deliver(Delivery("plan", msg), _dies)  # third delivery: not run

    assert outcome == Split(parts=3)
    assert [[r.index for r in m.records] for m in job.sent] == [[0], [2], [3]]
    assert [m.feeds for m in job.sent] == [True, False, False]
    assert [m.part for m in job.sent] == ["0", "2", "3"]
    assert {m.chunk for m in job.sent} == {0}


def test_a_split_keeps_the_items_a_killed_attempt_already_ended(make_job, redis_url):
    # Items 0 and 1 reached decode already done (their outputs written by a killed attempt
    # and reused), item 2 failed: the split finishes them in the chain's own part.
    job = make_job([20] * 5, chunk_size=5, max_deliveries=2)
    msg = job.message([0, 1, 2, 3, 4], feeds=False)
    for record in msg.records[:2]:
        record.status = "done"
    msg.records[2].fail("encode", "unreadable")
    for _ in range(2):
        with pytest.raises(WorkerDied):
            job.policy.deliver(Delivery("decode", msg), _dies)

    assert job.policy.deliver(Delivery("decode", msg), _dies) == Split(parts=2)
    assert job.state.done_flags([0, 1]) == [True, True] and job.state.counts().failed == 1
    assert isinstance(job.policy.deliver(Delivery("decode", msg), _dies), Stale)  # a redelivery of the split chain
    rt = Runtime(Settings.from_env(redis_url=redis_url, encoder="analysis", planner="rules", decoder="classic"))
    run_chains(job, rt)

    rows = job.manifest()
    assert sorted(rows) == [0, 1, 2, 3, 4]
    assert [rows[i]["status"] for i in range(5)] == ["done", "done", "failed", "done", "done"]
    counts = job.state.counts()
    assert (counts.done, counts.failed) == (4, 1)
    assert job.state.info().get("finished_seq") == str(job.seq)


def test_a_single_item_that_keeps_killing_its_worker_fails_with_the_reason(make_job):
    job = make_job([20], max_deliveries=2)
    msg = job.message([0], part="0", feeds=False)
    for _ in range(2):
        with pytest.raises(WorkerDied):
            job.policy.deliver(Delivery("decode", msg), _dies)

    outcome = job.policy.deliver(Delivery("decode", msg), _dies)

    assert isinstance(outcome, ChunkMessage) and job.sent == []
    assert outcome.records[0].error == "decode: worker process died 2 times on this item (crash or out of memory)"
    assert job.manifest()[0]["status"] == "failed"  # the decode stage finished the chunk
    assert job.state.counts().failed == 1
    assert job.delivery_keys() == []


def test_transient_errors_retry_with_growing_backoff_then_give_up(make_job):
    # max_deliveries=1: a retry is a new delivery, never taken for a worker death.
    job = make_job([20, 21], max_retries=3, max_deliveries=1, backoff_base_s=2.0, backoff_max_s=5.0, jitter=(1.0, 1.0))
    msg = job.message([0, 1])
    msg.records[1].fail("encode", "unreadable")
    calls = []

    def flaky(m: ChunkMessage) -> None:
        calls.append(m)
        raise TransientStorageError("read timed out")

    outcomes = [job.policy.deliver(Delivery("plan", msg, retries), flaky) for retries in range(4)]

    assert outcomes[:3] == [
        Retry(2.0, "TransientStorageError: read timed out"),
        Retry(4.0, "TransientStorageError: read timed out"),
        Retry(5.0, "TransientStorageError: read timed out"),
    ]
    assert len(calls) == 4  # every delivery ran the work
    final = outcomes[3]
    assert isinstance(final, ChunkMessage)
    assert final.records[0].error == "plan: gave up after 3 retries: TransientStorageError: read timed out"
    assert final.records[1].error == "encode: unreadable"  # an earlier reason is kept


def test_backoff_jitter_stays_within_half_to_full_backoff():
    limits = Limits(backoff_base_s=2.0, backoff_max_s=120.0)
    assert [limits.backoff(n) for n in range(8)] == [2, 4, 8, 16, 32, 64, 120, 120]
    for n in range(8):
        assert limits.backoff(n) / 2 <= limits.countdown(n) <= limits.backoff(n)


def test_redis_connection_errors_retry_and_other_errors_fail_the_items(make_job):
    job = make_job([20, 21])

    def lost(m: ChunkMessage) -> None:
        raise redis.ConnectionError("Connection reset by peer")

    assert isinstance(job.policy.deliver(Delivery("encode", job.message([0, 1])), lost), Retry)

    def buggy(m: ChunkMessage) -> None:
        raise KeyError("description")

    outcome = job.policy.deliver(Delivery("encode", job.message([0, 1])), buggy)
    assert [r.error for r in outcome.records] == ["encode: internal error: KeyError: 'description'"] * 2


def _done(job: Job, index: int, feeds: bool = False) -> ChunkMessage:
    msg = job.message([index], chunk=index, feeds=feeds)
    msg.records[0].status = "done"
    return msg


def test_finalize_is_claimed_by_exactly_one_of_concurrent_finishers(make_job, redis_url):
    job = make_job([20] * 8, chunk_size=1)
    manifest = manifest_uri(job.output, job.state.job_id)
    writes = []
    put_file = job.storage.put_file

    def counting_put_file(uri, fileobj, *args, **kwargs):
        writes.append(uri)
        return put_file(uri, fileobj, *args, **kwargs)

    job.storage.put_file = counting_put_file
    for index in range(4):  # the first chunks finish one by one
        assert finish_chunk(job.state, job.storage, job.sent.append, _done(job, index)) is False
    marked = threading.Barrier(4, timeout=30)

    class RacingState(JobState):
        def spec(self):  # finish_chunk asks after marking: so all four see the job complete
            marked.wait()
            return super().spec()

    won = []

    def finisher(index: int) -> None:  # the last chunks finish together, each its own client
        state = RacingState(redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/6"), job.state.job_id, TEST_SIGNER)
        won.append(finish_chunk(state, job.storage, job.sent.append, _done(job, index)))

    threads = [threading.Thread(target=finisher, args=(i,)) for i in range(4, 8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert sorted(won) == [False, False, False, True]
    assert writes.count(manifest) == 1
    assert sorted(job.manifest()) == list(range(8))
    assert job.state.info()["manifest_done"] == "8"


def test_a_failing_manifest_merge_releases_the_claim_and_the_retry_finishes(make_job):
    job = make_job([20])
    put_file = job.storage.put_file
    failures = [TransientStorageError("connection reset")]

    def flaky_put_file(uri, fileobj, *args, **kwargs):
        if failures:
            raise failures.pop()
        return put_file(uri, fileobj, *args, **kwargs)

    job.storage.put_file = flaky_put_file
    msg = _done(job, 0)

    first = job.policy.deliver(Delivery("decode", msg), lambda m: None)
    assert isinstance(first, Retry) and first.reason == "TransientStorageError: connection reset"
    assert not job.state.r.exists(keys.finalized(job.state.job_id, job.seq))  # claim released

    second = job.policy.deliver(Delivery("decode", msg, retries=1), lambda m: None)
    assert isinstance(second, ChunkMessage)
    assert job.manifest()[0]["status"] == "done"
    assert job.state.info()["finished_seq"] == str(job.seq)
