"""The sweep's decisions, in-process against a real Redis (a database of its own: the sweep
looks at every active job and at the broker's lists) and real kombu envelopes.

Each test creates a job as the producer would (listing in a local folder, first chunk fed
through a list's ``append``), ages its chunk's entry, and asks ``sweep_once`` what to do.
"""

from __future__ import annotations

import functools
import json
import threading
import time

import pytest
import redis

from pixelrelay.jobs import keys
from pixelrelay.jobs.chunks import ChunksInFlight, Slot
from pixelrelay.jobs.files import read_part, write_part
from pixelrelay.pipeline.messages import ChunkMessage
from pixelrelay.pipeline.settings import Settings
from pixelrelay.workers.celery_app import create_app
from pixelrelay.workers.flow import chunk_chain, signed_body
from pixelrelay.workers.policy import Delivery, Limits
from pixelrelay.workers.runtime import Runtime
from pixelrelay.workers.sweep import sweep_once
from pixelrelay.workers.tasks import STAGE_BODIES
from tests.conftest import TEST_SIGNER, wait_until
from tests.workers.policy_jobs import Job, WorkerDied, run_chains

LEASE_S = 1.0
DB = 7


@pytest.fixture()
def db_url(redis_url):
    url = redis_url.rsplit("/", 1)[0] + f"/{DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture()
def client(db_url):
    client = redis.Redis.from_url(db_url)
    yield client
    client.close()


@pytest.fixture()
def job(client, tmp_path) -> Job:
    """Ten items in chunks of four; chunk 0 fed, its entry aged past the lease."""
    job = Job(client, tmp_path, [20 + i for i in range(10)], 4, Limits())
    job.feed(window=1)
    assert [m.chunk for m in job.sent] == [0]
    age(job, Slot(job.seq, 0), "plan")
    return job


def age(job: Job, slot: Slot, stage: str, feeds: bool = True, by: float = 10 * LEASE_S) -> None:
    ChunksInFlight(job.state.r, job.state.job_id).track(slot, stage, feeds, now=time.time() - by)


def lapse(client: redis.Redis, *names: str) -> None:
    """Let leases run out: each key must carry a TTL, and expires in 1 ms."""
    for name in names:
        assert client.pttl(name) > 0, name
        client.pexpire(name, 1)
    wait_until(lambda: not client.exists(*names), timeout=5, interval=0.005)


def sweep(job: Job, send=None):
    return sweep_once(
        job.state.r, send or job.sent.append, lambda uri: job.storage, LEASE_S, confirm_s=0, signer=TEST_SIGNER
    )


def test_a_leased_chunk_is_left_alone(job):
    job.sent.clear()
    job.state.r.set(keys.lease(job.state.job_id, f"{job.seq}:0"), "w1", px=5000)
    report = sweep(job)
    assert (report.in_flight, report.candidates, report.resent) == (1, 0, [])
    assert job.sent == []


def test_a_young_entry_is_left_alone_without_reading_the_queues(job):
    job.sent.clear()
    age(job, Slot(job.seq, 0), "decode", by=LEASE_S / 4)
    report = sweep(job)
    assert (report.in_flight, report.candidates, report.resent, job.sent) == (1, 0, [], [])


@pytest.mark.parametrize("stage", ["encode", "plan", "decode"])
def test_a_chunk_waiting_in_a_queue_is_left_alone_however_old(job, db_url, stage):
    msg = job.sent.pop()
    app = create_app(Settings.from_env(redis_url=db_url))
    sig = chunk_chain(app, msg, TEST_SIGNER).tasks[("encode", "plan", "decode").index(stage)]
    sig.apply_async(args=(signed_body(TEST_SIGNER, stage, msg),))  # a real kombu envelope in that stage's list
    assert job.state.r.llen(f"pixelrelay.{stage}") == 1
    age(job, Slot(job.seq, 0), stage, by=3600)  # an hour in the queue behind a slow GPU
    report = sweep(job)
    assert report.candidates == 1 and report.resent == [] and job.sent == []


def test_junk_in_a_queue_does_not_stop_the_sweep(job):
    """Entries no worker has taken yet, pushed by whoever can write to Redis: the sweep reads
    past them and still re-sends the lost chunk."""
    job.sent.clear()
    job.state.r.lpush("pixelrelay.plan", b"not json", b"[" * 100_000, b"\xff", b'{"headers": []}')
    report = sweep(job)
    assert report.resent and [m.chunk for m in job.sent] == [0]


