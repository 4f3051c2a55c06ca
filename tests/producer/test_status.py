"""Progress display and waiting: fits the terminal, redraws in place, plain and quiet off a
TTY, and ``--timeout`` gives up (exit 3) while the job goes on."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
import time
import uuid

import pyte
import pytest
import redis
from rich.cells import cell_len
from rich.console import Console

from pixelrelay.exitcodes import ExitCode
from pixelrelay.jobs.activity import mark_seen
from pixelrelay.jobs.state import Counts, JobState, stalled_for
from pixelrelay.pipeline.messages import JobSpec
from pixelrelay.pipeline.settings import Settings
from pixelrelay.producer.status import ProgressDisplay, WaitTimeout, plain_line, wait_for_job
from tests.conftest import REPO, TEST_SIGNER, worker_env

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _rows(raw: str) -> list[str]:
    """Every run of text the terminal would draw between line breaks and carriage returns."""
    return [row for row in re.split(r"[\r\n]", ANSI.sub("", raw)) if row]


def _idle_redis(redis_url: str) -> str:
    """A database no stage worker listens on: jobs there never progress by themselves."""
    return redis_url.rsplit("/", 1)[0] + "/7"


def _new_job(url: str, total: int) -> JobState:
    """A job in ``url``'s database, whose stages each have a worker seen just now."""
    state = JobState(redis.Redis.from_url(url), "st-" + uuid.uuid4().hex[:8], TEST_SIGNER)
    for stage in ("encode", "plan", "decode"):
        mark_seen(state.r, stage, "host:1")
    state.start_submission(JobSpec(job_id=state.job_id, input="/in", output="/out", total=total, chunk_size=4))
    return state


@pytest.mark.parametrize("width", [80, 60, 40, 24])
def test_progress_fits_the_width_with_huge_counts(width):
    console = Console(file=io.StringIO(), width=width, force_terminal=True, color_system="truecolor")
    counts = Counts(total=123_456_789, done=61_728_394, failed=1_234_567)
    console.print(ProgressDisplay(counts, rate=12345.678))
    rows = _rows(console.file.getvalue())
    assert len(rows) == 1 and cell_len(rows[0]) <= width
    if width == 80:
        assert "failed 1234567" in rows[0] and "pending 60493828" in rows[0]


def test_plain_line_is_key_value_and_exact():
    line = plain_line(Counts(total=200, done=90, failed=10), rate=5.0)
    fields = dict(pair.split("=", 1) for pair in line.split())
    assert fields == {
        "done": "90",
        "failed": "10",
        "pending": "100",
        "total": "200",
        "percent": "50.0",
        "rate": "5.00/s",
        "eta": "0:00:20",
    }
    assert dict(p.split("=", 1) for p in plain_line(Counts(3, 0, 0), 0.0).split())["eta"] == "--:--"


def test_wait_redraws_in_place_within_80_columns_and_times_out(redis_url):
    url = _idle_redis(redis_url)
    state = _new_job(url, total=10)
    console = Console(file=io.StringIO(), width=80, force_terminal=True)
    threading.Timer(0.4, state.mark, args=(state.seq(), [(i, "done") for i in range(9)])).start()
    started = time.monotonic()
    with pytest.raises(WaitTimeout, match="goes on"):
        wait_for_job(state, Settings.from_env(redis_url=url), poll_s=0.1, timeout_s=1.0, console=console)
    assert 0.9 <= time.monotonic() - started < 5
    raw = console.file.getvalue()
    rows = _rows(raw)
    assert len(rows) >= 5 and all(cell_len(row) <= 80 for row in rows), rows
    assert "\x1b[2K" in raw  # each redraw erases the line first
    screen = pyte.Screen(80, 10)
    pyte.Stream(screen).feed(raw.replace("\n", "\r\n"))
    drawn = [line.rstrip() for line in screen.display if line.strip()]
    assert len(drawn) == 1, drawn  # one line, redrawn in place
    assert re.search(r"done 9  failed 0  pending 1  of 10  [\d.]+/s  ETA [\d:]+$", drawn[0]), drawn


