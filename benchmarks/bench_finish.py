"""Finish benchmark: writing a job's manifest from its parts, the one-pass way and from group files.

    python benchmarks/bench_finish.py                       # local 1,000,000 items, S3 100,000
    python benchmarks/bench_finish.py --local 200000 --s3 0 --repeats 3

For each size it generates the parts a job at chunk 16 leaves behind (one ``parts/`` object
per chunk, manifest lines shaped like the decode stage's, every 97th item failed), then:

* **old** (the one-pass reference): ``pixelrelay.jobs.files.merge_manifest``, the merge that reads every part;
* **groups**: ``pixelrelay.jobs.merge.merge_group`` + ``write_group`` for every group: the work the
  decode workers do as the job runs (spread over the job, one group per ~16,000 items), shown
  in total and for the one group merged last (on the finishing worker's path);
* **new** (the finish): ``pixelrelay.jobs.merge.write_manifest``: it reads only the group files.

Each row prints items, parts, objects read (``get`` / ``iter_lines`` calls, counted by a
wrapper around the real storage) and seconds (median of ``--repeats``, old and new
interleaved). The new manifest is checked byte for byte against the old one. S3 is moto in
server mode (``moto_server``, a subprocess, over HTTP): moto serves about 200 requests/s,
so S3 is measured at 100,000 items, not 1,000,000. Local parts are written without fsync
(generated data) and read from the page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from pixelrelay.jobs.files import manifest_uri, merge_manifest, part_uri
from pixelrelay.jobs.merge import Groups, merge_group, write_group, write_manifest
from pixelrelay.pipeline.messages import ItemRecord, JobSpec
from pixelrelay.pipeline.storage import Storage, open_storage

CHUNK = 16
JOB = "bench-finish"


class Counting(Storage):
    """The real storage with its object reads counted."""

    def __init__(self, inner: Storage) -> None:
        self.inner, self.reads = inner, 0

    def get(self, uri):
        self.reads += 1
        return self.inner.get(uri)

    def iter_lines(self, uri):
        self.reads += 1
        return self.inner.iter_lines(uri)

    def put(self, uri, data, content_type=None, **kw):
        return self.inner.put(uri, data, content_type, **kw)

    def put_file(self, uri, fileobj, content_type=None):
        return self.inner.put_file(uri, fileobj, content_type)

    def head(self, uri):
        return self.inner.head(uri)

    def exists(self, uri):
        return self.inner.exists(uri)

    def list(self, prefix):
        return self.inner.list(prefix)

    def delete(self, uri):
        return self.inner.delete(uri)


def _template() -> dict:
    record = ItemRecord(
        index=0,
        input="",
        output="",
        status="done",
        notes=["EXIF orientation 6 applied"],
        timings={"encode": 0.108, "plan": 0.002, "decode": 0.225},
        backends={"encoder": "builtin", "planner": "rules", "decoder": "builtin"},
        models={"decoder": "builtin@3f2a9c1e"},
        output_size=(512, 512),
        source_size=(256, 256),
        outcome="processed",
    )
    return record.model_dump(mode="json")


def part_body(chunk: int, total: int, output: str, template: dict) -> bytes:
    lines = []
    for i in range(chunk * CHUNK, min(total, (chunk + 1) * CHUNK)):
        row = dict(template, index=i, input=f"s3://in/photos/{i:07d}.jpg", output=f"{output}/photos/{i:07d}.png")
        if i % 97 == 1:
            row.update(status="failed", output=None, error="decode: not an image")
        lines.append(json.dumps(row, separators=(",", ":")))
    return ("\n".join(lines) + "\n").encode()


def generate(storage: Storage, output: str, total: int, local: bool) -> int:
    """Write the parts of a finished job; returns how many."""
    template = _template()
    n_chunks = -(-total // CHUNK)

    def write(chunk: int) -> None:
        uri = part_uri(output, JOB, chunk, 1)
        body = part_body(chunk, total, output, template)
        if local:  # generated data: no fsync per file
            os.makedirs(os.path.dirname(uri), exist_ok=True)
            with open(uri, "wb") as f:
                f.write(body)
        else:
            storage.put(uri, body, "application/x-ndjson")

    with ThreadPoolExecutor(1 if local else 16) as pool:
        list(pool.map(write, range(n_chunks)))
    return n_chunks


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def run_size(name: str, output: str, total: int, repeats: int, old: bool) -> list[tuple]:
    storage = Counting(open_storage(output))
    spec = JobSpec(job_id=JOB, input="/in", output=output, total=total, chunk_size=CHUNK)
    geo = Groups.of(spec)
    print(f"[{name}] generating {total:,} items ...", file=sys.stderr, flush=True)
    parts = generate(storage.inner, output, total, local=not output.startswith("s3://"))
    rows = []

    per_group, reads = [], []
    for group in range(geo.count):  # what the decode workers do as the job runs
        storage.reads = 0
        seconds, merged = timed(partial(merge_group, storage, spec, geo, group, 1))
        seconds += timed(partial(write_group, storage, spec, group, 1, merged))[0]
        per_group.append(seconds)
        reads.append(storage.reads)
    rows.append((name, total, parts, f"groups: all {geo.count} merges (over the job)", sum(reads), sum(per_group)))
    rows.append(
        (
            name,
            total,
            parts,
            f"groups: one merge (median of {geo.count})",
            int(statistics.median(reads)),
            statistics.median(per_group),
        )
    )

    new_s, old_s, new_reads, old_reads, old_body = [], [], 0, 0, None
    for _ in range(repeats):
        if old:
            storage.reads = 0
            seconds, _ = timed(lambda: merge_manifest(storage, output, JOB))
            old_s.append(seconds)
            old_reads = storage.reads
            old_body = storage.inner.get(manifest_uri(output, JOB))
        storage.reads = 0
        seconds, _ = timed(lambda: write_manifest(storage, spec, 1))
        new_s.append(seconds)
        new_reads = storage.reads
    if old_body is not None:
        assert storage.inner.get(manifest_uri(output, JOB)) == old_body, "the new manifest differs from the old"
    if old:
        rows.append((name, total, parts, "old: one-pass merge of every part", old_reads, statistics.median(old_s)))
    rows.append((name, total, parts, "new: finish from group files", new_reads, statistics.median(new_s)))
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_server():
    port = _free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([exe, "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing-secret",
        AWS_DEFAULT_REGION="us-east-1",
        PIXELRELAY_S3_ENDPOINT_URL=endpoint,
    )
    import boto3

    for _ in range(100):
        try:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
            return proc
        except Exception:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local", type=int, default=1_000_000, help="items on local storage (0: skip)")
    parser.add_argument("--s3", type=int, default=100_000, help="items on S3, moto server mode (0: skip)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of old and new, interleaved (median)")
    parser.add_argument("--no-old", action="store_true", help="skip the one-pass merge")
    args = parser.parse_args()
    rows = []
    if args.local:
        folder = tempfile.mkdtemp(prefix="bench-finish-")
        try:
            rows += run_size("local", os.path.join(folder, "out"), args.local, args.repeats, not args.no_old)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    if args.s3:
        proc = moto_server()
        try:
            rows += run_size("s3 (moto)", "s3://bench/out", args.s3, args.repeats, not args.no_old)
        finally:
            proc.terminate()
            proc.wait(10)
    print(f"\n{'storage':<10} {'items':>10} {'parts':>8}  {'what':<45} {'objects read':>12} {'seconds':>9}")
    for name, total, parts, what, reads, seconds in rows:
        print(f"{name:<10} {total:>10,} {parts:>8,}  {what:<45} {reads:>12,} {seconds:>9.2f}")
    print(f"\nchunk {CHUNK}; seconds: median of {args.repeats} (old and new interleaved); group merges run once")


if __name__ == "__main__":
    main()
