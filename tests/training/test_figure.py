"""`pixelrelay bench figure`: the before/after PNG, made on a tiny generated data folder with the
shipped weights, through the CLI's dispatch (in process, one torch thread)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pixelrelay.exitcodes import ExitCode
from pixelrelay.producer import cli
from pixelrelay.training import data
from pixelrelay.training import figure as F
from tests.training.helpers import write_images

CROP = 32


def _tile(png: np.ndarray, row: int, col: int, crop: int = CROP) -> np.ndarray:
    top = F.HEAD_H + row * (crop + F.TEXT_H + F.PAD) + F.PAD
    left = F.LABEL_W + F.PAD + col * (crop + F.PAD)
    return png[top : top + crop, left : left + crop]


def _found_in(tile: np.ndarray, images: list[np.ndarray]) -> bool:
    h, w = tile.shape[:2]
    for img in images:
        for y in range(img.shape[0] - h + 1):
            for x in range(img.shape[1] - w + 1):
                if np.array_equal(img[y : y + h, x : x + w], tile):
                    return True
    return False


def test_figure_grid_from_the_validation_part(tmp_path):
    root = tmp_path / "data"
    write_images(root / "set", 10, size=(96, 80))  # files 4 and 9 are the validation part
    train_files, val_files = data.split(root)
    out = tmp_path / "docs" / "fig.png"
    rc = cli.main(["bench", "figure", "--data", str(root), "--out", str(out), "--crop", str(CROP), "--threads", "1"])
    assert rc == ExitCode.OK and out.is_file()
    png = np.asarray(Image.open(out).convert("RGB"))
    rows = len(F.CASES)
    assert png.shape[:2] == (
        F.HEAD_H + rows * (CROP + F.TEXT_H + F.PAD) + F.PAD + F.FOOT_H,
        F.LABEL_W + len(F.COLUMNS) * (CROP + F.PAD) + F.PAD,
    )
    val, train = data.load_images(val_files), data.load_images(train_files)
    gt_col, in_col = F.COLUMNS.index("ground truth"), F.COLUMNS.index("input (nearest)")
    bic_col, classic_col, builtin_col = (F.COLUMNS.index(c) for c in ("bicubic", "classic", "builtin"))
    for row, (label, _, scale) in enumerate(F.CASES):
        gt = _tile(png, row, gt_col)
        assert _found_in(gt, val), f"{label}: the ground truth is not a crop of a validation image"
        assert not _found_in(gt, train), f"{label}: the ground truth is a crop of a training image"
        inp = _tile(png, row, in_col).astype(int)
        blocks = inp.reshape(CROP // scale, scale, CROP // scale, scale, 3)
        assert (blocks == blocks[:, :1, :, :1]).all(), f"{label}: the input is not enlarged nearest-neighbour"
        assert not np.array_equal(inp, _tile(png, row, bic_col)), label
        bic, builtin = _tile(png, row, bic_col), _tile(png, row, builtin_col)
        assert not np.array_equal(builtin, bic), f"{label}: the builtin tile is bicubic"
        assert not np.array_equal(builtin, gt), f"{label}: the builtin tile is the ground truth"
        assert not np.array_equal(_tile(png, row, classic_col), gt), label
        # a PSNR line starts under each output tile (dark text on white)
        text = png[_tile_bottom(row) : _tile_bottom(row) + F.TEXT_H]
        for col in (bic_col, classic_col, builtin_col):
            left = F.LABEL_W + F.PAD + col * (CROP + F.PAD)
            assert (text[:, left : left + 8] < 128).any(), (label, F.COLUMNS[col])


def _tile_bottom(row: int, crop: int = CROP) -> int:
    return F.HEAD_H + row * (crop + F.TEXT_H + F.PAD) + F.PAD + crop


def test_figure_without_validation_images_is_a_usage_error(tmp_path):
    write_images(tmp_path / "set", 3)  # fewer than five files: no validation part
    rc = F.main(["--data", str(tmp_path), "--out", str(tmp_path / "fig.png")])
    assert rc == ExitCode.USAGE and not (tmp_path / "fig.png").exists()
