"""Cost of the builtin encoder per image, on one thread: the current code against the code
at a git ref (``--old-ref``, loaded from git), side by side, with a breakdown by part.

    python benchmarks/bench_encoder.py [--sizes 256,512,1024] [--repeat 7] [--old-ref ae8ba15]

Inputs are generated (tests/images.py's clean_photo): clean, noisy (sigma 10) and
JPEG-damaged (quality 50, decoded and saved as PNG, so nothing but the pixels says JPEG).
Every (size, input, version) is timed once per round and the rounds interleave; the table
gives medians in ms per image of ``describe`` (analysis + CNN + table fit) and of each part.
Skip the old column with --old-ref ''. The default clock is the thread's CPU time (with one
torch thread all the work runs on the calling thread), which a shared machine inflates less
than wall time (--clock wall); figures are still noisy there: read ratios from one run.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import time
import types
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pixelrelay.pipeline.imageio import DecodedImage, decode_image  # noqa: E402
from pixelrelay.pipeline.stages.encoders import analysis, builtin  # noqa: E402
from tests.images import add_noise, clean_photo  # noqa: E402

ANALYSIS_MOD = "pixelrelay.pipeline.stages.encoders.analysis"


def _module_from_git(ref: str, path: str, name: str, replace: dict[str, str]) -> types.ModuleType:
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{ref}:{path}"], check=True, capture_output=True, text=True
    ).stdout
    for old, new in replace.items():
        source = source.replace(old, new)
    module = types.ModuleType(name)
    module.__file__ = str(ROOT / path)  # the old code finds its weights next to the new
    sys.modules[name] = module
    exec(compile(source, f"{ref}:{path}", "exec"), module.__dict__)
    return module


def load_old(ref: str) -> tuple[types.ModuleType, types.ModuleType]:
    """The encoder and analysis modules as they were at ``ref``, wired to each other."""
    old_analysis = _module_from_git(ref, "pipeline/stages/encoders/analysis.py", "old_analysis", {})
    old_builtin = _module_from_git(
        ref, "pipeline/stages/encoders/builtin.py", "old_builtin", {ANALYSIS_MOD: "old_analysis"}
    )
    return old_builtin, old_analysis


def inputs(size: int) -> dict[str, DecodedImage]:
    clean = clean_photo(size, size)
    buf = io.BytesIO()
    Image.fromarray(clean).save(buf, "JPEG", quality=50)
    jpeg_pixels = decode_image(buf.getvalue()).rgb
    png = io.BytesIO()
    Image.fromarray(jpeg_pixels).save(png, "PNG")
    return {
        "clean": DecodedImage(rgb=clean),
        "noisy": DecodedImage(rgb=add_noise(clean, 10.0)),
        "jpeg-as-png": decode_image(png.getvalue()),
    }


CLOCK = {"thread": time.thread_time, "wall": time.perf_counter}
_clock = time.thread_time


def _ms(fn) -> float:
    t = _clock()
    fn()
    return (_clock() - t) * 1000.0


def parts_new(enc, im: DecodedImage) -> dict[str, float]:
    out: dict[str, float] = {}
    out["analysis"] = _ms(lambda: analysis.measure(im, builtin.ANALYSIS_MAX_PIXELS))
    with torch.inference_mode():
        out["cnn"] = _ms(lambda: enc._run_net(builtin.image_crops(im.rgb)))
        _, grid = enc._run_net(builtin.image_crops(im.rgb))
    blocks = analysis.sampled_blockiness(im.rgb, builtin.ANALYSIS_MAX_PIXELS)
    runs = builtin.jpeg_evidence(grid, blocks)
    out["fit"] = _ms(lambda: builtin.jpeg_table_fit(im.rgb)) if runs else 0.0
    return out


def parts_old(enc, old_builtin, old_analysis, im: DecodedImage) -> dict[str, float]:
    out: dict[str, float] = {}
    out["analysis"] = _ms(lambda: old_analysis.measure(im))
    with torch.inference_mode():
        x = torch.from_numpy(old_builtin.image_crops(im.rgb)).permute(0, 3, 1, 2).float() / 255.0
        out["cnn"] = _ms(lambda: enc.net(x))
    out["fit"] = _ms(lambda: old_builtin.jpeg_table_fit(im.rgb))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="256,512,1024")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--old-ref", default="ae8ba15", help="git revision of the old encoder ('' to skip)")
    ap.add_argument(
        "--clock",
        choices=tuple(CLOCK),
        default="thread",
        help="thread: this thread's CPU time (steadier on a shared machine); wall: elapsed",
    )
    args = ap.parse_args(argv)
    global _clock
    _clock = CLOCK[args.clock]
    torch.set_num_threads(1)
    versions = {"new": builtin.BuiltinEncoder()}
    old_modules = None
    if args.old_ref:
        try:
            old_modules = load_old(args.old_ref)
            versions["old"] = old_modules[0].BuiltinEncoder()
        except (subprocess.CalledProcessError, FileNotFoundError) as exc:
            print(f"# old encoder at {args.old_ref!r} unavailable ({exc}); new only")
    sizes = [int(s) for s in args.sizes.split(",")]
    ims = {s: inputs(s) for s in sizes}
    times: dict[tuple, list[float]] = {}
    for enc in versions.values():  # warm-up
        enc.describe([ims[sizes[0]]["clean"]])
    for _ in range(args.repeat):
        for s in sizes:
            for kind, im in ims[s].items():
                for name, enc in versions.items():
                    times.setdefault((s, kind, name, "describe"), []).append(_ms(partial(enc.describe, [im])))
                    parts = parts_new(enc, im) if name == "new" else parts_old(enc, *old_modules, im)
                    for part, ms in parts.items():
                        times.setdefault((s, kind, name, part), []).append(ms)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(
        f"builtin encoder, ms per image ({args.clock} clock), 1 thread, median of {args.repeat} interleaved rounds "
        f"(old = {args.old_ref or 'skipped'}; fit 0 = skipped, no JPEG evidence)"
    )
    head = f"{'size':>5} {'input':12} {'new':>7} {'old':>7} {'old/new':>7}   new: {'analysis':>8} {'cnn':>6} {'fit':>6}"
    head += f"   old: {'analysis':>8} {'cnn':>6} {'fit':>6}" if "old" in versions else ""
    print(head)
    for s in sizes:
        for kind in ims[s]:
            new = med[(s, kind, "new", "describe")]
            old = med.get((s, kind, "old", "describe"), float("nan"))
            row = f"{s:>5} {kind:12} {new:7.1f} {old:7.1f} {old / new:7.2f}   " + " " * 5
            row += " ".join(f"{med[(s, kind, 'new', p)]:{w}.1f}" for p, w in (("analysis", 8), ("cnn", 6), ("fit", 6)))
            if "old" in versions:
                row += (
                    "   "
                    + " " * 5
                    + " ".join(
                        f"{med[(s, kind, 'old', p)]:{w}.1f}" for p, w in (("analysis", 8), ("cnn", 6), ("fit", 6))
                    )
                )
            print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
