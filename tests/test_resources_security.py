"""Attacks on bounded resources, colour and metadata (#11 rows 10-13, 15, 17), written as an
attacker would; each failed on the code before the fix.

* #10 the ``rules`` planner's instruction parsing was quadratic (13.4 s per item at 120 KB);
* #11 an 80 KB PNG that decodes to 81 Mpx, with ``--scale 4``: no output-pixel limit, and up
  to two batches of decoded images held at once whatever their size;
* #12 no Celery time limits and no ``worker_max_memory_per_child`` for prefork pools;
* #13 ``PIXELRELAY_MAX_IMAGE_PIXELS`` could not raise the limit (Pillow's guard fired first);
* #15 (end to end) ``--strip-metadata``: GPS EXIF and CMYK profiles never reach outputs;
* #17 a ``PIXELRELAY_REDIS_URL`` socket URL passed validation, then failed with a traceback.
"""

from __future__ import annotations

import gc
import io
import json
import random
import re
import resource
import struct
import time
import uuid
import zlib

import pytest
from celery import Celery
from PIL import Image

from pixelrelay.exitcodes import ExitCode
from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline import fingerprint as fp
from pixelrelay.pipeline.imageio import DecodedImage, ImageDecodeError, decode_image
from pixelrelay.pipeline.messages import (
    Backends,
    ChunkMessage,
    Description,
    ItemRecord,
    JobOptions,
    Plan,
    upgrade_message,
)
from pixelrelay.pipeline.settings import ConfigError, Settings
from pixelrelay.pipeline.stages.planners.rules import NEGATION, _Negations, instruction_requests
from pixelrelay.workers.batching import prefetched
from pixelrelay.workers.celery_app import configure, configure_pool
from pixelrelay.workers.runtime import DecodeBudget, Runtime
from pixelrelay.workers.stages import decode_chunk, encode_chunk
from tests.conftest import run_cli, wait_until, worker_env
from tests.iccprofiles import cmyk_profile

# --- helpers -------------------------------------------------------------------------------


def _chunk(*parts: bytes) -> bytes:
    kind, body = parts[0], b"".join(parts[1:])
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _grey_png(width: int, height: int, rows: int | None = None) -> bytes:
    """A valid greyscale PNG of black rows, compressed as tightly as deflate allows; with
    ``rows``, a file cut off inside its image data after that many rows (its header still
    says ``width`` x ``height``)."""
    z = zlib.compressobj(9)
    line = bytes(width + 1)  # filter byte 0, then black
    idat = b"".join(z.compress(line) for _ in range(height if rows is None else rows))
    idat += z.flush() if rows is None else z.flush(zlib.Z_SYNC_FLUSH)  # cut off: the stream goes on
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    head = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
    if rows is not None:
        return head + struct.pack(">I", len(idat) + 100_000) + b"IDAT" + idat
    return head + _chunk(b"IDAT", idat) + _chunk(b"IEND")


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    data = _grey_png(9000, 9000)  # 81 Mpx: under the 89 Mpx source limit
    assert len(data) < 100_000
    return data


def _runtime(redis_url: str, **settings) -> Runtime:
    return Runtime(Settings.from_env(redis_url=redis_url, **settings))


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- row 10: linear instruction parsing ----------------------------------------------------


def _parse_steps(text: str, monkeypatch) -> tuple[dict, dict[str, int]]:
    """Parse ``text``, counting the phrases looked at (``negated``) and the characters every
    step of the negation check reads: the text each ``_Negations`` is built over, and the
    span each of its word checks covers."""
    from pixelrelay.pipeline.stages.planners import rules

    steps = {"phrases": 0, "chars": 0}
    real_init, real_negated = rules._Negations.__init__, rules._Negations.negated
    real_all_word, real_ends = rules._Negations._all_word, rules._Negations._ends_with_negation

    def init(self, t):
        steps["chars"] += len(t)
        real_init(self, t)

    def negated(self, start):
        steps["phrases"] += 1
        return real_negated(self, start)

    def all_word(self, a, b):
        steps["chars"] += max(0, b - a)
        return real_all_word(self, a, b)

    def ends(self, a, b):
        steps["chars"] += max(0, b - a)
        return real_ends(self, a, b)

    class CountedNegation:  # the reference rule, should a check run it on the text before a phrase
        def __getattr__(self, name):
            method = getattr(rules.NEGATION, name)

            def counted(string, *args, **kwargs):
                steps["chars"] += len(string)
                return method(string, *args, **kwargs)

            return counted

    with monkeypatch.context() as m:
        for name, fn in (
            ("__init__", init),
            ("negated", negated),
            ("_all_word", all_word),
            ("_ends_with_negation", ends),
        ):
            m.setattr(rules._Negations, name, fn)
        m.setattr(rules, "NEGATION", CountedNegation())
        requests = instruction_requests(text)[0]
    return requests, steps


