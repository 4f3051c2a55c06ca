"""Issue #11, rows 6, 7 and 14, plus the storage layer's containment and full-disk errors,
written as an attacker (or an unlucky operator) would: hostile manifests, colliding names,
symlinks planted in the input and output folders, a huge manifest, a full disk."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest
from PIL import Image

from pixelrelay.jobs.files import manifest_uri
from pixelrelay.pipeline.messages import JobOptions
from pixelrelay.pipeline.settings import Settings
from pixelrelay.pipeline.storage import StorageEscapeError, StorageFullError, open_storage
from pixelrelay.producer.cli import build_parser
from pixelrelay.producer.listing import list_items
from pixelrelay.producer.status import show_status
from pixelrelay.producer.submit import submit
from tests.conftest import REPO
from tests.images import encode, good_images, photo_like


def _files_outside(root, out) -> set[str]:
    """Every file under ``root`` but not under ``out`` (symlinks not followed)."""
    found = {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}
    return {f for f in found if not f.startswith(os.path.relpath(out, root) + os.sep)}


def _run_job(redis_url, input_uri: str, out: str, fmt: str | None = None, **kwargs) -> tuple[int, list[dict]]:
    """Submit through the session's real workers, wait; (exit code, manifest rows)."""
    settings = Settings.from_env(redis_url=redis_url, chunk_size=4, window=4)
    job_id = "sec-" + uuid.uuid4().hex[:8]
    sub = submit(settings, input_uri, out, JobOptions(format=fmt), job_id=job_id, **kwargs)
    code = show_status(settings, job_id, wait=True, stream=io.StringIO(), timeout_s=120, output=sub.output)
    body = open_storage(sub.output).get(manifest_uri(sub.output, job_id))
    return code, [json.loads(line) for line in body.splitlines()]


# --- row 6: a manifest that points outputs outside --out ------------------------------


def test_manifest_escapes_fail_with_reasons_and_nothing_lands_outside_out(stage_workers, redis_url, tmp_path):
    images = list(good_images(4).values())
    (tmp_path / "in").mkdir()
    (tmp_path / "x").mkdir()
    (tmp_path / "abs").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(images[0])
    (tmp_path / "x" / "z.png").write_bytes(images[1])
    (tmp_path / "abs" / "b.png").write_bytes(images[2])
    (tmp_path / "in" / "sub").mkdir()
    (tmp_path / "in" / "sub" / "c.png").write_bytes(images[3])
    out = tmp_path / "out"
    (out / "in").mkdir(parents=True)
    os.symlink(tmp_path / "outside", out / "in" / "sub")  # planted: OUT/in/sub -> a folder outside OUT
    manifest = tmp_path / "in" / "list.txt"
    manifest.write_text("a.png\n../x/z.png\na/../../x/z.png\n" + str(tmp_path / "abs" / "b.png") + "\nsub/c.png\n")
    before = _files_outside(tmp_path, out)

    code, rows = _run_job(redis_url, str(manifest), str(out))

    assert code == 1, rows
    by_input = {r["input"]: r for r in rows}
    for line in ("../x/z.png", "a/../../x/z.png"):
        row = by_input[line]
        assert row["status"] == "failed" and row["output"] is None
        assert row["error"].startswith("listing: '..' in the path")
    # An absolute input is read; its output is named relative to the common root, under OUT.
    assert by_input[str(tmp_path / "abs" / "b.png")]["output"] == str(out / "abs" / "b.png")
    assert by_input[str(tmp_path / "in" / "a.png")]["status"] == "done"
    # OUT/in/sub/c.png would resolve through the planted symlink: refused by the storage root.
    planted = by_input[str(tmp_path / "in" / "sub" / "c.png")]
    assert planted["status"] == "failed" and "StorageEscapeError" in planted["error"], planted
    assert _files_outside(tmp_path, out) == before  # not one new file outside OUT
    assert os.listdir(tmp_path / "outside") == []


# --- row 7: two inputs, one output ----------------------------------------------------


