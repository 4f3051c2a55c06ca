"""Fingerprints (pure) and the storage they live in: metadata round trips and conditional
writes on local folders and on S3 over HTTP (moto server)."""

from __future__ import annotations

import os

import pytest

from pixelrelay import __version__
from pixelrelay.pipeline import constants
from pixelrelay.pipeline import fingerprint as fp
from pixelrelay.pipeline.messages import Backends, Fingerprint, JobOptions
from pixelrelay.pipeline.signing import Signer
from pixelrelay.pipeline.storage import StorageConflictError, open_storage
from pixelrelay.pipeline.storage.local import sidecar_path
from pixelrelay.producer.listing import list_sources

SPECS = {"encoder": "analysis", "planner": "rules", "decoder": "classic"}
IDS = {"encoder": "analysis", "planner": "rules", "decoder": "classic"}


def _request(**changes) -> str:
    options = JobOptions(**{k: v for k, v in changes.items() if k in JobOptions.model_fields})
    backends = Backends(**{k: v for k, v in changes.items() if k in Backends.model_fields})
    return fp.request_fingerprint(options, backends, changes.get("input", "/in/a.png"), changes.get("fmt", "png"))


def test_request_fingerprint_changes_with_every_request_field():
    base = _request()
    variants = [
        {"task": "upscale"},
        {"scale": 4},
        {"instruction": "keep the grain"},
        {"fmt": "webp"},
        {"quality": 80},
        {"lossless": True},
        {"encoder": "builtin"},
        {"planner": "hf-llm"},
        {"decoder": "builtin"},
        {"input": "/in/b.png"},
    ]
    digests = [_request(**v) for v in variants]
    assert base not in digests and len(set(digests)) == len(digests)
    assert _request(task="restore", scale=1) == base  # the effective scale is what counts
    assert _request(overwrite=True) == base  # overwrite changes what is done, not what is asked
    assert len(base) == 64 and int(base, 16) >= 0


def test_model_fingerprint_is_stable_across_order_and_changes_with_identity(monkeypatch):
    forward = fp.model_fingerprint(SPECS, IDS)
    backward = fp.model_fingerprint(dict(reversed(SPECS.items())), dict(reversed(IDS.items())))
    assert forward == backward
    assert fp.model_fingerprint(SPECS, {**IDS, "decoder": "classic@other-weights"}) != forward
    assert fp.model_fingerprint({**SPECS, "decoder": "classic:x"}, IDS) != forward
    assert fp.model_fingerprint(SPECS, {k: v for k, v in IDS.items() if k != "planner"}) != forward
    # The package version is not part of it; the decode-path version is.
    monkeypatch.setattr("pixelrelay.__version__", __version__ + ".post99")
    assert fp.model_fingerprint(SPECS, IDS) == forward
    monkeypatch.setattr(fp, "DECODE_PATH_VERSION", constants.DECODE_PATH_VERSION + 1)
    assert fp.model_fingerprint(SPECS, IDS) != forward


def test_metadata_round_trip_and_validation():
    mark = Fingerprint(request=_request(), model=fp.model_fingerprint(SPECS, IDS))
    meta = fp.to_metadata(mark, "job-1")
    assert all(v.isascii() for v in meta.values())
    assert fp.from_metadata(meta) == fp.Stored(mark, "job-1")
    for bad in (
        {},
        None,
        {**meta, fp.META_FINGERPRINT: "v1;request=zz;model=zz"},
        {**meta, fp.META_JOB: "../x"},
        {fp.META_FINGERPRINT: meta[fp.META_FINGERPRINT]},
    ):
        assert fp.from_metadata(bad) is None


def test_the_mac_covers_fingerprint_job_and_bytes_and_only_with_a_key():
    mark = Fingerprint(request=_request(), model=fp.model_fingerprint(SPECS, IDS))
    other = Fingerprint(request=_request(scale=4), model=mark.model)
    signer = Signer("the job's signing key")
    meta = fp.to_metadata(mark, "job-1", b"bytes", signer)
    stored = fp.authentic(fp.from_metadata(meta), signer)
    assert stored is not None and fp.bytes_match(stored, b"bytes") and not fp.bytes_match(stored, b"other")
    forged = [
        {**meta, fp.META_FINGERPRINT: fp.to_metadata(other, "job-1")[fp.META_FINGERPRINT]},
        {**meta, fp.META_JOB: "job-2"},
        {**meta, fp.META_MAC: fp.to_metadata(mark, "job-1", b"other", Signer("another key entirely"))[fp.META_MAC]},
        {k: v for k, v in meta.items() if k != fp.META_MAC},
        {**meta, fp.META_MAC: "v1;sha256=" + "0" * 64 + ";mac=" + meta[fp.META_MAC][-64:]},
    ]
    for bad in forged:
        assert fp.authentic(fp.from_metadata(bad), signer) is None
    # Without a key: no MAC written, none asked for, the bytes not checked (as ever).
    plain = fp.to_metadata(mark, "job-1", b"bytes", Signer.insecure())
    assert fp.META_MAC not in plain
    kept = fp.authentic(fp.from_metadata(plain), Signer.insecure())
    assert kept == fp.Stored(mark, "job-1") and fp.bytes_match(kept, b"anything")


