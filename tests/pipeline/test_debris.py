"""Temp files killed writers leave in a local output are removed by the next write into their
folder, at the end of a job and by ``pixelrelay gc``; one a live writer uses never is. The
files are made as a SIGKILLed writer leaves them: a dead pid of this host, or an old mtime."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import redis

from pixelrelay.jobs.files import write_listing, write_part, write_spec
from pixelrelay.jobs.finish import finalize_if_complete
from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline.messages import Item, ItemRecord, JobSpec
from pixelrelay.pipeline.storage import join_uri, open_storage
from pixelrelay.pipeline.storage.local import LocalStorage, _create_temp, remove_stale_parts_under
from tests.conftest import TEST_SIGNER


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _debris(folder: Path) -> dict[str, Path]:
    """Temp files as writers leave them: a killed one of this host, an old one of another host,
    an old one of the earlier naming, and a live writer's (this process, fresh)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, live = _create_temp(str(folder))
    os.close(fd)
    killed = Path(live).name.replace(f"-{os.getpid()}-", f"-{_dead_pid()}-")
    files = {
        "live": Path(live),
        "killed": folder / killed,
        "old-other-host": folder / ".pixelrelay-otherhost.4026531836-12-0123456789abcdef.part",
        "old-legacy": folder / ".pixelrelay-0123456789abcdef.part",
        "fresh-other-host": folder / ".pixelrelay-otherhost.4026531836-13-0123456789abcdef.part",
    }
    for name, path in files.items():
        path.write_bytes(b"partial")
        if name.startswith("old"):
            when = time.time() - 2 * 3600
            os.utime(path, (when, when))
    return files


def _left(files: dict[str, Path]) -> set[str]:
    return {name for name, path in files.items() if path.exists()}


def test_the_next_write_into_a_folder_removes_what_killed_writers_left(tmp_path):
    files = _debris(tmp_path / "out" / "a")
    LocalStorage(str(tmp_path / "out")).put(str(tmp_path / "out" / "a" / "x.png"), b"pixels")
    assert _left(files) == {"live", "fresh-other-host"}
    assert (tmp_path / "out" / "a" / "x.png").read_bytes() == b"pixels"


def test_a_whole_output_is_swept_without_entering_symlinked_folders(tmp_path):
    elsewhere = _debris(tmp_path / "elsewhere")
    files = _debris(tmp_path / "out" / "deep" / "er")
    (tmp_path / "out" / "link").symlink_to(tmp_path / "elsewhere")
    assert LocalStorage().remove_debris(str(tmp_path / "out")) == 3
    assert _left(files) == {"live", "fresh-other-host"}
    assert _left(elsewhere) == set(elsewhere)
    assert remove_stale_parts_under(str(tmp_path / "out")) == 0


def test_the_end_of_a_job_leaves_outputs_and_job_files_only(tmp_path, redis_url):
    out = str(tmp_path / "out")
    storage = open_storage(out)
    items = [Item(index=i, input=f"/in/{i}.png", output=join_uri(out, f"sub/{i}.png")) for i in range(2)]
    spec = JobSpec(job_id="debris-" + os.urandom(4).hex(), input="/in", output=out, total=2, chunk_size=2)
    write_spec(storage, spec, TEST_SIGNER)
    write_listing(storage, out, spec.job_id, items)
    state = JobState(redis.Redis.from_url(redis_url), spec.job_id, TEST_SIGNER)
    seq = state.start_submission(spec)
    for item in items:
        storage.put(item.output, b"pixels")
    files = _debris(tmp_path / "out" / "sub") | {
        f"job-{k}": v for k, v in _debris(tmp_path / "out" / "_jobs" / spec.job_id / "parts").items()
    }
    records = [ItemRecord(index=i.index, input=i.input, output=i.output, status="done") for i in items]
    write_part(storage, out, spec.job_id, 0, seq, records)
    state.mark(seq, [(r.index, r.status) for r in records])
    assert finalize_if_complete(state, storage, spec, seq)
    assert _left(files) == {"live", "fresh-other-host", "job-live", "job-fresh-other-host"}


WRITER = """
import sys
from pixelrelay.pipeline.storage.local import LocalStorage
LocalStorage(sys.argv[1]).put_file(sys.argv[2], sys.stdin.buffer)  # streams until stdin ends
"""


def test_a_writer_sigkilled_mid_write_leaves_nothing_past_the_next_write(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(out / "big.png")], stdin=subprocess.PIPE)
    try:
        assert writer.stdin is not None
        writer.stdin.write(b"x" * (2 << 20))  # more than one copy buffer: the temp file holds some of it
        writer.stdin.flush()
        deadline = time.monotonic() + 30
        while not any(p.name.endswith(".part") for p in out.iterdir()):
            assert time.monotonic() < deadline and writer.poll() is None
            time.sleep(0.02)
    finally:
        writer.kill()
        writer.wait()
    assert [p.name for p in out.iterdir() if p.name.endswith(".part")]  # what the kill left
    LocalStorage(str(out)).put(str(out / "next.png"), b"pixels")
    assert sorted(p.name for p in out.iterdir()) == ["next.png"]
