"""Signed job data (#11, section 1, and the remote-control bullet of section 2), attacked as
someone with write access to Redis (and nothing else) would attack it.

Row 1: a JSON chain pushed to ``pixelrelay.encode`` naming a private input and an output of
the attacker's choosing made the worker read the one and write the other. Now every body
carries an HMAC of a key that is never in Redis; workers check it before parsing and drop
what fails (unsigned, another key, altered). The job hash's ``spec`` and the chunk cursor,
which drive the feed and the sweep, are signed too. Row 5: ``app.control.shutdown()`` from
any Redis client stopped the worker; remote control is now off unless ``--remote-control``.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
from celery import Celery, chain

from pixelrelay.exitcodes import ExitCode
from pixelrelay.jobs import keys
from pixelrelay.jobs.chunks import ChunksInFlight, Slot
from pixelrelay.jobs.feed import feed
from pixelrelay.jobs.files import write_listing
from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline.messages import ChunkMessage, Item, JobSpec
from pixelrelay.pipeline.settings import ConfigError, Settings
from pixelrelay.pipeline.signing import SignatureError, Signer
from pixelrelay.pipeline.storage import open_storage
from pixelrelay.producer.run import run_key_file
from pixelrelay.producer.runstate import state_dir
from pixelrelay.workers.policy import Limits, finish_chunk
from pixelrelay.workers.sweep import sweep_once
from tests.conftest import REPO, TEST_SIGNER, TEST_SIGNING_KEY, wait_until, worker_env
from tests.images import photo_like
from tests.workers.policy_jobs import Job

DB = 11  # the in-process attacks' own database: no worker's sweeper sees their jobs


# --- the signer --------------------------------------------------------------------------


def test_a_signature_binds_the_key_the_kind_and_every_field():
    body = {"job_id": "j", "records": [{"input": "/in/a.png", "output": "/out/a.png"}], "timings": {"x": 0.1}}
    signed = TEST_SIGNER.sign("chunk:encode", body)
    assert TEST_SIGNER.verify("chunk:encode", json.loads(json.dumps(signed))) == body  # survives a JSON round trip
    altered = json.loads(json.dumps(signed))
    altered["records"][0]["output"] = "/home/victim/.ssh/authorized_keys"
    forged = [
        ("chunk:encode", body),  # unsigned
        ("chunk:encode", Signer("another-key-of-16-chars").sign("chunk:encode", body)),
        ("chunk:encode", altered),
        ("chunk:decode", signed),  # a body signed for encode, replayed to decode
        ("spec", signed),
    ]
    for kind, candidate in forged:
        with pytest.raises(SignatureError):
            TEST_SIGNER.verify(kind, candidate)
    assert Signer.insecure().verify("chunk:encode", signed) == body  # no key: accepted, sig stripped
    assert TEST_SIGNING_KEY not in repr(TEST_SIGNER)
    with pytest.raises(ConfigError, match="PIXELRELAY_SIGNING_KEY"):
        Signer("too-short")


def test_the_key_comes_from_the_environment_or_a_file_and_never_shows(tmp_path, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_text("k" * 20 + "\n")
    monkeypatch.delenv("PIXELRELAY_SIGNING_KEY")
    monkeypatch.setenv("PIXELRELAY_SIGNING_KEY_FILE", str(key_file))
    settings = Settings.from_env()
    assert settings.signer().mac("x", 1) == Signer("k" * 20).mac("x", 1)
    assert "k" * 20 not in repr(settings) + settings.model_dump_json() + str(settings.model_dump())
    monkeypatch.setenv("PIXELRELAY_SIGNING_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="PIXELRELAY_SIGNING_KEY_FILE: cannot read"):
        Settings.from_env()
    monkeypatch.setenv("PIXELRELAY_SIGNING_KEY_FILE", str(key_file))
    monkeypatch.setenv("PIXELRELAY_SIGNING_KEY", "k" * 20)
    with pytest.raises(ConfigError, match="not both"):
        Settings.from_env()
    monkeypatch.delenv("PIXELRELAY_SIGNING_KEY_FILE")
    monkeypatch.delenv("PIXELRELAY_SIGNING_KEY")
    with pytest.raises(ConfigError, match="--insecure-no-signing"):
        Settings.from_env().signer()
    assert not Settings.from_env(insecure_no_signing=True).signer().secure


def test_run_keeps_its_key_in_the_users_state_folder_mode_0600_and_reuses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    out = tmp_path / "out"
    folder = Path(state_dir(str(out)))
    assert folder.parent == tmp_path / "state" / "pixelrelay" and state_dir(str(out) + "/.") == str(folder)
    path = run_key_file(str(folder))
    assert Path(path).parent == folder and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700 and not out.exists()  # nothing in the output tree
    key = Path(path).read_text()
    assert len(key) >= 32 and run_key_file(str(folder)) == path and Path(path).read_text() == key
    os.chmod(path, 0o644)  # widened: whoever could read it may have it
    with pytest.raises(ConfigError, match="must be a file of yours with mode 0600"):
        run_key_file(str(folder))


def test_a_planted_or_symlinked_run_key_is_refused(tmp_path):
    """Someone who can write where the run state lives plants a key (theirs, or a symlink to
    a file whose content they know): the run refuses it rather than sign with it."""
    folder = tmp_path / "st"
    folder.mkdir(mode=0o700)
    known = tmp_path / "known.txt"
    known.write_text("a key the attacker knows well")
    os.chmod(known, 0o644)
    (folder / "signing.key").symlink_to(known)
    with pytest.raises(ConfigError, match="a symlink"):
        run_key_file(str(folder))
    assert stat.S_IMODE(os.stat(known).st_mode) == 0o644  # the target was not chmod'ed
    (folder / "signing.key").unlink()
    (folder / "signing.key").write_text("the attacker's own key, 0600")
    os.chmod(folder / "signing.key", 0o600)
    if os.geteuid() != 0:
        pytest.skip("planting a file owned by another user needs root")
    os.chown(folder / "signing.key", 65534, 65534)
    with pytest.raises(ConfigError, match="owner uid 65534"):
        run_key_file(str(folder))
    os.chown(folder, 65534, 65534)  # the folder itself is someone else's
    with pytest.raises(ConfigError, match="not by you"):
        run_key_file(str(folder))
    link = tmp_path / "link"
    link.symlink_to(folder)
    with pytest.raises(ConfigError, match="symlink"):
        run_key_file(str(link))


# --- row 1 over the wire: real workers ----------------------------------------------------


def _attack_body(job_id: str, private: Path, loot: Path) -> dict:
    """A chunk message as the attacker writes it: a private input, an output of theirs."""
    return {
        "job_id": job_id,
        "seq": 1,
        "chunk": 0,
        "output": str(loot.parent),
        "options": {"task": "restore", "scale": None, "instruction": "", "format": None},
        "backends": {"encoder": None, "planner": None, "decoder": None},
        "records": [{"index": 0, "input": str(private), "output": str(loot)}],
        "feeds": False,
        "part": "",
    }


def test_forged_chains_pushed_to_the_broker_are_dropped_and_logged(stage_workers, redis_url, tmp_path):
    private = tmp_path / "private" / "secret.png"
    private.parent.mkdir()
    photo_like(24, 16).save(private)
    attacker = Celery("attacker", broker=redis_url)  # only Redis access: no key, none of our code
    attacker.conf.update(task_serializer="json", accept_content=["json"])
    bodies = {}
    for how in ("unsigned", "wrong-key", "altered"):
        job_id = f"atk-{how}-" + uuid.uuid4().hex[:6]
        body = _attack_body(job_id, private, tmp_path / "loot" / how / "stolen.png")
        if how == "wrong-key":
            body = Signer("the-attackers-own-key").sign("chunk:encode", body)
        elif how == "altered":  # a body signed by the producer, its output then rewritten
            body = TEST_SIGNER.sign("chunk:encode", {**body, "records": [{**body["records"][0], "output": "/x.png"}]})
            body["records"][0]["output"] = str(tmp_path / "loot" / how / "stolen.png")
        bodies[how] = body
        task_id = f"{job_id}-encode"
        chain(
            attacker.signature(
                "pixelrelay.encode", args=(body,), immutable=True, task_id=task_id, queue="pixelrelay.encode"
            ),
            attacker.signature("pixelrelay.plan", queue="pixelrelay.plan"),
            attacker.signature("pixelrelay.decode", queue="pixelrelay.decode"),
        ).apply_async()
    attacker.close()
    log = stage_workers.logdir / "encode.log"
    client = redis.Redis.from_url(redis_url)
    job_ids = [b["job_id"].encode() for b in bodies.values()]

    def settled() -> bool:  # each body dropped, off the encode queue and acked: any chain step sent is queued
        text = log.read_text(errors="replace").encode()
        held = b"".join(client.hvals(keys.KOMBU_UNACKED)) + b"".join(client.lrange("pixelrelay.encode", 0, -1))
        return all(j in text and j not in held for j in job_ids)

    wait_until(settled, timeout=60, interval=0.05)
    text = log.read_text(errors="replace")
    for body in bodies.values():
        line = next(line for line in text.splitlines() if body["job_id"] in line)
        assert "WARNING" in line and "dropped" in line and f"{body['job_id']}-encode" in line, line
    assert not (tmp_path / "loot").exists()  # nothing written, not even a folder
    assert not any((tmp_path / "private").glob("_jobs*"))
    assert not any(client.exists(keys.job(b["job_id"]), keys.chunks(b["job_id"])) for b in bodies.values())
    assert client.llen("pixelrelay.plan") == 0 and client.llen("pixelrelay.decode") == 0  # the chains ended
    assert TEST_SIGNING_KEY not in stage_workers.logs()


def test_the_key_is_in_no_worker_argv(stage_workers):
    for proc in stage_workers.procs:
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert "pixelrelay" in cmdline and TEST_SIGNING_KEY not in cmdline


# --- the job hash's spec and the cursor: in-process against real Redis --------------------


@pytest.fixture()
def client(redis_url):
    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + f"/{DB}")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture()
def job(client, tmp_path) -> Job:
    """A job of six items in chunks of two, chunk 0 fed, created as the producer would."""
    (tmp_path / "job").mkdir()
    job = Job(client, tmp_path / "job", [20, 21, 22, 23, 24, 25], 2, Limits())
    job.feed(window=1)
    assert [m.chunk for m in job.sent] == [0]
    return job


def _forged_roots(tmp_path: Path, job_id: str) -> tuple[Path, Path, Path]:
    """What the attacker prepares: a private file, and a listing under a root of theirs
    that names it, with an output of theirs."""
    (tmp_path / "private").mkdir()
    private = tmp_path / "private" / "secret.png"
    photo_like(24, 16).save(private)
    forged, loot = tmp_path / "forged", tmp_path / "loot" / "stolen.png"
    items = [Item(index=i, input=str(private), output=str(loot)) for i in range(6)]
    write_listing(open_storage(str(forged)), str(forged), job_id, items)
    return private, forged, loot


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")} if root.exists() else set()


@pytest.mark.parametrize("forgery", ["unsigned", "another-jobs-signed-spec", "signature-kept"])
def test_a_forged_spec_in_redis_drives_no_read_or_write(job, client, tmp_path, forgery, caplog):
    private, forged, loot = _forged_roots(tmp_path, job.state.job_id)
    spec = JobSpec(job_id=job.state.job_id, input=str(private.parent), output=str(forged), total=6, chunk_size=2)
    if forgery == "unsigned":
        raw = spec.model_dump_json()
    elif forgery == "another-jobs-signed-spec":  # a genuine spec of a job the attacker submitted
        other = JobState(client, "atk-" + uuid.uuid4().hex[:6], TEST_SIGNER)
        other.start_submission(spec.model_copy(update={"job_id": other.job_id}))
        raw = client.hget(other.key, "spec")
    else:  # the genuine spec's signature, over other roots
        genuine = json.loads(client.hget(job.state.key, "spec"))
        raw = json.dumps({**spec.model_dump(mode="json"), "sig": genuine["sig"]})
    client.hset(job.state.key, "spec", raw)
    before = _files(forged)
    job.sent.clear()

    # A decode worker finishing chunk 0 reads the spec to feed chunk 1: refused.
    msg = ChunkMessage(
        job_id=job.state.job_id,
        seq=job.seq,
        chunk=0,
        output=job.output,
        options=job.spec.options,
        backends=job.spec.backends,
        records=[r.model_copy(update={"status": "done"}) for r in job.message([0, 1]).records],
    )
    with pytest.raises(SignatureError):
        finish_chunk(job.state, job.storage, job.sent.append, msg)
    # The sweep finds chunk 1 lost and would rebuild it from the spec's listing: skipped, logged.
    ChunksInFlight(client, job.state.job_id).track(Slot(job.seq, 1), "encode", True, now=time.time() - 60)
    report = sweep_once(client, job.sent.append, open_storage, 1.0, confirm_s=0, signer=TEST_SIGNER)
    assert report.candidates == 1 and report.resent == [] and job.sent == []  # found lost, and not re-sent
    assert any("skipped" in r.getMessage() and job.state.job_id in r.getMessage() for r in caplog.records)
    assert _files(forged) == before and not loot.exists() and not (tmp_path / "loot").exists()


def test_a_forged_cursor_sends_nothing(job, client):
    job.sent.clear()
    n = job.state.cursor()
    for forged in ("0", f"0:{'0' * 64}", f"0:{TEST_SIGNER.mac('cursor', ['another-job', 0])}"):
        client.set(job.state.cursor_key, forged)
        with pytest.raises(SignatureError):
            feed(job.sent.append, job.state, job.storage, job.spec, job.seq, 1)
    assert job.sent == []
    # A genuine older value (a rewind) only sends a chunk again: within the job's listing.
    client.set(job.state.cursor_key, f"{n - 1}:{TEST_SIGNER.mac('cursor', [job.state.job_id, n - 1])}")
    assert feed(job.sent.append, job.state, job.storage, job.spec, job.seq, 1) == 1
    assert [m.chunk for m in job.sent] == [n - 1] and job.state.cursor() == n


# --- starting workers: the key, and remote control ---------------------------------------


@pytest.mark.e2e
def test_a_worker_without_a_key_refuses_to_start(redis_url):
    env = worker_env(redis_url)
    env.pop("PIXELRELAY_SIGNING_KEY")
    result = subprocess.run(
        [sys.executable, "-m", "pixelrelay", "worker", "--stage", "plan"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert "--insecure-no-signing" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_remote_control_is_off_by_default_and_on_with_the_flag(stage_workers, redis_url, tmp_path):
    # Row 5: the session's workers run with the defaults. Any Redis client may broadcast.
    attacker = Celery("attacker", broker=redis_url)
    replies = attacker.control.ping(timeout=1.0)  # every command is refused: remote control is off
    assert all(set(reply) == {"error"} for row in replies for reply in row.values()), replies
    refused = attacker.control.broadcast("shutdown", reply=True, timeout=30, limit=len(stage_workers.procs))
    assert len(refused) == len(stage_workers.procs), refused  # each answered: the command was read, and refused
    assert all(set(reply) == {"error"} for row in refused for reply in row.values()), refused
    assert stage_workers.alive()
    attacker.close()

    # --remote-control (here with --insecure-no-signing, and no key) turns it on.
    url = redis_url.rsplit("/", 1)[0] + "/12"
    env = worker_env(url)
    env.pop("PIXELRELAY_SIGNING_KEY")
    log = open(tmp_path / "worker.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pixelrelay",
            "worker",
            "--stage",
            "plan",
            "--planner",
            "rules",
            "--insecure-no-signing",
            "--remote-control",
            "--loglevel",
            "WARNING",
        ],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    admin = Celery("admin", broker=url)
    try:
        assert wait_until(lambda: proc.poll() is not None or admin.control.ping(timeout=0.5), timeout=60), (
            tmp_path / "worker.log"
        ).read_text()
        assert proc.poll() is None
        admin.control.shutdown()
        assert proc.wait(30) == 0
    finally:
        admin.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert "--insecure-no-signing" in (tmp_path / "worker.log").read_text()
