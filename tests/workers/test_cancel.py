"""Cancelling a job, in-process: a real Redis and ``JobState``, local-folder storage, the
real delivery policy and stage bodies, and a list's ``append`` for the broker (see
``tests/workers/policy_jobs.py``). The end-to-end run through real workers is
``tests/producer/test_job_control.py``."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import pytest

from pixelrelay.jobs import keys
from pixelrelay.jobs.chunks import ChunksInFlight, Slot
from pixelrelay.jobs.files import cancel_uri, read_cancel, write_cancel
from pixelrelay.jobs.state import Counts, JobCancelledError, JobStatus, job_status
from pixelrelay.pipeline.messages import ChunkMessage
from pixelrelay.pipeline.settings import Settings
from pixelrelay.pipeline.stages.decoders.classic import ClassicDecoder
from pixelrelay.pipeline.stages.registry import register
from pixelrelay.workers.policy import Cancelled, Delivery
from pixelrelay.workers.runtime import Runtime
from pixelrelay.workers.sweep import sweep_once
from pixelrelay.workers.tasks import STAGE_BODIES
from tests.conftest import TEST_SIGNER, wait_until
from tests.workers.policy_jobs import Job

ON_RESTORE: list = []  # callables the ``cancelling`` decoder runs after each batch


class CancellingDecoder(ClassicDecoder):
    """``classic``, running ``ON_RESTORE`` after each batch (a cancel arriving mid-decode)."""

    kind = "cancelling"

    def restore(self, images, plans):
        out = super().restore(images, plans)
        for hook in ON_RESTORE:
            hook()
        return out


register("decoder", "cancelling", f"{__name__}:CancellingDecoder")


@pytest.fixture()
def rt(redis_url):
    ON_RESTORE.clear()
    yield Runtime(
        Settings.from_env(redis_url=redis_url, encoder="analysis", planner="rules", decoder="cancelling", batch_size=1)
    )
    ON_RESTORE.clear()


def deliver(job: Job, rt: Runtime, stage: str, msg: ChunkMessage):
    return job.policy.deliver(Delivery(stage, msg), functools.partial(STAGE_BODIES[stage], rt, job.state))


def run_chain(job: Job, rt: Runtime, msg: ChunkMessage):
    for stage in STAGE_BODIES:
        msg = deliver(job, rt, stage, msg)
        if not isinstance(msg, ChunkMessage):
            return msg
    return msg


def outputs(job: Job) -> set[str]:
    """Every file in the output folder but the job's own (and the outputs' sidecars)."""
    out = Path(job.output)
    return (
        {p.name for p in out.iterdir() if p.is_file() and not p.name.endswith(".pixelrelay.json")}
        if out.exists()
        else set()
    )


def test_a_cancelled_job_feeds_nothing_and_its_chains_end_at_their_next_stage(make_job, rt):
    job = make_job([20 + i for i in range(10)], chunk_size=4)
    job.feed(window=2)
    first = job.sent.pop(0)
    assert isinstance(run_chain(job, rt, first), ChunkMessage)  # chunk 0 done; its finish fed chunk 2
    assert [m.chunk for m in job.sent] == [1, 2]
    cursor = job.state.cursor()

    assert job.state.cancel() and not job.state.cancel()  # set once
    job.feed(window=5)
    assert [m.chunk for m in job.sent] == [1, 2]  # nothing more
    one, two = job.sent
    assert deliver(job, rt, "encode", one) == Cancelled(4)
    assert job.state.info().get("finished_at") is None  # chunk 2 is still in flight
    assert deliver(job, rt, "plan", two) == Cancelled(2)  # a chain ends at whatever stage comes next

    rows = job.manifest()
    assert sorted(rows) == list(range(10))
    assert [rows[i]["status"] for i in range(10)] == ["done"] * 4 + ["cancelled"] * 6
    assert all(rows[i]["output"] is None and rows[i]["error"] == "job cancelled" for i in range(4, 10))
    assert outputs(job) == {f"{i}.png" for i in range(4)}
    info = job.state.info()
    assert (info["manifest_done"], info["manifest_cancelled"], info["manifest_missing"]) == ("4", "6", "0")
    assert job.state.cursor() == cursor  # no chunk was taken after the cancel
    assert job.state.r.hlen(keys.chunks(job.state.job_id)) == 0
    assert not job.state.r.sismember(keys.ACTIVE_JOBS, job.state.job_id)
    assert job_status(info, job.state.counts(), time.time(), 30) == JobStatus.CANCELLED


def test_decode_stops_before_its_next_batch_and_keeps_what_it_finished(make_job, rt):
    job = make_job([20, 21, 22], chunk_size=4)
    job.feed(window=1)
    msg = job.sent.pop(0)
    msg = deliver(job, rt, "plan", deliver(job, rt, "encode", msg))
    ON_RESTORE.append(job.state.cancel)  # the cancel arrives while batch 1 of 3 is decoded
    assert deliver(job, rt, "decode", msg) == Cancelled(2)

    rows = job.manifest()
    assert [rows[i]["status"] for i in range(3)] == ["done", "cancelled", "cancelled"]
    assert Path(rows[0]["output"]).exists() and outputs(job) == {"0.png"}  # no partial file, no extra
    assert job.sent == [] and job.state.counts() == Counts(3, 1, 0)


def test_the_sweep_drops_a_lost_chain_of_a_cancelled_job_and_writes_its_manifest(make_job):
    job = make_job([20 + i for i in range(6)], chunk_size=4)
    job.feed(window=2)
    job.sent.clear()  # both chains lost (a purge, or their workers died)
    for chunk in (0, 1):
        ChunksInFlight(job.state.r, job.state.job_id).track(Slot(job.seq, chunk), "plan", True, now=time.time() - 60)
    job.state.cancel()
    report = sweep_once(job.state.r, job.sent.append, lambda uri: job.storage, 1.0, confirm_s=0, signer=TEST_SIGNER)
    assert report.resent == [] and job.sent == []  # never sent again
    assert sorted(report.finished) == [f"{job.state.job_id}/{job.seq}:{c}" for c in (0, 1)]
    assert [row["status"] for row in job.manifest().values()] == ["cancelled"] * 6


def test_a_cancelled_job_is_not_submitted_again_even_when_rebuilt_from_storage(make_job):
    job = make_job([20, 21], chunk_size=4)
    write_cancel(job.storage, job.output, job.state.job_id, 1234.5)
    assert Path(cancel_uri(job.output, job.state.job_id)).exists()
    assert read_cancel(job.storage, job.output, job.state.job_id) == 1234.5
    job.state.r.delete(job.state.key)  # Redis lost the job; storage rebuilds it
    job.state.restore(0, [], read_cancel(job.storage, job.output, job.state.job_id))
    with pytest.raises(JobCancelledError, match="new job id"):
        job.state.start_submission(job.spec)


def test_progress_time_moves_only_when_an_item_finishes(make_job):
    job = make_job([20, 21, 22], chunk_size=4)
    info = job.state.info
    assert "progress_at" not in info()
    assert job_status(info(), job.state.counts(), time.time(), 30) == JobStatus.QUEUED
    job.state.mark(job.seq, [(0, "done")])
    first = float(info()["progress_at"])
    assert job_status(info(), job.state.counts(), time.time(), 30) == JobStatus.RUNNING
    wait_until(lambda: time.time() > first + 0.001, timeout=1, interval=0.001)  # the clock moved on
    job.state.mark(job.seq, [(0, "done")])  # a duplicate: no bit changes
    assert float(info()["progress_at"]) == first
    job.state.mark(job.seq, [(1, "failed")])
    assert float(info()["progress_at"]) > first
    assert job_status(info(), job.state.counts(), first + 31, 30) == JobStatus.STALLED
    job.state.cancel()
    assert job_status(info(), job.state.counts(), first + 31, 30) == JobStatus.CANCELLING


def test_cancel_without_workers_writes_the_manifest_after_its_grace(make_job, redis_url):
    from pixelrelay.producer.control import CancelOutcome, cancel_job

    settings = Settings.from_env(redis_url=redis_url)
    job = make_job([20, 21, 22], chunk_size=2)
    job.feed(window=2)  # two chains in flight that no worker will ever take
    started = time.monotonic()
    assert cancel_job(job.state.r, settings, job.state.job_id, grace_s=0.3, poll_s=0.05) == CancelOutcome.FORCED
    assert 0.3 <= time.monotonic() - started < 5
    assert read_cancel(job.storage, job.output, job.state.job_id) is not None  # recorded in storage too
    assert [row["status"] for row in job.manifest().values()] == ["cancelled"] * 3
    assert cancel_job(job.state.r, settings, job.state.job_id, grace_s=0) == CancelOutcome.ALREADY
    # a chain delivered after the forced finish is dropped, as a stale duplicate, writing nothing
    assert deliver(job, Runtime(settings), "encode", job.sent[0]).__class__.__name__ == "Stale"


def test_a_job_that_finished_cannot_be_cancelled(make_job, rt, redis_url):
    from pixelrelay.producer.control import JobFinishedError, cancel_job

    job = make_job([20, 21], chunk_size=2)
    job.feed(window=1)
    assert isinstance(run_chain(job, rt, job.sent.pop(0)), ChunkMessage)
    with pytest.raises(JobFinishedError, match="already finished"):
        cancel_job(job.state.r, Settings.from_env(redis_url=redis_url), job.state.job_id, grace_s=0)
    assert not job.state.cancelled() and read_cancel(job.storage, job.output, job.state.job_id) is None
