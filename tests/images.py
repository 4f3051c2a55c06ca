"""Generated test images, good and bad (no third-party images)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def photo_like(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 90 * np.sin(x / (5 + seed % 7)), 128 + 90 * np.cos(y / 9.0), 255 * x / max(1, w - 1)], -1)
    base += rng.normal(0, 3, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def good_images(n: int) -> dict[str, bytes]:
    """n images of varied sizes and formats, keyed by relative path."""
    out = {}
    for i in range(n):
        w, h = 24 + (i * 7) % 40, 20 + (i * 5) % 36
        fmt, ext = [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")][i % 3]
        sub = "nested/" if i % 4 == 0 else ""
        out[f"{sub}img{i:03d}.{ext}"] = encode(photo_like(w, h, i), fmt, **({"quality": 90} if ext != "png" else {}))
    return out


def bad_and_odd_images() -> tuple[dict[str, bytes], dict[str, str]]:
    """(files, expected failure reason fragment per failing file). Files not in the second
    dict must succeed."""
    files: dict[str, bytes] = {}
    good = encode(photo_like(40, 30, 1), "PNG")
    files["truncated.png"] = encode(
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG"
    )[:2000]
    files["zero.jpg"] = b""
    files["notes.png"] = b"these are meeting notes, not a picture\n" * 20
    files["bomb.png"] = encode(Image.new("L", (3000, 3000)), "PNG")  # 9 Mpx > the test limit
    cmyk = Image.new("CMYK", (20, 16), (0, 200, 200, 10))
    files["cmyk.jpg"] = encode(cmyk, "JPEG")
    files["deep16.png"] = encode(Image.fromarray((np.arange(30 * 20).reshape(20, 30) * 100).astype(np.uint16)), "PNG")
    pal = photo_like(24, 18, 3).convert("P", palette=Image.ADAPTIVE, colors=16)
    files["palette.png"] = encode(pal, "PNG")
    rgba = photo_like(30, 22, 4).convert("RGBA")
    alpha = np.zeros((22, 30), np.uint8)
    alpha[:, 15:] = 255
    rgba.putalpha(Image.fromarray(alpha))
    files["alpha.png"] = encode(rgba, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    files["rotated.jpg"] = encode(photo_like(40, 20, 5), "JPEG", exif=exif.tobytes(), quality=92)
    frames = [Image.new("RGB", (16, 16), c) for c in ((250, 10, 10), (10, 10, 250))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    files["animated.gif"] = buf.getvalue()
    files["tiny.png"] = encode(Image.new("RGB", (2, 1), (10, 200, 30)), "PNG")
    files["good.png"] = good
    expected_failures = {
        "truncated.png": "corrupt",
        "zero.jpg": "empty file",
        "notes.png": "not a recognised image format",
        "bomb.png": "decompression bomb",
    }
    return files, expected_failures


def smooth_field(height: int, width: int, period: float = 20.0) -> np.ndarray:
    """Slowly varying colour fields: no edges, no noise, mid-range values (no clipping)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    red = 128 + 50 * np.sin(xx / period) * np.cos(yy / (1.25 * period))
    green = 120 + 40 * np.cos(xx / (1.5 * period) + yy / (2.0 * period))
    blue = 110 + 30 * np.sin((xx - yy) / (1.75 * period))
    return np.clip(np.stack([red, green, blue], -1), 0, 255).round().astype(np.uint8)


def clean_photo(height: int, width: int, period: float = 20.0) -> np.ndarray:
    """A clean synthetic 'photo': smooth_field with sharp-edged shapes placed by size."""
    from PIL import ImageDraw

    image = Image.fromarray(smooth_field(height, width, period))
    draw = ImageDraw.Draw(image)

    def box(x0, y0, x1, y1):
        return [int(x0 * width), int(y0 * height), int(x1 * width), int(y1 * height)]

    draw.rectangle(box(0.10, 0.19, 0.45, 0.62), fill=(220, 40, 40))
    draw.ellipse(box(0.55, 0.12, 0.90, 0.56), fill=(30, 60, 200))
    draw.rectangle(box(0.30, 0.69, 0.85, 0.87), fill=(240, 240, 80))
    return np.asarray(image)


def add_noise(image: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(image + rng.normal(0.0, sigma, image.shape), 0, 255).round().astype(np.uint8)


def scene(size: int = 128) -> np.ndarray:
    """A fixed synthetic photo-like scene: gradient sky, hard-edged shapes, stripes, texture."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.stack([0.3 + 0.4 * yy, 0.5 + 0.2 * xx, 0.8 - 0.3 * yy], -1)
    disc = (xx - 0.3) ** 2 + (yy - 0.35) ** 2 < 0.04
    img[disc] = [0.9, 0.25, 0.2]
    box = (xx > 0.55) & (xx < 0.9) & (yy > 0.2) & (yy < 0.5)
    img[box] = [0.15, 0.2, 0.3]
    stripes = (yy > 0.6) & (np.sin(xx * size / 3.0) > 0)
    img[stripes] = [0.95, 0.95, 0.85]
    ring = np.abs(np.hypot(xx - 0.7, yy - 0.8) - 0.12) < 0.02
    img[ring] = [0.1, 0.6, 0.1]
    rng = np.random.default_rng(0)
    tex = rng.normal(0, 1, (size // 4, size // 4))
    tex = np.kron(tex, np.ones((4, 4)))
    img = img + 0.03 * tex[..., None] * (yy < 0.6)[..., None]
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
