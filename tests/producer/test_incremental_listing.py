"""The versions ``submit --incremental`` compares, as the listing reads them (S3 via moto)."""

from __future__ import annotations

from pixelrelay.pipeline.storage import open_storage
from pixelrelay.producer.listing import list_versioned_items
from tests.images import encode, photo_like


def test_s3_listing_versions_are_the_etags_from_the_listing_pages(s3_server, s3_bucket, s3_client):
    for i in range(3):
        s3_client.put_object(Bucket=s3_bucket, Key=f"in/a{i}.png", Body=encode(photo_like(8, 8, i), "PNG"))
    storage = open_storage(f"s3://{s3_bucket}/in", s3_server)

    def versions() -> dict[str, str]:
        pairs = list_versioned_items(f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out", storage, None)
        return {item.input.rsplit("/", 1)[-1]: version for item, version in pairs}

    before = versions()
    etags = {
        f"a{i}.png": s3_client.head_object(Bucket=s3_bucket, Key=f"in/a{i}.png")["ETag"].strip('"') for i in range(3)
    }
    assert before == etags
    s3_client.put_object(Bucket=s3_bucket, Key="in/a1.png", Body=encode(photo_like(8, 8, 42), "PNG"))
    after = versions()
    assert after["a1.png"] != before["a1.png"]
    assert (after["a0.png"], after["a2.png"]) == (before["a0.png"], before["a2.png"])


def test_local_listing_versions_change_with_size_or_mtime(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(encode(photo_like(8, 8, 0), "PNG"))
    storage = open_storage(str(src))
    [(item, version)] = list(list_versioned_items(str(src), str(tmp_path / "out"), storage, None))
    st = (src / "a.png").stat()
    assert version == f"{st.st_size}:{st.st_mtime_ns}"
