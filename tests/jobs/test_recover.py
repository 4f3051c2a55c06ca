"""Rebuilding a job from storage (``jobs.recover``) and the storage registry
(``jobs.registry``, ``workers.sweep.rebuild_registered``), in a real Redis with local
storage and a list as the sender: no Celery, no workers."""

from __future__ import annotations

import json
import uuid

import pytest
import redis

from pixelrelay.jobs import keys
from pixelrelay.jobs.files import write_listing, write_part, write_spec
from pixelrelay.jobs.recover import RebuildError, rebuild
from pixelrelay.jobs.registry import Registry
from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline.messages import Item, ItemRecord, JobSpec
from pixelrelay.pipeline.storage import open_storage
from pixelrelay.workers.sweep import rebuild_registered
from tests.conftest import TEST_SIGNER


@pytest.fixture()
def client(redis_url):
    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/12")
    client.flushdb()
    yield client
    client.close()


def _job(tmp_path, total: int = 10, chunk_size: int = 2) -> JobSpec:
    out = str(tmp_path / "out")
    spec = JobSpec(job_id="rb-" + uuid.uuid4().hex[:6], input="/in", output=out, total=total, chunk_size=chunk_size)
    storage = open_storage(out)
    listing = write_listing(
        storage, out, spec.job_id, [Item(index=i, input=f"/in/{i}.png", output=f"{out}/{i}.png") for i in range(total)]
    )
    spec.listing_sha256 = list(listing.digests)
    write_spec(storage, spec, TEST_SIGNER)
    return spec


def _done_part(spec: JobSpec, chunk: int, seq: int, indices: list[int]) -> None:
    records = [
        ItemRecord(index=i, input=f"/in/{i}.png", output=f"{spec.output}/{i}.png", status="done") for i in indices
    ]
    write_part(open_storage(spec.output), spec.output, spec.job_id, chunk, seq, records)


def test_rebuild_restores_done_bits_and_feeds_the_rest(client, tmp_path):
    spec = _job(tmp_path)
    _done_part(spec, 0, 3, [0, 1])  # chunk 0 done in submission 3
    _done_part(spec, 2, 3, [4])  # half of chunk 2
    sent = []
    seq = rebuild(
        client, open_storage(spec.output), spec.output, spec.job_id, sent.append, window=2, signer=TEST_SIGNER
    )
    assert seq == 4  # after the newest part's submission
    state = JobState(client, spec.job_id, TEST_SIGNER)
    assert state.counts().done == 3 and state.spec() == spec
    assert [(m.chunk, [r.index for r in m.records]) for m in sent] == [(1, [2, 3]), (2, [5])]  # done items skipped
    assert all(m.seq == 4 for m in sent) and client.sismember(keys.ACTIVE_JOBS, spec.job_id)
    assert (
        rebuild(client, open_storage(spec.output), spec.output, spec.job_id, sent.append, 2, signer=TEST_SIGNER) is None
    )  # known now
    assert len(sent) == 2


def test_one_rebuilder_at_a_time(client, tmp_path):
    spec = _job(tmp_path)
    client.set(keys.rebuild_lock(spec.job_id), "1", px=5000)  # another process is rebuilding it
    sent = []
    assert (
        rebuild(client, open_storage(spec.output), spec.output, spec.job_id, sent.append, 2, signer=TEST_SIGNER) is None
    )
    assert sent == [] and not JobState(client, spec.job_id, TEST_SIGNER).exists()


def test_a_half_done_rebuild_is_undone(client, tmp_path):
    spec = _job(tmp_path)

    def broken(msg):
        raise OSError("broker down")

    with pytest.raises(OSError):
        rebuild(client, open_storage(spec.output), spec.output, spec.job_id, broken, 2, signer=TEST_SIGNER)
    assert not JobState(client, spec.job_id, TEST_SIGNER).exists() and not client.exists(keys.rebuild_lock(spec.job_id))


@pytest.mark.parametrize("body", [None, b"{not json", b'{"job_id": "other", "output": "/x"}'])
def test_an_invalid_job_json_is_refused(client, tmp_path, body):
    out = str(tmp_path / "out")
    if body is not None:
        (tmp_path / "out" / "_jobs" / "rb-x").mkdir(parents=True)
        (tmp_path / "out" / "_jobs" / "rb-x" / "job.json").write_bytes(body)
    with pytest.raises(RebuildError):
        rebuild(client, open_storage(out), out, "rb-x", lambda m: None, 2, signer=TEST_SIGNER)
    assert not JobState(client, "rb-x", TEST_SIGNER).exists()


