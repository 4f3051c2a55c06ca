"""``--notify``: POST a JSON summary of a job to a webhook when waiting for it ends.

Invariants: the URL (``PIXELRELAY_NOTIFY_URL`` or ``_FILE``, never argv) is never printed,
logged or stored (``redact``); delivery is retried ``ATTEMPTS`` times on connection errors,
timeouts, 408, 429 and 5xx; a redirect is never followed (it fails the notification: the
webhook's host must not steer the request to another address, internal ones included); a
failed notification warns and changes nothing else (``post_summary`` never raises).
``after_wait`` runs ``--report``, then ``--notify``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from http.client import HTTPMessage
from typing import IO, TextIO
from urllib.parse import urlsplit

from pixelrelay import __version__
from pixelrelay.pipeline.settings import ConfigError, Settings

URL_ENV = "PIXELRELAY_NOTIFY_URL"
URL_FILE_ENV = "PIXELRELAY_NOTIFY_URL_FILE"
ATTEMPTS = 4
BACKOFF_S = 0.5  # before the 2nd attempt; doubles after each failed one
TIMEOUT_S = 10.0  # per attempt
RETRY_STATUS = {408, 429}  # plus every 5xx


def notify_url(env: Mapping[str, str] | None = None) -> str:
    """The webhook URL from the environment, checked; a ConfigError names the setting (never
    the URL) when it is missing, both are set, the file is unreadable or it is not http(s)."""
    env = os.environ if env is None else env
    direct, path = env.get(URL_ENV, "").strip(), env.get(URL_FILE_ENV, "").strip()
    if direct and path:
        raise ConfigError(f"--notify: set {URL_ENV} or {URL_FILE_ENV}, not both")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                direct = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{URL_FILE_ENV}: cannot read {path}: {type(exc).__name__}") from None
        name = URL_FILE_ENV
    else:
        name = URL_ENV
    if not direct:
        raise ConfigError(f"--notify: set {URL_ENV} (or {URL_FILE_ENV}, a file holding the URL)")
    try:
        parts = urlsplit(direct)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        valid = False
    if not valid:
        raise ConfigError(f"{name}: not an http(s) URL")
    return direct


def redact(url: str) -> str:
    """What messages may say of the URL: its scheme and host (no port, user, path or query)."""
    try:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.hostname}"
    except ValueError:
        return "(the notify URL)"


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Turns every redirect into the ``HTTPError`` of its 3xx answer."""

    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: HTTPMessage, newurl: str
    ) -> urllib.request.Request | None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def _problem(exc: BaseException) -> tuple[str, bool]:
    """(what went wrong, worth retrying), without quoting the URL."""
    if isinstance(exc, urllib.error.HTTPError) and 300 <= exc.code < 400:
        return f"HTTP {exc.code} (redirects are not followed)", False
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}", exc.code in RETRY_STATUS or exc.code >= 500
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        if isinstance(reason, OSError) and reason.strerror:
            return f"{type(reason).__name__}: {reason.strerror}", True
        return type(reason).__name__ if isinstance(reason, BaseException) else "connection failed", True
    if isinstance(exc, (TimeoutError, ConnectionError, OSError)):
        return type(exc).__name__, True
    return type(exc).__name__, False


def post_summary(
    url: str,
    summary: dict,
    stream: TextIO | None = None,
    attempts: int = ATTEMPTS,
    backoff_s: float = BACKOFF_S,
    timeout_s: float = TIMEOUT_S,
) -> bool:
    """POST ``summary`` as JSON to the webhook. Never raises.

    Args:
        url: the webhook (never printed: see ``redact``).
        summary: the JSON body.
        stream: where warnings go; None: stderr.
        attempts: tries in all, on connection errors, timeouts, 408, 429 and 5xx.
        backoff_s: the first wait between tries, doubling.
        timeout_s: per request.

    Returns:
        True once a 2xx came back.
    """
    stream = stream or sys.stderr
    body = json.dumps(summary).encode()
    where = redact(url)
    delay, problem = backoff_s, "not tried"
    for attempt in range(1, max(1, attempts) + 1):
        request = urllib.request.Request(
            url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "User-Agent": f"pixelrelay/{__version__}"},
        )
        try:
            with _OPENER.open(request, timeout=timeout_s) as response:
                response.read(1 << 16)
            stream.write(f"pixelrelay: notified {where} (job {summary.get('job_id')})\n")
            stream.flush()
            return True
        except Exception as exc:  # noqa: BLE001 - any failure: retry or give up, never raise
            problem, retry = _problem(exc)
        if not retry or attempt >= attempts:
            break
        time.sleep(delay)
        delay *= 2
    stream.write(
        f"pixelrelay: warning: could not notify {where} after {attempt} attempt(s): {problem}; "
        "the job is not affected\n"
    )
    stream.flush()
    return False