def test_row10_instruction_parsing_is_linear(monkeypatch):
    # Every phrase sits behind a long run of words, which the old code re-scanned from the
    # start of the text for every phrase: 10x the text took ~100x the work. Counted, not
    # timed: the characters the negation check reads grow with the text, not its square.
    unit = "please no x sharpen-denoise "
    small, big = unit * (2_000 // len(unit)), unit * (20_000 // len(unit))
    _, few = _parse_steps(small, monkeypatch)
    _, many = _parse_steps(big, monkeypatch)
    assert many["phrases"] >= 9 * few["phrases"] > 0  # 10x the text: 10x the phrases
    assert many["chars"] <= 12 * few["chars"], (few, many)  # and about 10x the reading, not 100x
    assert many["chars"] <= 40 * len(big)  # a bounded number of reads per character
    huge = unit * (200_000 // len(unit))
    requests, steps = _parse_steps(huge, monkeypatch)
    assert steps["chars"] <= 40 * len(huge)
    assert requests == instruction_requests(unit)[0] == {"sharpen": False, "denoise": False, "deblur": False}


def test_row10_negations_read_exactly_as_the_reference_rule():
    words = [
        "no",
        "not",
        "don't",
        "dont",
        "without",
        "skip",
        "never",
        "it",
        "over-",
        "-",
        "a'b",
        "(no",
        "x-no",
        "no-",
        "é",
        "_no",
        "no,",
        "sharpen",
        "denoise",
        "deblur",
        "remove the noise",
    ]
    rng = random.Random(11)
    checked = 0
    for _ in range(3000):
        text = "".join(rng.choice(words) + (" " if rng.random() < 0.7 else "") for _ in range(rng.randint(1, 8)))
        text = " ".join(text.split())
        negations = _Negations(text)
        for match in re.finditer(r"\b(?:sharpen|denoise|deblur|remove the noise)\w*\b", text):
            assert negations.negated(match.start()) == (NEGATION.search(text[: match.start()]) is not None), text
            checked += 1
    assert checked > 2000


# --- row 11: output pixels, prefetch budget -----------------------------------------------


def _message(tmp_path, options: JobOptions, backends: Backends, records: list[ItemRecord]) -> ChunkMessage:
    return ChunkMessage(
        job_id="res-" + uuid.uuid4().hex[:8],
        seq=1,
        chunk=0,
        output=str(tmp_path / "out"),
        options=options,
        backends=backends,
        records=records,
    )


def test_row11_an_output_pixel_bomb_fails_at_encode_before_any_decode_or_model(redis_url, tmp_path, bomb_png):
    source = tmp_path / "bomb.png"
    source.write_bytes(bomb_png)
    rt = _runtime(redis_url)  # the defaults: 89 Mpx per source, 256 Mpx per output
    record = ItemRecord(index=0, input=str(source), output=str(tmp_path / "out" / "bomb.png"))
    msg = _message(tmp_path, JobOptions(task="upscale", scale=4), Backends(encoder="analysis"), [record])
    rss_before = _max_rss_mb()
    encode_chunk(rt, JobState(rt.redis, msg.job_id), msg)
    assert record.failed and "PIXELRELAY_MAX_OUTPUT_PIXELS" in record.error, record.error
    assert "36000x36000" in record.error
    assert record.description is None and "encode_s" not in record.timings  # no model ran
    assert _max_rss_mb() - rss_before < 150  # decoding it would hold > 300 MB


def test_row11_the_decode_stage_checks_the_plan_scale_before_the_model(redis_url, tmp_path, bomb_png):
    source = tmp_path / "bomb.png"
    source.write_bytes(bomb_png)
    rt = _runtime(redis_url)
    record = ItemRecord(
        index=0,
        input=str(source),
        output=str(tmp_path / "out" / "bomb.png"),
        description=Description(text="x"),
        plan=Plan(scale=4),
    )
    msg = _message(tmp_path, JobOptions(task="upscale"), Backends(decoder="classic"), [record])
    decode_chunk(rt, JobState(rt.redis, msg.job_id), msg)
    assert record.failed and "PIXELRELAY_MAX_OUTPUT_PIXELS" in record.error, record.error
    assert not (tmp_path / "out" / "bomb.png").exists()


def _live_decoded_images() -> int:
    return sum(type(o) is DecodedImage for o in gc.get_objects())


def _held_while_running(rt: Runtime, records: list[ItemRecord], budget: DecodeBudget, settle) -> list[int]:
    """Run the prefetcher as a stage does; per batch, the decoded images alive once the
    prefetch thread had its chance to decode the next batch."""
    held = []
    batches = len(records) // rt.settings.batch_size
    for i, (_, loaded) in enumerate(prefetched(rt, records, "encode", budget=budget)):
        assert len(loaded) == rt.settings.batch_size
        settle(budget, i == batches - 1)
        held.append(_live_decoded_images())
        del loaded
    return held


def test_row11_the_prefetch_holds_at_most_its_byte_budget_of_decoded_images(redis_url, tmp_path):
    records = []
    for i in range(6):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(path)
        records.append(ItemRecord(index=i, input=str(path), output=str(tmp_path / "out" / f"{i}.png")))
    batch_bytes = 2 * 64 * 64 * 4  # batch_size 2, RGB + alpha per pixel
    gc.collect()
    baseline = _live_decoded_images()

    # A budget for two batches: the next batch is decoded while this one runs (the test sees it).
    rt = _runtime(redis_url, batch_size=2, prefetch_bytes=2 * batch_bytes)
    roomy = DecodeBudget(rt.settings.prefetch_bytes)
    held = _held_while_running(
        rt,
        records,
        roomy,
        lambda b, last: last or wait_until(lambda: b.held == 2 * batch_bytes, timeout=5, interval=0.01),
    )
    assert [h - baseline for h in held] == [4, 4, 2]

    # A budget for one batch: the next one waits until this one is done with.
    rt = _runtime(redis_url, batch_size=2, prefetch_bytes=batch_bytes + 1000)
    tight = DecodeBudget(rt.settings.prefetch_bytes)
    held = _held_while_running(rt, records, tight, lambda b, last: time.sleep(0.3))
    assert [h - baseline for h in held] == [2, 2, 2]
    assert tight.peak == batch_bytes and tight.held == 0

    # A batch larger than the whole budget still runs, alone.
    rt = _runtime(redis_url, batch_size=2, prefetch_bytes=1000)
    alone = DecodeBudget(rt.settings.prefetch_bytes)
    held = _held_while_running(rt, records, alone, lambda b, last: time.sleep(0.1))
    assert [h - baseline for h in held] == [2, 2, 2] and alone.peak == batch_bytes


# --- row 12: prefork limits ----------------------------------------------------------------


def test_row12_prefork_pools_get_time_limits_and_a_memory_ceiling():
    settings = Settings.from_env(
        redis_url="redis://127.0.0.1:1/0", item_budget_s=10, chunk_size=4, lease_s=5, max_memory_per_child_kb=123_456
    )
    prefork = configure_pool(configure(Celery("t-prefork", set_as_current=False), settings), settings, concurrency=2)
    assert prefork.conf.task_time_limit == 10 * 4 + 2 * 5 + 60  # after the lease watchdog's budget
    assert prefork.conf.task_soft_time_limit == prefork.conf.task_time_limit - 30
    assert prefork.conf.worker_max_memory_per_child == 123_456

    explicit = Settings.from_env(redis_url="redis://127.0.0.1:1/0", task_time_limit_s=900, max_memory_per_child_kb=0)
    app = configure_pool(configure(Celery("t-explicit", set_as_current=False), explicit), explicit, concurrency=4)
    assert (app.conf.task_soft_time_limit, app.conf.task_time_limit) == (870, 900)
    assert app.conf.worker_max_memory_per_child is None  # 0: off

    solo = configure_pool(configure(Celery("t-solo", set_as_current=False), settings), settings, concurrency=1)
    assert solo.conf.task_time_limit is None and solo.conf.worker_max_memory_per_child is None  # the watchdog's


# --- row 13: PIXELRELAY_MAX_IMAGE_PIXELS both ways -------------------------------------------


def test_row13_max_image_pixels_really_raises_and_lowers_the_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    # 182 Mpx by its header (over twice Pillow's default, where Pillow's own guard errors),
    # 2 rows of data: raising the limit lets it reach the decoder, which finds it truncated.
    claims = _grey_png(13_500, 13_500, rows=2)
    settings = Settings.from_env(max_image_pixels=2_000_000_000)
    with pytest.raises(ImageDecodeError) as raised:
        decode_image(claims, settings.max_image_pixels)
    assert "truncated" in str(raised.value) and "bomb" not in str(raised.value), raised.value

    with pytest.raises(ImageDecodeError) as lowered:
        decode_image(claims, 100_000_000)
    assert "PIXELRELAY_MAX_IMAGE_PIXELS" in str(lowered.value) and "13500x13500" in str(lowered.value)
    small = _grey_png(40, 30)
    assert decode_image(small, 1200).rgb.shape == (30, 40, 3)
    with pytest.raises(ImageDecodeError, match="PIXELRELAY_MAX_IMAGE_PIXELS"):
        decode_image(small, 1199)


# --- row 15 end to end: --strip-metadata, CMYK profiles ------------------------------------


def _gps_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "attacker-cam"
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 29.0), 3: "E", 4: (2.0, 17.0, 40.0)}  # GPSInfo
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (90, 140, 200)).save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def test_row15_strip_metadata_and_cmyk_profiles_through_real_workers(stage_workers, redis_url, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "gps.jpg").write_bytes(_gps_jpeg())
    assert Image.open(src / "gps.jpg").getexif().get_ifd(0x8825)  # the attacker's location is there
    buf = io.BytesIO()
    Image.new("CMYK", (24, 16), (200, 0, 0, 0)).save(buf, "JPEG", icc_profile=cmyk_profile(), quality=95)
    (src / "cmyk.jpg").write_bytes(buf.getvalue())

    job_id = "strip-" + uuid.uuid4().hex[:8]
    result = run_cli(
        ["submit", str(src), "--out", str(out), "--job-id", job_id, "--strip-metadata", "--wait"], worker_env(redis_url)
    )
    assert result.returncode == 0, result.stderr + stage_workers.logs()

    stripped = Image.open(out / "gps.jpg")
    assert not stripped.getexif() and not stripped.getexif().get_ifd(0x8825)
    assert stripped.size == (24, 16)
    cmyk_out = Image.open(out / "cmyk.jpg")
    assert cmyk_out.mode == "RGB" and cmyk_out.info.get("icc_profile") is None
    rows = [json.loads(line) for line in (out / "_jobs" / job_id / "manifest.jsonl").read_text().splitlines()]
    notes = {r["input"].rsplit("/", 1)[1]: r["notes"] for r in rows}
    assert any("converted to sRGB through its ICC profile" in n for n in notes["cmyk.jpg"])