def test_the_registry_skips_what_is_not_an_entry(tmp_path):
    registry = Registry(open_storage(str(tmp_path)), str(tmp_path))
    registry.add("good-1", "/out")
    active = tmp_path / "active"
    (active / "junk.json").write_text("{not json")
    (active / "named.json").write_text(json.dumps({"job_id": "other", "output": "/out"}))  # name mismatch
    (active / "bad id.json").write_text(json.dumps({"job_id": "bad id", "output": "/out"}))
    (active / "no-out.json").write_text(json.dumps({"job_id": "no-out", "output": 3}))
    assert [(e.job_id, e.output) for e in registry.entries()] == [("good-1", "/out")]
    registry.remove("good-1")
    registry.remove("good-1")  # twice is fine
    assert list(registry.entries()) == []


def test_the_sweep_rebuilds_registered_jobs_and_unlists_finished_ones(client, tmp_path):
    lost, finished = _job(tmp_path), _job(tmp_path)
    registry = Registry(open_storage(str(tmp_path / "state")), str(tmp_path / "state"))
    registry.add(lost.job_id, lost.output)
    registry.add(finished.job_id, finished.output)
    client.hset(keys.job(finished.job_id), mapping={"seq": 2, "finished_seq": 2, "finished_at": 1.0})
    sent = []
    assert rebuild_registered(client, registry, sent.append, open_storage, window=1, signer=TEST_SIGNER) == [
        lost.job_id
    ]
    assert [m.job_id for m in sent] == [lost.job_id]
    assert [e.job_id for e in registry.entries()] == [lost.job_id]
    assert (
        rebuild_registered(client, registry, sent.append, open_storage, window=1, signer=TEST_SIGNER) == []
    )  # known now


class _Outage:
    """A storage whose reads fail as during an outage (``get`` raises a transient error)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def get(self, uri: str) -> bytes:
        from pixelrelay.pipeline.storage import TransientStorageError

        raise TransientStorageError(f"connection reset reading {uri}")


def test_a_chunk_whose_listing_cannot_be_read_stays_tracked_for_the_sweep(client, tmp_path):
    """The cursor hands out chunk 0, then reading its listing fails: the chunk must not be
    lost with the cursor. It stays tracked (no lease, no message), so the sweep re-sends it."""
    from pixelrelay.jobs.chunks import ChunksInFlight, Slot
    from pixelrelay.jobs.feed import feed
    from pixelrelay.pipeline.storage import TransientStorageError

    spec = _job(tmp_path)
    state = JobState(client, spec.job_id, TEST_SIGNER)
    seq = state.start_submission(spec)
    sent = []
    with pytest.raises(TransientStorageError):
        feed(sent.append, state, _Outage(open_storage(spec.output)), spec, seq, 1)
    assert sent == [] and state.next_chunk() == 1  # the cursor moved past chunk 0...
    entry = ChunksInFlight(client, spec.job_id).get(Slot(seq, 0))
    assert entry is not None and entry.stage == "encode"  # ...but chunk 0 is still tracked
    assert client.sismember(keys.ACTIVE_JOBS, spec.job_id)


@pytest.mark.parametrize("forgery", ["signature-kept", "unsigned"])
def test_a_job_json_edited_in_storage_is_not_rebuilt(client, tmp_path, forgery):
    """A storage writer rewrites the job's listing and the digests in job.json to match."""
    spec = _job(tmp_path, total=4)
    storage = open_storage(spec.output)
    private = str(tmp_path / "private.png")
    listing = write_listing(
        storage, spec.output, spec.job_id, [Item(index=i, input=private, output="") for i in range(4)]
    )
    path = tmp_path / "out" / "_jobs" / spec.job_id / "job.json"
    body = json.loads(path.read_text())
    body["listing_sha256"] = list(listing.digests)
    if forgery == "unsigned":
        del body["sig"]
    path.write_text(json.dumps(body))
    sent: list = []
    with pytest.raises(RebuildError, match="job.json .* fails its check"):
        rebuild(client, storage, spec.output, spec.job_id, sent.append, 2, signer=TEST_SIGNER)
    assert sent == [] and not JobState(client, spec.job_id, TEST_SIGNER).exists()
