"""Training test data: small generated image folders and tiny run configs."""

from __future__ import annotations

import numpy as np
from PIL import Image

TINY = {  # per kind: a few steps of a small net, for a run of seconds
    "decoder": {
        "seed": 1,
        "threads": 1,
        "steps": 4,
        "batch": 2,
        "lr": 1e-3,
        "warmup": 1,
        "lr_patch": 12,
        "scale_probs": {"1": 1, "2": 1, "4": 1},
        "p_clean": {"1": 0.2, "2": 0.3, "4": 0.3},
        "cond_jitter": {"noise": 1.0},
        "net": {"channels": 8, "blocks": 1, "hidden": 8},
        "val_crop": 48,
        "log_every": 2,
        "val_every": 2,
    },
    "encoder": {
        "seed": 1,
        "threads": 1,
        "steps": 4,
        "batch": 4,
        "lr": 1e-3,
        "warmup": 1,
        "patch": 16,
        "scale_probs": {"1": 1, "2": 1},
        "p_clean": 0.2,
        "net": {"channels": 8, "hidden": 8},
        "val_samples": 4,
        "log_every": 2,
        "val_every": 2,
    },
}


def write_images(folder, n: int, size: tuple[int, int] = (96, 80), seed: int = 0) -> None:
    """``n`` smooth random-sine PNGs of ``size`` in a new ``folder``."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        yy, xx = np.mgrid[0 : size[1], 0 : size[0]].astype(np.float32)
        f = rng.uniform(3, 12, 3)
        rgb = np.stack([0.5 + 0.4 * np.sin(xx / f[c] + yy / (f[c] + 3)) for c in range(3)], -1)
        Image.fromarray((rgb * 255).astype(np.uint8)).save(folder / f"img_{i:02d}.png")