def test_plain_output_is_occasional(redis_url):
    url = _idle_redis(redis_url)
    state = _new_job(url, total=4)
    stream = io.StringIO()  # not a TTY
    threading.Timer(0.3, state.mark, args=(state.seq(), [(0, "done"), (1, "failed")])).start()
    with pytest.raises(WaitTimeout):
        wait_for_job(state, Settings.from_env(redis_url=url), stream, poll_s=0.05, timeout_s=1.0)
    lines = stream.getvalue().splitlines()  # ~20 ticks: the first line and the last only
    assert [line.split(" percent=")[0] for line in lines] == [
        "done=0 failed=0 pending=4 total=4",
        "done=1 failed=1 pending=2 total=4",
    ]


def _run_in_pty(args: list[str], env: dict[str, str], columns: int = 80) -> tuple[int, str]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = dict(env, COLUMNS=str(columns), LINES="24", TERM="xterm-256color")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pixelrelay", *args],
        env=env,
        cwd=REPO,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        close_fds=True,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(30), b"".join(chunks).decode(errors="replace")


@pytest.mark.e2e
def test_status_wait_timeout_in_an_80_column_terminal(redis_url):
    url = _idle_redis(redis_url)
    state = _new_job(url, total=7)
    threading.Timer(1.5, state.mark, args=(state.seq(), [(0, "done"), (1, "done")])).start()
    rc, raw = _run_in_pty(["status", state.job_id, "--wait", "--timeout", "3"], worker_env(url))
    assert rc == ExitCode.TIMEOUT, raw
    rows = _rows(raw)
    assert all(cell_len(row) <= 80 for row in rows), [r for r in rows if cell_len(r) > 80]
    assert f"gave up waiting after 3 s; job {state.job_id} goes on" in raw
    assert any("done 2  failed 0  pending 5  of 7" in row for row in rows)
    assert state.counts() == Counts(total=7, done=2, failed=0)  # the job itself is untouched


def test_a_stalled_job_shows_stalled_instead_of_an_eta():
    counts = Counts(total=100, done=99, failed=0)  # "nearly done" by the counts
    fields = dict(pair.split("=", 1) for pair in plain_line(counts, rate=50.0, stalled_s=42.7).split())
    assert fields["eta"] == "--:--" and fields["stalled"] == "42"
    assert "stalled" not in plain_line(counts, rate=50.0)  # moving: an ETA, no stalled key
    console = Console(file=io.StringIO(), width=80, force_terminal=True)
    console.print(ProgressDisplay(counts, rate=50.0, stalled_s=42.7))
    (row,) = _rows(console.file.getvalue())
    assert row.endswith("50.00/s  stalled 42 s") and "ETA" not in row and cell_len(row) <= 80


def test_stall_is_measured_from_the_last_finished_item():
    info = {"submitted_at": "1000", "progress_at": "1100"}
    assert stalled_for(info, now=1129, stall_s=30) is None
    assert stalled_for(info, now=1130.5, stall_s=30) == 30.5
    assert stalled_for({"submitted_at": "1000"}, now=1031, stall_s=30) == 31  # nothing finished yet
    assert stalled_for({**info, "cancelled_at": "1101"}, now=2000, stall_s=30) is None


def test_waiting_on_a_job_that_does_not_move_prints_a_stalled_line(redis_url):
    url = _idle_redis(redis_url)
    state = _new_job(url, total=4)
    state.mark(state.seq(), [(0, "done")])
    stream = io.StringIO()  # not a TTY: plain lines
    settings = Settings.from_env(redis_url=url, stall_s=0.5)
    with pytest.raises(WaitTimeout):
        wait_for_job(
            state, settings, stream, poll_s=0.05, timeout_s=3.0, plain_every_s=0.2
        )  # stalled well before the end
    lines = stream.getvalue().splitlines()
    assert "stalled=" not in lines[0] and "eta=" in lines[0]
    assert lines[-1].startswith("done=1 failed=0 pending=3") and " eta=--:-- stalled=" in lines[-1], lines
