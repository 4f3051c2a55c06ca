"""``pixelrelay report``: a real job on S3 (moto) through the session's stage workers, its
report written through Storage and rendered in a real headless Chromium; a synthetic
100,000-item manifest for size, speed and memory; untrusted manifest text escaped."""

from __future__ import annotations

import functools
import html
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

from pixelrelay.exitcodes import ExitCode
from pixelrelay.jobs.files import manifest_uri, part_uri, write_listing, write_spec
from pixelrelay.pipeline.messages import Item, JobSpec
from pixelrelay.pipeline.settings import Settings
from pixelrelay.pipeline.storage import open_storage
from pixelrelay.producer.cli import main
from pixelrelay.producer.report import SAMPLE_CAP, ReportError, scan_manifest, write_report
from tests.conftest import REPO, TEST_SIGNER, TEST_SIGNING_KEY
from tests.images import encode, good_images, photo_like

# An S3 key can hold "/" and "<": this input's URI carries a whole script element.
EVIL_NAME = "<script>document.body.dataset.pwned=1</script>.png"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _s3_get(s3_client, uri: str) -> tuple[bytes, str]:
    bucket, key = uri[len("s3://") :].split("/", 1)
    obj = s3_client.get_object(Bucket=bucket, Key=key)
    return obj["Body"].read(), obj["ContentType"]


@pytest.fixture(scope="module")
def s3_job(stage_workers, redis_url, s3_client):
    """A finished job on S3: 8 good images, one broken, one whose key is a script element."""
    bucket = "rep-" + uuid.uuid4().hex[:10]
    s3_client.create_bucket(Bucket=bucket)
    files = good_images(8)
    files["broken.png"] = b"\x89PNG\r\n\x1a\n not really a picture"
    files[EVIL_NAME] = encode(photo_like(48, 40, 9), "PNG")
    for rel, data in files.items():
        s3_client.put_object(Bucket=bucket, Key=f"in/{rel}", Body=data)
    job_id = "rep-" + uuid.uuid4().hex[:8]
    code = main(
        [
            "submit",
            f"s3://{bucket}/in",
            "--out",
            f"s3://{bucket}/out",
            "--job-id",
            job_id,
            "--wait",
            "--redis-url",
            redis_url,
            "--chunk-size",
            "3",
        ]
    )
    assert code == ExitCode.FAILED_ITEMS, stage_workers.logs()
    return {"bucket": bucket, "job_id": job_id, "out": f"s3://{bucket}/out", "done": 9}


def test_report_of_an_s3_job_is_one_escaped_self_contained_page(s3_job, redis_url, s3_client, capsys):
    # No --out: the output comes from the job's Redis state.
    assert main(["report", s3_job["job_id"], "--redis-url", redis_url]) == ExitCode.OK
    html_uri, sheet = capsys.readouterr().out.split()
    assert html_uri == f"{s3_job['out']}/_jobs/{s3_job['job_id']}/report.html"
    body, content_type = _s3_get(s3_client, html_uri)
    assert content_type.startswith("text/html")
    page = body.decode()
    jpeg, sheet_type = _s3_get(s3_client, sheet)
    assert sheet_type == "image/jpeg" and Image.open(io.BytesIO(jpeg)).format == "JPEG"

    # Self-contained: every picture is a data: URI; nothing is fetched; no script at all.
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page)
    assert page.count('src="data:image/jpeg;base64,') == 4 * s3_job["done"]  # before, after, two zooms
    # The untrusted key is shown, escaped.
    assert "&lt;script&gt;document.body.dataset.pwned=1&lt;/script&gt;.png" in page
    # The failure, grouped by its reason, with its input.
    failures = page[page.index('id="failures"') :]
    assert "Failures (1)" in page and "broken.png" in failures
    assert re.search(r'class="reason bad">[^<]*(decode|encode|read)', failures)
    assert "Items (every done item)" in page


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(s3_job, redis_url, s3_client, tmp_path):
    report = write_report(Settings.from_env(redis_url=redis_url), s3_job["out"], s3_job["job_id"])
    page, _ = _s3_get(s3_client, report.html)
    (tmp_path / "report.html").write_bytes(page)
    # A page of the same origin loads the report in a frame and writes what it finds into
    # its own DOM, which --dump-dom prints. The report itself stays as written (no script).
    (tmp_path / "check.html").write_text(CHECK_PAGE)
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        dom = _chromium(
            ["--virtual-time-budget=15000", "--dump-dom", f"http://127.0.0.1:{server.server_port}/check.html"]
        )
        server.shutdown()
    found = json.loads(html.unescape(re.search(r'<pre id="result">(.*?)</pre>', dom.stdout, re.S).group(1)))
    assert found["images"] == 4 * s3_job["done"] and found["loaded"] == found["images"], found
    assert found["widths"] and min(found["widths"]) > 0
    assert "broken.png" in found["failures"] and found["reason"], found
    assert found["reason"] in found["text"]
    assert EVIL_NAME in found["text"]  # shown as text...
    assert found["scripts"] == 0 and found["pwned"] is None  # ...never run
    assert found["svg"] >= 1

    shot = tmp_path / "shot.png"
    _chromium(
        ["--hide-scrollbars", f"--screenshot={shot}", "--window-size=1200,1400", (tmp_path / "report.html").as_uri()]
    )
    img = Image.open(shot).convert("L")
    assert img.size == (1200, 1400)
    lo, hi = img.getextrema()
    assert hi - lo > 100  # not a blank page


