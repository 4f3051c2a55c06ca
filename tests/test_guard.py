"""Attacks from the security issue (#11), section 2: workers check what they are told.

Rows covered (each failed on the code before the fix):

* #1 a chain pushed to ``pixelrelay.encode`` naming a private file and an output of the
  attacker's choosing, for a job that exists: the worker read and wrote them. Now every
  record must be the job's own listing entry, under the job's roots: the message is dropped
  and logged, nothing is read or written, and the genuine job completes.
* #2 the same with an output named ``.../authorized_keys`` (under the root, or ``../..``
  out of it): the file was created. Now it is not.
* #4 backend specs ``builtin:/any/path``, ``hf-sr:/``, ``hf-llm:/root`` in a message or on
  submit: loaded or tried, every spelling cached. Now submit refuses them (exit 2), a message
  that names them is dropped, a job whose spec names them fails its items with "not allowed
  on this worker", and a worker builds only allowed specs, cached in one spelling.

Messages here are unsigned; ``_send_forged`` is the one place that builds and sends them.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from pixelrelay.exitcodes import ExitCode
from pixelrelay.jobs.files import Listing, read_chunk, write_listing, write_spec
from pixelrelay.jobs.state import JobState, is_finished
from pixelrelay.pipeline.messages import Backends, ChunkMessage, Item, ItemRecord, JobOptions, JobSpec
from pixelrelay.pipeline.settings import ConfigError, Settings
from pixelrelay.pipeline.stages import registry
from pixelrelay.pipeline.stages.registry import BackendNotAllowedError, StageSpec
from pixelrelay.pipeline.storage import open_storage
from pixelrelay.producer.listing import list_items
from pixelrelay.producer.submit import normalize_backends, submit
from pixelrelay.workers.celery_app import create_app
from pixelrelay.workers.flow import chunk_chain
from pixelrelay.workers.guard import ForgedMessage, check_message, location_problem, within
from pixelrelay.workers.runtime import BackendLoadError, Runtime, load_error
from tests.conftest import TEST_SIGNER, run_cli, wait_until, worker_env
from tests.images import encode, photo_like

FORGED_SPECS = {"encoder": "builtin:/any/path", "planner": "hf-llm:/root", "decoder": "hf-sr:/"}


# --- helpers ----------------------------------------------------------------------------------


def _send_forged(settings: Settings, msg: ChunkMessage) -> None:
    """Push a chain as an attacker with broker access would (the only place that sends one)."""
    chunk_chain(create_app(settings), msg, TEST_SIGNER).apply_async()


def _images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"img{i}.png").write_bytes(encode(photo_like(20 + i, 16, i), "PNG"))


def _private_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = photo_like(2, 2).getexif()
    exif[0x010E] = "ssh-ed25519 AAAAattacker attacker@evil"  # ImageDescription
    path.write_bytes(encode(photo_like(24, 24, 9), "PNG", exif=exif))


def _settings(redis_url: str, **extra) -> Settings:
    return Settings.from_env(redis_url=redis_url, chunk_size=4, window=4, **extra)


def _job(client, tmp_path: Path, n: int = 6, backends: Backends | None = None) -> tuple[JobState, JobSpec]:
    """A job as submit records it (listing, spec, job hash), not fed."""
    _images(tmp_path / "in", n)
    storage = open_storage(str(tmp_path / "out"))
    spec = JobSpec(
        job_id="g-" + uuid.uuid4().hex[:8],
        input=str(tmp_path / "in"),
        output=str(tmp_path / "out"),
        backends=backends or Backends(),
        chunk_size=4,
        created_at=time.time(),
    )
    listing = write_listing(storage, spec.output, spec.job_id, list_items(spec.input, spec.output, storage, None))
    spec.total, spec.listing_sha256 = listing.total, list(listing.digests)
    write_spec(storage, spec, TEST_SIGNER)
    state = JobState(client, spec.job_id, TEST_SIGNER)
    state.start_submission(spec)
    return state, spec


def _genuine(spec: JobSpec, chunk: int = 0) -> ChunkMessage:
    items = read_chunk(open_storage(spec.output), spec, chunk)
    return ChunkMessage(
        job_id=spec.job_id,
        seq=1,
        chunk=chunk,
        output=spec.output,
        options=spec.options,
        backends=spec.backends,
        records=[ItemRecord(index=i.index, input=i.input, output=i.output) for i in items],
    )


def _refused(state: JobState, msg: ChunkMessage, why: str) -> None:
    with pytest.raises(ForgedMessage, match=why):
        check_message(state, open_storage, msg, "encode")


def _drops(log: Path, job_id: str) -> int:
    text = log.read_text(errors="replace") if log.exists() else ""
    return sum(1 for line in text.splitlines() if "dropped a message" in line and job_id in line)


def _finished(state: JobState) -> bool:
    return is_finished(state.info())


def _manifest(spec_output: str, job_id: str) -> list[dict]:
    path = Path(spec_output) / "_jobs" / job_id / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- the guard, in process (real Redis, real storage) ------------------------------------------


@pytest.fixture()
def client(redis_url):
    import redis

    return redis.Redis.from_url(redis_url)


def test_a_genuine_message_and_its_split_parts_pass(client, tmp_path):
    state, spec = _job(client, tmp_path)
    for chunk in (0, 1):
        check_message(state, open_storage, _genuine(spec, chunk), "encode")
    part = _genuine(spec, 1)
    part.records, part.part = part.records[1:], str(part.records[1].index)
    check_message(state, open_storage, part, "decode")


def test_messages_that_ask_for_anything_else_are_refused(client, tmp_path):
    state, spec = _job(client, tmp_path)
    private = str(tmp_path / "private" / "id.png")

    def forged(**change):
        msg = _genuine(spec)
        for name, value in change.items():
            setattr(msg, name, value)
        return msg

    _refused(JobState(client, "no-such-job-" + uuid.uuid4().hex[:6], TEST_SIGNER), forged(), "no such job")
    _refused(state, forged(output=str(tmp_path / "elsewhere")), "output root")
    _refused(state, forged(options=JobOptions(task="upscale", scale=4)), "options")
    _refused(state, forged(backends=Backends(decoder="hf-sr:/")), "backends")
    _refused(state, forged(chunk=7), "chunk 7")
    _refused(state, forged(chunk=-1), "chunk -1")
    msg = forged()
    msg.records[0].input = private  # row 1: a private file
    _refused(state, msg, "differs from the job's listing")
    msg = forged()
    msg.records[0].output = str(tmp_path / "out" / "authorized_keys")  # row 2, under the root
    _refused(state, msg, "differs from the job's listing")
    msg = forged()
    msg.records[1].output = str(tmp_path / "out" / ".." / ".ssh" / "authorized_keys")
    _refused(state, msg, "differs from the job's listing")
    msg = forged()
    msg.records.append(msg.records[0].model_copy())
    _refused(state, msg, "twice")
    msg = forged()
    msg.records[0].index = 5  # an item of chunk 1 named in chunk 0
    _refused(state, msg, "not in chunk 0")


def test_a_listing_that_escapes_its_roots_is_refused_too(client, tmp_path):
    """Defence in depth: a listing written by an older release (a manifest naming ``../x``)."""
    state, spec = _job(client, tmp_path, n=2)
    storage = open_storage(spec.output)
    rows = [
        Item(index=0, input=str(tmp_path / "in" / "img0.png"), output=str(tmp_path / "out" / ".." / "x.png")),
        Item(index=1, input="/etc/passwd", output=str(tmp_path / "out" / "p.png")),
    ]
    job_id = spec.job_id + "-old"
    spec = spec.model_copy(update={"job_id": job_id, "listing_sha256": None})  # an older release's spec
    write_listing(storage, spec.output, job_id, rows)
    JobState(client, job_id, TEST_SIGNER).start_submission(spec)
    msg = _genuine(spec)
    msg.records = msg.records[:1]
    _refused(JobState(client, job_id, TEST_SIGNER), msg, "output is not under")
    msg = _genuine(spec)
    msg.records = msg.records[1:]
    _refused(JobState(client, job_id, TEST_SIGNER), msg, "input is not under")


def test_locations_are_normalised_before_they_are_compared():
    assert within("/data/out", "/data/out/a/b.png")
    assert not within("/data/out", "/data/out/../x.png")
    assert not within("/data/out", "/data/out/a/../../x.png")
    assert not within("/data/out", "/data/outside/x.png")
    assert not within("/data/out", "/data/out")
    assert not within("/data/out", "relative/x.png")
    assert not within("/data/out", "s3://b/out/x.png")
    assert within("s3://b/out", "s3://b/out/a/x.png")
    assert within("s3://b", "s3://b/x.png")
    assert not within("s3://b/out", "s3://b/out/../x.png")
    assert not within("s3://b/out", "s3://other/out/x.png")
    assert not within("s3://b/out", "s3://b/outside/x.png")
    spec = JobSpec(job_id="j", input="s3://b/in", output="s3://b/out")
    assert "state folder" in location_problem(
        spec, Item(index=0, input="s3://b/in/a.png", output="s3://b/out/_jobs/j/x")
    )
    assert "input" in location_problem(spec, Item(index=0, input="s3://b/secret/a.png", output="s3://b/out/a.png"))
    manifest = spec.model_copy(update={"input": "s3://b/list.txt"})
    assert location_problem(manifest, Item(index=0, input="s3://b/any/a.png", output="s3://b/out/a.png")) is None


def test_a_listing_entry_with_an_error_is_never_read_or_written(client, tmp_path):
    if "error" not in Item.model_fields:
        pytest.skip("listing entries carry no error in this tree")
    state, spec = _job(client, tmp_path, n=2)
    storage = open_storage(spec.output)
    rows = [
        Item(index=0, input=str(tmp_path / "in" / "img0.png"), output=str(tmp_path / "out" / "img0.png")),
        Item(
            index=1,
            input=str(tmp_path / "in" / "img1.png"),
            output=str(tmp_path / "out" / "img1.png"),
            error="refused listing line",
        ),
    ]
    job_id = spec.job_id + "-err"
    listing = write_listing(storage, spec.output, job_id, rows)
    spec = spec.model_copy(update={"job_id": job_id, "listing_sha256": list(listing.digests)})
    JobState(client, spec.job_id, TEST_SIGNER).start_submission(spec)
    msg = _genuine(spec)
    check_message(JobState(client, spec.job_id, TEST_SIGNER), open_storage, msg, "encode")
    assert msg.records[0].status is None
    assert msg.records[1].status == "failed" and "refused listing line" in msg.records[1].error


# --- the backend allowlist ---------------------------------------------------------------------


def test_the_allowlist_reads_multi_model_specs_and_star(monkeypatch):
    assert registry.parse_allowlist("*") is None
    assert registry.parse_allowlist("") == []
    entries = registry.parse_allowlist("hf-sr:org/a,org/b classic, rules,hf-llm:/m")
    assert [str(e) for e in entries] == ["hf-sr:org/a,org/b", "classic", "rules", "hf-llm:/m"]
    monkeypatch.setenv("PIXELRELAY_ALLOWED_BACKENDS", "classic nosuchkind:/x")
    with pytest.raises(ConfigError, match="PIXELRELAY_ALLOWED_BACKENDS: .*unknown backend kind 'nosuchkind'"):
        Settings.from_env()


def test_a_worker_builds_only_its_own_spec_and_variants():
    rt = Runtime(Settings.defaults().model_copy(update={"decoder": "hf-sr:org/a,org/b", "encoder": "analysis"}))
    assert rt.allowed("decode", None) == "hf-sr:org/a,org/b"
    assert rt.allowed("decode", " hf-sr:org/b ") == "hf-sr:org/b"  # a subset, one spelling
    assert rt.allowed("decode", "classic") == "classic"  # a bare kind that reads no path
    assert rt.allowed("decode", "builtin") == "builtin"  # the shipped weights
    assert rt.allowed("encode", "builtin") == "builtin"
    for stage, spec in [
        ("decode", "hf-sr:/"),
        ("decode", "hf-sr:org/a,org/c"),
        ("decode", "hf-sr"),
        ("decode", "builtin:/any/path"),
        ("encode", "builtin:/any/path"),
        ("plan", "hf-llm:/root"),
        ("plan", "hf-llm"),
        ("encode", "hf-caption:/root"),
    ]:
        with pytest.raises(BackendNotAllowedError, match=r"not allowed on this worker \(PIXELRELAY_ALLOWED_BACKENDS\)"):
            rt.stage(stage, spec)
    assert rt._stages == {}  # nothing was built, nothing cached
    wide = Runtime(
        Settings.defaults().model_copy(update={"allowed_backends": "hf-sr:/models/x builtin:/w/a.safetensors"})
    )
    assert wide.allowed("decode", "hf-sr:/models/x") == "hf-sr:/models/x"
    assert wide.allowed("decode", "builtin:/w/a.safetensors") == "builtin:/w/a.safetensors"
    with pytest.raises(BackendNotAllowedError):
        wide.allowed("decode", "builtin:/w/b.safetensors")
    anything = Runtime(Settings.defaults().model_copy(update={"allowed_backends": "*"}))
    assert anything.allowed("decode", "hf-sr:/") == "hf-sr:/"


def test_spellings_of_one_spec_share_one_backend():
    rt = Runtime(Settings.defaults().model_copy(update={"decoder": "classic"}))
    first = rt.stage("decode", "classic")
    assert rt.stage("decode", "  classic ") is first and rt.stage("decode", None) is first
    assert list(rt._stages) == [("decode", "classic")]


def test_a_load_error_names_the_path_and_reason_only(tmp_path):
    (tmp_path / "model").mkdir()
    for name in ("config.json", "private-notes.txt", "id_rsa"):
        (tmp_path / "model" / name).write_text("{}")
    weights = tmp_path / "model" / "w.safetensors"
    weights.write_bytes(b"junk" * 10)
    rt = Runtime(Settings.defaults().model_copy(update={"allowed_backends": "*"}))
    with pytest.raises(BackendLoadError) as info:
        rt.stage("decode", f"builtin:{weights}")
    assert "private-notes" not in str(info.value) and "id_rsa" not in str(info.value)
    assert rt._stages == {}
    long = load_error(ValueError("first line\n" + "\n".join(f"{tmp_path}/file{i}" for i in range(50))))
    assert str(long) == "ValueError: first line"


@pytest.mark.parametrize(
    "spec",
    [
        "builtin:/any/path",
        "hf-sr:/",
        "hf-llm:/root",
        "hf-sr:org/a,/etc",
        "hf-caption:~/m",
        "hf-sr:../x",
        "hf-sr:./m",
    ],
)
def test_submit_refuses_local_path_specs(spec):
    stage = registry.stage_of(StageSpec.parse(spec).kind) if not spec.startswith("builtin") else "decoder"
    with pytest.raises(ConfigError, match="names a local path"):
        normalize_backends(Backends(**{stage: spec}))
    assert getattr(normalize_backends(Backends(**{stage: spec}), allowed=spec), stage) == spec
    assert getattr(normalize_backends(Backends(**{stage: spec}), allowed="*"), stage) == spec


def test_submit_takes_hub_ids_and_s3_but_not_a_local_folder(tmp_path, monkeypatch):
    backends = normalize_backends(
        Backends(
            decoder="hf-sr:caidas/swin2SR-classical-sr-x2-64", planner="rules", encoder="hf-caption:s3://bucket/blip"
        )
    )
    assert backends.decoder == "hf-sr:caidas/swin2SR-classical-sr-x2-64"
    (tmp_path / "org" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="names a local path"):
        normalize_backends(Backends(decoder="hf-sr:org/model"))


@pytest.mark.e2e
def test_submit_with_a_path_spec_exits_2(redis_url, tmp_path):
    _images(tmp_path / "in", 1)
    result = run_cli(
        ["submit", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--decoder", "hf-sr:/"], worker_env(redis_url)
    )
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert "--decoder: hf-sr:/ names a local path" in result.stderr
    assert not (tmp_path / "out").exists()


def test_run_allows_the_specs_it_starts_its_workers_with():
    from pixelrelay.producer.run import own_allowlist

    settings = Settings.defaults().model_copy(update={"allowed_backends": "hf-llm:/m"})
    allowed = own_allowlist(settings, Backends(encoder="hf-caption:/c"), {"decode": ["--decoder", "hf-sr:/a,/b"]})
    entries = {str(e) for e in registry.parse_allowlist(allowed)}
    assert {"hf-llm:/m", "hf-caption:/c", "hf-sr:/a,/b", "builtin", "rules"} <= entries
    assert normalize_backends(Backends(decoder="hf-sr:/b"), allowed).decoder == "hf-sr:/b"


# --- attacks through real workers -------------------------------------------------------------


def test_forged_chains_for_a_real_job_read_and_write_nothing(stage_workers, client, redis_url, tmp_path):
    """Rows 1 and 2: the messages are dropped and logged; the genuine job completes. The job
    exists (submitted, not yet fed) when the forged chains arrive, so nothing stale stops them."""
    settings = _settings(redis_url)
    home = tmp_path / "home"
    private = home / "private" / "secret.png"
    _private_image(private)
    state, spec = _job(client, home / "work", n=3)
    out = spec.output
    stolen = tmp_path / "attacker" / "stolen.png"
    targets = [stolen, Path(out) / "authorized_keys", home / ".ssh" / "authorized_keys"]
    outputs = [str(stolen), str(Path(out) / "authorized_keys"), f"{out}/../../.ssh/authorized_keys"]
    forged = []
    for seq, output in enumerate(outputs, 11):  # the job's own root, options and backends: the record lies
        record = ItemRecord(index=0, input=str(private), output=output)
        forged.append(
            ChunkMessage(
                job_id=spec.job_id,
                seq=seq,
                chunk=0,
                output=out,
                options=spec.options,
                backends=spec.backends,
                records=[record],
            )
        )
    forged.append(
        ChunkMessage(
            job_id=spec.job_id,
            seq=20,
            chunk=0,
            output=str(tmp_path / "attacker"),
            options=spec.options,
            backends=spec.backends,
            records=[ItemRecord(index=0, input=str(private), output=str(stolen))],
        )
    )
    for msg in forged:
        _send_forged(settings, msg)
    log = stage_workers.logdir / "encode.log"
    wait_until(lambda: _drops(log, spec.job_id) >= len(forged), timeout=60)
    # The genuine job: resumed by its submitter, it completes.
    submit(settings, spec.input, spec.output, spec.options, spec.backends, job_id=spec.job_id)
    wait_until(lambda: _finished(state), timeout=60)
    assert not any(t.exists() for t in targets), stage_workers.logs()
    rows = _manifest(out, spec.job_id)
    assert [r["status"] for r in rows] == ["done"] * 3
    assert all(r["input"].startswith(spec.input + "/") and r["output"].startswith(out + "/") for r in rows)
    assert not (home / ".ssh").exists()


def test_forged_backends_are_refused_in_messages_and_jobs(stage_workers, client, redis_url, tmp_path):
    """Row 4: a job whose spec names ``hf-sr:/`` (its submitter allowed it) fails its items
    with the reason, nothing loaded; a message naming other specs than its job is dropped."""
    permissive = _settings(redis_url, allowed_backends="*")
    _images(tmp_path / "in", 2)
    job_id = "specs-" + uuid.uuid4().hex[:8]
    sub = submit(
        permissive,
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        JobOptions(),
        Backends(decoder=FORGED_SPECS["decoder"]),
        job_id=job_id,
    )
    spec = JobState(client, job_id, TEST_SIGNER).spec()
    msg = _genuine(spec)
    msg.seq, msg.backends = sub.seq, Backends(**FORGED_SPECS)
    _send_forged(permissive, msg)
    state = JobState(client, job_id, TEST_SIGNER)
    wait_until(lambda: _finished(state), timeout=60)
    wait_until(lambda: _drops(stage_workers.logdir / "encode.log", job_id) >= 1, timeout=30)
    rows = _manifest(sub.output, job_id)
    assert [r["status"] for r in rows] == ["failed", "failed"]
    for row in rows:
        assert row["error"] == "decode: backend hf-sr:/ is not allowed on this worker (PIXELRELAY_ALLOWED_BACKENDS)"
    assert stage_workers.alive(), stage_workers.logs()


# --- inputs are read where they were listed ------------------------------------------------------


def _swap_for_link(path: Path, target: Path) -> None:
    """Replace ``path`` (listed already) by a symlink to ``target``, as the input folder's writer can."""
    if path.is_dir():
        for child in path.iterdir():
            child.unlink()
        path.rmdir()
    else:
        path.unlink()
    path.symlink_to(target)


