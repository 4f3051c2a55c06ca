"""``pixelrelay report``: a job's morning report, one self-contained HTML file and a contact sheet.

Writes ``OUTPUT/_jobs/<job_id>/report.html`` and ``contact-sheet.jpg`` through the Storage
interface (local folders and S3 alike). What it shows, and where each figure comes from:

* totals (done, failed, cancelled, items without a line) and outcomes, from the manifest;
* wall time: the job's ``created_at`` (job.json) to the manifest's last-modified time;
* throughput over time: the manifest has no wall-clock time per item, only each item's share
  of its stage's batch time (``timings``). So the chart places each chain at the time its
  manifest part was written (the part's last-modified time: the chain's end, after decode)
  and shows, per time bin, (a) items finished per minute and (b) per stage, items per second
  of that stage's busy time (items / summed ``timings``): what a worker of that stage does
  while it works. Queue waits are not recorded, so no per-stage wall-clock finish is claimed.
  Once ``pixelrelay gc`` removed the parts, the chart says so;
* failures grouped by reason (at most ``MAX_REASONS`` reasons, ``MAX_INPUTS_PER_REASON``
  inputs each, the rest counted);
* a deterministic sample of done items (every one up to ``sample_cap``; reservoir sampling
  seeded by the job id beyond): before/after thumbnails, a zoomed crop of the most detailed
  region of both, the description and the plan.

Invariants:

* The manifest is streamed (``Storage.iter_lines``) in one pass; memory is bounded by the
  sample, the failure groups and one small tuple per chain, whatever the job's size.
* Everything from the manifest (input names, reasons, descriptions, plans) is untrusted and
  goes through ``html.escape``; images are re-encoded JPEG ``data:`` URIs. The page loads
  nothing from anywhere and its Content-Security-Policy allows no script at all.
* Producer code: no torch (images are decoded with ``pipeline.imageio``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from pydantic import ValidationError

from pixelrelay.jobs.files import job_root, manifest_uri, read_spec
from pixelrelay.pipeline.imageio import decode_image
from pixelrelay.pipeline.messages import JOB_ID_PATTERN, Edit, JobSpec
from pixelrelay.pipeline.settings import Settings
from pixelrelay.pipeline.storage import StorageError, join_uri, open_storage

REPORT_NAME = "report.html"
SHEET_NAME = "contact-sheet.jpg"
SAMPLE_CAP = 48  # done items shown with thumbnails
MAX_REASONS = 50  # failure reasons listed; the rest are counted
MAX_INPUTS_PER_REASON = 20
MAX_BACKENDS = 10  # distinct backend combinations listed
MAX_TEXT = 600  # characters of any one manifest string shown
THUMB_PX = 160  # longest side of a thumbnail
ZOOM_PX = 160  # side of a zoomed crop
SHEET_CELL_PX = 120
SHEET_COLUMNS = 6
CHART_BINS = 30
STAGES = (("encode", "encode_s", "#1f77b4"), ("plan", "plan_s", "#ff7f0e"), ("decode", "decode_s", "#2ca02c"))
STATUSES = ("done", "failed", "cancelled")
OUTCOMES = ("processed", "reused", "overwritten")
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


class ReportError(Exception):
    """The report cannot be written (no manifest yet, unreadable job.json)."""


def report_uri(output: str, job_id: str) -> str:
    return join_uri(job_root(output, job_id), REPORT_NAME)


def sheet_uri(output: str, job_id: str) -> str:
    return join_uri(job_root(output, job_id), SHEET_NAME)


# --- one pass over the manifest ---------------------------------------------------------


@dataclass
class Failures:
    count: int = 0
    inputs: list[str] = field(default_factory=list)


@dataclass
class Scan:
    """What the report needs from the manifest, gathered in one streaming pass."""

    statuses: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)
    unreadable: int = 0
    failures: dict[str, Failures] = field(default_factory=dict)
    other_failures: int = 0  # failures whose reason is beyond MAX_REASONS
    chains: dict[int, list[float]] = field(default_factory=dict)  # chunk -> [items, encode_s, plan_s, decode_s]
    stage_s: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s, _, _ in STAGES})
    sample: list[dict] = field(default_factory=list)
    done_seen: int = 0
    backends: Counter = field(default_factory=Counter)  # "encoder X, planner Y, ..." -> items (MAX_BACKENDS kinds)

    @property
    def lines(self) -> int:
        return sum(self.statuses.values())


def _text(value: object, limit: int = MAX_TEXT) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _number(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def scan_manifest(lines: Iterable[bytes], chunk_size: int, cap: int, seed: str) -> Scan:
    """Count, group and sample the manifest's rows (reservoir sampling of done items, seeded
    by ``seed``: the same manifest gives the same sample)."""
    scan, rng = Scan(), random.Random(seed)
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            index, status = int(row["index"]), row.get("status")
        except (ValueError, TypeError, KeyError):
            scan.unreadable += 1
            continue
        status = status if status in STATUSES else "other"  # bounded, whatever the manifest says
        scan.statuses[status] += 1
        if status == "done":
            _count_backends(scan, row.get("backends"))
            outcome = row.get("outcome")
            scan.outcomes[outcome if outcome in OUTCOMES else "unknown"] += 1
            scan.done_seen += 1
            if len(scan.sample) < cap:
                scan.sample.append(row)
            else:
                slot = rng.randrange(scan.done_seen)
                if slot < cap:
                    scan.sample[slot] = row
        elif status == "failed":
            _add_failure(scan, _text(row.get("error") or "no reason given"), _text(row.get("input", "")))
        if status not in ("done", "failed"):
            continue  # cancelled: never ran, no chain time
        timings = row.get("timings") if isinstance(row.get("timings"), dict) else {}
        chain = scan.chains.setdefault(index // max(1, chunk_size), [0.0, 0.0, 0.0, 0.0])
        chain[0] += 1
        for i, (stage, key, _) in enumerate(STAGES, start=1):
            seconds = _number(timings.get(key))
            chain[i] += seconds
            scan.stage_s[stage] += seconds
    scan.sample.sort(key=lambda r: int(r["index"]))
    return scan


def _count_backends(scan: Scan, backends: object) -> None:
    if not isinstance(backends, dict) or not backends:
        return
    key = _text(", ".join(f"{k} {v}" for k, v in sorted(backends.items())), 200)
    if key in scan.backends or len(scan.backends) < MAX_BACKENDS:
        scan.backends[key] += 1


def _add_failure(scan: Scan, reason: str, input_uri: str) -> None:
    group = scan.failures.get(reason)
    if group is None:
        if len(scan.failures) >= MAX_REASONS:
            scan.other_failures += 1
            return
        group = scan.failures[reason] = Failures()
    group.count += 1
    if len(group.inputs) < MAX_INPUTS_PER_REASON:
        group.inputs.append(input_uri)


# --- chain times (manifest parts' last-modified times) ----------------------------------


def chain_times(storage, output: str, job_id: str) -> tuple[dict[int, float], float | None]:
    """(chunk -> when its newest part was written, when the manifest was written) from one
    listing of the job's folder."""
    times: dict[int, float] = {}
    manifest_at = None
    manifest = manifest_uri(output, job_id)
    for info in storage.list_info(job_root(output, job_id).rstrip("/") + "/"):  # not job "<id>-2"
        if info.uri == manifest:
            manifest_at = info.modified
            continue
        head, _, name = info.uri.rpartition("/")
        if not head.endswith("/parts") or not name.endswith(".jsonl"):
            continue
        try:
            chunk = int(name.split("-", 1)[0])
        except ValueError:
            continue
        times[chunk] = max(times.get(chunk, 0.0), info.modified)
    return times, manifest_at


