"""Job status: counts per state, progress with rate and ETA, and waiting for the end.

Invariants: a TTY gets one ``rich`` line redrawn to the console's width, anything else a
``key=value`` line at most every ``PLAIN_EVERY_S``; ``--timeout`` stops the wait, never the
job; waiting survives Redis outages (``pixelrelay.producer.keeper``); a job with no progress
for ``Settings.stall_s`` while no worker holds a lease on one of its chains shows "stalled"
instead of an ETA (``pixelrelay.jobs.activity``); counts include the decode stage's batches of
chains not yet marked; a stage with no worker seen lately is named; ``exit_code_for`` and
``job_info`` are the one exit-code mapping and status record that the CLI and the API share.
``status`` never reads a job's parts.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import IO, TextIO

import redis
from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from pixelrelay.exitcodes import ExitCode
from pixelrelay.jobs.activity import WORKER_GONE_S, Activity, MissingStage, last_seen, missing_stages, read_activity
from pixelrelay.jobs.files import manifest_uri
from pixelrelay.jobs.finish import finalize_if_complete
from pixelrelay.jobs.recover import RebuildError
from pixelrelay.jobs.state import Counts, JobState, JobStatus, is_finished, job_status, stalled_for
from pixelrelay.pipeline import constants as C
from pixelrelay.pipeline.settings import Settings
from pixelrelay.pipeline.storage import open_storage
from pixelrelay.producer.keeper import Keeper
from pixelrelay.producer.submit import redis_client

STALL_FINALIZE_S = 10.0  # complete but no manifest this long: finish it from here
PLAIN_EVERY_S = 10.0  # non-TTY progress: at most one line this often
MIN_BAR_WIDTH = 10  # narrower than this, the bar is left out


class WaitAborted(RuntimeError):
    """The ``health`` check of ``wait_for_job`` reported a problem (e.g. a local worker died)."""


class WaitTimeout(TimeoutError):
    """Waiting for a job gave up after ``--timeout`` seconds; the job itself goes on.
    A ``TimeoutError``, so that ``except TimeoutError`` in an orchestrator catches it."""

    def __init__(self, job_id: str, seconds: float) -> None:
        super().__init__(f"gave up waiting after {seconds:g} s; job {job_id} goes on")
        self.job_id, self.seconds = job_id, seconds


def eta_text(counts: Counts, rate: float, stalled_s: float | None = None) -> str:
    if counts.pending == 0:
        return "0:00:00"
    if stalled_s is not None:
        return f"stalled {int(stalled_s)} s"
    if rate <= 0:
        return "--:--"
    seconds = int(round(counts.pending / rate))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _percent(counts: Counts) -> float:
    return 100.0 * (counts.done + counts.failed) / counts.total if counts.total else 100.0


def plain_line(
    counts: Counts,
    rate: float,
    stalled_s: float | None = None,
    state: str | None = None,
    missing: tuple[MissingStage, ...] = (),
) -> str:
    """One parseable ``key=value`` line (pipes, logs and one-shot ``status``). While stalled,
    ``eta=--:--`` and ``stalled=N`` (seconds); one-shot ``status`` adds ``state=``; a stage
    with no worker seen lately, ``no_worker=decode`` (comma-separated)."""
    stalled = stalled_s is not None and counts.pending > 0
    eta = "--:--" if stalled else eta_text(counts, rate)
    line = (
        f"done={counts.done} failed={counts.failed} pending={counts.pending} total={counts.total} "
        f"percent={_percent(counts):.1f} rate={rate:.2f}/s eta={eta}"
    )
    if stalled and stalled_s is not None:
        line += f" stalled={int(stalled_s)}"
    line += f" state={state}" if state else ""
    return line + (" no_worker=" + ",".join(m.stage for m in missing) if missing else "")


def stats_text(
    counts: Counts, rate: float, stalled_s: float | None = None, missing: tuple[MissingStage, ...] = ()
) -> str:
    eta = eta_text(counts, rate, stalled_s)
    return (
        f"{_percent(counts):5.1f}%  done {counts.done}  failed {counts.failed}  pending {counts.pending}"
        f"  of {counts.total}  {rate:.2f}/s  {eta if eta.startswith('stalled') else 'ETA ' + eta}"
    ) + (f"  {missing_text(missing)}" if missing else "")


def missing_text(missing: tuple[MissingStage, ...]) -> str:
    """The stages with no worker seen lately, in a few words."""
    if len(missing) == 1:
        return missing[0].text()
    return f"no {', '.join(m.stage for m in missing)} worker seen"


@dataclass
class ProgressDisplay:
    """A one-line rich renderable: a bar that takes the room the figures leave."""

    counts: Counts
    rate: float
    stalled_s: float | None = None
    missing: tuple[MissingStage, ...] = ()

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        text = stats_text(self.counts, self.rate, self.stalled_s, self.missing)
        stats = Text(text, no_wrap=True, overflow="ellipsis")
        stats.highlight_regex(r"failed [1-9]\d*", "bold red")
        stats.highlight_regex(r"stalled \d+ s", "bold yellow")
        stats.highlight_regex(r"no [\w, ]+ worker seen( for \d+ s)?", "bold yellow")
        bar_width = width - len(stats) - 1
        grid = Table.grid(padding=(0, 1) if bar_width >= MIN_BAR_WIDTH else 0)
        if bar_width >= MIN_BAR_WIDTH:
            finished = self.counts.done + self.counts.failed
            grid.add_column(width=bar_width, no_wrap=True)
            grid.add_column(no_wrap=True, overflow="ellipsis")
            grid.add_row(ProgressBar(total=max(1, self.counts.total), completed=finished, width=bar_width), stats)
        else:
            stats.truncate(width, overflow="ellipsis")
            grid.add_column(no_wrap=True, overflow="ellipsis", max_width=width)
            grid.add_row(stats)
        yield grid


class _LiveView:
    def __init__(self, console: Console) -> None:
        self.live = Live(console=console, auto_refresh=False, redirect_stdout=False, redirect_stderr=False)
        self.live.start()

    def show(
        self,
        counts: Counts,
        rate: float,
        final: bool = False,
        stalled_s: float | None = None,
        missing: tuple[MissingStage, ...] = (),
    ) -> None:
        self.live.update(ProgressDisplay(counts, rate, stalled_s, missing), refresh=True)

    def note(self, text: str) -> None:
        self.live.update(Text(text, style="yellow", no_wrap=True, overflow="ellipsis"), refresh=True)

    def close(self) -> None:
        self.live.stop()  # leaves the last line in place and moves to the next


class _PlainView:
    def __init__(self, stream: IO[str], every_s: float) -> None:
        self.stream, self.every_s = stream, every_s
        self.last: tuple[Counts, bool, tuple[str, ...]] | None = None
        self.last_at = float("-inf")

    def show(
        self,
        counts: Counts,
        rate: float,
        final: bool = False,
        stalled_s: float | None = None,
        missing: tuple[MissingStage, ...] = (),
    ) -> None:
        """A line when the counts changed, a stall began or ended, or a stage's workers went
        or came back (at most every ``every_s``)."""
        key = (counts, stalled_s is not None, tuple(m.stage for m in missing))
        due = time.monotonic() - self.last_at >= self.every_s
        if key != self.last and (final or due):
            self.stream.write(plain_line(counts, rate, stalled_s, missing=missing) + "\n")
            self.stream.flush()
            self.last, self.last_at = key, time.monotonic()

    def note(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
        self.last = None  # show the counts again once Redis answers

    def close(self) -> None:
        pass


class _QuietView:
    """No progress at all (``status --json``, the Python API unless asked)."""

    def show(
        self,
        counts: Counts,
        rate: float,
        final: bool = False,
        stalled_s: float | None = None,
        missing: tuple[MissingStage, ...] = (),
    ) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def _view(console: Console, plain_every_s: float):
    if console.is_terminal and not console.is_dumb_terminal:
        return _LiveView(console)
    return _PlainView(console.file, plain_every_s)


def _rate(info: dict[str, str], counts: Counts) -> float:
    started = float(info.get("submitted_at", 0) or 0)
    base = int(info.get("done_at_submit", 0) or 0)
    elapsed = max(1e-6, (float(info.get("finished_at", 0) or 0) or time.time()) - started)
    return max(0, counts.done + counts.failed - base) / elapsed


@dataclass(frozen=True)
class Snapshot:
    """One read of a job for display: its hash, its counts, what its chains are doing, and
    the stages with no worker seen lately (none once the job ended or was cancelled)."""

    info: dict[str, str]
    counts: Counts  # the bits: the one account
    activity: Activity
    missing: tuple[MissingStage, ...]
    at: float

    @property
    def shown(self) -> Counts:
        """The counts to show: the bits plus the decode stage's batches not yet marked."""
        c, a = self.counts, self.activity
        done = min(c.done + a.batch_done, max(0, c.total - c.failed))
        return Counts(c.total, done, min(c.failed + a.batch_failed, max(0, c.total - done)))

    def stalled(self, settings: Settings) -> float | None:
        return stalled_for(self.info, self.at, settings.stall_s, self.activity)

    def status(self, settings: Settings) -> JobStatus:
        return job_status(self.info, self.counts, self.at, settings.stall_s, self.activity)