def _unacked(job: Job, db_url: str, delivered_at: float) -> None:
    """Put chunk 0's encode message where kombu puts a message a worker took."""
    app = create_app(Settings.from_env(redis_url=db_url))
    chunk_chain(app, job.sent.pop(), TEST_SIGNER).apply_async()
    raw = job.state.r.rpop("pixelrelay.encode")
    job.state.r.hset(keys.KOMBU_UNACKED, "tag-1", json.dumps([json.loads(raw), "", "pixelrelay.encode"]))
    job.state.r.zadd(keys.KOMBU_UNACKED_INDEX, {"tag-1": delivered_at})


def test_a_message_just_taken_by_a_worker_is_left_alone(job, db_url):
    _unacked(job, db_url, delivered_at=time.time())
    report = sweep(job)
    assert report.candidates == 1 and report.resent == [] and job.sent == []
    assert job.state.r.hexists(keys.KOMBU_UNACKED, "tag-1")


def test_a_taken_message_without_a_lease_past_the_lease_time_is_resent(job, db_url):
    _unacked(job, db_url, delivered_at=time.time() - 5 * LEASE_S)  # its worker died
    report = sweep(job)
    assert report.resent == [f"{job.state.job_id}/{job.seq}:0"]
    assert [[r.index for r in m.records] for m in job.sent] == [[0, 1, 2, 3]]
    # the dead worker's message is taken off `unacked`: kombu will not restore it in 2 h
    assert not job.state.r.hexists(keys.KOMBU_UNACKED, "tag-1")
    assert job.state.r.zscore(keys.KOMBU_UNACKED_INDEX, "tag-1") is None


def test_a_lost_chunk_is_resent_once_from_storage_by_concurrent_sweepers(job, db_url):
    job.sent.clear()  # its message is gone (a purge)
    job.state.mark(job.seq, [(1, "done")])  # item 1 finished in an earlier delivery
    sent, start = [], threading.Barrier(2)

    def sweeper():
        client = redis.Redis.from_url(db_url)
        start.wait()
        sweep_once(client, sent.append, lambda uri: job.storage, LEASE_S, confirm_s=0.05, signer=TEST_SIGNER)

    threads = [threading.Thread(target=sweeper) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)

    assert len(sent) == 1
    msg = sent[0]
    assert (msg.chunk, msg.seq, msg.part, msg.feeds) == (0, job.seq, "", True)
    assert [r.index for r in msg.records] == [0, 2, 3]  # from the listing, less the done item
    assert all(r.status is None and r.description is None for r in msg.records)  # sent from encode
    entry = ChunksInFlight(job.state.r, job.state.job_id).get(Slot(job.seq, 0))
    assert entry.stage == "encode" and time.time() - entry.since < 5  # young again: not re-sent next sweep
    assert sweep(job).resent == []


def test_a_lost_split_part_is_resent_as_its_single_item(job):
    job.sent.clear()
    chunks = ChunksInFlight(job.state.r, job.state.job_id)
    chunks.untrack(Slot(job.seq, 0))
    age(job, Slot(job.seq, 0, "2"), "decode", feeds=False)
    report = sweep(job)
    assert report.resent == [f"{job.state.job_id}/{job.seq}:0:2"]
    [msg] = job.sent
    assert ([r.index for r in msg.records], msg.part, msg.feeds) == ([2], "2", False)


def test_a_chunk_lost_after_its_part_was_written_is_finished_by_the_sweep(job):
    msg = job.sent.pop()
    for record in msg.records:
        record.status = "done"
    write_part(job.storage, job.output, job.state.job_id, 0, job.seq, msg.records)  # then the worker died
    report = sweep(job)
    assert report.finished == [f"{job.state.job_id}/{job.seq}:0"] and report.resent == []
    assert job.state.counts().done == 4
    assert [m.chunk for m in job.sent] == [1]  # it fed the next chunk, as the chain would have
    assert ChunksInFlight(job.state.r, job.state.job_id).get(Slot(job.seq, 0)) is None
    assert len(read_part(job.storage, job.output, job.state.job_id, 0, job.seq)) == 4


