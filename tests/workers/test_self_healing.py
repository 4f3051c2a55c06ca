"""Jobs that heal themselves: real stage workers (subprocesses) on a Redis database of their
own, S3 (moto over HTTP), and real signals.

A worker is stopped while it is inside a chunk (its lease, owned by its pid, is live and the
chunk's entry names its stage), a replacement is started, and the job must finish: every
item in the manifest exactly once, exactly one output object per item in storage and nothing
else, exact counts. With test settings (lease 2 s, sweep every 0.5 s, 0.15 s per item and
stage) a lost chunk is re-sent about 2-3 s after its worker died.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid

import pytest
import redis

from pixelrelay.jobs import keys
from pixelrelay.jobs.chunks import parse_entries
from pixelrelay.jobs.state import JobState
from pixelrelay.workers.lease import WATCHDOG_EXIT_CODE
from tests.conftest import REPO, run_cli, wait_until, worker_env
from tests.images import good_images, photo_like
from tests.workers.stages import SETTINGS, Stages

pytestmark = pytest.mark.e2e

DB = 8
N_ITEMS = 6
QUEUES = [f"pixelrelay.{stage}" for stage in ("encode", "plan", "decode")]
RESENT = "sending it again from encode"  # the sweep's log line for a re-sent chunk


@pytest.fixture(scope="module")
def db_url(redis_url):
    url = redis_url.rsplit("/", 1)[0] + f"/{DB}"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="module")
def stages(db_url, s3_server, tmp_path_factory):
    pool = Stages(worker_env(db_url, **SETTINGS), tmp_path_factory.mktemp("healing-logs"))
    for stage in ("encode", "plan", "decode"):
        pool.start(stage)
    yield pool
    pool.stop_all()


@pytest.fixture()
def client(db_url):
    client = redis.Redis.from_url(db_url)
    yield client
    client.close()


def _submit(stages: Stages, s3_client, bucket: str):
    """Start submitting a job of ``N_ITEMS`` images (the test watches it from its first chunk
    on); returns its id, its files and the running ``pixelrelay submit``."""
    files = dict(list(good_images(N_ITEMS).items()))
    for rel, data in files.items():
        s3_client.put_object(Bucket=bucket, Key=f"in/{rel}", Body=data)
    job_id = "heal-" + uuid.uuid4().hex[:8]
    cmd = [
        sys.executable,
        "-m",
        "pixelrelay",
        "submit",
        f"s3://{bucket}/in",
        "--out",
        f"s3://{bucket}/out",
        "--job-id",
        job_id,
    ]
    return (
        job_id,
        files,
        subprocess.Popen(cmd, env=stages.env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
    )


def _running(client: redis.Redis, job_id: str, stage: str, pid: int) -> str | None:
    """A slot the worker ``pid`` is running at ``stage`` right now, if any."""
    entries, _ = parse_entries(client.hgetall(keys.chunks(job_id)))
    for slot, entry in entries.items():
        owner = client.get(keys.lease(job_id, slot.name))
        if entry.stage == stage and owner is not None and owner.decode().endswith(f":{pid}"):
            return slot.name
    return None


def _diagnose(stages: Stages, client: redis.Redis, job_id: str) -> str:
    state = {
        "entries": client.hgetall(keys.chunks(job_id)),
        "leases": {k: client.get(k) for k in client.keys(keys.lease(job_id, "*"))},
        "queues": {q: client.llen(q) for q in QUEUES},
        "unacked": client.hlen(keys.KOMBU_UNACKED),
        "job": JobState(client, job_id).info(),
        "workers": {s: (p.pid, p.poll()) for s, p in stages.procs.items()},
    }
    return f"{state}\n{stages.logs()}"


def _await(stages: Stages, client: redis.Redis, job_id: str, predicate, timeout: float = 60, interval: float = 0.1):
    try:
        return wait_until(predicate, timeout=timeout, interval=interval)
    except TimeoutError:
        pytest.fail("timed out: " + _diagnose(stages, client, job_id))


def _finished(client: redis.Redis, job_id: str) -> bool:
    info = JobState(client, job_id).info()
    return bool(info.get("finished_at")) and info.get("finished_seq") == info.get("seq")


def _check_job(client: redis.Redis, s3_client, bucket: str, job_id: str, files: dict[str, bytes]) -> None:
    body = s3_client.get_object(Bucket=bucket, Key=f"out/_jobs/{job_id}/manifest.jsonl")["Body"].read()
    rows = [json.loads(line) for line in body.splitlines()]
    assert [r["index"] for r in rows] == list(range(N_ITEMS))  # every item exactly once
    assert all(r["status"] == "done" for r in rows), [r["error"] for r in rows]
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]
    outputs = {o["Key"] for o in listed if not o["Key"].startswith("out/_jobs/")}
    assert outputs == {f"out/{rel}" for rel in files}  # one object per item, nothing partial or extra
    assert {r["output"] for r in rows} == {f"s3://{bucket}/out/{rel}" for rel in files}
    counts = JobState(client, job_id).counts()
    assert (counts.total, counts.done, counts.failed) == (N_ITEMS, N_ITEMS, 0)
    info = JobState(client, job_id).info()
    assert (info["manifest_done"], info["manifest_failed"], info["manifest_missing"]) == (str(N_ITEMS), "0", "0")
    assert not client.sismember(keys.ACTIVE_JOBS, job_id) and not client.exists(keys.chunks(job_id))


@pytest.mark.parametrize(
    "stage,sig",
    [
        ("decode", signal.SIGKILL),
        ("encode", signal.SIGKILL),
        ("plan", signal.SIGKILL),
        ("decode", signal.SIGTERM),
        ("encode", signal.SIGTERM),
        ("plan", signal.SIGTERM),
    ],
    ids=lambda v: v if isinstance(v, str) else signal.Signals(v).name,
)
def test_a_worker_stopped_mid_chunk_is_replaced_and_the_job_finishes(stages, client, s3_client, s3_bucket, stage, sig):
    resent_before = stages.logs().count(RESENT)
    job_id, files, submitting = _submit(stages, s3_client, s3_bucket)
    pid = stages.procs[stage].pid
    slot = _await(stages, client, job_id, lambda: _running(client, job_id, stage, pid), timeout=30, interval=0.01)

    stopped_at = time.monotonic()
    code = stages.stop(stage, sig)
    stages.start(stage)
    assert submitting.wait(60) == 0, submitting.stderr.read()
    _await(stages, client, job_id, lambda: _finished(client, job_id))
    recovered_s = time.monotonic() - stopped_at

    _check_job(client, s3_client, s3_bucket, job_id, files)
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
        assert stages.logs().count(RESENT) > resent_before, stages.logs()  # the sweep healed it
    print(f"\n{stage} {signal.Signals(sig).name} in slot {slot}: job finished {recovered_s:.1f} s after the signal")
    assert recovered_s < 30


def test_purged_queues_are_healed_by_the_sweep(stages, client, s3_client, s3_bucket):
    resent_before = stages.logs().count(RESENT)
    job_id, files, submitting = _submit(stages, s3_client, s3_bucket)
    # The window's second chunk waits in the encode list while the first is encoded: purge
    # the three queues (what `celery purge` does) as soon as a message waits in one.
    deadline = time.monotonic() + 30
    while not client.delete(*QUEUES):
        assert time.monotonic() < deadline and not _finished(client, job_id), "no message ever waited in a queue"
        time.sleep(0.002)
    purged_at = time.monotonic()
    assert submitting.wait(60) == 0, submitting.stderr.read()
    _await(stages, client, job_id, lambda: _finished(client, job_id))
    recovered_s = time.monotonic() - purged_at

    _check_job(client, s3_client, s3_bucket, job_id, files)
    assert stages.logs().count(RESENT) > resent_before, stages.logs()
    print(f"\npurge: job finished {recovered_s:.1f} s after the purge")


HUNG_ITEMS, HUNG_CHUNK, HUNG_BATCH, HUNG_INDEX = 12, 6, 3, 7  # item 7 hangs in the model call on items 6-8


def test_a_hung_model_call_fails_only_its_item_and_the_job_finishes(redis_url, tmp_path):
    """A real solo decode worker hangs on one item of a 12-item job: after the call's budget
    the watchdog sends that chunk's pending items on one by one and exits 75; a supervisor
    loop (standing in for systemd / Kubernetes) restarts it; the hanging item hangs again
    alone and fails alone, with the timeout; every other item is done, each exactly once, and
    the job finishes with nobody acting."""
    url = redis_url.rsplit("/", 1)[0] + "/11"
    redis.Redis.from_url(url).flushdb()
    env = worker_env(
        url,
        PIXELRELAY_PLUGINS="tests.faults",
        PIXELRELAY_CHUNK_SIZE=str(HUNG_CHUNK),
        PIXELRELAY_BATCH_SIZE=str(HUNG_BATCH),
        PIXELRELAY_ITEM_BUDGET_S="2",
        PIXELRELAY_LEASE_S="1",
        PIXELRELAY_SWEEP_INTERVAL_S="0.3",
    )
    src = tmp_path / "in"
    src.mkdir()
    for i in range(HUNG_ITEMS):
        photo_like(13 if i == HUNG_INDEX else 20 + i, 16, i).save(src / f"{i:02d}.png")
    pool = Stages(env, tmp_path)
    for stage, flag, backend in (("encode", "--encoder", "analysis"), ("plan", "--planner", "rules")):
        pool.start(stage, flag, backend)
    pool.start("decode", "--decoder", "hanging")
    exits: list[int] = []
    pool.supervise("decode", ("--decoder", "hanging"), exits)
    started = time.monotonic()
    try:
        job_id = "hung-" + uuid.uuid4().hex[:6]
        result = run_cli(
            ["submit", str(src), "--out", str(tmp_path / "out"), "--job-id", job_id, "--wait"], env, timeout=120
        )
        waited_s = time.monotonic() - started  # worker start-up included
        assert result.returncode == 1, result.stderr + pool.logs()
    finally:
        pool.stop_all()
    print(f"\nhung model call: submit --wait returned after {waited_s:.1f} s, decode exits {exits}")
    assert exits[:2] == [WATCHDOG_EXIT_CODE] * 2, pool.logs()  # the chunk's call of 3, then item 7 alone
    lines = (tmp_path / "out" / "_jobs" / job_id / "manifest.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["index"] for r in rows] == list(range(HUNG_ITEMS))  # every item exactly once
    failed = {r["input"].rsplit("/", 1)[1]: r["error"] for r in rows if r["status"] != "done"}
    assert failed == {f"{HUNG_INDEX:02d}.png": "decode: timed out after 2 s"}, failed
    good = [f"{i:02d}.png" for i in range(HUNG_ITEMS) if i != HUNG_INDEX]
    names = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))
    assert names == [*good, "_jobs"]
    client = redis.Redis.from_url(url)
    counts = JobState(client, job_id).counts()
    assert (counts.total, counts.done, counts.failed) == (HUNG_ITEMS, HUNG_ITEMS - 1, 1)
    info = JobState(client, job_id).info()
    assert (info["manifest_done"], info["manifest_failed"], info["manifest_missing"]) == ("11", "1", "0")
