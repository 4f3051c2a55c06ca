"""Job status: counts per state, a progress bar with rate and ETA, and waiting for the end."""

from __future__ import annotations

import json
import sys
import time
from typing import Callable, TextIO

from pixelrelay.jobs.files import manifest_uri
from pixelrelay.pipeline.settings import Settings
from pixelrelay.pipeline.storage import open_storage
from pixelrelay.producer.submit import redis_client
from pixelrelay.jobs.feed import finalize_if_complete
from pixelrelay.jobs.state import Counts, JobState

EXIT_OK, EXIT_FAILED_ITEMS, EXIT_USAGE = 0, 1, 2
STALL_FINALIZE_S = 10.0  # complete but no manifest this long: finish it from here


def progress_line(counts: Counts, rate: float, width: int = 30) -> str:
    finished = counts.done + counts.failed
    fraction = finished / counts.total if counts.total else 1.0
    filled = int(round(fraction * width))
    bar = "#" * filled + "-" * (width - filled)
    eta = counts.pending / rate if rate > 0 else float("inf")
    eta_text = "--:--" if eta == float("inf") else time.strftime("%H:%M:%S", time.gmtime(eta))
    return (
        f"[{bar}] {fraction * 100:5.1f}%  done {counts.done}  failed {counts.failed}  "
        f"pending {counts.pending}  of {counts.total}  {rate:.2f} items/s  ETA {eta_text}"
    )


def _rate(info: dict[str, str], counts: Counts) -> float:
    started = float(info.get("submitted_at", 0) or 0)
    base = int(info.get("done_at_submit", 0) or 0)
    elapsed = max(1e-6, (float(info.get("finished_at", 0) or 0) or time.time()) - started)
    return max(0, counts.done + counts.failed - base) / elapsed


def is_finished(info: dict[str, str]) -> bool:
    """The manifest of the job's current submission is written (``info``: JobState.info())."""
    return bool(info.get("finished_at")) and info.get("finished_seq") == info.get("seq")


def wait_for_job(
    state: JobState,
    settings: Settings,
    stream: TextIO = sys.stderr,
    poll_s: float = 0.5,
    health: Callable[[], str | None] | None = None,
) -> Counts:
    """Block until the job's manifest is written, drawing progress on ``stream``.

    ``health`` may return a reason to give up (e.g. a local worker died)."""
    tty = stream.isatty()
    complete_since: float | None = None
    last_line = ""
    while True:
        counts, info = state.counts(), state.info()  # one read of the job hash per tick
        line = progress_line(counts, _rate(info, counts))
        if tty:
            stream.write("\r" + line)
        elif line != last_line and (counts.complete or int(time.time()) % 5 == 0):
            stream.write(line + "\n")
        stream.flush()
        last_line = line
        if is_finished(info):
            break
        if counts.complete:
            complete_since = complete_since or time.monotonic()
            if time.monotonic() - complete_since > STALL_FINALIZE_S:
                spec = state.spec()
                finalize_if_complete(state, open_storage(spec.output, settings.s3_endpoint_url), spec, state.seq())
        if health is not None:
            problem = health()
            if problem:
                raise RuntimeError(problem)
        time.sleep(poll_s)
    if tty:
        stream.write("\n")
    return state.counts()


def summarize(state: JobState, settings: Settings, stream: TextIO, max_failures: int = 10) -> int:
    """Print the outcome; returns the exit code (0 all done, 1 some failed)."""
    info = state.info()
    spec = state.spec()
    done, failed = int(info.get("manifest_done", 0)), int(info.get("manifest_failed", 0))
    missing = int(info.get("manifest_missing", 0))
    manifest = manifest_uri(spec.output, spec.job_id)
    stream.write(f"job {spec.job_id}: {done} done, {failed} failed; manifest {manifest}\n")
    if missing:
        stream.write(f"  {missing} items have no manifest line (their part could not be written); re-submit to retry\n")
    if failed:
        storage = open_storage(manifest, settings.s3_endpoint_url)
        shown = 0
        for line in storage.get(manifest).splitlines():
            row = json.loads(line)
            if row["status"] == "failed":
                stream.write(f"  failed: {row['input']}: {row['error']}\n")
                shown += 1
                if shown >= max_failures:
                    stream.write(f"  ... and {failed - shown} more (see the manifest)\n")
                    break
    return EXIT_FAILED_ITEMS if failed or missing else EXIT_OK


def show_status(settings: Settings, job_id: str, wait: bool, stream: TextIO = sys.stdout) -> int:
    state = JobState(redis_client(settings), job_id)
    if not state.exists():
        stream.write(f"unknown job {job_id}\n")
        return EXIT_USAGE
    if wait:
        wait_for_job(state, settings, sys.stderr)
    counts, info = state.counts(), state.info()
    stream.write(progress_line(counts, _rate(info, counts)) + "\n")
    if is_finished(info):
        return summarize(state, settings, stream)
    return EXIT_OK
