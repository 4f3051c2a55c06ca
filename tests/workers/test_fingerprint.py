"""A result is reused only if it answers the same request with the same models.

Whole jobs through real stage workers (subprocesses, their own Redis database so no other
test's worker takes their tasks), local folders and S3 over HTTP (moto server); and the
decode stage body run in-process twice on one message (a duplicate delivery).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image

from pixelrelay.jobs import identities
from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline import fingerprint as fp
from pixelrelay.pipeline.messages import Backends, ChunkMessage, Fingerprint, ItemRecord, JobOptions
from pixelrelay.pipeline.settings import Settings
from pixelrelay.pipeline.signing import Signer
from pixelrelay.pipeline.stages.base import RestoredImage
from pixelrelay.pipeline.stages.decoders.classic import ClassicDecoder
from pixelrelay.pipeline.stages.registry import BACKENDS, register
from pixelrelay.pipeline.storage import open_storage
from pixelrelay.pipeline.storage.local import sidecar_path
from pixelrelay.workers.outputs import _store
from pixelrelay.workers.reuse import write_actions
from pixelrelay.workers.runtime import Runtime
from pixelrelay.workers.stages import decode_chunk, encode_chunk, plan_chunk
from tests.conftest import REPO, TEST_SIGNER, WorkerPool, run_cli, wait_until, worker_env
from tests.images import encode, photo_like
from tests.tagged import TAG_ENV

N = 3


class Pool(WorkerPool):
    """The three workers (decoder ``tagged``), and a decode worker that can be restarted
    with another model identity."""

    def restart_decoder(self, tag: str) -> None:
        decode = self.procs.pop()
        decode.terminate()
        decode.wait(30)
        self.env[TAG_ENV] = tag
        log = open(self.logdir / f"decode-{tag}.log", "wb")
        cmd = [
            sys.executable,
            "-m",
            "pixelrelay",
            "worker",
            "--stage",
            "decode",
            "--decoder",
            "tagged",
            "--loglevel",
            "WARNING",
        ]
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))


@pytest.fixture(scope="module")
def pool(redis_url, s3_server, tmp_path_factory):
    isolated = redis_url.rsplit("/", 1)[0] + "/5"
    client = redis.Redis.from_url(isolated)
    client.flushdb()
    env = worker_env(isolated, PIXELRELAY_PLUGINS="tests.tagged", **{TAG_ENV: "a"})
    workers = Pool(
        env, tmp_path_factory.mktemp("fp-logs"), {"encoder": "analysis", "planner": "rules", "decoder": "tagged"}
    )
    workers.start()
    workers.client = client
    try:
        _wait_published(client, "tagged:a")
        yield workers
    finally:
        workers.stop()


def _wait_published(client: redis.Redis, decoder_identity: str) -> None:
    """Until the plan and decode workers' identities are known to the encode stage."""
    wait_until(
        lambda: (
            identities.lookup(client, "plan", None) is not None
            and getattr(identities.lookup(client, "decode", None), "identity", None) == decoder_identity
        ),
        timeout=60,
    )


def _inputs(folder: Path) -> None:
    folder.mkdir(parents=True)
    for i in range(N):
        photo_like(20 + 4 * i, 16, i).save(folder / f"{i}.png")


def _submit(pool: Pool, src: str, out: str, *extra: str) -> tuple[str, subprocess.CompletedProcess]:
    job_id = "fp-" + uuid.uuid4().hex[:8]
    result = run_cli(["submit", src, "--out", out, "--job-id", job_id, "--task", "upscale", "--wait", *extra], pool.env)
    assert result.returncode == 0, result.stderr + pool.logs()
    return job_id, result


