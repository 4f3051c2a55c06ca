"""The finish that scales (``jobs.merge``): group files merged as a job runs, the manifest a
concatenation of them. Checked against the one-pass merge (``jobs.files.merge_manifest``) on
jobs written part by part as the workers write them (failed items, a resubmission, split
parts, an item with no line, a cancelled job), with every storage read counted, on a local
folder and on S3 (moto), in-process against a real Redis."""

from __future__ import annotations

import json
import math
import random
import uuid

import pytest
import redis

from pixelrelay.jobs import merge
from pixelrelay.jobs.files import manifest_uri, merge_manifest, write_listing, write_part, write_spec
from pixelrelay.jobs.finish import finalize_if_complete, finish_pending
from pixelrelay.jobs.merge import Groups, group_uri, merge_group_if_complete, write_manifest
from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline.messages import Item, ItemRecord, JobSpec
from pixelrelay.pipeline.storage import Storage, StorageError, join_uri, open_storage
from tests.conftest import TEST_SIGNER


class Counting(Storage):
    """The real storage, with every object read counted (``get`` and ``iter_lines``) and an
    optional fault: ``fail_put(uri)`` returning True makes that put raise."""

    def __init__(self, inner: Storage) -> None:
        self.inner, self.reads, self.fail_put = inner, [], lambda uri: False

    def get(self, uri):
        self.reads.append(uri)
        return self.inner.get(uri)

    def iter_lines(self, uri):
        self.reads.append(uri)
        return self.inner.iter_lines(uri)

    def put(self, uri, data, content_type=None, **kw):
        if self.fail_put(uri):
            raise StorageError(f"injected: {uri}")
        return self.inner.put(uri, data, content_type, **kw)

    def put_file(self, uri, fileobj, content_type=None):
        return self.inner.put_file(uri, fileobj, content_type)

    def head(self, uri):
        return self.inner.head(uri)

    def exists(self, uri):
        return self.inner.exists(uri)

    def list(self, prefix):
        return self.inner.list(prefix)

    def delete(self, uri):
        return self.inner.delete(uri)


