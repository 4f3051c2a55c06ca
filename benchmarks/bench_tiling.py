"""Tiling only where it pays: the builtin decoder untiled, tiled under a forced small memory
budget, and on a fixed grid of 256 px tiles, at 256, 512 and 1024 px, x2 and x4.

    python benchmarks/bench_tiling.py [--sizes 256,512,1024] [--scales 2,4] [--repeats 3]

Times the decoder's model step (``LearnedDecoder.upscale_tensor``: the forward calls and the
blending; the clean-image upscaler network) on one synthetic photo-like image per size, one
torch thread. Rows:

* ``untiled``: a budget big enough for the whole image: one forward call;
* ``budget 1/4``: a budget of a quarter of the image's pixels (forced, the image would fit
  whole): the balanced grid of fewest pixels under it;
* ``budget 256²``: a budget of 256x256 input pixels per call (the fixed grid's tile area);
* ``old fixed 256``: the fixed grid, for comparison: 256 px tiles at a fixed step, the last one pushed
  back to the edge, overlap 32, 8 tiles per call.

Repeats are interleaved (every row of a case once per round, in a rotating order) and
medians reported; the overhead is against ``untiled`` of the same case in the same run.
Two clocks: the process's CPU time (user + system; one thread, so it is the work done and
little disturbed by other processes) and wall time. The machine may be shared: wall times
are noisy, ratios within one run are what count.

glibc serves allocations over its mmap threshold (at most 32 MB) with fresh pages that the
kernel zeroes on every call; a whole 1024² image's feature maps are 128 MB each, so its
forward pays that in system time, and tiles do not. Workers raise the threshold
(``pixelrelay.pipeline.memory``, ``PIXELRELAY_ALLOCATOR=tuned``); so does this benchmark, unless
``--allocator default``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pixelrelay.pipeline.memory import tune_allocator  # noqa: E402
from pixelrelay.pipeline.messages import Plan  # noqa: E402
from pixelrelay.pipeline.stages.decoders.builtin import BuiltinDecoder  # noqa: E402
from pixelrelay.pipeline.tiling import MIB, TilePlan, run_tiled  # noqa: E402

MODEL = "upscaler"  # a clean plan's network
OLD_TILE, OLD_OVERLAP, OLD_BATCH = 256, 32, 8


def scene(size: int, seed: int = 0) -> torch.Tensor:
    """A (1,3,size,size) float image in [0,1]: smooth shapes, edges and texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.stack(
        [
            128 + 90 * np.sin(x / 17.0) * np.cos(y / 23.0),
            128 + 70 * np.sign(np.sin((x + y) / 41.0)),
            128 + 60 * np.cos(np.hypot(x - size / 2, y - size / 2) / 11.0),
        ],
        -1,
    )
    img += rng.normal(0, 8, img.shape)
    return torch.from_numpy(np.clip(img, 0, 255) / 255.0).permute(2, 0, 1)[None].float().contiguous()


def budget_mb(dec: BuiltinDecoder, scale: int, pixels: int) -> int:
    """The memory budget (MB) that allows ``pixels`` input pixels per forward call."""
    return max(1, math.floor(pixels * dec.pixel_bytes(MODEL, scale) / MIB))


def variants(dec: BuiltinDecoder, size: int, scale: int) -> dict:
    plans = [Plan(scale=scale)]
    area = size * size

    def budget(pixels: int):
        mb = budget_mb(dec, scale, pixels)
        return lambda x: dec.upscale_tensor(MODEL, x, plans, memory_mb=mb)

    def old(x):
        def fn(crops, items):
            return dec._forward(MODEL, crops, plans, items)  # the same precision policy as the new path

        with torch.inference_mode():
            plan = TilePlan(
                scale,
                OLD_TILE,
                OLD_OVERLAP,
                batch_size=OLD_BATCH,
                pass_items=True,
                pad_mode=dec.pad_mode,
                balance=False,
            )
            return run_tiled(fn, x, plan), None

    return {
        "untiled": budget(4 * area),
        "budget 1/4": budget(area // 4),
        "budget 256²": budget(256 * 256),
        "old fixed 256": old,
    }


def describe(used, size: int) -> str:
    if used is None:  # the fixed grid
        n = len(range(0, size - OLD_TILE, OLD_TILE - OLD_OVERLAP)) + 1 if size > OLD_TILE else 1
        return f"{n * n} x {min(size, OLD_TILE)}²" + (
            f" (+{n * n * min(size, OLD_TILE) ** 2 / size**2 - 1:.0%} px)" if n > 1 else ""
        )
    if used.tiles == 1:
        return "whole"
    extra = used.tiles * used.tile_h * used.tile_w / size**2 - 1
    return f"{used.tiles} x {used.tile_h}x{used.tile_w} (+{extra:.0%} px)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,512,1024")
    ap.add_argument("--scales", default="2,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--allocator",
        choices=("tuned", "default"),
        default="tuned",
        help="the workers' allocator policy (pipeline.memory), or glibc's default",
    )
    args = ap.parse_args(argv)
    if args.allocator == "tuned":
        tune_allocator()
    torch.set_num_threads(1)
    dec = BuiltinDecoder()
    cases = [(int(s), int(k)) for k in args.scales.split(",") for s in args.sizes.split(",")]
    table = {c: variants(dec, *c) for c in cases}
    images = {size: scene(size) for size, _ in cases}
    for case, rows in table.items():  # warm-up, and the grids each row uses
        for run in rows.values():
            run(images[case[0]][:, :, :64, :64])
    times: dict[tuple, list[float]] = {}
    grids: dict[tuple, str] = {}
    for rep in range(args.repeats):
        for case, rows in table.items():
            names = list(rows)
            names = names[rep % len(names) :] + names[: rep % len(names)]
            for name in names:
                x = images[case[0]]
                c0, p0, t0 = os.times(), time.process_time(), time.perf_counter()
                _, used = rows[name](x)
                c1, p1, t1 = os.times(), time.process_time(), time.perf_counter()
                cpu = p1 - p0  # user + system, fine-grained; os.times for the system part (10 ms ticks)
                times.setdefault((case, name), []).append((cpu * 1e3, (t1 - t0) * 1e3, (c1.system - c0.system) * 1e3))
                grids[(case, name)] = describe(used, case[0])
        print(f"round {rep + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    load = os.getloadavg()[0]
    mmap = "1 GiB (tuned)" if args.allocator == "tuned" else os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default")
    print(
        f"builtin decoder ({MODEL} network), torch threads = 1, {args.repeats} interleaved repeats, medians; "
        f"mmap threshold {mmap}; load average {load:.1f} on {os.cpu_count()} cores "
        f"(a shared machine: wall times are noisy, ratios count)"
    )
    print()
    print("| scale | size | run | grid (input px) | CPU ms / image (sys) | vs untiled | wall ms | vs untiled |")
    print("|---|---|---|---|---|---|---|---|")
    for case, rows in table.items():
        base = [statistics.median(t[i] for t in times[(case, "untiled")]) for i in range(2)]
        for name in rows:
            cpu, wall, sys_ms = (statistics.median(t[i] for t in times[(case, name)]) for i in range(3))
            vs = ["" if name == "untiled" else f"{v / b - 1:+.0%}" for v, b in zip((cpu, wall), base, strict=True)]
            print(
                f"| x{case[1]} | {case[0]}² | {name} | {grids[(case, name)]} | {cpu:,.0f} ({sys_ms:,.0f}) | {vs[0]} "
                f"| {wall:,.0f} | {vs[1]} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
