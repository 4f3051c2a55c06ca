"""``pixelrelay bench figure --data DIR --out docs/quality-before-after.png``

A before/after figure from DIR's validation part: one row per degradation case (the seeds of
``pixelrelay.training.quality.make_set``), one column per pipeline
(``pixelrelay.training.quality.run_pipeline``), each tile labelled with its Y-channel PSNR
over a fixed, seeded crop.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pixelrelay.exitcodes import ExitCode
from pixelrelay.training import data
from pixelrelay.training import degradations as D
from pixelrelay.training.quality import SEED, _pipelines, make_set, run_pipeline

# (label, degradation as ``bench quality --degradation`` names it, scale)
CASES = (
    ("mild x2", "mild", 2),
    ("realistic x2", "realistic", 2),
    ("clean x2", "bicubic", 2),
    ("clean x4", "bicubic", 4),
)
COLUMNS = ("input (nearest)", "bicubic", "classic", "builtin", "ground truth")
PAD = 4  # pixels between tiles
LABEL_W = 84  # the row label strip on the left
HEAD_H = 16  # the column label strip on top
TEXT_H = 14  # the PSNR line under each tile
FOOT_H = 16  # the note at the bottom
CANDIDATES = 8  # seeded crop windows per image; the one with the most detail is shown


def choose_images(n_files: int, rows: int, seed: int = SEED) -> list[int]:
    """``rows`` distinct file indices (repeating only when there are fewer files), seeded."""
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(n_files))
    while len(order) < rows:
        order += order
    return [int(i) for i in order[:rows]]


def choose_window(gt: np.ndarray, crop: int, scale: int, seed: int) -> tuple[int, int]:
    """(y, x) of a ``crop`` x ``crop`` window of ``gt`` aligned to ``scale``: among a few seeded
    windows, the one whose luma varies most (edges and texture, not sky)."""
    h, w = gt.shape[:2]
    rng = np.random.default_rng(seed)
    y_luma = D.rgb_to_y(gt)
    best, best_var = (0, 0), -1.0
    for _ in range(CANDIDATES):
        y = int(rng.integers(0, max(1, h - crop + 1))) // scale * scale
        x = int(rng.integers(0, max(1, w - crop + 1))) // scale * scale
        var = float(np.var(np.diff(y_luma[y : y + crop, x : x + crop], axis=1)))
        if var > best_var:
            best, best_var = (y, x), var
    return best


def _tile(img: np.ndarray, y: int, x: int, crop: int) -> np.ndarray:
    return np.ascontiguousarray(img[y : y + crop, x : x + crop])


def _nearest(lr: np.ndarray, scale: int) -> np.ndarray:
    return np.repeat(np.repeat(lr, scale, axis=0), scale, axis=1)


def _describe(params, lr: np.ndarray) -> str:
    """The true degradation, short: what the row's input went through."""
    size = f"{lr.shape[1]}x{lr.shape[0]} in"
    if params is None:
        return f"bicubic down\n{size}"
    parts = []
    if params.blur_sigma:
        parts.append(f"blur {params.blur_sigma:.1f}")
    if params.noise_sigma:
        parts.append(f"noise {params.noise_sigma:.0f}")
    if params.jpeg_quality is not None:
        parts.append(f"JPEG q{params.jpeg_quality}")
    return "\n".join(parts + [size])