def _local_rows(out: Path, job_id: str) -> list[dict]:
    rows = [json.loads(line) for line in (out / "_jobs" / job_id / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == N and all(r["status"] == "done" for r in rows)
    return rows


def _size(path: str) -> tuple[int, int]:
    return Image.open(path).size


@pytest.mark.e2e
def test_local_reuse_scale_change_and_overwrite(pool, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _inputs(src)
    first, _ = _submit(pool, str(src), str(out), "--scale", "2")
    rows = _local_rows(out, first)
    assert {r["outcome"] for r in rows} == {"processed"}
    for row in rows:
        source = _size(row["input"])
        assert _size(row["output"]) == (source[0] * 2, source[1] * 2)
        stored = fp.from_metadata(json.loads(Path(sidecar_path(row["output"])).read_text()))
        assert stored is not None and stored.job == first and stored.fingerprint.model_dump() == row["fingerprint"]
    stamps = {r["output"]: Path(r["output"]).stat().st_mtime_ns for r in rows}

    # The same request under a new job id: reused before the encode stage ran.
    same, result = _submit(pool, str(src), str(out), "--scale", "2")
    assert "0 failed" in result.stderr
    for row, before in zip(_local_rows(out, same), rows, strict=True):
        assert row["outcome"] == "reused" and row["fingerprint"] == before["fingerprint"]
        assert "encode_s" not in row["timings"] and row["description"] is None
        assert Path(row["output"]).stat().st_mtime_ns == stamps[row["output"]]

    # Another scale is another request: every output re-processed, now x4.
    bigger, _ = _submit(pool, str(src), str(out), "--scale", "4")
    for row in _local_rows(out, bigger):
        assert row["outcome"] == "overwritten" and "encode_s" in row["timings"]
        source = _size(row["input"])
        assert _size(row["output"]) == (source[0] * 4, source[1] * 4)

    # --overwrite re-processes even what answers the same request.
    forced, _ = _submit(pool, str(src), str(out), "--scale", "4", "--overwrite")
    for row in _local_rows(out, forced):
        assert row["outcome"] == "overwritten" and {"encode_s", "decode_s"} <= row["timings"].keys()
        assert fp.from_metadata(json.loads(Path(sidecar_path(row["output"])).read_text())).job == forced


@pytest.mark.e2e
def test_s3_scale_change_then_the_same_request_again(pool, s3_bucket, s3_client):
    for i in range(N):
        s3_client.put_object(Bucket=s3_bucket, Key=f"in/{i}.png", Body=encode(photo_like(24 + 4 * i, 16, i), "PNG"))
    src, out = f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out"

    def rows(job_id):
        body = s3_client.get_object(Bucket=s3_bucket, Key=f"out/_jobs/{job_id}/manifest.jsonl")["Body"].read()
        found = [json.loads(line) for line in body.splitlines()]
        assert len(found) == N and all(r["status"] == "done" for r in found)
        return found

    def head(row):
        return s3_client.head_object(Bucket=s3_bucket, Key=row["output"].split("/", 3)[3])

    def width(row):
        return Image.open(
            io.BytesIO(s3_client.get_object(Bucket=s3_bucket, Key=row["output"].split("/", 3)[3])["Body"].read())
        ).width

    first, _ = _submit(pool, src, out, "--scale", "2")
    for row in rows(first):
        assert row["outcome"] == "processed"
        assert fp.from_metadata(head(row)["Metadata"]).fingerprint.model_dump() == row["fingerprint"]
    second, _ = _submit(pool, src, out, "--scale", "4")
    after = rows(second)
    for index, row in enumerate(after):
        assert row["outcome"] == "overwritten" and width(row) == (24 + 4 * index) * 4
    stamps = [head(row)["LastModified"] for row in after]
    third, _ = _submit(pool, src, out, "--scale", "4")
    for row, stamp in zip(rows(third), stamps, strict=True):
        assert row["outcome"] == "reused" and "encode_s" not in row["timings"]
        assert head(row)["LastModified"] == stamp


@pytest.mark.e2e
def test_a_changed_model_identity_is_reprocessed(pool, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _inputs(src)
    first, _ = _submit(pool, str(src), str(out))
    assert {r["outcome"] for r in _local_rows(out, first)} == {"processed"}
    old = identities.lookup(pool.client, "decode", None).identity
    new = "b" if old != "tagged:b" else "c"
    pool.restart_decoder(new)  # the same decoder spec, other weights
    _wait_published(pool.client, f"tagged:{new}")
    again, _ = _submit(pool, str(src), str(out))
    for row in _local_rows(out, again):
        assert row["outcome"] == "overwritten" and row["models"]["decoder"] == f"tagged:{new}"


@pytest.mark.e2e
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_forged_output_is_reprocessed_not_reused(pool, tmp_path, where, request):
    """A writer of the storage without the key replaces output 0's bytes and replays its
    metadata (fingerprint, job and MAC), and strips output 1's MAC (as an output written
    without one): the same request again re-processes both, reuses only output 2."""
    if where == "local":
        src, out = tmp_path / "in", tmp_path / "out"
        _inputs(src)
        roots = (str(src), str(out))
    else:
        bucket, client = request.getfixturevalue("s3_bucket"), request.getfixturevalue("s3_client")
        for i in range(N):
            client.put_object(Bucket=bucket, Key=f"in/{i}.png", Body=encode(photo_like(20 + 4 * i, 16, i), "PNG"))
        roots = (f"s3://{bucket}/in", f"s3://{bucket}/out")
    storage = open_storage(roots[1])
    first, _ = _submit(pool, *roots)
    outputs = [f"{roots[1]}/{i}.png" for i in range(N)]
    genuine = [storage.get(uri) for uri in outputs]
    metadata = [storage.head(uri).metadata for uri in outputs]
    assert all(fp.META_MAC in m for m in metadata)

    forged = encode(photo_like(40, 32, 9), "PNG")
    stripped = {k: v for k, v in metadata[1].items() if k != fp.META_MAC}
    if where == "local":
        Path(outputs[0]).write_bytes(forged)
        Path(sidecar_path(outputs[0])).write_text(json.dumps(metadata[0]))
        Path(sidecar_path(outputs[1])).write_text(json.dumps(stripped))
    else:
        client.put_object(Bucket=bucket, Key="out/0.png", Body=forged, Metadata=metadata[0])
        client.copy_object(
            Bucket=bucket,
            Key="out/1.png",
            CopySource={"Bucket": bucket, "Key": "out/1.png"},
            Metadata=stripped,
            MetadataDirective="REPLACE",
        )

    again, _ = _submit(pool, *roots)
    body = storage.get(f"{roots[1]}/_jobs/{again}/manifest.jsonl")
    rows = sorted((json.loads(line) for line in body.splitlines()), key=lambda r: r["index"])
    assert [r["status"] for r in rows] == ["done"] * N
    assert [r["outcome"] for r in rows] == ["overwritten", "overwritten", "reused"]
    assert [storage.get(uri) for uri in outputs] == genuine
    assert fp.META_MAC in storage.head(outputs[1]).metadata


# --- duplicate deliveries, in-process ---------------------------------------------------


class NoisyDecoder(ClassicDecoder):
    """``classic`` plus fresh random noise: every run gives other bytes."""

    kind = "noisy"

    def restore(self, images, plans):
        rng = np.random.default_rng()
        out = []
        for restored in super().restore(images, plans):
            noise = rng.integers(0, 40, restored.rgb.shape, dtype=np.uint8)
            out.append(RestoredImage(rgb=restored.rgb // 2 + noise, alpha=restored.alpha, notes=restored.notes))
        return out


@pytest.fixture(autouse=True)
def noisy_decoder():
    """Registered for this module's tests only: the shared contract suite, which runs every
    registered decoder, must never pick it up, whatever order the tests run in."""
    register("decoder", "noisy", f"{__name__}:NoisyDecoder")
    yield
    BACKENDS["decoder"].pop("noisy", None)


@pytest.fixture(params=["local", "s3"])
def roots(request, tmp_path) -> tuple[str, str]:
    if request.param == "local":
        return str(tmp_path / "in"), str(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/in", f"s3://{bucket}/out"


@pytest.mark.parametrize("overwrite, prior", [(False, False), (True, True)], ids=["new", "over-old-overwrite"])
def test_a_duplicate_delivery_never_changes_written_bytes(roots, redis_url, overwrite, prior):
    src, out = roots
    storage = open_storage(out)
    rt = Runtime(Settings.from_env(redis_url=redis_url))
    records = []
    for i in range(2):
        storage.put(f"{src}/{i}.png", encode(photo_like(20 + i, 12, i), "PNG"))
        records.append(ItemRecord(index=i, input=f"{src}/{i}.png", output=f"{out}/{i}.png"))
        if prior:  # an output of some older request, without a fingerprint
            storage.put(f"{out}/{i}.png", b"old bytes")
    seen = [storage.head(r.output) for r in records]
    job_id = "dup-" + uuid.uuid4().hex[:8]
    options = JobOptions(task="upscale", overwrite=overwrite)
    msg = ChunkMessage(
        job_id=job_id,
        seq=1,
        chunk=0,
        output=out,
        options=options,
        backends=Backends(encoder="analysis", planner="rules", decoder="noisy"),
        records=records,
    )
    state = JobState(rt.redis, job_id, TEST_SIGNER)
    encode_chunk(rt, state, msg)
    plan_chunk(rt, state, msg)

    first = msg.model_copy(deep=True)
    decode_chunk(rt, state, first)
    assert [r.outcome for r in first.records] == ["overwritten" if prior else "processed"] * 2
    written = [storage.get(r.output) for r in first.records]

    second = msg.model_copy(deep=True)  # the same message delivered again
    decode_chunk(rt, state, second)
    assert [r.status for r in second.records] == ["done", "done"]
    assert [r.outcome for r in second.records] == ["processed", "processed"]
    assert [storage.get(r.output) for r in second.records] == written

    # A delivery that checked before the first one wrote: its conditional write loses.
    for record, before in zip(second.records, seen, strict=True):
        action, version = ("replace", before.version) if before else ("create", None)
        outcome = _store(rt, record, b"other bytes", "image/png", options, job_id, action, version)
        assert outcome == "processed" and any("another delivery" in n for n in record.notes)
    assert [storage.get(r.output) for r in second.records] == written


def test_the_decode_stage_reuses_only_a_genuine_signed_output(redis_url, tmp_path):
    """The decode stage's check, in-process: replaced bytes under replayed metadata, an
    output without a MAC and one signed with another key are re-processed; only the
    genuine one is reused."""
    out = str(tmp_path / "out")
    rt = Runtime(Settings.from_env(redis_url=redis_url))
    storage = open_storage(out)
    mark = Fingerprint(request="a" * 64, model="b" * 64)
    signers = [TEST_SIGNER, TEST_SIGNER, Signer("another key, not the job's"), TEST_SIGNER]
    records = []
    for i, signer in enumerate(signers):
        uri = f"{out}/{i}.png"
        metadata = fp.to_metadata(mark, "old-job", b"genuine", signer)
        if i == 1:
            metadata.pop(fp.META_MAC)
        storage.put(uri, b"forged" if i == 0 else b"genuine", metadata=metadata)
        records.append(ItemRecord(index=i, input=f"{out}/in{i}.png", output=uri, fingerprint=mark))
    msg = ChunkMessage(
        job_id="new-job", seq=1, chunk=0, output=out, options=JobOptions(), backends=Backends(), records=records
    )
    planned = write_actions(rt, msg, records)
    assert [(record.index, action) for record, action, _ in planned] == [(0, "replace"), (1, "replace"), (2, "replace")]
    assert records[3].status == "done" and records[3].outcome == "reused"
