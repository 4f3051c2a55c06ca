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
* Everything from the manifest (input names, reasons, descriptions, plans) is untrusted: it
  is passed to the page as plain text, truncated (``MAX_TEXT``), and the Jinja2 template
  (``templates/report.html.j2``, autoescape on) escapes it; no value is marked safe. Images
  are re-encoded JPEG ``data:`` URIs. The page loads nothing from anywhere and its
  Content-Security-Policy allows no script at all.
* A sampled row's pictures are read only where the job may read and write (``Roots``: the
  row is its listing entry, under the job's input and the given output, as the workers'
  guard checks it), locally with no symlink followed below those roots (unless the job
  follows them); any other row shows "outside the job's roots" and nothing it names is
  opened, so the page tells nothing of it, not even whether it exists.
* Producer code: no torch (images are decoded with ``pipeline.imageio``).
"""

from __future__ import annotations

import base64
import functools
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

import jinja2
import numpy as np
from PIL import Image, ImageDraw
from pydantic import ValidationError

from pixelrelay.jobs.files import job_root, manifest_uri, read_chunk, read_spec
from pixelrelay.pipeline.imageio import decode_image
from pixelrelay.pipeline.messages import JOB_ID_PATTERN, Edit, Item, JobSpec
from pixelrelay.pipeline.settings import Settings
from pixelrelay.pipeline.storage import Storage, StorageError, is_s3, join_uri, open_storage
from pixelrelay.pipeline.storage.local import read_nofollow
from pixelrelay.workers.guard import input_root, location_problem

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
TEMPLATE_NAME = "report.html.j2"  # in producer/templates/, shipped as package data
PARTS_NAME = "report_parts.html.j2"  # its macros (image, card, chart)
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
OUTSIDE = "outside the job's roots: not opened"


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


class Roots:
    """Where the report may read a job's pictures: its listing entries, under its roots.

    ``spec`` is the job's, its output the one the report was asked for. A row is allowed when
    its index, input and output are its listing entry's (a listing removed by ``gc``: when
    they are under the roots) and the entry is where the job may read and write
    (``workers.guard.location_problem``). Local files are read with no symlink followed below
    the input root (``workers.guard.input_root``) or the output root."""

    def __init__(self, storage: Storage, spec: JobSpec) -> None:
        self.storage, self.spec = storage, spec
        self.inputs = input_root(spec)
        self._chunks: dict[int, dict[int, Item] | None] = {}

    def allows(self, row: dict) -> bool:
        """Whether ``row``'s input and output may be opened."""
        index, source, target = row.get("index"), row.get("input"), row.get("output")
        if not isinstance(index, int) or not isinstance(source, str) or not isinstance(target, str):
            return False
        if not 0 <= index < self.spec.total:
            return False
        listed = self._entry(index)
        if listed is not None and (listed.input, listed.output, listed.error) != (source, target, None):
            return False
        return location_problem(self.spec, Item(index=index, input=source, output=target)) is None

    def _entry(self, index: int) -> Item | None:
        """The listing entry of ``index``; None when the listing is gone (``gc``)."""
        size = max(1, self.spec.chunk_size)
        chunk = index // size
        if chunk not in self._chunks:
            try:
                items = read_chunk(self.storage, self.spec, chunk, size)
                self._chunks[chunk] = {item.index: item for item in items}
            except (StorageError, ValueError):
                self._chunks[chunk] = None
        entries = self._chunks[chunk]
        return None if entries is None else entries.get(index, Item(index=index, input="", output=""))

    def read_input(self, uri: str, settings: Settings) -> bytes:
        if is_s3(uri) or self.inputs.follow:
            return open_storage(uri, settings.s3_endpoint_url, settings).get(uri)
        return read_nofollow(uri, self.inputs.folder)

    def read_output(self, uri: str, settings: Settings) -> bytes:
        if is_s3(uri):
            return open_storage(uri, settings.s3_endpoint_url, settings).get(uri)
        return read_nofollow(uri, self.spec.output)