def gone_after_s(settings: Settings) -> float:
    """How long a stage goes unseen before ``status`` names it: past the workers' beat
    (``health_interval_s``) and lease renewals (``lease_s / 3``) with room to spare."""
    return max(WORKER_GONE_S, settings.lease_s, 3 * settings.health_interval_s)


def snapshot(state: JobState, settings: Settings, now: float | None = None) -> Snapshot:
    """Read the job once for display (any Redis error propagates)."""
    now = time.time() if now is None else now
    counts, info = state.counts(), state.info()
    seq = int(info["seq"]) if info.get("seq", "").isdigit() else 0
    activity = read_activity(state.r, state.job_id, seq, now)
    missing: tuple[MissingStage, ...] = ()
    if not is_finished(info) and not info.get("cancelled_at"):
        gone_s = gone_after_s(settings)
        young = now - float(info.get("submitted_at", 0) or 0) < gone_s  # its workers may be starting
        seen = last_seen(state.r, C.STAGES, now)
        missing = tuple(m for m in missing_stages(seen, now, gone_s) if not (young and m.gone_s is None))
    return Snapshot(info, counts, activity, missing, now)


def _finalize_if_stalled(state: JobState, settings: Settings) -> None:
    spec = state.spec()
    finalize_if_complete(state, open_storage(spec.output, settings.s3_endpoint_url), spec, state.seq())


