"""Small ICC profiles built byte by byte for colour tests: a grey display profile and a CMYK
printer profile whose conversion is told apart from Pillow's own."""

from __future__ import annotations

import struct

from PIL import Image, ImageCms


def s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def desc(text: str) -> bytes:
    ascii_ = text.encode() + b"\0"
    return b"desc" + bytes(4) + struct.pack(">I", len(ascii_)) + ascii_ + bytes(4 + 4 + 2 + 1 + 67)


def xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ " + bytes(4) + s15(x) + s15(y) + s15(z)


def icc(device_class: bytes, space: bytes, pcs: bytes, tags: dict[bytes, bytes]) -> bytes:
    table, body = [], b""
    offset = 128 + 4 + 12 * len(tags)
    for sig, data in tags.items():
        data += bytes(-len(data) % 4)
        table.append(struct.pack(">4sII", sig, offset + len(body), len(data)))
        body += data
    size = offset + len(body)
    header = (
        struct.pack(">I", size)
        + b"lcms"
        + struct.pack(">I", 0x02100000)
        + device_class
        + space
        + pcs
        + bytes(12)
        + b"acsp"
        + bytes(4 + 4 + 4 + 4 + 8 + 4)
        + s15(0.9642)
        + s15(1.0)
        + s15(0.8249)
    )
    header += bytes(128 - len(header))
    return header + struct.pack(">I", len(tags)) + b"".join(table) + body


def grey_profile(gamma: float = 1.0) -> bytes:
    """A grey display profile with a pure gamma curve (1.0: linear light)."""
    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256))
    return icc(
        b"mntr", b"GRAY", b"XYZ ", {b"desc": desc("test grey"), b"wtpt": xyz(0.9642, 1.0, 0.8249), b"kTRC": curve}
    )


def naive_rgb(c: int, m: int, y: int, k: int) -> tuple[int, int, int]:
    return tuple(round(255 * (1 - v) * (1 - k)) for v in (c, m, y))


def corner_rgb(c: int, m: int, y: int, k: int) -> tuple[int, int, int]:
    """What the test CMYK profile maps a CMYK corner to: the naive conversion with red and
    blue swapped, so a conversion through the profile is told apart from Pillow's own."""
    r, g, b = naive_rgb(c, m, y, k)
    return (b, g, r)


def cmyk_profile() -> bytes:
    """A CMYK printer profile (A2B0: a 2-point lut8 CLUT from CMYK to Lab)."""
    corners = [(c, m, y, k) for c in (0, 1) for m in (0, 1) for y in (0, 1) for k in (0, 1)]
    rgb = Image.new("RGB", (len(corners), 1))
    rgb.putdata([corner_rgb(*corner) for corner in corners])
    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    raw = ImageCms.applyTransform(rgb, to_lab).tobytes()  # L 0..255, a and b as signed bytes
    lab = bytes(v ^ 0x80 if i % 3 else v for i, v in enumerate(raw))  # lut8's Lab: a and b + 128
    identity = bytes(range(256))
    lut = (
        b"mft1"
        + bytes(4)
        + bytes([4, 3, 2, 0])
        + b"".join(s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
        + identity * 4
        + lab
        + identity * 3
    )
    return icc(b"prtr", b"CMYK", b"Lab ", {b"desc": desc("test cmyk"), b"wtpt": xyz(0.9642, 1.0, 0.8249), b"A2B0": lut})