def test_row15_without_strip_metadata_the_exif_stays_and_the_request_differs():
    decoded = decode_image(_gps_jpeg())
    assert decoded.exif is not None
    kept = Image.Exif()
    kept.load(decoded.exif)
    assert kept[0x010F] == "attacker-cam" and kept.get_ifd(0x8825)

    plain, strip = JobOptions(), JobOptions(strip_metadata=True)
    args = (Backends(), "/in/a.jpg", "jpg")
    assert fp.request_fingerprint(plain, *args) != fp.request_fingerprint(strip, *args)
    # Requests without it keep the fingerprint they had before the option existed.
    before = {
        "task": "restore",
        "scale": 1,
        "instruction": "",
        "format": "jpg",
        "quality": 92,
        "lossless": False,
        "backends": {"encoder": None, "planner": None, "decoder": None},
        "input": "/in/a.jpg",
    }
    assert fp.request_fingerprint(plain, *args) == fp._digest(before)


def test_strip_metadata_is_wire_version_3_and_older_bodies_upgrade_without_it():
    msg = ChunkMessage(
        job_id="w3",
        seq=1,
        chunk=0,
        output="/o",
        options=JobOptions(strip_metadata=True),
        backends=Backends(),
        records=[ItemRecord(index=0, input="/i/a.png", output="/o/a.png")],
    )
    wire = msg.model_dump(mode="json")
    assert wire["v"] == 3 and wire["options"]["strip_metadata"] is True
    assert upgrade_message(json.loads(msg.model_dump_json())) == msg
    v2 = msg.model_copy(update={"options": JobOptions(quality=70)}).model_dump(mode="json")
    assert v2["v"] == 2 and "strip_metadata" not in v2["options"]  # readable by the previous release
    assert upgrade_message(v2).options.strip_metadata is False
    v1 = msg.model_copy(update={"options": JobOptions()}).model_dump(mode="json")
    assert "v" not in v1 and "strip_metadata" not in v1["options"]


# --- row 17: unix:// -----------------------------------------------------------------------


@pytest.mark.e2e
def test_row17_a_unix_socket_redis_url_is_validated_cleanly(monkeypatch, tmp_path):
    monkeypatch.setenv("PIXELRELAY_REDIS_URL", "unix://:pw@/var/run/redis.sock?db=2")
    assert Settings.from_env().redacted_redis_url == "unix://:***@/var/run/redis.sock?db=2"
    for url in ("unix://redis.sock", "unix://host/var/run/redis.sock", "unix:///r.sock?timeout=1", "redis+socket:///r"):
        monkeypatch.setenv("PIXELRELAY_REDIS_URL", url)
        with pytest.raises(ConfigError) as raised:
            Settings.from_env()
        assert "PIXELRELAY_REDIS_URL" in str(raised.value) and "unix:" in str(raised.value), url
    env = worker_env("unix://redis.sock")
    (tmp_path / "in").mkdir()
    result = run_cli(["submit", str(tmp_path / "in"), "--out", str(tmp_path / "out")], env)
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert "PIXELRELAY_REDIS_URL" in result.stderr and "Traceback" not in result.stderr