def test_entries_of_older_submissions_and_garbage_are_dropped_and_finished_jobs_retired(job):
    job.sent.clear()
    chunks = ChunksInFlight(job.state.r, job.state.job_id)
    age(job, Slot(job.seq - 1 if job.seq > 1 else 0, 0), "plan")
    job.state.r.hset(chunks.key, mapping={"junk": "{", "9:9": json.dumps({"stage": "nope", "since": 0})})
    job.state.r.set(keys.lease(job.state.job_id, f"{job.seq}:0"), "w1", px=5000)
    sweep(job)
    assert set(job.state.r.hkeys(chunks.key)) == {f"{job.seq}:0".encode()}
    job.state.finish(job.seq, "m", 10, 0)
    report = sweep(job)
    assert report.retired == [job.state.job_id]
    assert not job.state.r.sismember(keys.ACTIVE_JOBS, job.state.job_id) and not job.state.r.exists(chunks.key)


def test_a_finisher_that_died_holding_the_finish_claim_is_taken_over_once_its_lease_lapses(job):
    """Every part is written and marked, and the worker finishing the last chain died after
    claiming the manifest (SIGKILL mid-merge): its chain stays tracked until the claim's
    lease lapses, then a sweep writes the manifest."""
    job.sent.clear()
    for chunk, indices in enumerate([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]):
        records = job.message(indices, chunk=chunk).records
        for record in records:
            record.status = "done"
        write_part(job.storage, job.output, job.state.job_id, chunk, job.seq, records)
        job.state.mark(job.seq, [(r.index, "done") for r in records])
    chunks = ChunksInFlight(job.state.r, job.state.job_id)
    chunks.untrack(Slot(job.seq, 0))
    assert job.state.claim_finalize(job.seq, lease_s=2)  # then the finisher died
    age(job, Slot(job.seq, 2), "decode", feeds=False)
    assert sweep(job).finished == [f"{job.state.job_id}/{job.seq}:2"]
    assert chunks.get(Slot(job.seq, 2)) is not None and "finished_at" not in job.state.info()  # kept
    lapse(job.state.r, keys.finalized(job.state.job_id, job.seq), keys.resend_lock(job.state.job_id, f"{job.seq}:2"))
    sweep(job)
    info = job.state.info()
    assert info["finished_seq"] == str(job.seq) and info["manifest_done"] == "10"
    assert sorted(job.manifest()) == list(range(10))


class _DiesOnPartWrite:
    """The job's storage, but writing a manifest part kills the worker (``WorkerDied``)."""

    def __init__(self, storage) -> None:
        self.storage = storage

    def __getattr__(self, name: str):
        return getattr(self.storage, name)

    def put(self, uri: str, *args, **kwargs):
        if "/parts/" in uri:
            raise WorkerDied()
        return self.storage.put(uri, *args, **kwargs)


def test_a_chunk_whose_splitting_worker_died_before_its_finish_is_recovered_whole(client, tmp_path, db_url):
    rt = Runtime(Settings.from_env(redis_url=db_url, encoder="analysis", planner="rules", decoder="classic"))
    job = Job(client, tmp_path, [20] * 4, 4, Limits(max_deliveries=1))
    msg = job.message([0, 1, 2, 3], feeds=False)
    for stage in ("encode", "plan"):
        msg = job.policy.deliver(Delivery(stage, msg), functools.partial(STAGE_BODIES[stage], rt, job.state))
    planned = msg.model_copy(deep=True)

    def decode_then_die(m: ChunkMessage) -> None:
        STAGE_BODIES["decode"](rt, job.state, m)  # every output written
        raise WorkerDied()

    with pytest.raises(WorkerDied):
        job.policy.deliver(Delivery("decode", msg), decode_then_die)
    planned.records[0].status = "done"  # as a re-sent chain's encode stage finds it: reused
    healthy = job.policy.storage
    job.policy.storage = lambda uri: _DiesOnPartWrite(healthy(uri))
    with pytest.raises(WorkerDied):  # split: items 1..3 sent on, then died finishing item 0
        job.policy.deliver(Delivery("decode", planned), decode_then_die)
    job.policy.storage = healthy
    assert [m.part for m in job.sent] == ["1", "2", "3"]
    age(job, Slot(job.seq, 0), "decode", feeds=False)

    report = sweep(job)

    assert report.resent == [f"{job.state.job_id}/{job.seq}:0"]
    run_chains(job, rt)
    rows = job.manifest()
    assert sorted(rows) == [0, 1, 2, 3] and {r["status"] for r in rows.values()} == {"done"}, rows
    assert job.state.counts().done == 4
