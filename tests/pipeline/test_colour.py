"""Colour and metadata of outputs (#11 row 15): ICC profiles, CMYK and grey sources, the EXIF
carried over. No ICC file ships with this system, so the CMYK and grey profiles are built
here, byte by byte (ICC v2: a grey TRC profile and a CMYK -> Lab lut8 printer profile);
littlecms reads them as it reads any profile embedded in a file."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageCms

from pixelrelay.pipeline.imageio import MAX_EXIF_BYTES, MAX_ICC_BYTES, decode_image, encode_image
from tests.iccprofiles import cmyk_profile, corner_rgb, grey_profile

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _saved(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _patches_cmyk() -> Image.Image:
    """Pure cyan, magenta, yellow, black and white patches, 8x8 each."""
    values = [(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255), (0, 0, 0, 0)]
    arr = np.concatenate([np.full((8, 8, 4), v, np.uint8) for v in values], axis=1)
    return Image.fromarray(arr, "CMYK")


# --- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_with_a_cmyk_profile_is_converted_through_it_and_the_profile_is_not_carried(fmt):
    profile = cmyk_profile()
    source = _patches_cmyk()
    data = _saved(source, fmt, icc_profile=profile, **({"quality": 100} if fmt == "JPEG" else {}))
    decoded = decode_image(data)

    assert decoded.icc_profile is None  # never a CMYK profile on an RGB output
    assert any("CMYK input converted to sRGB through its ICC profile" in n for n in decoded.notes)
    as_read = Image.open(io.BytesIO(data))
    expected = ImageCms.profileToProfile(
        as_read,
        ImageCms.ImageCmsProfile(io.BytesIO(profile)),
        ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")),
        outputMode="RGB",
    )
    assert np.abs(decoded.rgb.astype(int) - np.asarray(expected, dtype=int)).max() <= 1
    # Through the profile, not Pillow's naive formula: each patch is the profile's colour.
    for i, cmyk in enumerate([(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (0, 0, 0, 0)]):
        patch = decoded.rgb[:, i * 8 + 2 : i * 8 + 6].reshape(-1, 3).mean(axis=0)
        assert np.abs(patch - corner_rgb(*cmyk)).max() < 12, (cmyk, patch)

    written, _ = encode_image(decoded.rgb, "png", icc_profile=decoded.icc_profile)
    assert Image.open(io.BytesIO(written)).info.get("icc_profile") is None


def test_cmyk_without_a_profile_is_converted_naively():
    decoded = decode_image(_saved(_patches_cmyk(), "TIFF"))
    assert decoded.icc_profile is None and any("CMYK input converted to RGB" in n for n in decoded.notes)
    assert tuple(decoded.rgb[4, 4]) == (0, 255, 255)  # cyan


@pytest.mark.parametrize("mode", ["L", "LA"])
def test_grey_with_a_grey_profile_is_converted_to_srgb_and_the_profile_is_not_carried(mode):
    grey = Image.new(mode, (16, 8), 128 if mode == "L" else (128, 200))
    decoded = decode_image(_saved(grey, "PNG", icc_profile=grey_profile(gamma=1.0)))
    assert decoded.icc_profile is None
    assert any("GRAY input converted to sRGB" in n for n in decoded.notes)
    # 128 in linear light is ~188 in sRGB; a naive grey-to-RGB copy would keep 128.
    assert np.abs(decoded.rgb.astype(int) - 188).max() <= 2
    if mode == "LA":
        assert decoded.alpha is not None and int(decoded.alpha[0, 0]) == 200


def test_a_profile_of_another_colour_space_is_dropped():
    rgb = Image.new("RGB", (8, 8), (10, 120, 230))
    for profile in (cmyk_profile(), grey_profile()):
        decoded = decode_image(_saved(rgb, "PNG", icc_profile=profile))
        assert decoded.icc_profile is None
        assert tuple(decoded.rgb[0, 0]) == (10, 120, 230)  # pixels untouched
        assert any("ICC profile on a RGB image: not carried" in n for n in decoded.notes)
    assert decode_image(_saved(rgb, "PNG", icc_profile=SRGB)).icc_profile == SRGB  # RGB on RGB stays


def test_an_unreadable_or_oversized_profile_is_dropped_with_a_note():
    rgb = Image.new("RGB", (8, 8), (10, 120, 230))
    decoded = decode_image(_saved(rgb, "PNG", icc_profile=b"not an icc profile" * 10))
    assert decoded.icc_profile is None and any("unreadable" in n for n in decoded.notes)
    huge = SRGB + bytes(MAX_ICC_BYTES)  # a valid header with a megabyte of padding
    decoded = decode_image(_saved(rgb, "JPEG", icc_profile=huge))  # JPEG: in many APP2 segments
    assert decoded.icc_profile is None and any("over the" in n and "ICC" in n for n in decoded.notes)


def test_tiff_structural_tags_are_not_carried_into_the_exif():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    data = _saved(
        img, "TIFF", compression="tiff_lzw", tiffinfo={0x010F: "cam-maker", 0x0110: "cam-model", 0x013B: "an artist"}
    )
    assert {0x0111, 0x0117, 0x0116, 0x0100} <= set(Image.open(io.BytesIO(data)).getexif())  # the attack
    decoded = decode_image(data)
    written, _ = encode_image(decoded.rgb, "jpg", exif=decoded.exif)
    exif = Image.open(io.BytesIO(written)).getexif()
    structural = {0x0100, 0x0101, 0x0102, 0x0103, 0x0106, 0x0111, 0x0115, 0x0116, 0x0117, 0x011C}
    assert structural.isdisjoint(exif), sorted(structural & set(exif))
    assert exif[0x010F] == "cam-maker" and exif[0x0110] == "cam-model" and exif[0x013B] == "an artist"


def test_an_oversized_exif_is_dropped_at_decode_so_a_jpeg_output_never_fails_after_the_model():
    # An attacker's PNG whose eXIf chunk is far over what a JPEG APP1 segment holds: before,
    # the item decoded, ran through the model, then failed at write ("EXIF data is too long").
    exif = Image.Exif()
    exif[0x010E] = "x" * (MAX_EXIF_BYTES + 5000)  # ImageDescription
    data = _saved(Image.new("RGB", (16, 16), (1, 2, 3)), "PNG", exif=exif.tobytes())
    decoded = decode_image(data)
    assert decoded.exif is None
    assert any("EXIF of" in n and "not carried" in n for n in decoded.notes)
    written, _ = encode_image(decoded.rgb, "jpg", exif=decoded.exif)
    assert Image.open(io.BytesIO(written)).size == (16, 16)
