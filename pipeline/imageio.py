"""Safe image decode and encode.

``decode_image`` turns untrusted bytes into an upright 8-bit RGB array (+ alpha) or raises
``ImageDecodeError``, never returning a half-decoded image. ``max_pixels`` and
``max_output_pixels`` are checked from the header, before any pixel is decoded (Pillow's
own guard is only ever raised to ours). ``encode_image`` writes RGB(A) with the source's RGB
ICC profile and its EXIF less orientation and TIFF structural tags; an oversized profile or
EXIF is left out with a note, so that an item never fails at write time.
"""

from __future__ import annotations

import io
import struct
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from pixelrelay.pipeline.constants import DEFAULT_MAX_IMAGE_PIXELS
from pixelrelay.pipeline.messages import DEFAULT_QUALITY, OutputFormat

EXIF_ORIENTATION_TAG = 0x0112
# Formats we write, by output format name -> Pillow format, file extension.
OUTPUT_FORMATS = {"png": ("PNG", ".png"), "jpg": ("JPEG", ".jpg"), "webp": ("WEBP", ".webp")}
CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
# Input format (Pillow name) -> the output format that keeps it, when the job names none.
_KEEP_FORMAT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "MPO": "jpg"}

try:  # HEIC/HEIF inputs, through the optional `heic` extra (pillow-heif)
    from pillow_heif import register_heif_opener
except ImportError:
    HEIF_READABLE = False
else:
    register_heif_opener()
    HEIF_READABLE = True

# We do our own pixel-limit check (configurable per call). Pillow's global limit is a
# second line of defence for what our check cannot see (nested images); ``_allow_pillow``
# raises it to the largest limit any call asked for, so it never fires before ours.
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_IMAGE_PIXELS
_PILLOW_LIMIT_LOCK = threading.Lock()