CHECK_PAGE = """<!DOCTYPE html><html><body><pre id="result">pending</pre>
<iframe id="r" src="report.html" width="1200" height="800"></iframe>
<script>
document.getElementById('r').addEventListener('load', function () {
  var d = this.contentDocument, imgs = Array.from(d.images), reason = d.querySelector('.reason');
  var failures = d.getElementById('failures');
  document.getElementById('result').textContent = JSON.stringify({
    images: imgs.length,
    loaded: imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
    widths: imgs.map(function (i) { return i.naturalWidth; }),
    scripts: d.querySelectorAll('script').length,
    svg: d.querySelectorAll('svg').length,
    reason: reason ? reason.innerText : '',
    failures: failures && failures.nextElementSibling ? failures.nextElementSibling.innerText : '',
    text: d.body.innerText,
    pwned: d.body.dataset.pwned || null
  });
});
</script></body></html>
"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _chromium(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-dev-shm-usage", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


# --- a 100,000-item job: streamed, sampled, small and fast --------------------------------

N_BIG = 100_000

# Run in a fresh process, so that its peak RSS before the report is just the imports.
MEASURE = """
import json, resource, sys, time
from pixelrelay.pipeline.settings import Settings
from pixelrelay.producer.report import write_report
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.monotonic()
report = write_report(Settings.from_env(), sys.argv[1], sys.argv[2])
print(json.dumps({"seconds": time.monotonic() - started, "items": report.items, "sampled": report.sampled,
                  "grew_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, "html": report.html}))
"""


def _done_row(i: int, src: str, dst: str) -> dict:
    return {
        "index": i,
        "input": src,
        "output": dst,
        "status": "done",
        "outcome": "processed",
        "description": {"text": "<script>alert(1)</script> a test image " + "x" * 200, "metrics": {"noise_sigma": 3.5}},
        "plan": {
            "operations": [{"name": "denoise", "strength": 0.5}],
            "scale": 2,
            "output_format": "png",
            "rationale": "<img src=x onerror=alert(2)>",
        },
        "timings": {"encode_s": 0.01, "plan_s": 0.001, "decode_s": 0.05},
    }


def _failed_row(i: int, src: str) -> dict:
    return {
        "index": i,
        "input": f"{src}?<script>alert({i})</script>",
        "output": None,
        "status": "failed",
        "error": f"decode: <b>bad</b> pixels #{i % 3}",
        "timings": {"encode_s": 0.01},
    }


def _big_job(root: Path) -> tuple[str, str]:
    """job.json, a 100,000-line manifest (every 97th item failed, untrusted text in it) and
    a part every 50 chains; items point at six real images."""
    output = str(root / "out")
    job_id = "big-job"
    storage = open_storage(output)
    pics = []
    for i in range(6):
        src, dst = root / "in" / f"p{i}.png", root / "out" / f"p{i}.png"
        src.parent.mkdir(parents=True, exist_ok=True)
        dst.parent.mkdir(parents=True, exist_ok=True)
        photo_like(64, 48, i).save(src)
        photo_like(128, 96, i).save(dst)
        pics.append((str(src), str(dst)))
    created = time.time() - 3600
    write_spec(
        storage,
        JobSpec(job_id=job_id, input=str(root / "in"), output=output, total=N_BIG, chunk_size=16, created_at=created),
        TEST_SIGNER,
    )
    # Each row is a template with its index and picture filled in (json.dumps per row is slow).
    done = [json.dumps(_done_row(123456789, s, d)) for s, d in pics]
    with open(manifest_uri(output, job_id), "w") as f:
        for i in range(N_BIG):
            line = (
                json.dumps(_failed_row(i, pics[i % 6][0]))
                if i % 97 == 0
                else done[i % 6].replace("123456789", str(i), 1)
            )
            f.write(line + "\n")
    for chunk in range(0, N_BIG // 16, 50):  # spread over the hour
        part = Path(part_uri(output, job_id, chunk, 1))
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_text("{}\n")
        os.utime(part, (created + chunk / (N_BIG // 16) * 3500,) * 2)
    return output, job_id


def test_report_of_100k_items_streams_and_stays_small(tmp_path):
    output, job_id = _big_job(tmp_path)
    manifest_size = os.path.getsize(manifest_uri(output, job_id))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, output, job_id], capture_output=True, text=True, env=env, timeout=240
    )
    assert run.returncode == 0, run.stderr
    measured = json.loads(run.stdout.splitlines()[-1])
    page = Path(measured["html"]).read_text()

    assert measured["items"] == N_BIG and measured["sampled"] == SAMPLE_CAP
    assert measured["grew_kib"] * 1024 < manifest_size / 2, (measured, manifest_size)  # streamed, never held whole
    assert measured["seconds"] < 90
    assert len(page) < 2_000_000
    assert f"{SAMPLE_CAP} of {N_BIG - (N_BIG + 96) // 97} done items" in page
    assert "Failures (1031)" in page  # ceil(100000 / 97)
    assert page.count('class="reason bad"') == 3  # grouped by reason
    assert "and 324 more (see the manifest)" in page  # 344 of one reason, 20 listed
    # Untrusted text is escaped wherever it appears.
    assert "<script" not in page and "<img src=x" not in page and "<b>bad" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;bad&lt;/b&gt;" in page
    assert "<polyline" in page and "No chain times" not in page
    shown = [int(i) for i in re.findall(r"<b>#(\d+)</b>", page)]
    assert len(shown) == SAMPLE_CAP and shown == sorted(shown) and all(i % 97 for i in shown)
    assert shown[-1] > N_BIG // 2  # sampled from the whole job, not its head


def test_the_sample_is_fixed_per_job_and_every_item_up_to_the_cap():
    rows = [json.dumps(_done_row(i, "/in", "/out")).encode() for i in range(5000)]
    first, again = (scan_manifest(iter(rows), 16, 48, seed="job-a") for _ in range(2))
    other = scan_manifest(iter(rows), 16, 48, seed="job-b")
    assert [r["index"] for r in first.sample] == [r["index"] for r in again.sample]
    assert [r["index"] for r in first.sample] != [r["index"] for r in other.sample]
    small = scan_manifest(iter(rows[:30]), 16, 48, seed="job-a")
    assert [r["index"] for r in small.sample] == list(range(30))


def test_report_of_a_job_without_manifest_is_a_usage_error(tmp_path, capsys):
    output = str(tmp_path / "out")
    write_spec(open_storage(output), JobSpec(job_id="unfinished", input="/in", output=output, total=3), TEST_SIGNER)
    assert main(["report", "unfinished", "--out", output]) == ExitCode.USAGE
    assert "no manifest yet" in capsys.readouterr().err
    assert main(["report", "never-was", "--out", output]) == ExitCode.USAGE
    # A job id names a folder: one that climbs out of _jobs/ is refused, nothing is written,
    # even where a job.json and a manifest lie at the place it climbs to.
    spec = Path(output, "_jobs", "unfinished", "job.json").read_text()
    Path(output, "job.json").write_text(spec)
    Path(output, "manifest.jsonl").write_text("")
    assert main(["report", "..", "--out", output]) == ExitCode.USAGE
    assert "job id" in capsys.readouterr().err and not (tmp_path / "out" / "report.html").exists()


def test_an_edit_plans_grading_and_generative_edit_are_on_its_card():
    """Edit and style jobs: the card shows what the plan changes (escaped, as every value
    from the manifest is), and says so when the manifest's edit does not read as one."""
    from pixelrelay.producer.report import Views, _card

    edit = {
        "grading": [{"name": "warmth", "strength": 0.4}, {"name": "vignette", "strength": 0.3}],
        "generative": {
            "prompt": "a <b>watercolour</b> painting",
            "negative_prompt": "blurry",
            "strength": 0.6,
            "guidance": 7.5,
            "steps": 20,
            "seed": 7,
        },
    }
    row = {
        "index": 3,
        "input": "/in/a.png",
        "output": "/out/a.png",
        "status": "done",
        "plan": {"operations": [], "scale": 1, "output_format": "png", "edit": edit},
    }
    card = _card(row, Views())
    assert "<b>edit</b> warmth +0.4, vignette 0.3; generative edit" in card
    assert (
        "a &lt;b&gt;watercolour&lt;/b&gt; painting; not: blurry (strength 0.6, guidance 7.5, 20 steps, seed 7)" in card
    )
    assert "<b>watercolour</b>" not in card

    forged = dict(row, plan=dict(row["plan"], edit={"grading": [{"name": "rm -rf", "strength": 9}]}))
    assert "<b>edit</b> (not a valid edit)" in _card(forged, Views())
    plain = dict(row, plan={k: v for k, v in row["plan"].items() if k != "edit"})
    assert "<b>edit</b>" not in _card(plain, Views())


def _pictures_on(page: str) -> int:
    return page.count("data:image/jpeg;base64,")


def test_report_opens_only_what_the_jobs_listing_and_roots_allow(tmp_path):
    """An attacker who can write the output tree edits the manifest: a row naming an image in
    a folder only the operator can read, a row naming a path to learn whether it exists, and a
    listed output swapped for a link to the private image. None of them is opened."""
    private = tmp_path / "home" / "private" / "secret.png"
    private.parent.mkdir(parents=True)
    photo_like(40, 30, 7).save(private)
    private.parent.chmod(0o700)
    root, output, job_id = tmp_path / "job", str(tmp_path / "job" / "out"), "roots-job"
    items = [Item(index=i, input=str(root / "in" / f"{i}.png"), output=f"{output}/{i}.png") for i in range(4)]
    for i, item in enumerate(items):
        Path(item.input).parent.mkdir(parents=True, exist_ok=True)
        Path(item.output).parent.mkdir(parents=True, exist_ok=True)
        photo_like(32, 24, i).save(item.input)
        photo_like(64, 48, i).save(item.output)
    storage = open_storage(output)
    write_listing(storage, output, job_id, items)
    write_spec(
        storage, JobSpec(job_id=job_id, input=str(root / "in"), output=output, total=4, chunk_size=4), TEST_SIGNER
    )
    Path(items[3].output).unlink()
    Path(items[3].output).symlink_to(private)
    rows = [
        _done_row(0, items[0].input, items[0].output),  # genuine
        _done_row(1, str(private), items[1].output),  # not its listing entry
        _done_row(2, str(tmp_path / "home" / "private" / "maybe.txt"), items[2].output),  # an existence probe
        _done_row(3, items[3].input, items[3].output),  # its entry, the output a link
    ]
    Path(manifest_uri(output, job_id)).write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = Path(write_report(Settings.from_env(), output, job_id).html).read_text()
    assert _pictures_on(page) == 4  # row 0: before, after and their zooms; nothing of the others
    assert page.count("outside the job&#39;s roots: not opened") == 2
    assert "a symlink, not followed" in page
    assert "NotFound" not in page and "no such file" not in page.lower()


def test_report_refuses_an_edited_job_json_when_it_has_the_key(tmp_path):
    """Without Redis, ``report --out`` reads the job's roots from job.json: an attacker who can
    write the output tree widens them to a private folder. With the signing key the edit is
    refused; the genuine file is read."""
    root, output, job_id = tmp_path / "job", str(tmp_path / "job" / "out"), "edited-spec"
    item = Item(index=0, input=str(root / "in" / "0.png"), output=f"{output}/0.png")
    for path, size in ((item.input, (32, 24)), (item.output, (64, 48))):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        photo_like(*size, 0).save(path)
    storage = open_storage(output)
    write_listing(storage, output, job_id, [item])
    write_spec(
        storage, JobSpec(job_id=job_id, input=str(root / "in"), output=output, total=1, chunk_size=1), TEST_SIGNER
    )
    Path(manifest_uri(output, job_id)).write_text(json.dumps(_done_row(0, item.input, item.output)) + "\n")
    keyed = Settings.from_env(signing_key=TEST_SIGNING_KEY)
    assert Path(write_report(keyed, output, job_id).html).exists()
    spec_file = Path(output) / "_jobs" / job_id / "job.json"
    body = json.loads(spec_file.read_text())
    body["input"] = str(tmp_path / "home")  # the signature kept, the roots widened
    spec_file.write_text(json.dumps(body))
    with pytest.raises(ReportError, match="job.json"):
        write_report(keyed, output, job_id)