def _views(row: dict, settings: Settings, roots: Roots) -> Views:
    """Thumbnails and zoomed crops of one done item (``roots`` allowed it); ``problem`` says
    why there are none."""
    views = Views()
    try:
        before = _load(roots.read_input(row["input"], settings), settings.max_image_pixels)
        after = _load(roots.read_output(row["output"], settings), settings.max_image_pixels * 16)  # at most 4x per side
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


def _load(data: bytes, max_pixels: int) -> Image.Image:
    decoded = decode_image(data, max_pixels)
    return Image.fromarray(decoded.rgb, "RGB")


def contact_sheet(sample: list[dict], views: list[Views]) -> bytes:
    """A JPEG grid: per sampled item its before and after side by side, labelled by index."""
    cell_w, label = 2 * SHEET_CELL_PX + 6, 14
    cols = max(1, min(SHEET_COLUMNS, len(sample)))
    rows = max(1, -(-len(sample) // cols))
    sheet = Image.new("RGB", (cols * (cell_w + 8) + 8, rows * (SHEET_CELL_PX + label + 8) + 8), (34, 34, 34))
    draw = ImageDraw.Draw(sheet)
    for n, (row, view) in enumerate(zip(sample, views, strict=True)):
        x0 = 8 + (n % cols) * (cell_w + 8)
        y0 = 8 + (n // cols) * (SHEET_CELL_PX + label + 8)
        draw.text((x0, y0), f"#{int(row['index'])}", fill=(220, 220, 220))
        for i, img in enumerate((view.sheet_before, view.sheet_after)):
            if img is not None:
                sheet.paste(img, (x0 + i * (SHEET_CELL_PX + 6), y0 + label))
    return _jpeg(sheet, 82)


# --- the page ---------------------------------------------------------------------------
# Python gathers plain text and numbers; templates/report.html.j2 lays them out, escaping
# every value (autoescape on). No value here is pre-escaped HTML.


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("pixelrelay.producer", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )


def _data_uri(data: bytes | None) -> str | None:
    return f"data:image/jpeg;base64,{base64.b64encode(data).decode()}" if data else None


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass(frozen=True, slots=True)
class Axes:
    """One chart panel's axes.

    Attributes:
        left: x of the vertical axis; top: y of the panel's top; plot_w, h: the plot's size.
        max_label, min_label: the vertical axis' end labels; title: the panel's title.
    """

    left: int
    top: float
    plot_w: int
    h: int
    max_label: str
    min_label: str
    title: str


@dataclass(frozen=True, slots=True)
class Bar:
    """One bar of the items-per-minute panel (coordinates already formatted)."""

    x: str
    y: str
    width: str
    height: str
    title: str


@dataclass(frozen=True, slots=True)
class Series:
    """One stage's line on the rate panel: ``points`` for the polyline, ``coords`` for its dots."""

    color: str
    points: str
    coords: list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Chart:
    """The throughput chart's geometry, drawn by the template's ``chart`` macro.

    Attributes:
        width, height, pad: the SVG's size and right padding.
        bar_axes, bars: the items-per-minute panel.
        rate_axes, series: the per-stage rate panel (log scale).
        legend: (stage, color, x, y) per stage.
        span: the time axis' length, as text.
    """

    width: int
    height: int
    pad: int
    bar_axes: Axes
    bars: list[Bar]
    rate_axes: Axes
    series: list[Series]
    legend: list[tuple[str, str, int, float]]
    span: str


def throughput_chart(points: list[tuple[float, list[float]]], start: float, end: float) -> Chart | None:
    """Two small panels over wall time: items finished per minute, and per stage items per
    busy second (log scale: stages differ by orders of magnitude). ``points``: (chain end
    time, [items, encode_s, plan_s, decode_s]). None without points."""
    if not points:
        return None
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

    top = max(per_min) or 1.0
    bar_w = max(1.0, plot_w / bins - 2)
    bars = []
    for b, value in enumerate(per_min):
        if value > 0:
            bh = max(1.0, h * value / top)
            bars.append(
                Bar(
                    f"{x_of(b) - bar_w / 2:.1f}",
                    f"{20 + h - bh:.1f}",
                    f"{bar_w:.1f}",
                    f"{bh:.1f}",
                    f"{value:.1f} items/min",
                )
            )
    y0 = h + 60
    values = [r for series in rates.values() for r in series if r is not None]
    lo = math.floor(math.log10(min(values))) if values else 0
    hi = max(lo + 1, math.ceil(math.log10(max(values)))) if values else 1

    def y_of(rate: float) -> float:
        return y0 + h - h * (math.log10(rate) - lo) / (hi - lo)

    series = []
    for stage, _, color in STAGES:
        coords = [(f"{x_of(b):.1f}", f"{y_of(r):.1f}") for b, r in enumerate(rates[stage]) if r is not None]
        if coords:
            series.append(Series(color, " ".join(f"{x},{y}" for x, y in coords), coords))
    return Chart(
        width=w,
        height=2 * h + 80,
        pad=pad,
        bar_axes=Axes(left, 20, plot_w, h, f"{top:.3g}", "0", "items finished / min"),
        bars=bars,
        rate_axes=Axes(left, y0, plot_w, h, f"{10.0**hi:g}", f"{10.0**lo:g}", "items / busy s per stage (log)"),
        series=series,
        legend=[(stage, color, left + 260 + i * 70, y0 - 6) for i, (stage, _, color) in enumerate(STAGES)],
        span=_duration(span),
    )


@dataclass
class Page:
    """What one report shows (the inputs of ``render``)."""

    spec: JobSpec
    scan: Scan
    views: list[Views]
    chart: Chart | None
    wall_s: float | None
    manifest: str
    sheet: str
    state: str | None


@dataclass(frozen=True, slots=True)
class Row:
    """A summary table row: its label, its value's lines (shown as code when ``code``), its cell class."""

    label: str
    lines: list[str]
    cls: str = ""
    code: bool = False


@dataclass(frozen=True, slots=True)
class MetaLine:
    """A line of a card's caption: a bold label, then text (as code when ``code``)."""

    label: str
    text: str
    code: bool = False


def render(page: Page) -> str:
    """The report page as HTML text."""
    scan = page.scan
    shown = len(scan.sample)
    what = "every done item" if shown == scan.done_seen else f"{shown} of {scan.done_seen} done items, a fixed sample"
    return (
        _environment()
        .get_template(TEMPLATE_NAME)
        .render(
            csp=CSP,
            title=f"pixelrelay report: job {_text(page.spec.job_id)}",
            summary=_summary_rows(page),
            chart_data=page.chart,
            stages=_stage_rows(scan),
            failed=scan.statuses.get("failed", 0),
            failures=_failure_rows(scan),
            other_failures=scan.other_failures,
            max_reasons=MAX_REASONS,
            sample_title=what,
            cards=[_card_data(row, view) for row, view in zip(scan.sample, page.views, strict=True)],
            manifest=_text(page.manifest),
            sheet=_text(page.sheet),
            written=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        )
    )


def _summary_rows(page: Page) -> list[Row]:
    spec, scan = page.spec, page.scan
    st = scan.statuses
    missing = max(0, spec.total - scan.lines)
    created = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(spec.created_at)) if spec.created_at else "unknown"
    wall = "unknown"
    if page.wall_s is not None:
        finished = st.get("done", 0) + st.get("failed", 0)
        rate = (finished / page.wall_s) if page.wall_s > 0 else 0.0
        wall = f"{_duration(page.wall_s)} ({rate:.2f} items/s)"
    outcomes = ", ".join(f"{_text(k)} {v}" for k, v in sorted(scan.outcomes.items())) or "none"
    options = spec.options
    target = options.target()
    size = f"\u00d7{options.effective_scale()}" if target is None else f"output {_text(target.describe())}"
    request = f"{_text(options.task)} {size}, format {_text(options.format or 'kept')}" + (
        f", instruction: {_text(options.instruction)}" if options.instruction else ""
    )
    asked = ", ".join(f"{k} {_text(v)}" for k, v in spec.backends.model_dump().items() if v) or "workers' defaults"
    used = [f"{_text(k)} ({v} items)" for k, v in scan.backends.most_common()] or ["-"]
    rows = [
        Row("state", [_text(page.state or _state(st, missing))]),
        Row("input", [_text(spec.input)], code=True),
        Row("output", [_text(spec.output)], code=True),
        Row("request", [request]),
        Row("backends asked", [asked]),
        Row("backends used", used),
        Row("created", [created]),
        Row("wall time", [wall]),
        Row("items", [str(spec.total)], "num"),
        Row("done", [str(st.get("done", 0))], "num"),
        Row("failed", [str(st.get("failed", 0))], "num bad" if st.get("failed") else "num"),
        Row("cancelled", [str(st.get("cancelled", 0))], "num"),
        Row("without a manifest line", [str(missing)], "num bad" if missing else "num"),
        Row("done items by outcome", [outcomes]),
    ]
    if st.get("other"):
        rows.append(Row("lines with an unknown status", [str(st["other"])], "num bad"))
    if scan.unreadable:
        rows.append(Row("unreadable manifest lines", [str(scan.unreadable)], "num bad"))
    return rows


def _state(statuses: Counter, missing: int) -> str:
    """The job's end state as the manifest tells it (``jobs.state.JobStatus`` names)."""
    if statuses.get("cancelled"):
        return "cancelled"
    return "failed-items" if statuses.get("failed") or missing else "finished"


def _stage_rows(scan: Scan) -> list[dict[str, str]]:
    n, rows = scan.lines, []
    for stage, _, _ in STAGES:
        busy = scan.stage_s[stage]
        rows.append(
            {
                "stage": stage,
                "busy": f"{busy:.2f}",
                "per_item": f"{1000 * busy / n:.1f}" if n else "-",
                "rate": f"{n / busy:.2f}" if busy > 0 else "-",
            }
        )
    return rows


def _failure_rows(scan: Scan) -> list[dict[str, object]]:
    """Failure groups, most frequent first: count, reason, the inputs kept and how many more."""
    groups = sorted(scan.failures.items(), key=lambda kv: (-kv[1].count, kv[0]))
    return [
        {
            "count": g.count,
            "reason": _text(reason),
            "inputs": [_text(i) for i in g.inputs],
            "more": g.count - len(g.inputs),
        }
        for reason, g in groups
    ]


def _card(row: dict, view: Views) -> str:
    """One sampled item's card, as HTML (the template's ``card`` macro)."""
    parts = _environment().get_template(PARTS_NAME).module
    return str(parts.card(_card_data(row, view)))  # type: ignore[attr-defined]


def _card_data(row: dict, view: Views) -> dict[str, object]:
    return {
        "before": _data_uri(view.before),
        "after": _data_uri(view.after),
        "zoom_before": _data_uri(view.zoom_before),
        "zoom_after": _data_uri(view.zoom_after),
        "problem": _text(view.problem) if view.problem else "",
        "meta": _meta_lines(row),
    }


def _meta_lines(row: dict) -> list[MetaLine]:
    """A done row's caption: where it came from and went, its description, plan, timings."""
    meta = [
        MetaLine(f"#{int(row['index'])}", _text(row.get("input", "")), code=True),
        MetaLine("output", _text(row.get("output", "")), code=True),
    ]
    desc = row.get("description") if isinstance(row.get("description"), dict) else {}
    if desc:
        meta.append(MetaLine("description", _text(desc.get("text", ""))))
        if desc.get("caption"):
            meta.append(MetaLine("caption", _text(desc["caption"])))
        metrics = desc.get("metrics") if isinstance(desc.get("metrics"), dict) else {}
        if metrics:
            meta.append(MetaLine("metrics", ", ".join(f"{_text(k)} {_fmt(v)}" for k, v in list(metrics.items())[:10])))
    plan = row.get("plan") if isinstance(row.get("plan"), dict) else {}
    if plan:
        meta += _plan_lines(row, plan)
    timings = row.get("timings") if isinstance(row.get("timings"), dict) else {}
    if timings:
        meta.append(MetaLine("timings", ", ".join(f"{_text(k)} {_fmt(v)}" for k, v in timings.items())))
    if row.get("outcome"):
        meta.append(MetaLine("outcome", _text(row["outcome"])))
    return meta


def _plan_lines(row: dict, plan: dict) -> list[MetaLine]:
    listed = plan.get("operations")
    ops = listed if isinstance(listed, list) else []
    ops_text = ", ".join(f"{_text(o.get('name'))} {_fmt(o.get('strength'))}" for o in ops if isinstance(o, dict))
    scale = f"scale \u00d7{_text(plan.get('scale'))}"
    if row.get("native_scale") is not None:  # an output target (pipeline.outsize): what ran, what came out
        scale = f"scale \u00d7{_text(row.get('native_scale'))} native, \u00d7{_fmt(row.get('final_scale'))} final"
    bits = [f"operations: {ops_text or 'none'}", scale, f"format {_text(plan.get('output_format'))}"]
    if plan.get("model"):
        bits.append(f"model {_text(plan['model'])}")
    lines = [MetaLine("plan", "; ".join(bits))]
    if plan.get("rationale"):
        lines.append(MetaLine("rationale", _text(plan["rationale"])))
    if plan.get("prompt"):
        lines.append(MetaLine("prompt", _text(plan["prompt"])))
    return lines + _edit_lines(plan.get("edit"))


def _edit_lines(raw: object) -> list[MetaLine]:
    """An edit or style plan's edit (``Plan.edit``), checked like any manifest value: its
    grading operations and its generative edit, or a note that it does not read as one."""
    if raw is None:
        return []
    try:
        edit = Edit.model_validate(raw)
    except ValidationError:
        return [MetaLine("edit", "(not a valid edit)")]
    lines = [MetaLine("edit", _text(edit.describe()))]
    g = edit.generative
    if g is not None:
        negative = f"; not: {_text(g.negative_prompt)}" if g.negative_prompt else ""
        lines.append(
            MetaLine(
                "generative",
                f"{_text(g.prompt)}{negative} (strength {g.strength:g}, guidance {g.guidance:g}, "
                f"{g.steps} steps, seed {g.seed})",
            )
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
    signed_spec: JobSpec | None = None,
) -> ReportFiles:
    """Write the job's report.html and contact-sheet.jpg beside its manifest; ReportError
    when the job has no manifest yet or its job.json cannot be read.

    Args:
        settings: storage access and image limits.
        output: the job's output (folder or ``s3://`` prefix).
        job_id: the job (checked against ``JOB_ID_PATTERN``: it names a folder).
        sample_cap: done items shown with pictures.
        state: the job's state to show (None: as the manifest tells it).
        workers: threads that load and shrink the sampled pictures.
        signed_spec: the job's spec as Redis holds it, signed: its roots bound what is read
            (None: job.json's, its signature checked when ``settings`` has the signing key).
    """
    if not re.fullmatch(JOB_ID_PATTERN, job_id):  # it names a folder: no "..", no "/"
        raise ReportError("job id: use letters, digits, '.', '_' and '-' (at most 128)")
    storage = open_storage(output, settings.s3_endpoint_url)
    manifest = manifest_uri(output, job_id)
    signer = settings.signer() if settings.signing_key is not None else None  # with a key, job.json is checked
    try:
        spec = read_spec(storage, output, job_id, signer)
    except (StorageError, ValueError) as exc:  # SignatureError is a ValueError: an edited job.json
        raise ReportError(f"job {job_id}: cannot read its job.json under {output}: {exc}") from None
    times, manifest_at = chain_times(storage, output, job_id)
    if manifest_at is None:
        raise ReportError(f"job {job_id} has no manifest yet ({manifest}): wait for it to end")
    scan = scan_manifest(storage.iter_lines(manifest), spec.chunk_size, sample_cap, seed=job_id)
    roots = Roots(storage, (signed_spec or spec).model_copy(update={"output": output}))
    allowed = [roots.allows(row) for row in scan.sample]  # listing shards read here, once each
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        views = list(
            pool.map(
                lambda pair: _views(pair[0], settings, roots) if pair[1] else Views(problem=OUTSIDE),
                zip(scan.sample, allowed, strict=True),
            )
        )
    start = spec.created_at or min(times.values(), default=manifest_at)
    points = sorted((times[c], v) for c, v in scan.chains.items() if c in times)
    page = Page(
        spec=spec,
        scan=scan,
        views=views,
        chart=throughput_chart(points, start, manifest_at),
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