def job_summary(
    settings: Settings, job_id: str, exit_code: int, report: str | None = None, contact_sheet: str | None = None
) -> dict:
    """The JSON the webhook gets, from the job's Redis state."""
    from pixelrelay.jobs.activity import read_activity
    from pixelrelay.jobs.files import manifest_uri
    from pixelrelay.jobs.state import JobState, is_finished, job_status
    from pixelrelay.producer.submit import redis_client

    state = JobState(redis_client(settings), job_id, settings.signer())
    spec, info, counts = state.spec(), state.info(), state.counts()
    finished = is_finished(info)
    activity = None if finished else read_activity(state.r, job_id, state.seq())
    status = job_status(info, counts, time.time(), settings.stall_s, activity)
    end = float(info.get("finished_at") or 0) if finished else time.time()

    def count(name: str, fallback: int) -> int:
        return int(info.get(f"manifest_{name}", fallback) or 0) if finished else fallback

    return {
        "job_id": job_id,
        "state": status.value,
        "exit_code": int(exit_code),
        "total": spec.total,
        "done": count("done", counts.done),
        "failed": count("failed", counts.failed),
        "cancelled": count("cancelled", 0),
        "missing": count("missing", 0),
        "pending": 0 if finished else counts.pending,
        "input": spec.input,
        "output": spec.output,
        "manifest": manifest_uri(spec.output, job_id) if finished else None,
        "report": report,
        "contact_sheet": contact_sheet,
        "wall_s": round(end - spec.created_at, 3) if spec.created_at else None,
    }


def after_wait(
    settings: Settings,
    job_id: str,
    output: str,
    exit_code: int,
    *,
    report: bool,
    url: str | None,
    stream: TextIO | None = None,
) -> None:
    """Run ``--report`` and ``--notify`` once waiting for a job ended. Never raises and never
    changes the exit code: problems are printed as warnings.

    Args:
        settings: for Redis and storage.
        job_id: the job.
        output: its output root.
        exit_code: how the wait ended.
        report: write the job's report (only if its manifest is written).
        url: the webhook to POST a summary to, or None.
        stream: where messages go; None: stderr.
    """
    stream = stream or sys.stderr
    from pixelrelay.jobs.state import JobState, is_finished
    from pixelrelay.producer.report import write_report
    from pixelrelay.producer.submit import redis_client

    written = None
    if report:
        try:
            state = JobState(redis_client(settings), job_id, settings.signer())
            if not is_finished(state.info()):
                stream.write(f"pixelrelay: job {job_id} has not ended: no report\n")
            else:
                written = write_report(settings, output, job_id, signed_spec=state.spec())
                stream.write(f"report: {written.html}\ncontact sheet: {written.contact_sheet}\n")
        except Exception as exc:  # noqa: BLE001 - a report problem must not change the outcome
            stream.write(f"pixelrelay: warning: could not write the report: {type(exc).__name__}: {exc}\n")
    if url is not None:
        try:
            summary = job_summary(
                settings,
                job_id,
                exit_code,
                written.html if written else None,
                written.contact_sheet if written else None,
            )
        except Exception as exc:  # noqa: BLE001 - e.g. Redis gone: still tell the webhook
            stream.write(f"pixelrelay: warning: job state unavailable for the notification: {type(exc).__name__}\n")
            summary = {"job_id": job_id, "state": "unknown", "exit_code": int(exit_code), "output": output}
        post_summary(url, summary, stream)
    stream.flush()
