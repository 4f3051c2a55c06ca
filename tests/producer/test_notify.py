"""``--notify``: the job's summary POSTed to a webhook (a local HTTP server in a thread), with
retries; the URL, which carries a token, never shows in argv, output, logs or job files; an
undeliverable notification never changes the exit code."""

from __future__ import annotations

import http.server
import io
import json
import logging
import threading
import uuid
from pathlib import Path

import pytest

from pixelrelay.exitcodes import ExitCode
from pixelrelay.producer.cli import main
from pixelrelay.producer.embedded import free_port
from pixelrelay.producer.notify import URL_ENV, URL_FILE_ENV, post_summary
from tests.images import good_images

TOKEN = "T0KEN-" + uuid.uuid4().hex  # what a webhook URL's secret looks like


class Hook:
    """A webhook: records each request; answers with ``codes`` in turn, then 200 (each with a
    ``Location`` of ``redirect_to`` when given)."""

    def __init__(self, codes: list[int] | None = None, redirect_to: str | None = None) -> None:
        self.codes, self.received = list(codes or []), []
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                hook.received.append({"path": self.path, "type": self.headers.get("Content-Type"), "body": body})
                self.send_response(hook.codes.pop(0) if hook.codes else 200)
                if redirect_to:
                    self.send_header("Location", redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_PUT = do_POST

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/{TOKEN}?key={TOKEN}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def hook():
    server = Hook()
    yield server
    server.close()


def _folder(root: Path, n: int, broken: bool = False) -> str:
    folder = root / "in"
    for rel, data in good_images(n).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    if broken:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    return str(folder)


def _no_token(*texts: str) -> None:
    for text in texts:
        assert TOKEN not in text


def test_submit_wait_posts_the_summary_with_the_report(
    stage_workers, redis_url, hook, tmp_path, monkeypatch, capsys, caplog
):
    monkeypatch.setenv(URL_ENV, hook.url)
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "out"
    job_id = "ntf-" + uuid.uuid4().hex[:8]
    code = main(
        [
            "submit",
            _folder(tmp_path, 5),
            "--out",
            str(out),
            "--job-id",
            job_id,
            "--wait",
            "--report",
            "--notify",
            "--redis-url",
            redis_url,
            "--chunk-size",
            "2",
        ]
    )
    captured = capsys.readouterr()
    assert code == ExitCode.OK, captured.err + stage_workers.logs()

    assert len(hook.received) == 1
    sent = hook.received[0]
    assert sent["type"] == "application/json" and sent["path"] == f"/hooks/{TOKEN}?key={TOKEN}"
    summary = json.loads(sent["body"])
    job_dir = out / "_jobs" / job_id
    assert summary["job_id"] == job_id and summary["state"] == "finished" and summary["exit_code"] == 0
    assert (summary["total"], summary["done"], summary["failed"], summary["cancelled"]) == (5, 5, 0, 0)
    assert summary["manifest"] == str(job_dir / "manifest.jsonl")
    assert summary["report"] == str(job_dir / "report.html") and Path(summary["report"]).is_file()
    assert summary["contact_sheet"] == str(job_dir / "contact-sheet.jpg")
    assert summary["wall_s"] > 0
    # Said by scheme and host only; never in output, logs or the job's files.
    assert "notified http://127.0.0.1 " in captured.err
    _no_token(
        captured.out,
        captured.err,
        caplog.text,
        *(p.read_text(errors="replace") for p in job_dir.rglob("*") if p.is_file()),
    )


def test_an_unreachable_webhook_leaves_the_exit_code_alone(stage_workers, redis_url, tmp_path, monkeypatch, capsys):
    url_file = tmp_path / "notify-url"
    url_file.write_text(f"http://127.0.0.1:{free_port()}/hooks/{TOKEN}\n")  # nothing listens there
    monkeypatch.setenv(URL_FILE_ENV, str(url_file))
    code = main(
        [
            "submit",
            _folder(tmp_path, 2, broken=True),
            "--out",
            str(tmp_path / "out"),
            "--wait",
            "--notify",
            "--redis-url",
            redis_url,
        ]
    )
    captured = capsys.readouterr()
    assert code == ExitCode.FAILED_ITEMS, captured.err  # as without --notify: an item failed
    assert "could not notify http://127.0.0.1 after 4 attempt(s)" in captured.err
    assert "the job is not affected" in captured.err
    _no_token(captured.out, captured.err)


def test_a_webhook_that_fails_twice_gets_it_on_the_third_try(capsys):
    hook = Hook(codes=[503, 502])
    try:
        assert post_summary(hook.url, {"job_id": "j1", "state": "finished"}, backoff_s=0.05) is True
    finally:
        hook.close()
    assert len(hook.received) == 3
    assert {json.loads(r["body"])["job_id"] for r in hook.received} == {"j1"}
    _no_token(*capsys.readouterr())


def test_a_client_error_is_not_retried(capsys):
    hook = Hook(codes=[404])
    try:
        assert post_summary(hook.url, {"job_id": "j2"}, backoff_s=0.05) is False
    finally:
        hook.close()
    assert len(hook.received) == 1
    err = capsys.readouterr().err
    assert "HTTP 404" in err and "http://127.0.0.1" in err
    _no_token(err)


@pytest.mark.parametrize(
    "env",
    [
        {},  # --notify without a URL
        {URL_ENV: f"ftp://host/{TOKEN}"},  # not http(s)
        {URL_ENV: f"http://host/{TOKEN}", URL_FILE_ENV: "/x"},  # both
        {URL_FILE_ENV: f"/no/such/file-{TOKEN[:4]}"},  # unreadable
    ],
)
def test_notify_settings_fail_fast_before_anything_is_submitted(env, redis_url, tmp_path, monkeypatch, capsys):
    for name in (URL_ENV, URL_FILE_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    code = main(["submit", _folder(tmp_path, 1), "--out", str(out), "--wait", "--notify", "--redis-url", redis_url])
    err = capsys.readouterr().err
    assert code == ExitCode.USAGE and "PIXELRELAY_NOTIFY_URL" in err
    assert not out.exists()  # nothing was submitted
    _no_token(err)


def test_report_and_notify_need_wait_on_submit(redis_url, tmp_path, capsys):
    for flag in ("--report", "--notify"):
        assert main(["submit", str(tmp_path), "--out", str(tmp_path / "o"), flag, "--redis-url", redis_url]) == 2
        assert "only with --wait" in capsys.readouterr().err


def test_the_webhook_does_not_follow_a_redirect():
    """A webhook that answers with a redirect to an internal address: nothing reaches that
    address, the notification fails without a retry, and the message says why."""
    codes = [301, 302, 303, 307, 308]
    internal = Hook()
    webhook = Hook(codes=list(codes), redirect_to=internal.url.split("/hooks/")[0] + "/internal-admin?x=1")
    try:
        for code in codes:  # one request each: a redirect is not retried
            stream = io.StringIO()
            assert post_summary(webhook.url, {"job_id": "j"}, stream, backoff_s=0) is False
            assert f"HTTP {code} (redirects are not followed)" in stream.getvalue()
            _no_token(stream.getvalue())
    finally:
        webhook.close()
        internal.close()
    assert internal.received == []
    assert len(webhook.received) == len(codes)
