"""Storage backends: local folders and S3 over HTTP (moto server), with error mapping, file
modes under the umask and S3 Content-Types."""

from __future__ import annotations

import io
import os
import stat

import pytest

from pixelrelay.pipeline.storage import StorageNotFoundError, TransientStorageError, open_storage
from pixelrelay.pipeline.storage.s3 import S3Storage


def test_local_round_trip_and_atomic_writes(tmp_path):
    storage = open_storage(str(tmp_path))
    target = str(tmp_path / "a" / "b.bin")
    storage.put(target, b"hello")
    assert storage.get(target) == b"hello" and storage.exists(target)
    storage.put_file(str(tmp_path / "big.bin"), io.BytesIO(b"x" * 100_000))
    assert sorted(os.listdir(tmp_path)) == ["a", "big.bin"]  # no temp files left behind
    assert list(storage.list(str(tmp_path))) == [str(tmp_path / "a" / "b.bin"), str(tmp_path / "big.bin")]
    with pytest.raises(StorageNotFoundError):
        storage.get(str(tmp_path / "missing"))


def test_s3_round_trip_over_http(s3_bucket):
    storage = open_storage(f"s3://{s3_bucket}/x")
    assert isinstance(storage, S3Storage)
    for name in ("p/2.png", "p/1.png", "q/3.png"):
        storage.put(f"s3://{s3_bucket}/{name}", name.encode())
    assert list(storage.list(f"s3://{s3_bucket}/p/")) == [f"s3://{s3_bucket}/p/1.png", f"s3://{s3_bucket}/p/2.png"]
    assert storage.get(f"s3://{s3_bucket}/q/3.png") == b"q/3.png"
    assert storage.exists(f"s3://{s3_bucket}/q/3.png") and not storage.exists(f"s3://{s3_bucket}/q/4.png")
    storage.put_file(f"s3://{s3_bucket}/big", io.BytesIO(b"y" * 300_000))
    assert len(storage.get(f"s3://{s3_bucket}/big")) == 300_000
    with pytest.raises(StorageNotFoundError):
        storage.get(f"s3://{s3_bucket}/nope")


def test_unreachable_endpoint_is_transient(s3_server):
    from pixelrelay.producer.embedded import free_port

    storage = S3Storage(endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TransientStorageError):
        storage.get("s3://bucket/key")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)], ids=["022", "027", "077"])
def test_local_writes_honour_the_umask(tmp_path, umask, mode):
    storage = open_storage(str(tmp_path))
    old = os.umask(umask)
    try:
        storage.put(str(tmp_path / "out" / "a.png"), b"png")
        storage.put_file(str(tmp_path / "out" / "m.jsonl"), io.BytesIO(b"{}\n"))
        storage.put(str(tmp_path / "out" / "a.png"), b"png again")  # replacing keeps the rule
    finally:
        os.umask(old)
    for name in ("a.png", "m.jsonl"):
        assert stat.S_IMODE(os.stat(tmp_path / "out" / name).st_mode) == mode, name
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png", "m.jsonl"]  # temp files renamed away


def test_failed_local_write_leaves_no_temp_file(tmp_path):
    storage = open_storage(str(tmp_path))

    class Broken(io.RawIOBase):
        def readinto(self, buffer):
            raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        storage.put_file(str(tmp_path / "x.png"), Broken())
    assert os.listdir(tmp_path) == []


def test_s3_objects_get_their_content_type(s3_bucket, s3_client):
    storage = open_storage(f"s3://{s3_bucket}/")
    expected = {
        "o/a.png": "image/png",
        "o/b.jpg": "image/jpeg",
        "o/c.JPEG": "image/jpeg",
        "o/d.webp": "image/webp",
        "o/spec.json": "application/json",
        "o/p.jsonl": "application/x-ndjson",
    }
    for key in expected:
        storage.put(f"s3://{s3_bucket}/{key}", b"data")
    storage.put_file(f"s3://{s3_bucket}/o/manifest.jsonl", io.BytesIO(b"{}\n"))
    storage.put(f"s3://{s3_bucket}/o/named.bin", b"data", "image/png")  # a given type wins
    expected.update({"o/manifest.jsonl": "application/x-ndjson", "o/named.bin": "image/png"})
    for key, content_type in expected.items():
        assert s3_client.head_object(Bucket=s3_bucket, Key=key)["ContentType"] == content_type, key