REDIS_RETRY_MIN_S = 0.5  # backoff while Redis is unreachable: doubles up to the max
REDIS_RETRY_MAX_S = 5.0
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)  # BusyLoadingError is a ConnectionError


def wait_for_job(
    state: JobState,
    settings: Settings,
    stream: TextIO | None = sys.stderr,
    poll_s: float = 0.5,
    health: Callable[[], str | None] | None = None,
    timeout_s: float | None = None,
    console: Console | None = None,
    plain_every_s: float = PLAIN_EVERY_S,
    keeper: Keeper | None = None,
) -> Counts:
    """Block until the job's manifest is written, showing progress.

    While Redis is unreachable the loop shows "Redis unreachable, retrying" and retries with a
    backoff (``health`` and ``timeout_s`` still apply).

    Args:
        state: the job.
        settings: stall time and Redis settings.
        stream: progress goes here; None (and no ``console``): no progress at all.
        poll_s: seconds between reads of the counts.
        health: returns a reason to give up (e.g. a local worker died), or None.
        timeout_s: give up waiting after this long; the job goes on.
        console: a rich console for the progress line; None: one for ``stream``.
        plain_every_s: at most one plain progress line this often.
        keeper: rebuilds the job when Redis lost it, and sweeps (``pixelrelay.producer.keeper``).

    Returns:
        The job's final counts.

    Raises:
        WaitAborted: ``health`` gave a reason.
        WaitTimeout: ``timeout_s`` passed.
    """
    view = _QuietView() if console is None and stream is None else _view(console or Console(file=stream), plain_every_s)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    ticker = _Ticker(state, settings, view, keeper)
    backoff = REDIS_RETRY_MIN_S
    try:
        while True:
            try:
                counts = ticker.tick()
                backoff = REDIS_RETRY_MIN_S
            except REDIS_ERRORS as exc:
                view.note(f"Redis unreachable, retrying in {backoff:g} s ({exc})")
                counts, wait_s = None, backoff
                backoff = min(REDIS_RETRY_MAX_S, backoff * 2)
            else:
                wait_s = poll_s
            if counts is not None and ticker.finished:
                if keeper is not None:
                    keeper.finished()
                return counts
            problem = health() if health is not None else None
            if problem:
                raise WaitAborted(problem)
            if timeout_s is not None and deadline is not None and time.monotonic() >= deadline:
                ticker.show_final()
                raise WaitTimeout(state.job_id, timeout_s)
            time.sleep(wait_s if deadline is None else max(0.0, min(wait_s, deadline - time.monotonic())))
    finally:
        view.close()


