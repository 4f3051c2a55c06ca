"""``pixelrelay gc``: old jobs lose their parts, listings and reports, keep their manifests
(unless asked), and nothing else is touched: not the outputs, not recent jobs, not a job
that may still run. Job folders are written with ``jobs.files`` as the workers write them;
local folders and S3 (moto) alike."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
import redis

from pixelrelay.exitcodes import ExitCode
from pixelrelay.jobs.files import job_root, merge_manifest, write_listing, write_part, write_spec
from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline.messages import Item, ItemRecord, JobSpec
from pixelrelay.pipeline.settings import ConfigError
from pixelrelay.pipeline.storage import join_uri, open_storage
from pixelrelay.producer.cli import main
from pixelrelay.producer.gc import parse_age
from tests.conftest import TEST_SIGNER

DAY = 86400
KEPT = {"job.json", "manifest.jsonl"}
COLLECTED = {
    "inputs/00000000.jsonl",
    "parts/00000000-000001.jsonl",
    "parts/00000001-000001.jsonl",
    "report.html",
    "contact-sheet.jpg",
}


def _job(output: str, job_id: str, *, finished: bool = True, n: int = 4) -> None:
    """A job's files as submit and the workers write them: spec, listing, parts (2 chains),
    the merged manifest and a report; plus its outputs at the output root."""
    storage = open_storage(output)
    items = [
        Item(index=i, input=f"/in/{job_id}-{i}.png", output=join_uri(output, f"{job_id}-{i}.png")) for i in range(n)
    ]
    write_spec(
        storage,
        JobSpec(job_id=job_id, input="/in", output=output, total=n, chunk_size=2, created_at=time.time()),
        TEST_SIGNER,
    )
    write_listing(storage, output, job_id, items)
    for chunk in range(n // 2):
        records = [
            ItemRecord(index=i.index, input=i.input, output=i.output, status="done")
            for i in items[chunk * 2 : chunk * 2 + 2]
        ]
        write_part(storage, output, job_id, chunk, 1, records)
    for item in items:
        storage.put(item.output, b"restored pixels")
    if finished:
        merge_manifest(storage, output, job_id)
        storage.put(join_uri(job_root(output, job_id), "report.html"), b"<html></html>")
        storage.put(join_uri(job_root(output, job_id), "contact-sheet.jpg"), b"jpeg")


def _age(root: Path, days: float) -> None:
    """Make every file under ``root`` last modified ``days`` ago."""
    when = time.time() - days * DAY
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, (when, when))


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def _outputs(out: Path) -> set[str]:
    return {p.name for p in out.glob("*.png")}


def test_gc_dry_run_then_collect_old_jobs_only(tmp_path, redis_url, capsys):
    out = tmp_path / "out"
    for job_id in ("old", "recent", "unfinished"):
        _job(str(out), job_id, finished=job_id != "unfinished")
        if job_id != "recent":
            _age(out / "_jobs" / job_id, 40)
    running_id = "running-" + uuid.uuid4().hex[:6]
    _job(str(out), running_id, finished=False)
    _age(out / "_jobs" / running_id, 40)
    # Redis knows it and its manifest is not written: it runs (a long, quiet job).
    JobState(redis.Redis.from_url(redis_url), running_id, TEST_SIGNER).start_submission(
        JobSpec(job_id=running_id, input="/in", output=str(out), total=4, chunk_size=2)
    )
    outputs = _outputs(out)
    before = {j: _files(out / "_jobs" / j) for j in ("old", "recent", "unfinished", running_id)}

    assert main(["gc", "--out", str(out), "--older-than", "30d", "--dry-run", "--redis-url", redis_url]) == ExitCode.OK
    dry = capsys.readouterr().out
    assert {j: _files(out / "_jobs" / j) for j in before} == before  # nothing removed
    for rel in COLLECTED:
        assert f"would remove {out / '_jobs' / 'old' / rel} (" in dry
    assert "would remove 5 objects" in dry and "of job old" in dry
    assert f"kept {running_id}: running (Redis)" in dry
    assert "manifest.jsonl" not in dry and "job.json" not in dry and "recent" not in dry

    assert main(["gc", "--out", str(out), "--older-than", "30d", "--redis-url", redis_url]) == ExitCode.OK
    assert _files(out / "_jobs" / "old") == KEPT
    assert not (out / "_jobs" / "old" / "parts").exists() and not (out / "_jobs" / "old" / "inputs").exists()
    assert _files(out / "_jobs" / "recent") == before["recent"]
    assert _files(out / "_jobs" / running_id) == before[running_id]
    # Redis reachable and it does not know the job: it is not running, old, collected.
    assert _files(out / "_jobs" / "unfinished") == {"job.json"}
    assert _outputs(out) == outputs  # the restored images are never touched

    assert (
        main(["gc", "--out", str(out), "--older-than", "30d", "--include-manifests", "--redis-url", redis_url])
        == ExitCode.OK
    )
    assert not (out / "_jobs" / "old").exists() and not (out / "_jobs" / "unfinished").exists()
    assert _files(out / "_jobs" / "recent") == before["recent"] and _outputs(out) == outputs


def test_gc_without_redis_keeps_jobs_that_may_run_unless_forced(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PIXELRELAY_REDIS_URL", raising=False)
    out = tmp_path / "out"
    _job(str(out), "nomanifest", finished=False)
    _job(str(out), "resubmitted")
    stray = out / "_jobs" / "_not-a-job" / "parts" / "00000000-000001.jsonl"  # no job id: never collected
    stray.parent.mkdir(parents=True)
    stray.write_text("{}\n")
    (out / "_jobs" / "resubmitted" / "parts" / "00000000-000002.jsonl").write_text("{}\n")  # a later submission
    _age(out / "_jobs", 10)
    os.utime(out / "_jobs" / "resubmitted" / "parts" / "00000000-000002.jsonl", (time.time() - 9 * DAY,) * 2)

    assert main(["gc", "--out", str(out), "--older-than", "7d"]) == ExitCode.OK
    text = capsys.readouterr().out
    assert (
        "kept nomanifest: no manifest and no Redis" in text
        and "kept resubmitted: parts newer than its manifest" in text
    )
    assert "parts/00000000-000001.jsonl" in _files(out / "_jobs" / "nomanifest")
    assert "parts/00000000-000001.jsonl" in _files(out / "_jobs" / "resubmitted")

    assert main(["gc", "--out", str(out), "--older-than", "7d", "--force"]) == ExitCode.OK
    assert _files(out / "_jobs" / "nomanifest") == {"job.json"}
    assert _files(out / "_jobs" / "resubmitted") == KEPT
    assert stray.exists()


def test_gc_on_s3(s3_bucket, s3_client, redis_url, capsys):
    out = f"s3://{s3_bucket}/out"
    _job(out, "s3old")
    # Beside _jobs/, not in it: a key prefix match alone would take this for job "archive".
    s3_client.put_object(Bucket=s3_bucket, Key="out/_jobsarchive/parts/00000000-000001.jsonl", Body=b"{}")

    def keys() -> set[str]:
        listed = s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="out/").get("Contents", [])
        return {o["Key"][len("out/") :] for o in listed}

    everything = keys()
    # S3 keeps its own LastModified: a job written a moment ago is not 1 hour old...
    assert main(["gc", "--out", out, "--older-than", "60m", "--redis-url", redis_url]) == ExitCode.OK
    assert keys() == everything
    # ...but it is older than 0 minutes.
    assert main(["gc", "--out", out, "--older-than", "0m", "--dry-run", "--redis-url", redis_url]) == ExitCode.OK
    assert "would remove 5 objects" in capsys.readouterr().out and keys() == everything
    assert main(["gc", "--out", out, "--older-than", "0m", "--redis-url", redis_url]) == ExitCode.OK
    assert keys() == everything - {f"_jobs/s3old/{rel}" for rel in COLLECTED}
    assert {"_jobs/s3old/job.json", "_jobs/s3old/manifest.jsonl", "s3old-0.png"} <= keys()


def _victim(root: Path) -> set[str]:
    """A folder laid out as a job state folder, outside the output: what a planted link names."""
    _job(str(root), "victim")
    _age(root, 40)
    return _files(root)


def test_gc_never_follows_a_symlinked_jobs_folder(tmp_path, redis_url, capsys):
    """An attacker who can write the output swaps ``_jobs`` for a link to someone else's folder."""
    victim = tmp_path / "private"
    before = _victim(victim)
    out = tmp_path / "out"
    out.mkdir()
    (out / "_jobs").symlink_to(victim / "_jobs")
    args = ["gc", "--out", str(out), "--older-than", "30d", "--include-manifests", "--redis-url", redis_url]
    assert main(args) == ExitCode.OK
    assert _files(victim) == before
    assert f"skipped {out / '_jobs'}: a symlink, not followed" in capsys.readouterr().out