# --- images -----------------------------------------------------------------------------


@dataclass
class Views:
    """A sampled item's pictures (JPEG bytes), or why they could not be made."""

    before: bytes | None = None
    after: bytes | None = None
    zoom_before: bytes | None = None
    zoom_after: bytes | None = None
    problem: str = ""
    sheet_before: Image.Image | None = None
    sheet_after: Image.Image | None = None


def _jpeg(img: Image.Image, quality: int = 78) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def _thumb(img: Image.Image, px: int) -> Image.Image:
    small = img.copy()
    small.thumbnail((px, px), Image.Resampling.LANCZOS)
    return small


def detail_window(rgb: np.ndarray, side: int) -> tuple[int, int]:
    """Top-left (x, y) of the ``side`` x ``side`` window with the most edge energy."""
    h, w = rgb.shape[:2]
    if side >= min(h, w):
        return 0, 0
    step = max(1, max(h, w) // 256)  # judge on a small copy: cheap for any size
    gray = rgb[::step, ::step].astype(np.float32).mean(axis=2)
    energy = np.zeros_like(gray)
    energy[:, 1:] += np.abs(np.diff(gray, axis=1))
    energy[1:, :] += np.abs(np.diff(gray, axis=0))
    integral = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    s = max(1, side // step)
    gh, gw = gray.shape
    if s >= min(gh, gw):
        return 0, 0
    sums = integral[s:, s:] - integral[:-s, s:] - integral[s:, :-s] + integral[:-s, :-s]
    y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return min(int(x) * step, w - side), min(int(y) * step, h - side)


def _views(row: dict, settings: Settings) -> Views:
    """Thumbnails and zoomed crops of one done item; ``problem`` says why there are none."""
    views = Views()
    try:
        before = _load(row.get("input"), settings.max_image_pixels, settings)
        after = _load(row.get("output"), settings.max_image_pixels * 16, settings)  # an output is at most 4x per side
    except Exception as exc:  # noqa: BLE001 - one unreadable picture must not sink the report
        views.problem = _text(f"image unavailable: {type(exc).__name__}: {exc}", 300)
        return views
    views.before, views.after = _jpeg(_thumb(before, THUMB_PX)), _jpeg(_thumb(after, THUMB_PX))
    views.sheet_before, views.sheet_after = _thumb(before, SHEET_CELL_PX), _thumb(after, SHEET_CELL_PX)
    scale = max(1.0, after.width / max(1, before.width))
    side = int(max(8, min(min(before.size) // 4, ZOOM_PX // scale)))
    x, y = detail_window(np.asarray(before), side)
    crop_before = before.crop((x, y, x + side, y + side))
    sx, sy = after.width / before.width, after.height / before.height
    crop_after = after.crop((round(x * sx), round(y * sy), round((x + side) * sx), round((y + side) * sy)))
    zoom = (ZOOM_PX, ZOOM_PX)
    views.zoom_before = _jpeg(crop_before.resize(zoom, Image.Resampling.NEAREST), 85)
    views.zoom_after = _jpeg(crop_after.resize(zoom, Image.Resampling.NEAREST), 85)
    return views


def _load(uri: object, max_pixels: int, settings: Settings) -> Image.Image:
    if not isinstance(uri, str) or not uri:
        raise ValueError("no URI")
    decoded = decode_image(open_storage(uri, settings.s3_endpoint_url, settings).get(uri), max_pixels)
    return Image.fromarray(decoded.rgb, "RGB")


def contact_sheet(sample: list[dict], views: list[Views]) -> bytes:
    """A JPEG grid: per sampled item its before and after side by side, labelled by index."""
    cell_w, label = 2 * SHEET_CELL_PX + 6, 14
    cols = max(1, min(SHEET_COLUMNS, len(sample)))
    rows = max(1, -(-len(sample) // cols))
    sheet = Image.new("RGB", (cols * (cell_w + 8) + 8, rows * (SHEET_CELL_PX + label + 8) + 8), (34, 34, 34))
    draw = ImageDraw.Draw(sheet)
    for n, (row, view) in enumerate(zip(sample, views)):
        x0 = 8 + (n % cols) * (cell_w + 8)
        y0 = 8 + (n // cols) * (SHEET_CELL_PX + label + 8)
        draw.text((x0, y0), f"#{int(row['index'])}", fill=(220, 220, 220))
        for i, img in enumerate((view.sheet_before, view.sheet_after)):
            if img is not None:
                sheet.paste(img, (x0 + i * (SHEET_CELL_PX + 6), y0 + label))
    return _jpeg(sheet, 82)


# --- the page ---------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(_text(value), quote=True)


def _img(data: bytes | None, alt: str) -> str:
    if not data:
        return f'<div class="missing">{_e(alt)}: none</div>'
    return f'<img alt="{_e(alt)}" src="data:image/jpeg;base64,{base64.b64encode(data).decode()}">'


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def throughput_svg(points: list[tuple[float, list[float]]], start: float, end: float) -> str:
    """Two small panels over wall time: items finished per minute, and per stage items per
    busy second (log scale: stages differ by orders of magnitude). ``points``: (chain end
    time, [items, encode_s, plan_s, decode_s])."""
    if not points:
        return '<p class="note">No chain times: the job\'s parts are gone (removed by gc) or were never written.</p>'
    end = max(end, max(t for t, _ in points))
    span = max(1.0, end - start)
    bins = CHART_BINS
    width = span / bins
    sums = [[0.0, 0.0, 0.0, 0.0] for _ in range(bins)]
    for t, chain in points:
        b = min(bins - 1, max(0, int((t - start) / width)))
        for i in range(4):
            sums[b][i] += chain[i]
    per_min = [s[0] / width * 60 for s in sums]
    rates = {
        stage: [s[0] / s[i] if s[i] > 0 and s[0] > 0 else None for s in sums]
        for i, (stage, _, _) in enumerate(STAGES, 1)
    }
    w, h, left, pad = 720, 120, 56, 8
    plot_w = w - left - pad

    def x_of(b: float) -> float:
        return left + plot_w * (b + 0.5) / bins

    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{2 * h + 80}" '
        f'viewBox="0 0 {w} {2 * h + 80}" role="img" aria-label="throughput over time">'
    ]
    top = max(per_min) or 1.0
    parts.append(_axes(left, 20, plot_w, h, f"{top:.3g}", "0", "items finished / min"))
    bar_w = max(1.0, plot_w / bins - 2)
    for b, value in enumerate(per_min):
        if value > 0:
            bh = max(1.0, h * value / top)
            parts.append(
                f'<rect x="{x_of(b) - bar_w / 2:.1f}" y="{20 + h - bh:.1f}" width="{bar_w:.1f}" '
                f'height="{bh:.1f}" fill="#888"><title>{value:.1f} items/min</title></rect>'
            )
    y0 = h + 60
    values = [r for series in rates.values() for r in series if r is not None]
    lo = math.floor(math.log10(min(values))) if values else 0
    hi = max(lo + 1, math.ceil(math.log10(max(values)))) if values else 1

    def y_of(rate: float) -> float:
        return y0 + h - h * (math.log10(rate) - lo) / (hi - lo)

    parts.append(_axes(left, y0, plot_w, h, f"{10.0**hi:g}", f"{10.0**lo:g}", "items / busy s per stage (log)"))
    for stage, _, color in STAGES:
        coords = [(x_of(b), y_of(r)) for b, r in enumerate(rates[stage]) if r is not None]
        if coords:
            parts.append(
                f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                f'points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in coords)}"/>'
            )
            parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in coords]
    for i, (stage, _, color) in enumerate(STAGES):
        parts.append(
            f'<text x="{left + 260 + i * 70}" y="{y0 - 6}" fill="{color}" font-size="12">&#9679; {stage}</text>'
        )
    parts.append(f'<text x="{left}" y="{2 * h + 76}" font-size="11">0</text>')
    parts.append(
        f'<text x="{w - pad}" y="{2 * h + 76}" font-size="11" text-anchor="end">'
        f"{_duration(span)} after the job was created</text>"
    )
    parts.append("</svg>")
    return "".join(parts)


def _axes(left: int, top: float, plot_w: int, h: int, max_label: str, min_label: str, title: str) -> str:
    return (
        f'<line x1="{left}" y1="{top + h}" x2="{left + plot_w}" y2="{top + h}" stroke="#444"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + h}" stroke="#444"/>'
        f'<text x="{left - 4}" y="{top + 10}" font-size="11" text-anchor="end">{max_label}</text>'
        f'<text x="{left - 4}" y="{top + h}" font-size="11" text-anchor="end">{min_label}</text>'
        f'<text x="{left}" y="{top - 6}" font-size="12" font-weight="bold">{html.escape(title)}</text>'
    )


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:3px 10px;text-align:left;border-bottom:1px solid #eee;vertical-align:top}
.num{text-align:right;font-variant-numeric:tabular-nums}.note{color:#666}.bad{color:#b00}
.grid{display:flex;flex-wrap:wrap;gap:14px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;width:680px}
.pics{display:flex;gap:6px;align-items:flex-start}.pics figure{margin:0;text-align:center;font-size:11px;color:#666}
.pics img{display:block;max-width:160px;image-rendering:auto}.zoom img{image-rendering:pixelated}
.missing{width:160px;height:60px;background:#eee;color:#999;font-size:11px;padding:4px}
.meta{font-size:12px;word-break:break-all}.meta b{color:#444}
code{font-size:12px;word-break:break-all}
"""


@dataclass
class Page:
    spec: JobSpec
    scan: Scan
    views: list[Views]
    chart: str
    wall_s: float | None
    manifest: str
    sheet: str
    state: str | None


def render(page: Page) -> str:
    spec, scan = page.spec, page.scan
    title = f"pixelrelay report: job {spec.job_id}"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width">',
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        _summary_table(page),
        "<h2>Throughput over time</h2>",
        '<p class="note">Each chain is placed at the time its manifest part was written (its end). '
        "Top: items finished per minute. Bottom: per stage, items per second of that stage's busy "
        "time (the items' summed <code>timings</code>); queue waits are not recorded.</p>",
        page.chart,
        _stage_table(scan),
        _failures(scan),
        _samples(page),
        f'<p class="note">Manifest: <code>{_e(page.manifest)}</code> &middot; contact sheet: '
        f"<code>{_e(page.sheet)}</code> &middot; written {_e(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}</p>",
        "</body></html>",
    ]
    return "\n".join(out)


def _row(label: str, value: str, cls: str = "") -> str:
    return f'<tr><th>{html.escape(label)}</th><td class="{cls}">{value}</td></tr>'


def _summary_table(page: Page) -> str:
    spec, scan = page.spec, page.scan
    st = scan.statuses
    missing = max(0, spec.total - scan.lines)
    created = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(spec.created_at)) if spec.created_at else "unknown"
    wall = "unknown"
    if page.wall_s is not None:
        finished = st.get("done", 0) + st.get("failed", 0)
        rate = (finished / page.wall_s) if page.wall_s > 0 else 0.0
        wall = f"{_duration(page.wall_s)} ({rate:.2f} items/s)"
    outcomes = ", ".join(f"{_e(k)} {v}" for k, v in sorted(scan.outcomes.items())) or "none"
    options = spec.options
    target = options.target()
    size = f"&times;{options.effective_scale()}" if target is None else f"output {_e(target.describe())}"
    request = f"{_e(options.task)} {size}, format {_e(options.format or 'kept')}" + (
        f", instruction: {_e(options.instruction)}" if options.instruction else ""
    )
    backends = ", ".join(f"{k} {_e(v)}" for k, v in spec.backends.model_dump().items() if v) or "workers' defaults"
    rows = [
        _row("state", _e(page.state or _state(st, missing))),
        _row("input", f"<code>{_e(spec.input)}</code>"),
        _row("output", f"<code>{_e(spec.output)}</code>"),
        _row("request", request),
        _row("backends asked", backends),
        _row("backends used", "<br>".join(f"{_e(k)} ({v} items)" for k, v in scan.backends.most_common()) or "-"),
        _row("created", _e(created)),
        _row("wall time", _e(wall)),
        _row("items", str(spec.total), "num"),
        _row("done", str(st.get("done", 0)), "num"),
        _row("failed", str(st.get("failed", 0)), "num bad" if st.get("failed") else "num"),
        _row("cancelled", str(st.get("cancelled", 0)), "num"),
        _row("without a manifest line", str(missing), "num bad" if missing else "num"),
        _row("done items by outcome", outcomes),
    ]
    if st.get("other"):
        rows.append(_row("lines with an unknown status", str(st["other"]), "num bad"))
    if scan.unreadable:
        rows.append(_row("unreadable manifest lines", str(scan.unreadable), "num bad"))
    return "<table>" + "".join(rows) + "</table>"


def _state(statuses: Counter, missing: int) -> str:
    """The job's end state as the manifest tells it (``jobs.state.JobStatus`` names)."""
    if statuses.get("cancelled"):
        return "cancelled"
    return "failed-items" if statuses.get("failed") or missing else "finished"


def _stage_table(scan: Scan) -> str:
    rows = ["<table><tr><th>stage</th><th>busy s (all workers)</th><th>ms per item</th><th>items / busy s</th></tr>"]
    n = scan.lines
    for stage, _, _ in STAGES:
        busy = scan.stage_s[stage]
        per = f"{1000 * busy / n:.1f}" if n else "-"
        rate = f"{n / busy:.2f}" if busy > 0 else "-"
        rows.append(
            f'<tr><td>{stage}</td><td class="num">{busy:.2f}</td><td class="num">{per}</td>'
            f'<td class="num">{rate}</td></tr>'
        )
    return "".join(rows) + "</table>"


def _failures(scan: Scan) -> str:
    failed = scan.statuses.get("failed", 0)
    out = [f'<h2 id="failures">Failures ({failed})</h2>']
    if not failed:
        return out[0] + '<p class="note">No item failed.</p>'
    out.append("<table><tr><th>items</th><th>reason</th><th>inputs</th></tr>")
    for reason, group in sorted(scan.failures.items(), key=lambda kv: (-kv[1].count, kv[0])):
        inputs = "<br>".join(f"<code>{_e(i)}</code>" for i in group.inputs)
        more = group.count - len(group.inputs)
        if more > 0:
            inputs += f'<br><span class="note">and {more} more (see the manifest)</span>'
        out.append(
            f'<tr><td class="num">{group.count}</td><td class="reason bad">{_e(reason)}</td><td>{inputs}</td></tr>'
        )
    out.append("</table>")
    if scan.other_failures:
        out.append(
            f'<p class="note">{scan.other_failures} more failures with other reasons '
            f"(only the first {MAX_REASONS} reasons are listed; see the manifest).</p>"
        )
    return "".join(out)


def _samples(page: Page) -> str:
    scan = page.scan
    shown = len(scan.sample)
    what = "every done item" if shown == scan.done_seen else f"{shown} of {scan.done_seen} done items, a fixed sample"
    out = [f"<h2>Items ({_e(what)})</h2>", '<div class="grid">']
    for row, view in zip(scan.sample, page.views):
        out.append(_card(row, view))
    out.append("</div>")
    return "".join(out)


def _card(row: dict, view: Views) -> str:
    pics = (
        f"<figure>{_img(view.before, 'before')}before</figure>"
        f"<figure>{_img(view.after, 'after')}after</figure>"
        f'<figure class="zoom">{_img(view.zoom_before, "zoom before")}zoom before</figure>'
        f'<figure class="zoom">{_img(view.zoom_after, "zoom after")}zoom after</figure>'
    )
    problem = f'<div class="bad">{_e(view.problem)}</div>' if view.problem else ""
    meta = [
        f"<b>#{int(row['index'])}</b> <code>{_e(row.get('input', ''))}</code>",
        f"<b>output</b> <code>{_e(row.get('output', ''))}</code>",
    ]
    desc = row.get("description") if isinstance(row.get("description"), dict) else {}
    if desc:
        meta.append(f"<b>description</b> {_e(desc.get('text', ''))}")
        if desc.get("caption"):
            meta.append(f"<b>caption</b> {_e(desc['caption'])}")
        metrics = desc.get("metrics") if isinstance(desc.get("metrics"), dict) else {}
        if metrics:
            meta.append("<b>metrics</b> " + ", ".join(f"{_e(k)} {_e(_fmt(v))}" for k, v in list(metrics.items())[:10]))
    plan = row.get("plan") if isinstance(row.get("plan"), dict) else {}
    if plan:
        ops = plan.get("operations") if isinstance(plan.get("operations"), list) else []
        ops_text = ", ".join(f"{_e(o.get('name'))} {_e(_fmt(o.get('strength')))}" for o in ops if isinstance(o, dict))
        scale = f"scale &times;{_e(plan.get('scale'))}"
        if row.get("native_scale") is not None:  # an output target (pipeline.outsize): what ran, what came out
            scale = (
                f"scale &times;{_e(row.get('native_scale'))} native, &times;{_e(_fmt(row.get('final_scale')))} final"
            )
        bits = [f"operations: {ops_text or 'none'}", scale, f"format {_e(plan.get('output_format'))}"]
        if plan.get("model"):
            bits.append(f"model {_e(plan['model'])}")
        meta.append("<b>plan</b> " + "; ".join(bits))
        if plan.get("rationale"):
            meta.append(f"<b>rationale</b> {_e(plan['rationale'])}")
        if plan.get("prompt"):
            meta.append(f"<b>prompt</b> {_e(plan['prompt'])}")
        meta += _edit_lines(plan.get("edit"))
    timings = row.get("timings") if isinstance(row.get("timings"), dict) else {}
    if timings:
        meta.append("<b>timings</b> " + ", ".join(f"{_e(k)} {_e(_fmt(v))}" for k, v in timings.items()))
    if row.get("outcome"):
        meta.append(f"<b>outcome</b> {_e(row['outcome'])}")
    return f'<div class="card"><div class="pics">{pics}</div>{problem}<div class="meta">{"<br>".join(meta)}</div></div>'


def _edit_lines(raw: object) -> list[str]:
    """An edit or style plan's edit (``Plan.edit``), checked like any manifest value: its
    grading operations and its generative edit, or a note that it does not read as one."""
    if raw is None:
        return []
    try:
        edit = Edit.model_validate(raw)
    except ValidationError:
        return ["<b>edit</b> (not a valid edit)"]
    lines = [f"<b>edit</b> {_e(edit.describe())}"]
    g = edit.generative
    if g is not None:
        negative = f"; not: {_e(g.negative_prompt)}" if g.negative_prompt else ""
        lines.append(
            f"<b>generative</b> {_e(g.prompt)}{negative} (strength {g.strength:g}, guidance {g.guidance:g}, "
            f"{g.steps} steps, seed {g.seed})"
        )
    return lines


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return _text(value, 80)


# --- entry point ------------------------------------------------------------------------


@dataclass
class ReportFiles:
    html: str
    contact_sheet: str
    html_bytes: int
    sampled: int
    items: int


def write_report(
    settings: Settings,
    output: str,
    job_id: str,
    *,
    sample_cap: int = SAMPLE_CAP,
    state: str | None = None,
    workers: int = 4,
) -> ReportFiles:
    """Write the job's report.html and contact-sheet.jpg beside its manifest; ReportError
    when the job has no manifest yet or its job.json cannot be read."""
    if not re.fullmatch(JOB_ID_PATTERN, job_id):  # it names a folder: no "..", no "/"
        raise ReportError("job id: use letters, digits, '.', '_' and '-' (at most 128)")
    storage = open_storage(output, settings.s3_endpoint_url)
    manifest = manifest_uri(output, job_id)
    try:
        spec = read_spec(storage, output, job_id)
    except (StorageError, ValueError) as exc:
        raise ReportError(f"job {job_id}: cannot read its job.json under {output}: {exc}") from None
    times, manifest_at = chain_times(storage, output, job_id)
    if manifest_at is None:
        raise ReportError(f"job {job_id} has no manifest yet ({manifest}): wait for it to end")
    scan = scan_manifest(storage.iter_lines(manifest), spec.chunk_size, sample_cap, seed=job_id)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        views = list(pool.map(lambda row: _views(row, settings), scan.sample))
    start = spec.created_at or min(times.values(), default=manifest_at)
    points = sorted((times[c], v) for c, v in scan.chains.items() if c in times)
    page = Page(
        spec=spec,
        scan=scan,
        views=views,
        chart=throughput_svg(points, start, manifest_at),
        wall_s=(manifest_at - spec.created_at) if spec.created_at else None,
        manifest=manifest,
        sheet=sheet_uri(output, job_id),
        state=state,
    )
    body = render(page).encode()
    storage.put(sheet_uri(output, job_id), contact_sheet(scan.sample, views), "image/jpeg")
    storage.put(report_uri(output, job_id), body, "text/html; charset=utf-8")
    return ReportFiles(
        html=report_uri(output, job_id),
        contact_sheet=sheet_uri(output, job_id),
        html_bytes=len(body),
        sampled=len(scan.sample),
        items=scan.lines,
    )
