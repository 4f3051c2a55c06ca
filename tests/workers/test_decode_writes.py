"""The decode stage stores each batch's outputs as one group (``Storage.put_many``): one
sync per batch on local storage, every item tried on its own, a failed write failing only
its item, with a reason. The stage body runs in-process against real Redis and folders."""

from __future__ import annotations

import uuid

from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline.messages import Backends, ChunkMessage, ItemRecord, JobOptions
from pixelrelay.pipeline.settings import Settings
from pixelrelay.pipeline.storage import open_storage
from pixelrelay.pipeline.storage.local import LocalStorage
from pixelrelay.workers.runtime import Runtime
from pixelrelay.workers.stages import decode_chunk, encode_chunk, plan_chunk
from tests.conftest import TEST_SIGNER
from tests.images import encode, photo_like


def test_each_batch_is_stored_as_one_group_and_a_bad_write_fails_alone(tmp_path, redis_url, monkeypatch):
    src, out = str(tmp_path / "in"), str(tmp_path / "out")
    storage = open_storage(out)
    records = []
    for i in range(7):
        storage.put(f"{src}/{i}.png", encode(photo_like(16 + i, 12, i), "PNG"))
        records.append(ItemRecord(index=i, input=f"{src}/{i}.png", output=f"{out}/{i}.png"))
    (tmp_path / "out" / "bad").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "out" / "bad").write_bytes(b"a file where a folder should be")
    records[4].output = f"{out}/bad/4.png"
    groups = []
    real = LocalStorage.put_many
    monkeypatch.setattr(LocalStorage, "put_many", lambda self, reqs: groups.append(len(reqs)) or real(self, reqs))

    rt = Runtime(Settings.from_env(redis_url=redis_url, batch_size=3, io_threads=2))
    job_id = "grp-" + uuid.uuid4().hex[:8]
    msg = ChunkMessage(
        job_id=job_id,
        seq=1,
        chunk=0,
        output=out,
        options=JobOptions(task="upscale"),
        backends=Backends(encoder="null", planner="null", decoder="null"),
        records=records,
    )
    state = JobState(rt.redis, job_id, TEST_SIGNER)
    for stage in (encode_chunk, plan_chunk):
        stage(rt, state, msg)
    groups.clear()  # only the decode stage's writes
    decode_chunk(rt, state, msg)

    assert groups == [3, 3, 1], "one group per decode batch"
    assert [r.status for r in msg.records] == ["done"] * 4 + ["failed"] + ["done"] * 2
    assert "cannot write output" in msg.records[4].error
    for r in msg.records:
        if r.status == "done":
            assert r.outcome == "processed" and storage.head(r.output).metadata, r.output


def _run_chunk(tmp_path, redis_url, name: str) -> tuple[int, dict[str, bytes]]:
    """Encode, plan and decode one local chunk of 7 small images; (tasks the I/O threads
    were given, the outputs' bytes)."""
    from concurrent.futures import ThreadPoolExecutor

    src, out = tmp_path / f"{name}-in", tmp_path / f"{name}-out"
    storage = open_storage(str(out))
    records = []
    for i in range(7):
        storage.put(f"{src}/{i}.png", encode(photo_like(16 + i, 12, i), "PNG"))
        records.append(ItemRecord(index=i, input=f"{src}/{i}.png", output=f"{out}/{i}.png"))
    rt = Runtime(Settings.from_env(redis_url=redis_url, batch_size=3, io_threads=2))
    job_id = "inl-" + uuid.uuid4().hex[:8]
    msg = ChunkMessage(
        job_id=job_id,
        seq=1,
        chunk=0,
        output=str(out),
        options=JobOptions(task="upscale"),
        backends=Backends(encoder="null", planner="null", decoder="null"),
        records=records,
    )
    state = JobState(rt.redis, job_id, TEST_SIGNER)
    io_tasks = []
    real_submit = ThreadPoolExecutor.submit

    def counting_submit(self, fn, *args, **kwargs):
        if self is rt.io:
            io_tasks.append(fn)
        return real_submit(self, fn, *args, **kwargs)

    ThreadPoolExecutor.submit = counting_submit
    try:
        for stage in (encode_chunk, plan_chunk, decode_chunk):
            stage(rt, state, msg)
    finally:
        ThreadPoolExecutor.submit = real_submit
    assert [r.status for r in msg.records] == ["done"] * 7, [r.error for r in msg.records]
    return len(io_tasks), {f"{i}.png": (out / f"{i}.png").read_bytes() for i in range(7)}


def test_small_local_work_runs_on_the_calling_thread_with_the_same_outputs(tmp_path, redis_url, monkeypatch):
    """Reading local files and decoding or encoding small images is cheaper than a hop to
    an I/O thread: those run where they are called, and the I/O threads get one task per
    decode batch (its group write). Forced onto the threads, the outputs are the same bytes."""
    from pixelrelay.workers import batching, outputs

    inline_tasks, inline_outputs = _run_chunk(tmp_path, redis_url, "inline")
    monkeypatch.setattr(batching, "INLINE_BYTES", 0)
    monkeypatch.setattr(outputs, "INLINE_PIXELS", 0)
    spread_tasks, spread_outputs = _run_chunk(tmp_path, redis_url, "spread")
    assert inline_tasks == 3  # the three decode batches' group writes
    assert spread_tasks > inline_tasks  # decodes and encodes fanned out as well
    assert inline_outputs == spread_outputs
