"""Safe decode/encode against the bad inputs a bulk job meets."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pixelrelay.pipeline.imageio import ImageDecodeError, decode_image, encode_image, format_for_uri


def _png(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kwargs)
    return buf.getvalue()


def _noise_png(w: int = 64, h: int = 64) -> bytes:
    return _png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)))


def _gradient(w: int = 32, h: int = 24) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 8 % 256, y * 10 % 256, (x + y) * 4 % 256], -1).astype(np.uint8))


def test_plain_rgb_round_trip():
    decoded = decode_image(_png(_gradient()))
    assert decoded.rgb.shape == (24, 32, 3) and decoded.alpha is None
    data, notes = encode_image(decoded.rgb, "png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), decoded.rgb) and notes == []


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"this is not an image at all" * 10, "not a recognised image format"),
        (_noise_png()[:2000], "corrupt"),
    ],
    ids=["zero-bytes", "not-an-image", "truncated"],
)
def test_bad_bytes_fail_with_reason(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data)


def test_corrupt_middle_of_jpeg():
    buf = io.BytesIO()
    _gradient(64, 64).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    data = bytes(data[: len(data) // 2])  # cut in the entropy-coded data
    with pytest.raises(ImageDecodeError):
        decode_image(data)


def test_decompression_bomb_limit_is_configurable():
    data = _png(Image.new("RGB", (400, 300)))
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(data, max_pixels=100_000)
    assert decode_image(data, max_pixels=200_000).rgb.shape == (300, 400, 3)


def test_cmyk_converted():
    img = Image.new("CMYK", (8, 6), (0, 255, 255, 0))  # red in CMYK
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    decoded = decode_image(buf.getvalue())
    assert decoded.rgb.shape == (6, 8, 3)
    assert decoded.rgb[..., 0].mean() > 200 and decoded.rgb[..., 1].mean() < 60
    assert any("CMYK" in n for n in decoded.notes)


def test_sixteen_bit_grey_scaled_to_8_bit():
    arr = (np.linspace(0, 65535, 16 * 4).reshape(4, 16)).astype(np.uint16)
    decoded = decode_image(_png(Image.fromarray(arr)))
    assert decoded.rgb.dtype == np.uint8
    assert decoded.rgb[0, 0, 0] == 0 and decoded.rgb[-1, -1, 0] == 255


def test_palette_with_transparency_keeps_alpha():
    img = Image.new("P", (10, 10), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.paste(1, (0, 0, 5, 10))
    img.info["transparency"] = 0
    decoded = decode_image(_png(img, transparency=0))
    assert decoded.alpha is not None
    assert decoded.alpha[:, :5].min() == 255 and decoded.alpha[:, 5:].max() == 0


def test_rgba_alpha_kept_through_encode():
    rgba = np.zeros((6, 7, 4), np.uint8)
    rgba[..., 1] = 200
    rgba[..., 3] = np.arange(7, dtype=np.uint8) * 40
    decoded = decode_image(_png(Image.fromarray(rgba, "RGBA")))
    assert np.array_equal(decoded.alpha, rgba[..., 3])
    for fmt in ("png", "webp"):
        data, _ = encode_image(decoded.rgb, fmt, alpha=decoded.alpha)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)))[..., 3], rgba[..., 3])
    _, notes = encode_image(decoded.rgb, "jpg", alpha=decoded.alpha)
    assert any("alpha dropped" in n for n in notes)


def test_exif_orientation_makes_output_upright():
    img = _gradient(30, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to view
    exif[0x010F] = "pixelrelay-test-camera"
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    decoded = decode_image(buf.getvalue())
    assert decoded.rgb.shape == (30, 20, 3)  # upright: width and height swapped
    assert any("orientation" in n for n in decoded.notes)
    data, _ = encode_image(decoded.rgb, "jpg", exif=decoded.exif)
    written = Image.open(io.BytesIO(data)).getexif()
    assert 0x0112 not in written and written[0x010F] == "pixelrelay-test-camera"


def test_animated_takes_first_frame_and_says_so():
    frames = [Image.new("RGB", (12, 12), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    decoded = decode_image(buf.getvalue())
    assert decoded.rgb[..., 0].mean() > 200 and decoded.rgb[..., 2].mean() < 50
    assert any("3 frames" in n for n in decoded.notes)


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (3, 1)])
def test_tiny_images(size):
    decoded = decode_image(_png(Image.new("RGB", size, (9, 99, 199))))
    assert decoded.rgb.shape == (size[1], size[0], 3)


def test_icc_profile_carried():
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    decoded = decode_image(_png(_gradient(), icc_profile=icc))
    assert decoded.icc_profile == icc
    data, _ = encode_image(decoded.rgb, "png", icc_profile=decoded.icc_profile)
    assert Image.open(io.BytesIO(data)).info.get("icc_profile") == icc


def test_format_for_uri():
    assert format_for_uri("s3://b/x/a.jpg") == "jpg"
    assert format_for_uri("/o/a.webp") == "webp"
    assert format_for_uri("/o/a.png") == "png"


def _photo(w: int = 96, h: int = 64) -> np.ndarray:
    """Smooth gradients plus mild noise: what lossy codecs are tuned for."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([128 + 90 * np.sin(x / 9 + c) * np.cos(y / 13 - c) for c in range(3)], -1)
    rgb += np.random.default_rng(1).normal(0, 6, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _error(data: bytes, rgb: np.ndarray) -> float:
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.float64)
    return float(np.abs(decoded - rgb).mean())


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_lossy_quality_trades_size_for_error(fmt):
    rgb = _photo()
    outs = [encode_image(rgb, fmt, quality=q)[0] for q in (10, 50, 92)]
    sizes, errors = [len(d) for d in outs], [_error(d, rgb) for d in outs]
    assert sizes[0] < sizes[1] < sizes[2], sizes
    assert errors[0] > errors[1] > errors[2] > 0, errors
    assert Image.open(io.BytesIO(outs[0])).format == ("JPEG" if fmt == "jpg" else "WEBP")


def test_webp_lossless_round_trips_exactly_and_ignores_quality():
    rgb = _photo()
    alpha = np.arange(96, dtype=np.uint8)[None, :].repeat(64, 0) * 2
    data, _ = encode_image(rgb, "webp", alpha=alpha, lossless=True, quality=5)
    decoded = np.asarray(Image.open(io.BytesIO(data)))
    assert np.array_equal(decoded[..., :3], rgb) and np.array_equal(decoded[..., 3], alpha)
    assert _error(encode_image(rgb, "webp")[0], rgb) > 0  # the default WebP is lossy


@pytest.mark.parametrize("quality", [0, 101])
def test_quality_out_of_range_is_refused(quality):
    with pytest.raises(ValueError, match="quality"):
        encode_image(_photo(8, 8), "jpg", quality=quality)


def test_job_options_carry_quality_and_old_messages_still_validate():
    from pydantic import ValidationError

    from pixelrelay.pipeline.messages import JobOptions

    old = JobOptions.model_validate_json('{"task": "restore", "scale": null, "instruction": "", "format": "jpg"}')
    assert (old.quality, old.lossless) == (92, False)
    assert JobOptions(quality=40, lossless=True).model_dump()["quality"] == 40
    for bad in (0, 101):
        with pytest.raises(ValidationError):
            JobOptions(quality=bad)