class _Ticker:
    """One tick of ``wait_for_job`` against Redis (any Redis error propagates)."""

    def __init__(self, state: JobState, settings: Settings, view, keeper: Keeper | None) -> None:
        self.state, self.settings, self.view, self.keeper = state, settings, view, keeper
        self.complete_since: float | None = None
        self.finished = False
        self.last: Snapshot | None = None

    def tick(self) -> Counts:
        if self.keeper is not None:
            self.keeper.tick()
        snap = self.last = snapshot(self.state, self.settings)  # one read of the job hash per tick
        counts, info = snap.counts, snap.info
        self.finished = is_finished(info)
        self._show(snap, final=self.finished)
        if self.finished:
            return self.state.counts()
        if counts.complete and counts.total > 0:
            self.complete_since = self.complete_since or time.monotonic()
            if time.monotonic() - self.complete_since > STALL_FINALIZE_S:
                _finalize_if_stalled(self.state, self.settings)
        return counts

    def _show(self, snap: Snapshot, final: bool) -> None:
        shown = snap.shown
        self.view.show(shown, _rate(snap.info, shown), final, snap.stalled(self.settings), snap.missing)

    def show_final(self) -> None:
        if self.last is not None:
            self._show(self.last, final=True)


# The exit code of ``status`` per state; a state not named here (the job has not ended, or
# every item is done) exits 0.
_EXIT_CODES = {JobStatus.CANCELLED: ExitCode.CANCELLED, JobStatus.FAILED_ITEMS: ExitCode.FAILED_ITEMS}


def exit_code_for(state: JobStatus) -> ExitCode:
    """What ``pixelrelay status JOB`` exits with for a job in ``state``: 4 cancelled, 1 some
    items failed (or have no manifest line), else 0 (every item done, or not ended yet)."""
    return _EXIT_CODES.get(state, ExitCode.OK)


