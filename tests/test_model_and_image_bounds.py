"""Bounds checked before anything is trusted, as an attacker would test them: an AVIF or HEIC
file whose header declares a huge image is refused from the header, before any pixel buffer
is allocated; a checkpoint over ``PIXELRELAY_CHECKPOINT_MAX_BYTES`` (a sparse file: it costs
no disk) is refused by its size, unread."""

from __future__ import annotations

import io
import resource
import struct
import time

import pytest
from PIL import Image, features

from pixelrelay.pipeline.checkpoints import CheckpointError
from pixelrelay.pipeline.imageio import ImageDecodeError, decode_image
from pixelrelay.pipeline.settings import Settings
from pixelrelay.pipeline.stages.decoders.spandrel import SpandrelDecoder

HUGE = (12_000, 12_000)  # 144 Mpx: over the default 89 Mpx limit, under libavif's own caps


def _with_dimensions(data: bytes, box: bytes, offset: int, size: tuple[int, int]) -> bytes:
    """``data`` with the width and height of its first ``box`` rewritten (``offset``: bytes
    from the box type to the two big-endian 32-bit fields)."""
    at = data.index(box) + offset
    return data[:at] + struct.pack(">II", *size) + data[at + 8 :]


def _refused_from_the_header(data: bytes) -> str:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    assert time.monotonic() - started < 2
    grew_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grew_kib < 64 * 1024, f"{grew_kib} KiB: pixels were allocated"  # 144 Mpx of RGB is 412 MiB
    return str(info.value)


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow was built without AVIF")
def test_an_avif_declaring_a_huge_image_is_refused_from_its_header():
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(buf, "AVIF")
    bomb = _with_dimensions(buf.getvalue(), b"ispe", 8, HUGE)  # ispe: version/flags, width, height
    with Image.open(io.BytesIO(bomb)) as img:
        assert img.size == HUGE  # the header really claims it
    assert "decompression bomb guard" in _refused_from_the_header(bomb)


def test_a_heic_declaring_a_huge_image_is_refused_from_its_header():
    pillow_heif = pytest.importorskip("pillow_heif", reason="pillow-heif (the heic extra) is not installed")
    pillow_heif.register_heif_opener()
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(buf, "HEIF")
    bomb = _with_dimensions(buf.getvalue(), b"ispe", 8, HUGE)
    text = _refused_from_the_header(bomb)
    assert "bomb" in text or "not a recognised" in text or "corrupt" in text, text


def test_a_checkpoint_over_the_bound_is_refused_by_its_size_unread(tmp_path):
    pytest.importorskip("spandrel")  # imported first: the time bound below is the refusal's alone
    settings = Settings.defaults()
    big = tmp_path / "huge.safetensors"
    with open(big, "wb") as f:
        f.truncate(settings.checkpoint_max_bytes + 1)  # sparse: a declared size, no data
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=r"over the \d+-byte bound \(PIXELRELAY_CHECKPOINT_MAX_BYTES\)"):
        SpandrelDecoder(str(big), settings=settings)
    assert time.monotonic() - started < 2  # 2 GiB is not read in that time on this machine
