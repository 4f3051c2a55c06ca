"""Generated sample input for ``pixelrelay demo``: synthetic scenes with known degradations
(noise, JPEG, blur, low resolution), a few formats and one image with alpha. No third-party
images are shipped."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def synthetic_scene(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth gradient sky, a horizon, shapes with hard edges and some fine texture."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (y / max(1, height - 1))[..., None]
    img = (top * (1 - t) + bottom * t).astype(np.float32)
    img += 12 * np.sin(x / rng.uniform(3, 9))[..., None] * (y > height * 0.6)[..., None]  # texture
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(pil)
    for _ in range(rng.integers(3, 8)):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(8, width // 2 + 9)), y0 + int(rng.integers(8, height // 2 + 9))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        else:
            draw.rectangle([x0, y0, x1, y1], fill=colour, outline=(0, 0, 0))
    for i in range(0, width, max(4, width // 16)):
        draw.line([i, 0, i + height // 3, height // 3], fill=(255, 255, 255), width=1)
    return pil


def degrade(img: Image.Image, rng: np.random.Generator, kind: str) -> Image.Image:
    if kind == "noise":
        arr = np.asarray(img).astype(np.float32) + rng.normal(0, rng.uniform(8, 25), (img.height, img.width, 3))
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 2.0)))
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(8, 30)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "lowres":
        return img.resize((img.width // 2, img.height // 2), Image.Resampling.BICUBIC)
    return img


def write_demo_images(folder: str, count: int = 24, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    kinds = ["clean", "noise", "blur", "jpeg", "lowres"]
    paths = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        img = degrade(synthetic_scene(rng, int(rng.integers(96, 257)), int(rng.integers(96, 257))), rng, kind)
        if i == count - 1:  # one image with transparency
            alpha = Image.new("L", img.size, 0)
            ImageDraw.Draw(alpha).ellipse([0, 0, img.width - 1, img.height - 1], fill=255)
            img = img.convert("RGBA")
            img.putalpha(alpha)
            path = os.path.join(folder, f"{i:03d}-{kind}-alpha.png")
            img.save(path)
        else:
            ext = {"jpeg": "jpg"}.get(kind, ["png", "webp", "jpg"][i % 3])
            path = os.path.join(folder, f"{i:03d}-{kind}.{ext}")
            img.save(path, quality=95) if ext != "png" else img.save(path)
        paths.append(path)
    return paths
