"""Listing benchmark: peak RSS and time of listing a large manifest into listing shards.

    python benchmarks/bench_listing.py                  # 10,000,000 lines
    python benchmarks/bench_listing.py --lines 2000000 --lines 200000

For each size it writes a manifest of N lines (relative paths, a few per folder, every 1000th
line a duplicate and every 5000th a ``..`` escape, so that the dedup and rejection paths run),
then runs the submit path's listing (``pixelrelay.producer.listing.list_items`` into
``pixelrelay.jobs.files.write_listing``, local output; no Redis is needed for it) in a fresh subprocess,
and prints lines, items, seconds and the child's peak RSS (``ru_maxrss``). The target is a
flat RSS: 10,000,000 lines within 300 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time
from pixelrelay.jobs.files import write_listing
from pixelrelay.pipeline.storage import open_storage
from pixelrelay.producer.listing import list_items

manifest, out = sys.argv[1], sys.argv[2]
started = time.perf_counter()
items = list_items(manifest, out, open_storage(manifest), "png")
total = write_listing(open_storage(out, root=out), out, "bench", items).total
seconds = time.perf_counter() - started
peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"items": total, "seconds": seconds, "peak_kib": peak_kib}))
"""


def write_manifest(path: str, lines: int) -> None:
    with open(path, "w") as f:
        for i in range(lines):
            if i % 5000 == 4999:
                f.write(f"../escape/{i}.png\n")
            elif i % 1000 == 999:
                f.write(f"d{(i - 1) // 64:07d}/img{i - 1:09d}.jpg\n")  # the line before, again
            else:
                f.write(f"d{i // 64:07d}/img{i:09d}.jpg\n")


def measure(lines: int, folder: str) -> dict:
    """Run the listing of an N-line manifest in a fresh interpreter; its figures."""
    manifest = os.path.join(folder, f"manifest-{lines}.txt")
    write_manifest(manifest, lines)
    out = os.path.join(folder, f"out-{lines}")
    env = dict(os.environ)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", CHILD, manifest, out], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    os.unlink(manifest)
    return {"lines": lines, **figures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, action="append", help="manifest size (repeatable; default 10,000,000)")
    parser.add_argument("--tmp", help="scratch folder (default: a new temp folder; needs ~2 GB per 10M lines)")
    args = parser.parse_args(argv)
    sizes = args.lines or [10_000_000]
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="bench-listing-") as folder:
        print(f"{'lines':>12} {'items':>12} {'seconds':>9} {'peak RSS MB':>12} {'lines/s':>10}")
        for lines in sizes:
            row = measure(lines, folder)
            mb = row["peak_kib"] / 1024
            print(
                f"{row['lines']:>12,} {row['items']:>12,} {row['seconds']:>9.1f} {mb:>12.1f} "
                f"{row['lines'] / row['seconds']:>10,.0f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
