"""Safe image decode and encode.

``decode_image`` turns untrusted bytes into an upright 8-bit RGB array (+ alpha), or raises
``ImageDecodeError`` with a one-line reason. It never returns a half-decoded image:
truncated files, non-images, empty files and decompression bombs are all errors.
``encode_image`` writes RGB(+alpha) back out, carrying the ICC profile and EXIF
(less orientation, since the pixels are already upright). JPEG and WebP are lossy at
``quality`` (1..100); WebP is lossless, pixel for pixel, with ``lossless=True``; PNG is
always lossless.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pixelrelay.pipeline.constants import DEFAULT_MAX_IMAGE_PIXELS
from pixelrelay.pipeline.messages import DEFAULT_QUALITY

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

# We do our own pixel-limit check (configurable per call); Pillow's global limit stays as a
# second line of defence at twice the default, as Pillow itself does.
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_IMAGE_PIXELS


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
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in img.info
    )
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


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> DecodedImage:
    """Decode untrusted bytes. Raises ImageDecodeError with a short reason on any problem."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ImageDecodeError(f"invalid dimensions {width}x{height}")
            if max_pixels and width * height > max_pixels:
                raise ImageDecodeError(
                    f"decompression bomb guard: {width}x{height} = {width * height} pixels "
                    f"exceeds the limit of {max_pixels} (PIXELRELAY_MAX_IMAGE_PIXELS)"
                )
            notes: list[str] = []
            n_frames = getattr(img, "n_frames", 1)
            if n_frames > 1:
                img.seek(0)
                notes.append(f"animated image with {n_frames} frames: used the first frame only")
            source_format = img.format or ""
            icc = img.info.get("icc_profile") or None
            img.load()  # forces a full decode: truncated data raises here
            exif = img.getexif()
            upright = ImageOps.exif_transpose(img)
            if upright is None:  # older Pillow returns None for in-place
                upright = img
            orientation = exif.get(EXIF_ORIENTATION_TAG)
            if orientation and orientation != 1:
                notes.append(f"EXIF orientation {orientation} applied")
            exif_bytes = None
            if len(exif):
                exif.pop(EXIF_ORIENTATION_TAG, None)
                exif_bytes = exif.tobytes() if len(exif) else None
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
        source_mode=img.mode,
        icc_profile=icc,
        exif=exif_bytes,
        notes=notes + mode_notes,
    )


def output_extension(fmt: str) -> str:
    return OUTPUT_FORMATS[fmt][1]


def format_for_extension(ext: str) -> str:
    """The output format that keeps an input's extension (png for ones we don't write)."""
    ext = ext.lower().lstrip(".")
    return {"jpg": "jpg", "jpeg": "jpg", "webp": "webp"}.get(ext, "png")


def format_for_uri(uri: str) -> str:
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
    """Encode to ``fmt`` (png|jpg|webp). Returns the bytes and any notes (e.g. alpha dropped).

    ``quality`` (1..100) applies to JPEG and to WebP unless ``lossless``."""
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
