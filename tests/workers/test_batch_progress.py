"""The decode stage reports its items per batch (``status`` counts move before the chunk's
part and bits are written). The stage bodies run in-process against real Redis and folders."""

from __future__ import annotations

import json
import uuid

from pixelrelay.jobs import keys
from pixelrelay.jobs.chunks import Slot
from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline.messages import Backends, ChunkMessage, ItemRecord, JobOptions
from pixelrelay.pipeline.settings import Settings
from pixelrelay.pipeline.storage import open_storage
from pixelrelay.workers import observe
from pixelrelay.workers.runtime import Runtime
from pixelrelay.workers.stages import decode_chunk, encode_chunk, plan_chunk
from tests.conftest import TEST_SIGNER
from tests.images import encode, photo_like


def test_the_decode_stage_reports_each_batch(tmp_path, redis_url, monkeypatch):
    src, out = str(tmp_path / "in"), str(tmp_path / "out")
    storage = open_storage(out)
    records = []
    for i in range(7):
        storage.put(f"{src}/{i}.png", encode(photo_like(16 + i, 12, i), "PNG"))
        records.append(ItemRecord(index=i, input=f"{src}/{i}.png", output=f"{out}/{i}.png"))
    rt = Runtime(Settings.from_env(redis_url=redis_url, batch_size=3, io_threads=2))
    msg = ChunkMessage(
        job_id="bp-" + uuid.uuid4().hex[:8],
        seq=1,
        chunk=0,
        output=out,
        options=JobOptions(task="upscale"),
        backends=Backends(encoder="null", planner="null", decoder="null"),
        records=records,
    )
    state = JobState(rt.redis, msg.job_id, TEST_SIGNER)
    reports = []
    real = observe.report_batch
    monkeypatch.setattr(observe, "report_batch", lambda *a: reports.append(a[3:]) or real(*a))
    for stage in (encode_chunk, plan_chunk, decode_chunk):
        stage(rt, state, msg)
    assert reports == [(3, 0), (6, 0), (7, 0)], "one report per decode batch"
    stored = json.loads(rt.redis.hget(keys.batches(msg.job_id), Slot.of(msg).name))
    assert (stored["done"], stored["failed"]) == (7, 0)