@dataclass(frozen=True)
class JobStatusInfo:
    """A job's status for machines: ``status --json`` prints ``to_json()``, the Python API
    returns it. Counts are live (Redis); ``manifest`` and ``finished_at`` are set once the
    manifest of the current submission is written (``ended``)."""

    job_id: str
    state: JobStatus
    done: int
    failed: int
    cancelled: int  # items the manifest lists as cancelled (0 until a cancelled job ends)
    missing: int  # items the manifest has no line for (their part could not be written)
    pending: int  # items neither done, failed nor cancelled
    total: int
    percent: float
    rate: float  # items per second since the submission
    eta_s: float | None  # None while nothing moves (rate 0, or stalled)
    stalled_s: float | None  # seconds since an item last finished, once stalled
    submitted_at: float
    finished_at: float | None
    manifest: str | None  # the manifest's URI, once written
    workers_missing: tuple[str, ...] = ()  # stages with no worker seen lately (``gone_after_s``)

    @property
    def ended(self) -> bool:
        """The job ended (finished, failed items or cancelled): its manifest is written."""
        return self.finished_at is not None

    @property
    def exit_code(self) -> ExitCode | None:
        """The exit code ``pixelrelay status`` gives this job once it ended (``exit_code_for``);
        None until then."""
        return exit_code_for(self.state) if self.ended else None

    def to_json(self) -> dict:
        return {
            **asdict(self),
            "state": self.state.value,
            "percent": round(self.percent, 1),
            "rate": round(self.rate, 3),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
            "stalled_s": None if self.stalled_s is None else round(self.stalled_s, 1),
            "workers_missing": list(self.workers_missing),
            "ended": self.ended,
            "exit_code": None if self.exit_code is None else int(self.exit_code),
        }


def job_info(
    job_id: str,
    info: dict[str, str],
    counts: Counts,
    settings: Settings,
    now: float | None = None,
    activity: Activity | None = None,
    missing: tuple[MissingStage, ...] = (),
) -> JobStatusInfo:
    """The status of a job, as ``status --json`` and the Python API return it
    (``snapshot_info`` reads all of it).

    Args:
        job_id: the job.
        info: one read of its hash (``JobState.info``).
        counts: its counts.
        settings: the stall time.
        now: the current time (tests).
        activity: its chains (``read_activity``); None: judged from the hash alone.
        missing: the stages with no worker seen lately.
    """
    snap = Snapshot(info, counts, activity or Activity(), missing, time.time() if now is None else now)
    ended = is_finished(info)
    cancelled = int(info.get("manifest_cancelled", 0) or 0) if ended else 0
    counts = snap.shown
    rate, stalled = _rate(info, counts), snap.stalled(settings)
    pending = max(0, counts.pending - cancelled)
    eta: float | None
    if pending == 0:
        eta = 0.0
    else:
        eta = pending / rate if rate > 0 and stalled is None else None
    return JobStatusInfo(
        job_id=job_id,
        state=snap.status(settings),
        done=counts.done,
        failed=counts.failed,
        cancelled=cancelled,
        missing=int(info.get("manifest_missing", 0) or 0) if ended else 0,
        pending=pending,
        total=counts.total,
        percent=_percent(counts),
        rate=rate,
        eta_s=eta,
        stalled_s=stalled,
        submitted_at=float(info.get("submitted_at", 0) or 0),
        finished_at=float(info["finished_at"]) if ended else None,
        manifest=info.get("manifest") if ended else None,
        workers_missing=tuple(m.stage for m in missing),
    )


def snapshot_info(state: JobState, settings: Settings) -> JobStatusInfo:
    """``job_info`` from one read of the job (``snapshot``)."""
    snap = snapshot(state, settings)
    return job_info(state.job_id, snap.info, snap.counts, settings, snap.at, snap.activity, snap.missing)


def status_line(snap: Snapshot, settings: Settings) -> str:
    """One-shot ``status``: the plain line with the job's state (``pixelrelay.jobs.state.JobStatus``),
    then a line per stage with no worker seen lately."""
    shown = snap.shown
    line = plain_line(shown, _rate(snap.info, shown), snap.stalled(settings), snap.status(settings).value, snap.missing)
    return line + "".join(f"\n  {m.text()}: its chains wait in the queue" for m in snap.missing)


