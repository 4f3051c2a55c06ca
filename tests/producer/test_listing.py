"""Input listing: folders, manifests and output naming."""

from __future__ import annotations

import json

from pixelrelay.pipeline.storage import open_storage
from pixelrelay.producer.listing import list_items


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_folder_listing_maps_relative_paths_and_skips_non_images(tmp_path):
    src, out = tmp_path / "in", tmp_path / "in" / "restored"
    for rel in ("b.jpg", "a/c.PNG", "a/d.webp", "notes.txt", ".hidden.png", "restored/old.png"):
        _touch(src / rel)
    items = list(list_items(str(src), str(out), open_storage(str(src)), None))
    assert [i.input for i in items] == [str(src / "a/c.PNG"), str(src / "a/d.webp"), str(src / "b.jpg")]
    assert [i.output for i in items] == [str(out / "a/c.png"), str(out / "a/d.webp"), str(out / "b.jpg")]
    assert [i.index for i in items] == [0, 1, 2]


def test_colliding_outputs_keep_their_old_extension(tmp_path):
    for name in ("a.png", "a.jpg", "b.gif"):
        _touch(tmp_path / "in" / name)
    items = list(list_items(str(tmp_path / "in"), "s3://bkt/out", open_storage(str(tmp_path)), "png"))
    assert [i.output for i in items] == ["s3://bkt/out/a.jpg.png", "s3://bkt/out/a.png.png", "s3://bkt/out/b.png"]


def test_manifest_text_and_jsonl(tmp_path):
    for rel in ("x/1.png", "x/y/2.jpg"):
        _touch(tmp_path / rel)
    (tmp_path / "list.txt").write_text("# images\nx/1.png\n\n" + str(tmp_path / "x/y/2.jpg") + "\nx/1.png\n")
    items = list(list_items(str(tmp_path / "list.txt"), "/out", open_storage(str(tmp_path)), "webp"))
    assert [i.output for i in items] == ["/out/1.webp", "/out/y/2.webp"]
    rows = [json.dumps({"uri": "s3://b/p/q/1.png"}), json.dumps({"uri": "s3://b/p/r/2.png", "extra": 1})]
    (tmp_path / "list.jsonl").write_text("\n".join(rows))
    items = list(list_items(str(tmp_path / "list.jsonl"), "/out", open_storage(str(tmp_path)), None))
    assert [(i.input, i.output) for i in items] == [
        ("s3://b/p/q/1.png", "/out/q/1.png"),
        ("s3://b/p/r/2.png", "/out/r/2.png"),
    ]


def test_avif_is_listed_when_pillow_reads_it(tmp_path):
    import io

    import pytest
    from PIL import Image, features

    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF support")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, "AVIF")
    _touch(tmp_path / "in" / "photo.avif", buf.getvalue())
    items = list(list_items(str(tmp_path / "in"), str(tmp_path / "out"), open_storage(str(tmp_path)), None))
    assert [i.output for i in items] == [str(tmp_path / "out" / "photo.png")]  # AVIF is read, written as PNG