def test_gc_never_follows_a_symlinked_job_folder(tmp_path, redis_url, capsys):
    victim = tmp_path / "private"
    before = _victim(victim)
    out = tmp_path / "out"
    _job(str(out), "old")
    _age(out, 40)
    (out / "_jobs" / "linked").symlink_to(victim / "_jobs" / "victim")
    (out / "_jobs" / "old" / "groups").symlink_to(victim / "_jobs" / "victim" / "parts")
    assert main(["gc", "--out", str(out), "--older-than", "30d", "--redis-url", redis_url]) == ExitCode.OK
    assert _files(victim) == before
    text = capsys.readouterr().out
    assert f"skipped {out / '_jobs' / 'linked'}: a symlink" in text
    assert f"skipped {out / '_jobs' / 'old' / 'groups'}: a symlink" in text
    assert _files(out / "_jobs" / "old") == KEPT  # the job itself is collected


def test_gc_removes_temp_files_killed_writers_left(tmp_path, redis_url, capsys):
    out = tmp_path / "out"
    _job(str(out), "recent")
    stale = [
        out / ".pixelrelay-0123456789abcdef.part",
        out / "_jobs" / "recent" / "parts" / ".pixelrelay-h.1-7-0123456789abcdef.part",
    ]
    fresh = out / ".pixelrelay-otherhost.1-7-0123456789abcdef.part"
    for path in [*stale, fresh]:
        path.write_bytes(b"partial")
    for path in stale:
        os.utime(path, (time.time() - 2 * 3600,) * 2)
    assert main(["gc", "--out", str(out), "--older-than", "30d", "--redis-url", redis_url]) == ExitCode.OK
    assert not any(p.exists() for p in stale) and fresh.exists()
    assert "removed 2 temp files left by killed writers" in capsys.readouterr().out


@pytest.mark.parametrize("text,seconds", [("30d", 30 * DAY), ("12h", 12 * 3600), ("90m", 90 * 60), ("1.5d", 1.5 * DAY)])
def test_ages(text, seconds):
    assert parse_age(text) == seconds


@pytest.mark.parametrize("text", ["30", "1w", "-1d", "d", "30 days", ""])
def test_bad_ages_are_usage_errors(text, tmp_path, capsys):
    with pytest.raises(ConfigError, match="--older-than"):
        parse_age(text)
    assert main(["gc", "--out", str(tmp_path), f"--older-than={text}"]) == ExitCode.USAGE
