"""What any output scale costs: the decoder at its native scale vs the same call through
``pixelrelay.pipeline.outsize`` (native scale, then the antialiased resample to the exact size).

    python benchmarks/bench_outsize.py [--size 256] [--batch 4] [--repeat 5] [--decoders classic,builtin]

For each decoder and target (x1.5 -> runs x2, x3 -> x4, x0.5 -> x1, x8 -> x4 + resize) it
times ``decoder.restore`` with the native plan and ``restore_with_edits`` with the target
plan, interleaved, ``--repeat`` times, and prints the medians and the resample's share.
CPU, fp32, ``torch.set_num_threads(1)`` unless ``--threads``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixelrelay.pipeline.imageio import DecodedImage  # noqa: E402
from pixelrelay.pipeline.messages import Operation, OutputTarget, Plan  # noqa: E402
from pixelrelay.pipeline.stages.decoders.edits import restore_with_edits  # noqa: E402
from pixelrelay.pipeline.stages.registry import create_decoder  # noqa: E402

TARGETS = [(1.5, 2), (3, 4), (0.5, 1), (8, 4)]  # (target scale, native scale on 1, 2, 4)


def _images(n: int, size: int) -> list[DecodedImage]:
    rng = np.random.default_rng(0)
    return [DecodedImage(rgb=rng.integers(0, 256, (size, size + 7, 3), dtype=np.uint8)) for _ in range(n)]


def _time(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--decoders", default="classic,builtin")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = _images(args.batch, args.size)
    ops = [Operation(name="denoise", strength=0.5)]
    print(f"{args.batch} images {args.size + 7}x{args.size}, {args.repeat} interleaved runs, medians (s)")
    print(f"{'decoder':<8} {'target':>6} {'native':>6} {'native run':>11} {'with target':>12} {'resample share':>15}")
    for kind in args.decoders.split(","):
        decoder = create_decoder(kind)
        for scale, native in TARGETS:
            plain = [Plan(scale=native, operations=ops)] * len(images)
            target = [Plan(scale=native, operations=ops, target=OutputTarget(scale=scale))] * len(images)
            decoder.restore(images[:1], plain[:1])  # warm-up
            a, b = [], []
            for _ in range(args.repeat):
                a.append(_time(partial(decoder.restore, images, plain)))
                b.append(_time(partial(restore_with_edits, decoder, images, target)))
            ma, mb = statistics.median(a), statistics.median(b)
            print(f"{kind:<8} {f'x{scale:g}':>6} {f'x{native:d}':>6} {ma:>11.3f} {mb:>12.3f} {(mb - ma) / mb:>14.0%}")


if __name__ == "__main__":
    main()