def test_colliding_outputs_never_report_done(stage_workers, redis_url, s3_bucket, s3_client):
    images = list(good_images(5).values())
    keys = ["in/a.jpg", "in/a.png", "in/a.jpg.png", "in/p//x.png", "in/p/x.png"]
    for key, data in zip(keys, images, strict=True):
        s3_client.put_object(Bucket=s3_bucket, Key=key, Body=data)

    code, rows = _run_job(redis_url, f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out", fmt="png")

    assert code == 1
    done = [r for r in rows if r["status"] == "done"]
    assert len({r["output"] for r in done}) == len(done)  # no output is claimed twice
    by_input = {r["input"].split("/in/", 1)[1]: r for r in rows}
    assert by_input["a.jpg"]["output"] == f"s3://{s3_bucket}/out/a.jpg.png"  # both keep their extension
    assert by_input["a.png"]["output"] == f"s3://{s3_bucket}/out/a.png.png"
    loser = by_input["a.jpg.png"]  # its natural name is a.jpg's: the later item fails, naming it
    assert loser["status"] == "failed" and loser["output"] is None
    assert "is also the output of item 0" in loser["error"] and "in/a.jpg)" in loser["error"]
    # p//x.png (index 3) and p/x.png (index 4) both normalise to p/x.png
    assert by_input["p//x.png"]["status"] == "done"
    assert by_input["p/x.png"]["status"] == "failed" and "item 3" in by_input["p/x.png"]["error"]
    for row in done:  # each done output holds its own input's pixels (scale 1: same size)
        bucket, key = row["output"][len("s3://") :].split("/", 1)
        written = Image.open(io.BytesIO(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()))
        assert written.size == Image.open(io.BytesIO(images[keys.index("in/" + row["input"].split("/in/", 1)[1])])).size


# --- row 14: a huge manifest -----------------------------------------------------------

_RSS_CHILD = textwrap.dedent(
    """
    import resource, sys
    from pixelrelay.jobs.files import write_listing
    from pixelrelay.pipeline.storage import open_storage
    from pixelrelay.producer.listing import list_items

    def listed(lines, out):
        manifest = out + ".txt"
        with open(manifest, "w") as f:
            for i in range(lines):
                f.write(f"d{i // 64:06d}/img{i:08d}.jpg\\n")
        items = list_items(manifest, out, open_storage(manifest), "png")
        total = write_listing(open_storage(out), out, "j", items).total
        assert total == lines, total
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    small = listed(50_000, sys.argv[1] + "/small")
    large = listed(200_000, sys.argv[1] + "/large")
    print(small, large)
    """
)


@pytest.mark.slow
def test_listing_rss_stays_flat_from_50k_to_200k_lines(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    small, large = (int(v) for v in result.stdout.split())
    # Held in lists, 150,000 more items cost ~100 MB (0.65 kB each); streamed, a few MB.
    assert (large - small) / 1024 < 25, (small, large)


# --- local storage: real paths, symlinks -----------------------------------------------


def test_rooted_local_storage_refuses_writes_through_a_symlinked_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "out" / "link")
    storage = open_storage(str(tmp_path / "out"), root=str(tmp_path / "out"))
    for uri in (
        tmp_path / "out" / "link" / "x.png",
        tmp_path / "out" / "link" / "new" / "y.png",
        tmp_path / "out" / "ok" / ".." / ".." / "elsewhere" / "z.png",
    ):
        with pytest.raises(StorageEscapeError):
            storage.put(str(uri), b"attacker bytes", metadata={"k": "v"})
    with pytest.raises(StorageEscapeError):
        storage.delete(str(tmp_path / "out" / "link" / "victim"))
    assert os.listdir(tmp_path / "elsewhere") == []
    storage.put(str(tmp_path / "out" / "ok" / "fine.png"), b"fine")  # inside: written
    assert (tmp_path / "out" / "ok" / "fine.png").read_bytes() == b"fine"


def test_symlinks_are_followed_only_with_follow_symlinks(tmp_path):
    src, secret = tmp_path / "in", tmp_path / "private"
    (src / "real").mkdir(parents=True)
    secret.mkdir()
    png = encode(photo_like(8, 8), "PNG")
    (src / "real" / "a.png").write_bytes(png)
    (secret / "key.png").write_bytes(png)
    os.symlink(secret / "key.png", src / "stolen.png")
    os.symlink(secret, src / "linked")
    os.symlink(src, src / "real" / "loop")  # a loop, entered at most once

    items = list(list_items(str(src), str(tmp_path / "out"), open_storage(str(src)), None))
    assert [(i.input, i.error is None) for i in items] == [
        (str(src / "real" / "a.png"), True),
        (str(src / "stolen.png"), False),
    ]
    assert "symlink not followed" in items[1].error and items[1].output == ""

    followed = list(list_items(str(src), str(tmp_path / "out"), open_storage(str(src)), None, follow_symlinks=True))
    assert [i.output for i in followed] == [
        str(tmp_path / "out" / "linked" / "key.png"),
        str(tmp_path / "out" / "real" / "a.png"),
        str(tmp_path / "out" / "stolen.png"),
    ]
    assert all(i.error is None for i in followed)
    for command in ("submit", "run"):
        args = build_parser().parse_args([command, str(src), "--out", "o", "--follow-symlinks"])
        assert args.follow_symlinks


# --- full disk ---------------------------------------------------------------------------

_FSIZE_CHILD = textwrap.dedent(
    """
    import resource, signal, sys
    from pixelrelay.pipeline.storage import StorageError, open_storage
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so the kernel says EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    out = sys.argv[1]
    try:
        open_storage(out, root=out).put(out + "/big.png", b"x" * 65536)
    except StorageError as exc:
        print(type(exc).__name__, exc)
    """
)


def test_a_file_size_limit_is_a_storage_full_error_naming_the_path(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", _FSIZE_CHILD, str(tmp_path)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("StorageFullError"), result.stdout + result.stderr[-2000:]
    assert os.strerror(errno.EFBIG) in result.stdout and str(tmp_path / "big.png") in result.stdout
    assert os.listdir(tmp_path) == []  # no temp file left


@pytest.fixture()
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs (root only: skipped elsewhere; the file-size-limit test runs anywhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_fails_items_with_reason_and_the_job_ends(stage_workers, redis_url, tmp_path, tiny_disk):
    src = tmp_path / "in"
    src.mkdir()
    rng = __import__("numpy").random.default_rng(0)
    for i in range(2):  # noise: each PNG output is ~120 KB, more than the whole disk
        Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype="uint8")).save(src / f"n{i}.png")
    with pytest.raises(StorageFullError):  # the storage layer names it, for every writer
        open_storage(str(tiny_disk), root=str(tiny_disk)).put(str(tiny_disk / "probe"), b"x" * 200_000)

    code, rows = _run_job(redis_url, str(src), str(tiny_disk / "out"))

    assert code == 1 and len(rows) == 2
    for row in rows:
        assert row["status"] == "failed" and row["output"] is None
        assert "cannot write output: StorageFullError" in row["error"], row["error"]
        assert os.strerror(errno.ENOSPC) in row["error"] and str(tiny_disk / "out") in row["error"]
