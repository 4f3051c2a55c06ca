"""A listing shard edited in storage, as an attacker who can write the output tree would:
in-process against a real Redis (a database of its own: the sweep looks at every active job)
and local storage, with the stages run through the delivery policy.

Item 0's input becomes a private file under the input root that the job never listed, item
1's output another job's output under the same output root. The shard no longer matches the
digest in the job's signed spec: nothing it names is read or written, and its items reach the
manifest failed with the reason.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from pixelrelay.jobs.chunks import ChunksInFlight, Slot
from pixelrelay.jobs.files import _read_shard, _shard_uri, read_chunk
from pixelrelay.jobs.finish import finalize_cancelled
from pixelrelay.pipeline.messages import Item
from pixelrelay.pipeline.settings import Settings
from pixelrelay.pipeline.storage.local import LocalStorage
from pixelrelay.workers.guard import check_message
from pixelrelay.workers.policy import Limits
from pixelrelay.workers.runtime import Runtime
from pixelrelay.workers.sweep import sweep_once
from tests.conftest import TEST_SIGNER
from tests.images import photo_like
from tests.workers.policy_jobs import Job, run_chains

DB = 13  # no worker's sweeper sees these jobs
REASON = "listing: listing shard 0 does not match the job's signed digest"


@pytest.fixture()
def client(redis_url):
    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + f"/{DB}")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture()
def reads(monkeypatch) -> list[str]:
    """Every path local storage reads (``get``), in order."""
    seen: list[str] = []
    get = LocalStorage.get

    def spy(self, uri: str) -> bytes:
        seen.append(uri)
        return get(self, uri)

    monkeypatch.setattr(LocalStorage, "get", spy)
    return seen


class Attack:
    """A job of four items in chunks of two, chunk 0 fed; then its listing shard edited."""

    def __init__(self, client: redis.Redis, root: Path) -> None:
        self.job = Job(client, root, [20, 21, 22, 23], 2, Limits())
        self.job.feed(window=1)
        self.private = root / "in" / "private" / "secret.png"  # under the input root, never listed
        self.private.parent.mkdir()
        photo_like(24, 16, 9).save(self.private)
        self.other = root / "out" / "other-job" / "result.png"  # another job's output
        self.other.parent.mkdir(parents=True)
        self.other.write_bytes(b"the other job's output")
        self.other_mtime = self.other.stat().st_mtime_ns

    def edit_shard(self) -> None:
        job = self.job
        uri = _shard_uri(job.output, job.state.job_id, 0)
        rows = [Item.model_validate_json(line) for line in job.storage.get(uri).splitlines()]
        rows[0].input = str(self.private)
        rows[1].output = str(self.other)
        job.storage.put(uri, "".join(r.model_dump_json(exclude_none=True) + "\n" for r in rows).encode())
        _read_shard.cache_clear()  # the worker that reads it next is another process

    def assert_nothing_leaked(self, reads: list[str]) -> None:
        assert str(self.private) not in reads
        assert self.other.read_bytes() == b"the other job's output"
        assert self.other.stat().st_mtime_ns == self.other_mtime
        assert sorted(p.name for p in Path(self.job.output).glob("*.png")) == []  # nothing written

    def assert_failed_with_reason(self, indices: list[int]) -> None:
        rows = self.job.manifest()
        assert sorted(rows) == indices
        for index in indices:
            row = rows[index]
            assert (row["status"], row["error"], row["output"]) == ("failed", REASON, None), row
            assert row["input"] == ""  # the edited shard's locations are never repeated


def _runtime(redis_url: str) -> Runtime:
    return Runtime(Settings.from_env(redis_url=redis_url, encoder="analysis", planner="rules", decoder="classic"))


def test_a_chain_the_sweep_resends_from_an_edited_listing_reads_and_writes_nothing(client, redis_url, tmp_path, reads):
    started = time.monotonic()
    attack = Attack(client, tmp_path)
    job = attack.job
    attack.edit_shard()
    job.sent.clear()  # the genuine chain is gone (dropped, purged): the sweep must re-send it
    ChunksInFlight(client, job.state.job_id).track(Slot(job.seq, 0), "plan", True, now=time.time() - 60)

    report = sweep_once(client, job.sent.append, lambda uri: job.storage, 1.0, confirm_s=0, signer=TEST_SIGNER)

    assert report.resent == [f"{job.state.job_id}/{job.seq}:0"]
    [msg] = job.sent
    assert [(r.index, r.input, r.output, r.status, r.error) for r in msg.records] == [
        (i, "", "", "failed", REASON) for i in (0, 1)
    ]
    run_chains(job, _runtime(redis_url))  # the re-sent chain, then the fed chunk 1
    attack.assert_nothing_leaked(reads)
    attack.assert_failed_with_reason([0, 1, 2, 3])
    assert job.state.info().get("finished_at")  # the job finishes
    assert time.monotonic() - started < 30


def test_the_genuine_chain_fails_its_items_unread_when_its_shard_is_edited(client, redis_url, tmp_path, reads):
    attack = Attack(client, tmp_path)
    job = attack.job
    attack.edit_shard()
    [msg] = job.sent
    check_message(job.state, lambda uri: job.storage, msg, "encode")  # not dropped: failed in place
    assert [(r.status, r.error) for r in msg.records] == [("failed", REASON)] * 2
    run_chains(job, _runtime(redis_url))
    attack.assert_nothing_leaked(reads)
    attack.assert_failed_with_reason([0, 1, 2, 3])


def test_a_shard_the_spec_does_not_name_is_not_read(client, tmp_path):
    attack = Attack(client, tmp_path)
    job = attack.job
    extra = _shard_uri(job.output, job.state.job_id, 1)  # planted past the listing's end
    job.storage.put(
        extra, Item(index=4096, input=str(attack.private), output=str(attack.other)).model_dump_json().encode()
    )
    spec = job.spec.model_copy(update={"total": 4097})
    with pytest.raises(Exception, match="00000001"):
        read_chunk(job.storage, spec, 2048)


def test_a_cancelled_jobs_rows_from_an_edited_shard_are_failed_with_the_reason(client, tmp_path, reads):
    attack = Attack(client, tmp_path)
    job = attack.job
    attack.edit_shard()
    assert job.state.cancel()
    assert finalize_cancelled(job.state, job.storage, job.spec, force=True)  # nothing of it ever ran
    attack.assert_nothing_leaked(reads)
    attack.assert_failed_with_reason([0, 1, 2, 3])  # failed with the reason, not "cancelled" at a forged path
    info = job.state.info()
    assert (info["manifest_failed"], info.get("manifest_cancelled", "0")) == ("4", "0"), info