MAX_ICC_BYTES = 1 << 20  # an ICC profile carried to the output, at most
MAX_EXIF_BYTES = 65_533  # a carried EXIF, at most: what one JPEG APP1 segment holds
_GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_EXIF_IFD = 0x8769
# TIFF tags that describe the source file's layout, not the picture: never carried.
TIFF_STRUCTURAL_TAGS = frozenset(
    {
        0x00FE,
        0x00FF,  # NewSubfileType, SubfileType
        0x0100,
        0x0101,
        0x0102,
        0x0103,  # ImageWidth, ImageLength, BitsPerSample, Compression
        0x0106,
        0x0107,
        0x0108,
        0x0109,
        0x010A,  # Photometric, Threshholding, CellWidth/Length, FillOrder
        0x0111,
        0x0115,
        0x0116,
        0x0117,
        0x0118,
        0x0119,  # StripOffsets, SamplesPerPixel, RowsPerStrip,
        # StripByteCounts, Min/MaxSampleValue
        0x011C,
        0x0120,
        0x0121,
        0x0122,
        0x0123,
        0x0124,
        0x0125,  # PlanarConfiguration, FreeOffsets,
        # FreeByteCounts, GrayResponseUnit/Curve, T4/T6Options
        0x013D,
        0x0140,
        0x0142,
        0x0143,
        0x0144,
        0x0145,  # Predictor, ColorMap, TileWidth/Length/Offsets/ByteCounts
        0x014A,
        0x014C,
        0x0152,
        0x0153,
        0x0154,
        0x0155,
        0x0156,  # SubIFDs, InkSet, ExtraSamples,
        # SampleFormat, SMin/SMaxSampleValue, TransferRange
        0x015B,  # JPEGTables
        0x0200,
        0x0201,
        0x0202,
        0x0203,
        0x0205,
        0x0206,
        0x0207,
        0x0208,
        0x0209,  # old-style JPEG
        0x0211,
        0x0212,
        0x0213,  # YCbCrCoefficients, YCbCrSubSampling, YCbCrPositioning
        0x8773,  # InterColorProfile: the ICC profile is handled on its own
        0x9354,  # ImageSourceData (Photoshop layers)
    }
)
_EXIF_PIXEL_DIMENSIONS = (0xA002, 0xA003)  # PixelXDimension, PixelYDimension (Exif IFD)


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; the message is the per-item reason."""


@dataclass
class DecodedImage:
    rgb: np.ndarray  # HxWx3 uint8, upright
    alpha: np.ndarray | None = None  # HxW uint8, or None when the source has no alpha
    source_format: str = ""  # Pillow format name, e.g. "PNG", "JPEG"
    source_mode: str = ""
    icc_profile: bytes | None = None
    exif: bytes | None = None  # EXIF without the orientation tag
    notes: list[str] = field(default_factory=list)

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    def default_output_format(self) -> str:
        return _KEEP_FORMAT.get(self.source_format, "png")


def _to_8bit(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    # Integer modes (I;16, I): Pillow stores 16-bit data; anything wider is clipped.
    return (np.clip(arr.astype(np.float64), 0, 65535) / 257.0 + 0.5).astype(np.uint8)


def _split_channels(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    notes: list[str] = []
    mode = img.mode
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in img.info)
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        gray = _to_8bit(np.asarray(img))
        notes.append(f"{mode} high-bit-depth input reduced to 8 bits")
        return np.repeat(gray[..., None], 3, axis=2), None, notes
    if mode == "CMYK":
        notes.append("CMYK input converted to RGB")
    if has_alpha:
        rgba = np.asarray(img.convert("RGBA"))
        return np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3]), notes
    return np.asarray(img.convert("RGB")), None, notes


def _allow_pillow(max_pixels: int) -> None:
    """Raise Pillow's global guard to ``max_pixels`` (never lower it: other threads may
    decode under a larger limit), so that our own check is the one that decides."""
    with _PILLOW_LIMIT_LOCK:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and max_pixels > current:
            Image.MAX_IMAGE_PIXELS = max_pixels


OutputScale = int | Callable[[int, int], tuple[int, int]]  # x scale, or (w, h) -> output (w, h)


def output_size(width: int, height: int, scale: OutputScale = 1) -> tuple[int, int]:
    """The output (width, height) of a ``width`` x ``height`` source at ``scale``."""
    if callable(scale):
        return scale(width, height)
    return width * scale, height * scale


def check_size(width: int, height: int, max_pixels: int, scale: OutputScale = 1, max_output_pixels: int = 0) -> None:
    """Check a source's size, and its output's, against their limits.

    Args:
        width: the source's width.
        height: the source's height.
        max_pixels: the source's limit (0: none).
        scale: the output scale, or a function of the source's size giving the output's.
        max_output_pixels: the output's limit (0: none).

    Raises:
        ImageDecodeError: a size is over its limit.
    """
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"invalid dimensions {width}x{height}")
    if max_pixels and width * height > max_pixels:
        raise ImageDecodeError(
            f"decompression bomb guard: {width}x{height} = {width * height} pixels "
            f"exceeds the limit of {max_pixels} (PIXELRELAY_MAX_IMAGE_PIXELS)"
        )
    out_w, out_h = output_size(width, height, scale)
    out = out_w * out_h
    if max_output_pixels and out > max_output_pixels:
        at = "" if callable(scale) else f" at x{scale}"
        raise ImageDecodeError(
            f"output too large: {width}x{height}{at} is {out_w}x{out_h} = "
            f"{out} pixels, over the limit of {max_output_pixels} (PIXELRELAY_MAX_OUTPUT_PIXELS)"
        )


def probe_size(data: bytes) -> tuple[int, int] | None:
    """A source's (width, height) from its header, without decoding it; None when the
    header is unreadable (``decode_image`` then says why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return img.size
    except Exception:  # noqa: BLE001 - any failure is reported by decode_image
        return None


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    *,
    scale: OutputScale = 1,
    max_output_pixels: int = 0,
) -> DecodedImage:
    """Decode untrusted bytes into an upright 8-bit RGB image (+ alpha).

    Args:
        data: the file's bytes.
        max_pixels: the source's limit, checked from the header before the decode.
        scale: the output scale, or a function of the source's size giving the output's.
        max_output_pixels: the output's limit (0: none), checked from the header too.

    Returns:
        The decoded image, its ICC profile and EXIF, and any notes.

    Raises:
        ImageDecodeError: with a short reason, on any problem (truncated, not an image, empty,
            a bomb, a size over its limit).
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            _allow_pillow(max_pixels)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            check_size(width, height, max_pixels, scale, max_output_pixels)
            notes: list[str] = []
            n_frames = getattr(img, "n_frames", 1)
            if n_frames > 1:
                img.seek(0)
                notes.append(f"animated image with {n_frames} frames: used the first frame only")
            source_format = img.format or ""
            source_mode = img.mode
            icc = img.info.get("icc_profile") or None
            img.load()  # forces a full decode: truncated data raises here
            if img.size != (width, height):  # formats whose size is settled by the decode
                check_size(*img.size, max_pixels, scale, max_output_pixels)
            exif = img.getexif()
            upright = ImageOps.exif_transpose(img)
            if upright is None:  # older Pillow returns None for in-place
                upright = img
            orientation = exif.get(EXIF_ORIENTATION_TAG)
            if orientation and orientation != 1:
                notes.append(f"EXIF orientation {orientation} applied")
            exif_bytes = _carried_exif(exif, notes)
            upright, icc = _to_output_colour(upright, icc, notes)
            rgb, alpha, mode_notes = _split_channels(upright)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"decompression bomb guard: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason.lower():
            reason = f"truncated or corrupt image data ({reason})"
        raise ImageDecodeError(f"corrupt image: {reason}") from None
    except MemoryError:
        raise ImageDecodeError("image too large to decode in memory") from None
    return DecodedImage(
        rgb=np.ascontiguousarray(rgb),
        alpha=alpha,
        source_format=source_format,
        source_mode=source_mode,
        icc_profile=icc,
        exif=exif_bytes,
        notes=notes + mode_notes,
    )


def _carried_exif(exif: Image.Exif, notes: list[str]) -> bytes | None:
    """The EXIF to carry to the output: no orientation, no TIFF structural tags, no pixel
    dimensions; None when nothing is left, or (with a note) when it is over
    ``MAX_EXIF_BYTES`` or cannot be written back."""
    if not len(exif):
        return None
    for tag in (EXIF_ORIENTATION_TAG, *TIFF_STRUCTURAL_TAGS):
        exif.pop(tag, None)
    try:
        if _EXIF_IFD in exif:
            sub = exif.get_ifd(_EXIF_IFD)
            for tag in _EXIF_PIXEL_DIMENSIONS:
                sub.pop(tag, None)
        if not len(exif):
            return None
        data = exif.tobytes()
    except (ValueError, TypeError, KeyError, OSError, struct.error) as exc:
        notes.append(f"EXIF unreadable ({str(exc) or type(exc).__name__}): not carried")
        return None
    if len(data) > MAX_EXIF_BYTES:
        notes.append(f"EXIF of {len(data)} bytes is over the {MAX_EXIF_BYTES}-byte limit: not carried")
        return None
    return data


def _icc_space(icc: bytes) -> str | None:
    """The colour space an ICC profile describes ("RGB", "CMYK", "GRAY"...), None if unreadable."""
    try:
        return ImageCms.ImageCmsProfile(io.BytesIO(icc)).profile.xcolor_space.strip() or None
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError, AttributeError):
        return None


def _to_srgb(img: Image.Image, icc: bytes) -> Image.Image:
    """``img`` converted from the ICC profile ``icc`` to sRGB, as a new RGB image."""
    out = ImageCms.profileToProfile(img, ImageCms.ImageCmsProfile(io.BytesIO(icc)), _srgb(), outputMode="RGB")
    assert out is not None  # None only for an in-place conversion
    return out


def _grey_to_rgb(img: Image.Image, profile: bytes, notes: list[str]) -> Image.Image:
    """A grey image (any grey mode, alpha kept) converted to sRGB through its grey profile."""
    alpha = None
    if img.mode in ("LA", "La") or "transparency" in img.info:
        alpha = img.convert("LA").getchannel("A")
    if img.mode in _HIGH_BIT_MODES:
        grey = Image.fromarray(_to_8bit(np.asarray(img)), "L")
        notes.append(f"{img.mode} high-bit-depth input reduced to 8 bits")
    else:
        grey = img.convert("L")
    rgb = _to_srgb(grey, profile)
    if alpha is not None:
        rgb.putalpha(alpha)
    return rgb


def _to_output_colour(img: Image.Image, icc: bytes | None, notes: list[str]) -> tuple[Image.Image, bytes | None]:
    """The image and the ICC profile to carry for an RGB output: an RGB profile is carried; a
    CMYK or grey source with a profile of its own space is converted to sRGB through it (no
    profile carried then); a mismatching or unreadable profile is dropped with a note."""
    if not icc:
        return img, None
    if len(icc) > MAX_ICC_BYTES:
        notes.append(f"ICC profile of {len(icc)} bytes is over the {MAX_ICC_BYTES}-byte limit: not carried")
        return img, None
    space = _icc_space(icc)
    family = "CMYK" if img.mode == "CMYK" else "GRAY" if img.mode in _GREY_MODES else "RGB"
    if space is None:
        notes.append("ICC profile unreadable: not carried")
        return img, None
    if space != family:
        notes.append(f"{space} ICC profile on a {img.mode} image: not carried")
        return img, None
    if family == "RGB":
        return img, icc
    try:
        if family == "CMYK":
            converted = _to_srgb(img, icc)
        else:
            converted = _grey_to_rgb(img, icc, notes)
    except (ImageCms.PyCMSError, OSError, ValueError) as exc:
        notes.append(f"{space} ICC profile unusable ({exc}): converted without it, not carried")
        return img, None
    notes.append(f"{space} input converted to sRGB through its ICC profile (not carried)")
    return converted, None


def _srgb() -> ImageCms.ImageCmsProfile:
    # A new one per use: littlecms profile handles are not shared between threads.
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def output_extension(fmt: str) -> str:
    return OUTPUT_FORMATS[fmt][1]


_KEPT_FORMATS: dict[str, OutputFormat] = {"jpg": "jpg", "jpeg": "jpg", "webp": "webp"}


def format_for_extension(ext: str) -> OutputFormat:
    """The output format that keeps an input's extension (png for ones we don't write)."""
    return _KEPT_FORMATS.get(ext.lower().lstrip("."), "png")


def format_for_uri(uri: str) -> OutputFormat:
    """The format of an output URI, from its extension."""
    name = uri.rsplit("/", 1)[-1]
    return format_for_extension(name.rpartition(".")[2] if "." in name else "png")


def content_type(fmt: str) -> str:
    """The MIME type of an output format (``png`` -> ``image/png``)."""
    return CONTENT_TYPES[fmt]


def encode_image(
    rgb: np.ndarray,
    fmt: str,
    alpha: np.ndarray | None = None,
    icc_profile: bytes | None = None,
    exif: bytes | None = None,
    quality: int = DEFAULT_QUALITY,
    lossless: bool = False,
) -> tuple[bytes, list[str]]:
    """Encode an image, carrying its ICC profile and EXIF where the format can.

    Args:
        rgb: HxWx3 uint8 pixels.
        fmt: png, jpg or webp.
        alpha: HxW uint8 alpha, or None (JPEG drops it, with a note).
        icc_profile: the ICC profile to carry, or None.
        exif: the EXIF to carry (orientation reset), or None.
        quality: 1..100, for JPEG and for WebP unless ``lossless``.
        lossless: lossless WebP.

    Returns:
        The encoded bytes and the notes (e.g. alpha dropped, EXIF too large).
    """
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"unsupported output format {fmt!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be 1..100, got {quality}")
    pil_format, _ = OUTPUT_FORMATS[fmt]
    notes: list[str] = []
    if alpha is not None and pil_format == "JPEG":
        notes.append("JPEG output cannot hold alpha: alpha dropped")
        alpha = None
    if alpha is not None:
        img = Image.fromarray(np.dstack([rgb, alpha]).astype(np.uint8), "RGBA")
    else:
        img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB")
    kwargs: dict = {}
    if icc_profile:
        kwargs["icc_profile"] = icc_profile
    if exif:
        kwargs["exif"] = exif
    if pil_format == "JPEG":
        kwargs.update(quality=quality, subsampling=0 if quality >= 90 else 2)
    elif pil_format == "WEBP":
        # Lossless keeps even the colour under fully transparent pixels (``exact``).
        kwargs.update({"lossless": True, "exact": True} if lossless else {"quality": quality})
    elif pil_format == "PNG":
        kwargs.update(compress_level=4)
    buf = io.BytesIO()
    img.save(buf, format=pil_format, **kwargs)
    return buf.getvalue(), notes