def test_decide_applies_the_reuse_rules():
    mark = Fingerprint(request="a" * 64, model="b" * 64)
    other = Fingerprint(request="c" * 64, model="b" * 64)
    mine, theirs = fp.Stored(mark, "job-1"), fp.Stored(mark, "job-0")
    assert fp.decide(False, None, mark, "job-1", overwrite=False) == "create"
    assert fp.decide(True, theirs, mark, "job-1", overwrite=False) == "reuse"
    assert fp.decide(True, theirs, mark, "job-1", overwrite=True) == "replace"
    assert fp.decide(True, mine, mark, "job-1", overwrite=True) == "reuse"  # a duplicate delivery
    assert fp.decide(True, fp.Stored(other, "job-0"), mark, "job-1", overwrite=False) == "replace"
    assert fp.decide(True, None, mark, "job-1", overwrite=False) == "replace"  # no fingerprint: never reused
    assert fp.reuse_outcome(mine, "job-1") == "processed" and fp.reuse_outcome(theirs, "job-1") == "reused"


def test_file_and_folder_identities_follow_the_bytes(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"one")
    first = fp.file_sha256(weights)
    folder_first = fp.folder_identity(tmp_path)
    weights.write_bytes(b"two")
    os.utime(weights, ns=(1, 2))
    assert fp.file_sha256(weights) != first and fp.folder_identity(tmp_path) != folder_first


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/out"


def test_metadata_travels_with_the_object(root):
    storage = open_storage(root)
    uri = f"{root}/a/b.png"
    assert storage.head(uri) is None
    storage.put(uri, b"plain")
    assert storage.head(uri).metadata == {}
    storage.put(uri, b"marked", metadata={"pixelrelay-job": "j1"})
    assert storage.head(uri).metadata == {"pixelrelay-job": "j1"} and storage.get(uri) == b"marked"
    storage.put(uri, b"unmarked again")  # a plain write never keeps old metadata
    assert storage.head(uri).metadata == {}


def test_conditional_write_never_replaces_an_existing_object(root):
    storage = open_storage(root)
    uri = f"{root}/c.png"
    storage.put(uri, b"first", metadata={"pixelrelay-job": "j1"}, if_absent=True)
    with pytest.raises(StorageConflictError):
        storage.put(uri, b"second", metadata={"pixelrelay-job": "j2"}, if_absent=True)
    assert storage.get(uri) == b"first" and storage.head(uri).metadata == {"pixelrelay-job": "j1"}
    seen = storage.head(uri).version
    storage.put(uri, b"replaced", metadata={"pixelrelay-job": "j3"}, if_version=seen)  # still that version
    assert storage.get(uri) == b"replaced" and storage.head(uri).metadata == {"pixelrelay-job": "j3"}
    assert storage.head(uri).version != seen
    with pytest.raises(StorageConflictError):  # replaced since `seen` was read
        storage.put(uri, b"late", metadata={"pixelrelay-job": "j4"}, if_version=seen)
    assert storage.get(uri) == b"replaced"
    storage.put(uri, b"forced")  # unconditional: replaces
    assert storage.get(uri) == b"forced" and storage.head(uri).metadata == {}


def test_local_sidecars_are_hidden_and_skipped_by_listings(tmp_path):
    storage = open_storage(str(tmp_path))
    uri = str(tmp_path / "x.png")
    storage.put(uri, b"png", metadata={"pixelrelay-job": "j"}, if_absent=True)
    assert os.path.basename(sidecar_path(uri)).startswith(".") and os.path.isfile(sidecar_path(uri))
    assert sorted(os.listdir(tmp_path)) == sorted(["x.png", os.path.basename(sidecar_path(uri))])  # no temp files
    assert list_sources(str(tmp_path), storage)[0] == [uri]
    storage.delete(uri)
    assert os.listdir(tmp_path) == []


def test_local_exclusive_link_loses_to_a_file_written_after_the_check(tmp_path, monkeypatch):
    """The race the up-front check can't see: the name appears between check and link."""
    from pixelrelay.pipeline.storage import PutRequest
    from pixelrelay.pipeline.storage.local import LocalStorage

    uri = str(tmp_path / "r.png")
    (tmp_path / "r.png").write_bytes(b"winner")
    monkeypatch.setattr(os.path, "lexists", lambda path: False)  # the check ran before it appeared
    [error] = LocalStorage().put_many([PutRequest(uri, b"loser", if_absent=True)])
    monkeypatch.undo()
    assert isinstance(error, StorageConflictError)
    assert (tmp_path / "r.png").read_bytes() == b"winner" and os.listdir(tmp_path) == ["r.png"]