def build_rows(hrs: list[np.ndarray], pipes, crop: int, rows: int, seed: int = SEED):
    """One dict per case: the tiles (in ``COLUMNS`` order), their PSNR-Y (None for input and
    ground truth) and the labels."""
    out = []
    for r, (label, degradation, scale) in enumerate(CASES[:rows]):
        hr = hrs[r]
        ((gt, lr, params),) = make_set([hr], scale, degradation, seed=seed + r)
        crop_r = min(crop, gt.shape[0], gt.shape[1]) // scale * scale
        bic = D.to_uint8(D.upscale_bicubic(D.to_tensor(lr), scale))
        outs = {"bicubic": np.asarray(bic)}
        plans = {}
        for name in ("classic", "builtin"):
            (o,), _, (plans[name],) = run_pipeline(pipes[name], [lr], scale)
            outs[name] = np.asarray(o)
        ops = ", ".join(op.name for op in plans["builtin"].operations) or "no operation"
        y, x = choose_window(gt, crop_r, scale, seed + 101 * r)
        g = _tile(gt, y, x, crop_r)
        tiles = [_nearest(_tile(lr, y // scale, x // scale, crop_r // scale), scale)]
        psnrs: list[float | None] = [None]
        for name in ("bicubic", "classic", "builtin"):
            t = _tile(outs[name], y, x, crop_r)
            tiles.append(t)
            psnrs.append(D.psnr_y(t, g))
        tiles.append(g)
        psnrs.append(None)
        out.append(
            {
                "label": label,
                "detail": _describe(params, lr),
                "ops": ops,
                "tiles": tiles,
                "psnrs": psnrs,
                "crop": crop_r,
            }
        )
    return out


def render(rows: list[dict]) -> Image.Image:
    """The grid: column labels on top, row labels on the left, PSNR-Y under each output tile."""
    crop = max(r["crop"] for r in rows)
    font = ImageFont.load_default()
    width = LABEL_W + len(COLUMNS) * (crop + PAD) + PAD
    height = HEAD_H + len(rows) * (crop + TEXT_H + PAD) + PAD + FOOT_H
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(COLUMNS):
        draw.text((LABEL_W + PAD + c * (crop + PAD), 2), name, fill="black", font=font)
    for r, row in enumerate(rows):
        top = HEAD_H + r * (crop + TEXT_H + PAD) + PAD
        draw.text((4, top), row["label"], fill="black", font=font)
        draw.multiline_text((4, top + 14), row["detail"], fill=(90, 90, 90), font=font, spacing=2)
        for c, (tile, psnr) in enumerate(zip(row["tiles"], row["psnrs"], strict=True)):
            left = LABEL_W + PAD + c * (crop + PAD)
            canvas.paste(Image.fromarray(tile), (left, top))
            if psnr is not None:
                draw.text((left, top + row["crop"] + 1), f"{psnr:.2f} dB", fill="black", font=font)
            elif c == 0:
                draw.text((left, top + row["crop"] + 1), "degraded", fill=(90, 90, 90), font=font)
    draw.text(
        (4, height - FOOT_H + 2),
        "dB: PSNR on the Y channel (BT.601) over the tile. Validation images, seeded degradations as in bench quality.",
        fill=(90, 90, 90),
        font=font,
    )
    return canvas


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pixelrelay bench figure", description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="the data folder; its validation part is used")
    ap.add_argument("--out", required=True, help="the PNG to write")
    ap.add_argument(
        "--builtin-model",
        default=None,
        metavar="FILE|UPSCALER,RESTORER",
        help="these builtin decoder weights instead of the shipped ones",
    )
    ap.add_argument("--crop", type=int, default=128, help="output pixels per tile side (default 128)")
    ap.add_argument(
        "--rows",
        type=int,
        default=len(CASES),
        choices=range(1, len(CASES) + 1),
        help=f"the first N cases of: {', '.join(c[0] for c in CASES)}",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = data.split_or_explain(args.data, "pixelrelay bench figure")
    if parts is None:
        return ExitCode.USAGE
    val_files = parts[1]
    if not val_files:
        print(
            f"pixelrelay bench figure: no validation images in {args.data} "
            "(every fifth file of a folder is validation)",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    picks = choose_images(len(val_files), args.rows)
    hrs = data.load_images([val_files[i] for i in picks])
    rows = build_rows(hrs, _pipelines(args.device, args.builtin_model), args.crop, args.rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    render(rows).save(out, optimize=True)
    for row, i in zip(rows, picks, strict=True):
        scores = ", ".join(f"{name} {p:.2f}" for name, p in zip(COLUMNS, row["psnrs"], strict=True) if p is not None)
        print(
            f"{row['label']:13s} {val_files[i].parent.name}/{val_files[i].name}: PSNR-Y {scores} dB; "
            f"builtin plan: {row['ops']}"
        )
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