def _private_folder(home: Path) -> Path:
    """A file only its owner may read: ``secret.png`` in a 0700 folder."""
    private = home / "private" / "secret.png"
    _private_image(private)
    private.parent.chmod(0o700)
    return private


def test_inputs_swapped_for_links_after_the_listing_are_not_read(client, tmp_path):
    """In process, as the stages read: a file or a folder swapped for a link fails with its reason;
    a job submitted with follow_symlinks reads through it."""
    from pixelrelay.pipeline.storage import StorageEscapeError
    from pixelrelay.pipeline.storage.local import read_nofollow
    from pixelrelay.workers.guard import input_root

    private = _private_folder(tmp_path)
    state, spec = _job(client, tmp_path / "work", n=2)
    (tmp_path / "work" / "in" / "sub").mkdir()
    (tmp_path / "work" / "in" / "sub" / "img.png").write_bytes(b"listed")
    root = input_root(spec)
    assert root.folder == spec.input and not root.follow
    _swap_for_link(Path(spec.input) / "img1.png", private)
    _swap_for_link(Path(spec.input) / "sub", private.parent)
    for name in ("img1.png", "sub/secret.png"):
        with pytest.raises(StorageEscapeError, match="a symlink, not followed"):
            read_nofollow(f"{spec.input}/{name}", root.folder)
    assert read_nofollow(f"{spec.input}/img0.png", root.folder).startswith(b"\x89PNG")
    assert input_root(spec.model_copy(update={"follow_symlinks": True})).follow
    from pixelrelay.producer.submit import JobRequest

    asked = JobRequest(spec.job_id, spec.input, spec.output, spec.options, spec.backends, follow_symlinks=True)
    settings = Settings(redis_url="redis://127.0.0.1:1/0", chunk_size=4, insecure_no_signing=True)
    assert input_root(asked.spec(Listing(2, ()), settings)).follow  # --follow-symlinks reaches the signed spec
    assert input_root(spec.model_copy(update={"input": str(tmp_path / "list.txt")})).follow  # a manifest: as named


@pytest.mark.e2e
def test_an_input_swapped_for_a_link_after_submit_fails_and_leaks_nothing(stage_workers, client, redis_url, tmp_path):
    """Through real workers: the listing saw a plain file; the attacker, who can write the
    input folder, swaps it for a link to a file in a 0700 folder before the workers read it."""
    settings = _settings(redis_url)
    private = _private_folder(tmp_path / "home")
    state, spec = _job(client, tmp_path / "work", n=3)
    _swap_for_link(Path(spec.input) / "img1.png", private)
    submit(settings, spec.input, spec.output, spec.options, spec.backends, job_id=spec.job_id)  # fed now
    wait_until(lambda: _finished(state), timeout=60)
    rows = {Path(r["input"]).name: r for r in _manifest(spec.output, spec.job_id)}
    assert [rows[f"img{i}.png"]["status"] for i in range(3)] == ["done", "failed", "done"], stage_workers.logs()
    assert "a symlink, not followed" in rows["img1.png"]["error"]
    written = sorted(p.name for p in Path(spec.output).iterdir() if p.is_file() and not p.name.startswith("."))
    assert written == ["img0.png", "img2.png"]  # nothing of the private file reached the output