def summarize(state: JobState, settings: Settings, stream: TextIO, max_failures: int = 10) -> int:
    """Print the outcome of a job that ended.

    Args:
        state: the job.
        settings: for storage (the failures are read from the manifest).
        stream: where to print.
        max_failures: failures listed at most.

    Returns:
        The exit code (``exit_code_for``: CANCELLED, else OK or FAILED_ITEMS).
    """
    info = state.info()
    spec = state.spec()
    done, failed = int(info.get("manifest_done", 0)), int(info.get("manifest_failed", 0))
    missing, dropped = int(info.get("manifest_missing", 0)), int(info.get("manifest_cancelled", 0) or 0)
    manifest = manifest_uri(spec.output, spec.job_id)
    cancelled = bool(info.get("cancelled_at"))
    outcome = (
        f"cancelled: {done} done, {failed} failed, {dropped} cancelled"
        if cancelled
        else f"{done} done, {failed} failed"
    )
    stream.write(f"job {spec.job_id}: {outcome}; manifest {manifest}\n")
    if missing:
        stream.write(f"  {missing} items have no manifest line (their part could not be written); re-submit to retry\n")
    if failed:
        storage = open_storage(manifest, settings.s3_endpoint_url)
        shown = 0
        for line in storage.iter_lines(manifest):  # streamed: stops after max_failures
            row = json.loads(line) if line.strip() else {}
            if row.get("status") == "failed":
                stream.write(f"  failed: {row['input']}: {row['error']}\n")
                shown += 1
                if shown >= max_failures:
                    stream.write(f"  ... and {failed - shown} more (see the manifest)\n")
                    break
    return exit_code_for(job_status(info, state.counts(), time.time(), settings.stall_s))


def show_status(
    settings: Settings,
    job_id: str,
    wait: bool,
    stream: TextIO = sys.stdout,
    timeout_s: float | None = None,
    output: str | None = None,
    as_json: bool = False,
) -> int:
    """Print the job's progress.

    Args:
        settings: Redis, storage and signing settings.
        job_id: the job.
        wait: follow the job until it ends.
        stream: where the status goes.
        timeout_s: stop waiting after this long.
        output: the job's output root: a job Redis does not know is rebuilt from it first.
        as_json: no progress; ``stream`` gets exactly one JSON object (``JobStatusInfo.to_json``),
            the job's status at the end (on a timeout too); messages go to stderr.

    Returns:
        The exit code (``exit_code_for``).
    """
    client = redis_client(settings)
    state = JobState(client, job_id, settings.signer())
    messages = sys.stderr if as_json else stream
    if output is None and state.exists():
        output = state.spec().output
    keeper = Keeper(client, settings, job_id, output) if output is not None else None
    if not state.exists():
        if keeper is None:
            messages.write(f"unknown job {job_id} (give --out OUTPUT to rebuild it from storage)\n")
            return ExitCode.USAGE
        try:
            keeper.tick()
        except RebuildError as exc:
            messages.write(f"unknown job {job_id}: {exc}\n")
            return ExitCode.USAGE
        sys.stderr.write(f"job {job_id}: rebuilt from {output} (Redis had lost it)\n")
    timed_out = False
    if wait:
        try:
            wait_for_job(state, settings, None if as_json else sys.stderr, timeout_s=timeout_s, keeper=keeper)
        except RebuildError as exc:
            sys.stderr.write(f"pixelrelay: Redis lost job {job_id} and it cannot be rebuilt: {exc}\n")
            return ExitCode.USAGE
        except WaitTimeout as exc:
            sys.stderr.write(f"pixelrelay: {exc}\n  to watch it again: pixelrelay status {job_id} --wait\n")
            if not as_json:
                return ExitCode.TIMEOUT
            timed_out = True
    snap = snapshot(state, settings)
    if as_json:
        status = job_info(job_id, snap.info, snap.counts, settings, snap.at, snap.activity, snap.missing)
        stream.write(json.dumps(status.to_json()) + "\n")
        return ExitCode.TIMEOUT if timed_out else exit_code_for(status.state)
    stream.write(status_line(snap, settings) + "\n")
    if is_finished(snap.info):
        return summarize(state, settings, stream)
    return ExitCode.OK
