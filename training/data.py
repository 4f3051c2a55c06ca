"""Training data: image listing, the fixed train/validation split, loading.

The split is fixed: in each folder, files are sorted by name and every fifth one (indices
4, 9, 14, ...) is validation. Training never sees a validation file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pixelrelay.pipeline.constants import INPUT_EXTENSIONS

VAL_EVERY = 5


def list_folders(data_dir: str | Path) -> dict[str, list[Path]]:
    """Folder name -> sorted image files. Images directly in ``data_dir`` count as folder ""."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no data folder {root}")
    out: dict[str, list[Path]] = {}
    for folder in [root] + sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in INPUT_EXTENSIONS)
        if files:
            out["" if folder == root else folder.name] = files
    if not out:
        raise FileNotFoundError(f"no images under {root}")
    return out


def split(data_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """(train, val) file lists: every fifth file in sorted order of each folder is validation."""
    train: list[Path] = []
    val: list[Path] = []
    for files in list_folders(data_dir).values():
        for i, f in enumerate(files):
            (val if i % VAL_EVERY == VAL_EVERY - 1 else train).append(f)
    return train, val


def split_or_explain(data_dir: str | Path, prog: str) -> tuple[list[Path], list[Path]] | None:
    """``split(data_dir)``, or None after telling the user why not (on stderr, as ``prog``)."""
    try:
        return split(data_dir)
    except FileNotFoundError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None


def load_rgb(path: str | Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).copy()


def load_images(paths: list[Path]) -> list[np.ndarray]:
    return [load_rgb(p) for p in paths]


def random_crop(img: np.ndarray, size: int, rng: np.random.Generator, augment: bool = True) -> np.ndarray:
    """A random size x size crop (images smaller than that are reflect-padded), with random
    flips/rotations when ``augment``."""
    h, w = img.shape[:2]
    if h < size or w < size:
        img = np.pad(img, ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0)), mode="reflect")
        h, w = img.shape[:2]
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    crop = img[y : y + size, x : x + size]
    if augment:
        k = int(rng.integers(4))
        crop = np.rot90(crop, k)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    size = min(size, h, w)
    y, x = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(img[y : y + size, x : x + size])