@pytest.fixture()
def client(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client


class Job:
    """A job written as submit and the decode stage write it, finishing its chunks in a
    shuffled order through ``merge_group_if_complete`` (what ``finish_chunk`` calls)."""

    def __init__(self, client, storage: Storage, output: str, total: int, chunk_size: int) -> None:
        self.storage, self.output, self.total = storage, output, total
        self.job_id = "mg-" + uuid.uuid4().hex[:10]
        self.spec = JobSpec(job_id=self.job_id, input="/in", output=output, total=total, chunk_size=chunk_size)
        self.items = [
            Item(index=i, input=f"/in/{i:07d}.png", output=join_uri(output, f"{i:07d}.png")) for i in range(total)
        ]
        write_spec(storage.inner, self.spec, TEST_SIGNER)
        write_listing(storage.inner, output, self.job_id, self.items)
        self.state = JobState(client, self.job_id, TEST_SIGNER)
        self.seq = self.state.start_submission(self.spec)
        self.rng = random.Random(total)

    def record(self, index: int, status: str) -> ItemRecord:
        item = self.items[index]
        record = ItemRecord(
            index=index,
            input=item.input,
            output=item.output,
            timings={"decode": 0.25},
            backends={"decoder": "builtin"},
            notes=[f"seq {self.seq}"],
        )
        if status == "done":
            record.status, record.output_size = "done", (512, 512)
        else:
            record.fail("decode", "not an image")
        return record

    def finish_chunk(self, chunk: int, records: list[ItemRecord], part: str = "") -> None:
        write_part(self.storage.inner, self.output, self.job_id, chunk, self.seq, records, part)
        self.state.mark(self.seq, [(r.index, r.status) for r in records])
        merge_group_if_complete(self.state, self.storage, self.spec, self.seq, chunk)

    def run(
        self,
        chunks: list[int] | None = None,
        fail_every: int | None = 97,
        lose: int | None = None,
        split: int | None = None,
    ) -> None:
        """Finish ``chunks`` (default: all) in a shuffled order; item i fails when i %
        ``fail_every`` is 1 (None: none fails); item ``lose`` gets no line (its part could not be written: only marked);
        chunk ``split`` ends as single-item parts."""
        size = self.spec.chunk_size
        chunks = list(range(-(-self.total // size))) if chunks is None else chunks
        self.rng.shuffle(chunks)
        for chunk in chunks:
            indices = range(chunk * size, min(self.total, (chunk + 1) * size))
            records = [self.record(i, "failed" if fail_every and i % fail_every == 1 else "done") for i in indices]
            if chunk == split:
                for r in records:
                    self.finish_chunk(chunk, [r], part=str(r.index))
                continue
            if lose is not None and lose in indices:
                self.state.mark(self.seq, [(lose, "failed")])
                records = [r for r in records if r.index != lose]
            self.finish_chunk(chunk, records)

    def resubmit(self) -> None:
        self.seq = self.state.start_submission(self.spec)

    def reference(self, cancelled: bool = False) -> tuple[bytes, dict]:
        """The one-pass merge's manifest and counts (then removed, so nothing is reused)."""
        counts = merge_manifest(self.storage.inner, self.output, self.job_id, self.total if cancelled else None)
        uri = manifest_uri(self.output, self.job_id)
        body = self.storage.inner.get(uri)
        self.storage.inner.delete(uri)
        return body, counts

    def finish(self, cancelled: bool = False) -> tuple[bytes, dict, list[str]]:
        """``write_manifest`` with its reads counted: (manifest, counts, objects read)."""
        self.storage.reads = []
        counts = write_manifest(self.storage, self.spec, self.seq, cancelled)
        return self.storage.inner.get(manifest_uri(self.output, self.job_id)), counts, self.storage.reads


def _lines(body: bytes) -> list[dict]:
    return [json.loads(line) for line in body.splitlines()]


def _local(tmp_path) -> Counting:
    return Counting(open_storage(str(tmp_path)))


# --- geometry and bitmaps ---------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 7, 16, 100, 1024, 4096])
@pytest.mark.parametrize("total", [1, 9_999, 10_001, 1_000_000])
def test_groups_are_few_and_their_name_prefixes_cover_exactly_their_chunks(total, chunk_size):
    geo = Groups(total, chunk_size)
    assert geo.count <= math.ceil(total / 10_000)
    assert geo.per_group * chunk_size >= 10_000 and geo.per_group * chunk_size <= 25_000 + chunk_size * 5
    seen = 0
    for group in {0, 1, geo.count // 2, geo.count - 1} & set(range(geo.count)):
        prefixes = geo.name_prefixes(group)
        assert len(prefixes) <= 5
        chunks = geo.chunks(group)
        probe = range(max(0, chunks.start - 3), min(geo.n_chunks, chunks.stop + 3))
        for chunk in probe:
            name = f"{chunk:08d}-000001.jsonl"
            assert any(name.startswith(p) for p in prefixes) == (chunk in chunks), (group, chunk, prefixes)
        seen += len(geo.items(group))
    assert sum(len(geo.items(g)) for g in range(geo.count)) == total


def test_marked_in_counts_done_or_failed_bits_of_a_range(client):
    state = JobState(client, "mi-" + uuid.uuid4().hex[:8], TEST_SIGNER)
    rng = random.Random(3)
    marked = {}
    for index in rng.sample(range(3000), 1200):
        marked[index] = rng.choice(["done", "failed"])
    state.mark(1, sorted(marked.items()))
    for start, stop in [(0, 3000), (0, 1), (5, 13), (7, 8), (8, 16), (1001, 2999), (2990, 4000), (5000, 6000)]:
        assert state.marked_in(start, stop) == sum(1 for i in marked if start <= i < stop), (start, stop)


# --- the finish against the one-pass merge ---------------------------------------------------


@pytest.mark.slow
def test_the_finish_reads_one_object_per_group_and_equals_the_one_pass_merge(client, tmp_path):
    """25,000 items at chunk 64 (391 parts, 2 groups): a resubmission retries the failures
    and the item that had no line, one chunk ends split into single-item parts."""
    job = Job(client, _local(tmp_path), str(tmp_path / "out"), 25_000, 64)
    job.run(split=3, lose=12_345, fail_every=997)
    first, _ = job.reference()
    job.resubmit()
    retried = [r["index"] for r in _lines(first) if r["status"] == "failed"] + [12_345]
    job.run(chunks=sorted({i // 64 for i in retried}), fail_every=None)  # all done this time
    groups = Groups(25_000, 64)
    assert all(job.storage.inner.exists(group_uri(job.output, job.job_id, g, job.seq)) for g in range(groups.count))

    expected, expected_counts = job.reference()
    body, counts, reads = job.finish()
    assert body == expected and counts == expected_counts
    assert len(reads) == groups.count <= math.ceil(25_000 / 10_000)
    rows = _lines(body)
    assert len(rows) == 25_000 and len({r["index"] for r in rows}) == len(rows)
    assert counts["done"] == 25_000 and all(r["notes"] == ["seq 2"] for r in rows if r["index"] in retried)

    again, counts_again, reads_again = job.finish()  # re-running the finish is idempotent
    assert (again, counts_again, len(reads_again)) == (body, counts, len(reads))


def test_an_item_without_a_line_is_missing_not_invented(client, tmp_path):
    job = Job(client, _local(tmp_path), str(tmp_path / "out"), 3_000, 16)
    job.run(lose=2_001)
    expected, expected_counts = job.reference()
    body, counts, reads = job.finish()
    assert body == expected and counts == expected_counts
    assert 2_001 not in {r["index"] for r in _lines(body)} and len(_lines(body)) == 2_999
    assert len(reads) == 1


def test_a_crash_between_group_writes_then_a_rerun_gives_one_line_per_item(client, tmp_path, monkeypatch):
    """The second group's write fails while the job runs (as if its merger died), then the
    finish itself fails after the first group: the re-run merges what has no file."""
    monkeypatch.setattr(merge, "GROUP_ITEMS", 1000)  # groups of 100 chunks: 1,600 items
    job = Job(client, _local(tmp_path), str(tmp_path / "out"), 4_000, 16)  # 3 groups
    job.storage.fail_put = lambda uri: uri == group_uri(job.output, job.job_id, 1, job.seq)
    job.run()
    assert not job.storage.inner.exists(group_uri(job.output, job.job_id, 1, job.seq))
    assert job.storage.inner.exists(group_uri(job.output, job.job_id, 2, job.seq))
    expected, expected_counts = job.reference()

    with pytest.raises(StorageError):  # the finish's own write of group 1 fails: no manifest
        job.finish()
    assert not job.storage.inner.exists(manifest_uri(job.output, job.job_id))

    job.storage.fail_put = lambda uri: False
    body, counts, reads = job.finish()
    assert body == expected and counts == expected_counts
    assert sorted(r["index"] for r in _lines(body)) == list(range(4_000))
    assert len(reads) == 3 + 100  # three group files (one not there), and group 1's 100 parts
    _, _, reads = job.finish()  # group 1 has its file now
    assert len(reads) == 3


def test_a_group_is_merged_once_and_only_when_complete(client, tmp_path, monkeypatch):
    monkeypatch.setattr(merge, "GROUP_ITEMS", 500)
    job = Job(client, _local(tmp_path), str(tmp_path / "out"), 1_000, 10)
    geo = Groups(1_000, 10)
    assert geo.per_group == 50 and geo.count == 2
    job.run(chunks=list(range(49)))
    uri = group_uri(job.output, job.job_id, 0, job.seq)
    assert not job.storage.inner.exists(uri)  # chunk 49 is still out
    job.run(chunks=[49])
    assert job.storage.inner.exists(uri)
    before = job.storage.inner.get(uri)
    job.storage.reads = []
    assert merge_group_if_complete(job.state, job.storage, job.spec, job.seq, 5) is False  # claimed already
    assert job.storage.reads == [] and job.storage.inner.get(uri) == before


def test_a_cancelled_job_lists_every_unfinished_item_as_cancelled(client, tmp_path, monkeypatch):
    monkeypatch.setattr(merge, "GROUP_ITEMS", 1000)  # groups of 100 chunks
    job = Job(client, _local(tmp_path), str(tmp_path / "out"), 4_800, 16)
    job.run(chunks=list(range(0, 100)) + list(range(120, 130)))  # group 0 whole, group 1 in part, group 2 none
    expected, expected_counts = job.reference(cancelled=True)
    body, counts, _ = job.finish(cancelled=True)
    assert body == expected and counts == expected_counts
    assert counts["cancelled"] == 4_800 - 110 * 16 and len(_lines(body)) == 4_800
    assert not job.storage.inner.exists(group_uri(job.output, job.job_id, 1, job.seq))  # never kept


def test_finalize_claims_the_finish_as_a_lease_and_reads_only_group_files(client, tmp_path, monkeypatch):
    monkeypatch.setattr(merge, "GROUP_ITEMS", 1000)
    job = Job(client, _local(tmp_path), str(tmp_path / "out"), 2_400, 16)  # 2 groups
    job.run()
    assert finish_pending(job.state, job.seq)
    assert job.state.claim_finalize(job.seq, lease_s=1)  # a finisher that dies at once
    assert finalize_if_complete(job.state, job.storage, job.spec, job.seq) is False
    client.delete(f"pixelrelay:job:{job.job_id}:finalized:{job.seq}")  # its lease ran out
    job.storage.reads = []
    assert finalize_if_complete(job.state, job.storage, job.spec, job.seq) is True
    assert len(job.storage.reads) == 2 and not finish_pending(job.state, job.seq)
    assert finalize_if_complete(job.state, job.storage, job.spec, job.seq) is False  # "written": once
    assert client.get(f"pixelrelay:job:{job.job_id}:finalized:{job.seq}") == b"written"
    info = job.state.info()
    failed = len(range(1, 2_400, 97))
    assert (info["manifest_done"], info["manifest_failed"], info["manifest_missing"]) == (
        str(2_400 - failed),
        str(failed),
        "0",
    )


@pytest.mark.slow
def test_on_s3_a_group_lists_its_name_prefixes_only(client, s3_bucket, monkeypatch):
    """S3 (moto over HTTP), with groups of 200 items (5 name prefixes per group) so that a
    small job has several."""
    monkeypatch.setattr(merge, "GROUP_ITEMS", 200)
    storage = Counting(open_storage(f"s3://{s3_bucket}/out"))
    job = Job(client, storage, f"s3://{s3_bucket}/out", 1_000, 4)  # 250 parts, 5 groups of 50 chunks
    assert Groups(1_000, 4).per_group == 50 and Groups(1_000, 4).count == 5
    job.run(split=7)
    expected, expected_counts = job.reference()
    body, counts, reads = job.finish()
    assert body == expected and counts == expected_counts and len(reads) == 5


def test_the_decode_finish_merges_each_group_as_its_last_chunk_ends(client, tmp_path, monkeypatch):
    """Through ``workers.policy.finish_chunk``, as the decode stage ends a chain: a group file
    appears when its last chunk ends, and the last chain's finish reads only group files."""
    from pixelrelay.pipeline.messages import ChunkMessage
    from pixelrelay.workers.policy import finish_chunk

    monkeypatch.setattr(merge, "GROUP_ITEMS", 40)
    job = Job(client, _local(tmp_path), str(tmp_path / "out"), 100, 4)  # 25 chunks, groups of 10
    sent = []
    for chunk in [*range(10, 25), *range(0, 10)]:
        records = [job.record(i, "done") for i in range(chunk * 4, chunk * 4 + 4)]
        msg = ChunkMessage(
            job_id=job.job_id,
            seq=job.seq,
            chunk=chunk,
            output=job.output,
            options=job.spec.options,
            backends=job.spec.backends,
            records=records,
            feeds=False,
        )
        job.storage.reads = []
        wrote = finish_chunk(job.state, job.storage, sent.append, msg)
        exists = [job.storage.inner.exists(group_uri(job.output, job.job_id, g, job.seq)) for g in range(3)]
        if chunk == 19:
            assert exists == [False, True, False]
        if chunk == 24:
            assert exists == [False, True, True]
        assert wrote == (chunk == 9)
    assert job.storage.reads[-3:] == [group_uri(job.output, job.job_id, g, job.seq) for g in range(3)]
    assert len(job.storage.reads) == 10 + 3  # the last group's 10 parts, then the 3 group files
    assert [r["index"] for r in _lines(job.storage.inner.get(manifest_uri(job.output, job.job_id)))] == list(range(100))


@pytest.mark.slow
def test_a_job_rebuilt_from_storage_reads_group_files_not_every_part(client, tmp_path, monkeypatch):
    """Redis lost the job: its done bits come back from the group files of the groups that
    completed and from the parts of the one that did not."""
    from pixelrelay.jobs.files import iter_part_records
    from pixelrelay.jobs.recover import restore_done

    monkeypatch.setattr(merge, "GROUP_ITEMS", 1000)  # groups of 100 chunks
    job = Job(client, _local(tmp_path), str(tmp_path / "out"), 4_800, 16)
    job.run(chunks=list(range(0, 200)) + list(range(250, 260)))  # groups 0 and 1 whole, 2 in part
    expected = sorted(
        r["index"] for r in iter_part_records(job.storage.inner, job.output, job.job_id) if r["status"] == "done"
    )
    client.delete(*client.keys(f"pixelrelay:job:{job.job_id}*"))  # Redis lost it
    state = JobState(client, job.job_id, TEST_SIGNER)
    job.storage.reads = []
    assert restore_done(state, job.storage, job.spec) == len(expected)
    assert len(job.storage.reads) == 2 + 10 + 1  # 2 group files, 10 parts, the cancel marker
    assert state.seq() == job.seq and state.marked_in(0, 4_800) == len(expected)
