"""Recovery time of a job from each fault, with **default** lease and sweep settings.

    python benchmarks/bench_recovery.py [--items 24] [--slow 0.25] [--only decode-SIGKILL,hang,...]

Real parts throughout: an embedded redis-server on a port of its own, moto's S3 server over
HTTP behind a proxy that can reset every connection, and one solo ``pixelrelay worker``
subprocess per stage with the ``slow`` test backends (``tests/faults.py``; each sleeps
``--slow`` seconds per item, so a fault lands in the middle of a chunk). For each fault a
fresh job is submitted, the fault is injected while the target stage is inside a chunk (the
purge: while a message waits in a queue),
and the clock runs until the job's manifest is written. Every row is then checked: the
manifest has every item exactly once, storage holds one output per item and nothing else,
and the counts are exact. ``baseline`` is the same job with no fault, after a warm-up job.

"recovery" is the job's wall time minus the fault-free baseline: what the fault cost.
Default settings: ``PIXELRELAY_LEASE_S=60``, ``PIXELRELAY_SWEEP_INTERVAL_S=15``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import boto3  # noqa: E402
import redis  # noqa: E402

from pixelrelay.jobs import keys  # noqa: E402
from pixelrelay.jobs.chunks import parse_entries  # noqa: E402
from pixelrelay.jobs.state import JobState  # noqa: E402
from pixelrelay.producer.embedded import EmbeddedRedis, free_port  # noqa: E402
from tests.faults import POISON_WIDTH  # noqa: E402
from tests.images import encode, good_images, photo_like  # noqa: E402
from tests.netfaults import FlakyProxy  # noqa: E402

STAGES = ("encode", "plan", "decode")
QUEUES = [f"pixelrelay.{s}" for s in STAGES]


class Bench:
    def __init__(self, args: argparse.Namespace, logdir: Path) -> None:
        from moto.server import ThreadedMotoServer

        self.args, self.logdir = args, logdir
        self.redis_port = free_port()
        self.redis = EmbeddedRedis(self.redis_port).start()
        self.client = redis.Redis(port=self.redis_port)
        port = free_port()
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.moto.start()
        self.s3_url = f"http://127.0.0.1:{port}"
        self.proxy = FlakyProxy(port)
        creds = {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        os.environ.setdefault("PIXELRELAY_SIGNING_KEY", secrets.token_urlsafe(32))  # workers and cancel share it
        os.environ.update(creds)
        self.s3 = boto3.client("s3", endpoint_url=self.s3_url)
        self.env = {
            **os.environ,
            **creds,
            "PIXELRELAY_REDIS_URL": self.redis.url,
            "PIXELRELAY_S3_ENDPOINT_URL": self.proxy.url,
            "PIXELRELAY_PLUGINS": "tests.faults",
            "PIXELRELAY_TEST_SLOW_S": str(args.slow),
            "PIXELRELAY_CHUNK_SIZE": "4",
            "PIXELRELAY_BATCH_SIZE": "4",
            "PIXELRELAY_WINDOW": "2",
            "PIXELRELAY_TORCH_THREADS": "1",
            "PYTHONPATH": str(REPO),
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self.started = 0
        self.files = good_images(args.items)

    # -- workers
    def start(self, stage: str, backend: str = "slow", **env: str) -> None:
        self.started += 1
        log = open(self.logdir / f"{stage}-{self.started}.log", "wb")
        flag = {"encode": "--encoder", "plan": "--planner", "decode": "--decoder"}[stage]
        cmd = [sys.executable, "-m", "pixelrelay", "worker", "--stage", stage, flag, backend, "--loglevel", "WARNING"]
        self.procs[stage] = subprocess.Popen(
            cmd, env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
        )

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    # -- jobs
    def submit(self, job_id: str, *extra: str, bucket: str | None = None) -> subprocess.Popen:
        bucket = bucket or self.bucket(job_id)
        if bucket not in {b["Name"] for b in self.s3.list_buckets()["Buckets"]}:
            self.s3.create_bucket(Bucket=bucket)
            for rel, data in self.files.items():
                self.s3.put_object(Bucket=bucket, Key=f"in/{rel}", Body=data)
        cmd = [
            sys.executable,
            "-m",
            "pixelrelay",
            "submit",
            f"s3://{bucket}/in",
            "--out",
            f"s3://{bucket}/out",
            "--job-id",
            job_id,
            "--wait",
            *extra,
        ]
        log = open(self.logdir / f"submit-{job_id}.log", "wb")
        return subprocess.Popen(cmd, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def inside(self, job_id: str, stage: str) -> bool:
        """True while ``stage``'s worker holds a live lease on a chunk of the job."""
        pid = self.procs[stage].pid
        entries, _ = parse_entries(self.client.hgetall(keys.chunks(job_id)))
        for slot, entry in entries.items():
            owner = self.client.get(keys.lease(job_id, slot.name))
            if entry.stage == stage and owner and owner.decode().endswith(f":{pid}"):
                return True
        return False

    @staticmethod
    def bucket(job_id: str) -> str:
        return "b-" + job_id.lower()

    def queued(self) -> int:
        """Messages waiting in the three stage queues."""
        return sum(int(self.client.llen(q)) for q in QUEUES)

    def check(self, job_id: str, bucket: str | None = None) -> str:
        bucket = bucket or self.bucket(job_id)
        body = self.s3.get_object(Bucket=bucket, Key=f"out/_jobs/{job_id}/manifest.jsonl")["Body"].read()
        rows = [json.loads(line) for line in body.splitlines()]
        once = [r["index"] for r in rows] == list(range(len(self.files)))
        statuses = {r["status"] for r in rows} | {r.get("outcome") or "" for r in rows} - {""}
        listed = self.s3.list_objects_v2(Bucket=bucket, Prefix="out/").get("Contents", [])
        outputs = {o["Key"] for o in listed if not o["Key"].startswith("out/_jobs/")}
        done_outputs = {f"out/{r['input'].split('/in/', 1)[1]}" for r in rows if r["status"] == "done"}
        if any(r["status"] == "cancelled" for r in rows):  # a cancelled job: no output beyond its done items
            outputs &= {f"out/{rel}" for rel in self.files}
        exact = outputs == done_outputs
        counts = JobState(self.client, job_id).counts()
        return (
            f"{'ok' if once else 'LOST/DUPLICATED'}; {'/'.join(sorted(statuses))}; "
            f"{'one object per done item' if exact else 'OBJECTS DIFFER'}; "
            f"counts {counts.done}+{counts.failed}/{counts.total}"
        )

    def run(
        self,
        name: str,
        fault: Callable[[str, str], None] | None,
        target: str = "decode",
        extra: tuple = (),
        job_id: str | None = None,
    ) -> tuple:
        job_id = job_id or f"rec-{name.lower()}-{uuid.uuid4().hex[:4]}"
        t0 = time.monotonic()
        waiter = self.submit(job_id, *extra)
        fault_at = None
        if fault is not None:
            deadline = time.monotonic() + 300
            ready = (lambda: self.queued() > 0) if target == "queued" else (lambda: self.inside(job_id, target))
            while not ready():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: {target} never started a chunk")
                time.sleep(0.02)
            fault_at = time.monotonic()
            fault(job_id, target)
        try:
            rc = waiter.wait(self.args.row_timeout)
        except subprocess.TimeoutExpired:
            waiter.kill()
            return name, time.monotonic() - t0, None, "STALLED", f"not finished after {self.args.row_timeout} s"
        t1 = time.monotonic()
        after = None if fault_at is None else t1 - fault_at
        return name, t1 - t0, after, rc, self.check(job_id)


def kill_and_replace(bench: Bench, sig: int) -> Callable[[str], None]:
    def fault(job_id: str, stage: str) -> None:
        proc = bench.procs.pop(stage)
        proc.send_signal(sig)
        proc.wait(120)
        bench.start(stage)

    return fault


def purge(bench: Bench) -> Callable[[str], None]:
    def fault(job_id: str, stage: str) -> None:
        bench.client.delete(*QUEUES)

    return fault


def s3_outage(bench: Bench, seconds: float = 20.0) -> Callable[[str], None]:
    def fault(job_id: str, stage: str) -> None:
        bench.proxy.go_down()
        time.sleep(seconds)
        bench.proxy.come_up()

    return fault


def redis_restart(bench: Bench) -> Callable[[str], None]:
    def fault(job_id: str, stage: str) -> None:
        bench.redis.process.send_signal(signal.SIGKILL)
        bench.redis.process.wait(10)
        bench.redis = EmbeddedRedis(bench.redis_port).start()  # empty: it keeps nothing

    return fault


def cancel(bench: Bench) -> Callable[[str, str], None]:
    def fault(job_id: str, stage: str) -> None:
        subprocess.run(
            [sys.executable, "-m", "pixelrelay", "cancel", job_id],
            env=bench.env,
            cwd=REPO,
            capture_output=True,
            check=True,
            timeout=300,
        )

    return fault


def hang(bench: Bench) -> tuple:
    """One item hangs the decode model call (``tests.faults`` ``hanging``: an image 13 px
    wide), the item budget scaled down to ``--hang-budget``; a supervisor loop (systemd or
    Kubernetes in production) restarts the decode worker whenever it exits. The row's check:
    only that item failed, every other item once, nobody acting."""
    job_id = f"rec-hang-{uuid.uuid4().hex[:4]}"
    bucket = bench.bucket(job_id)
    bench.s3.create_bucket(Bucket=bucket)
    hung = sorted(bench.files)[len(bench.files) // 2]
    for rel, data in bench.files.items():
        body = encode(photo_like(POISON_WIDTH, 16, 1), "PNG") if rel == hung else data
        bench.s3.put_object(Bucket=bucket, Key=f"in/{rel}", Body=body)
    settings = {"PIXELRELAY_ITEM_BUDGET_S": str(bench.args.hang_budget)}
    stop_worker(bench, "decode")
    bench.start("decode", "hanging", **settings)
    exits: list[int] = []
    stopping = threading.Event()

    def supervise() -> None:
        while not stopping.wait(0.05):
            if bench.procs["decode"].poll() is not None:
                exits.append(bench.procs["decode"].returncode)
                bench.start("decode", "hanging", **settings)

    supervisor = threading.Thread(target=supervise, daemon=True)
    supervisor.start()
    try:
        row = bench.run("hang", None, job_id=job_id)
    finally:
        stopping.set()
        supervisor.join(10)
        stop_worker(bench, "decode")
        bench.start("decode")
    body = bench.s3.get_object(Bucket=bucket, Key=f"out/_jobs/{job_id}/manifest.jsonl")["Body"].read()
    failed = [r["input"].split("/in/", 1)[1] for r in map(json.loads, body.splitlines()) if r["status"] != "done"]
    alone = "only the hanging item failed" if failed == [hung] else f"FAILED: {failed}"
    return (*row[:4], f"{row[4]}; {alone}; decode exits {exits}")


def stop_worker(bench: Bench, stage: str) -> None:
    proc = bench.procs.pop(stage)
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def rescale(bench: Bench) -> tuple:
    """A finished x2 job, then a new job id with --scale 4 into the same output: every item
    must be re-processed (outcome ``overwritten``) and come out at x4."""
    first = f"rec-x2-{uuid.uuid4().hex[:4]}"
    bucket = bench.bucket(first)
    if bench.submit(first, "--task", "upscale", "--scale", "2").wait(1800) != 0:
        return "rescale-x2-to-x4", 0.0, None, "x2 job failed", ""
    second = f"rec-x4-{uuid.uuid4().hex[:4]}"
    t0 = time.monotonic()
    rc = bench.submit(second, "--task", "upscale", "--scale", "4", bucket=bucket).wait(1800)
    wall = time.monotonic() - t0
    import io

    from PIL import Image

    sizes_ok = all(
        Image.open(io.BytesIO(bench.s3.get_object(Bucket=bucket, Key=f"out/{rel}")["Body"].read())).size
        == tuple(4 * v for v in Image.open(io.BytesIO(data)).size)
        for rel, data in bench.files.items()
    )
    return (
        "rescale-x2-to-x4",
        wall,
        None,
        rc,
        bench.check(second, bucket) + ("; every output x4" if sizes_ok else "; NOT x4"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=24)
    parser.add_argument("--slow", type=float, default=0.25, help="seconds per item per stage")
    parser.add_argument("--only", default="", help="comma-separated row names")
    parser.add_argument("--row-timeout", type=float, default=600, help="give a row up after this many seconds")
    parser.add_argument("--hang-budget", type=float, default=3, help="the hang row's PIXELRELAY_ITEM_BUDGET_S")
    args = parser.parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    logdir = Path(tempfile.mkdtemp(prefix="pixelrelay-bench-recovery-"))
    bench = Bench(args, logdir)
    rows = []
    try:
        for stage in STAGES:
            bench.start(stage)
        bench.run("warm-up", None)  # model loads and first-call costs stay out of the baseline
        scenarios = [("baseline", None, "decode")]
        scenarios += [(f"{s}-SIGKILL", kill_and_replace(bench, signal.SIGKILL), s) for s in STAGES]
        scenarios += [(f"{s}-SIGTERM", kill_and_replace(bench, signal.SIGTERM), s) for s in STAGES]
        scenarios += [
            ("purge-queues", purge(bench), "queued"),
            ("s3-unreachable-20s", s3_outage(bench), "decode"),
            ("redis-restart-empty", redis_restart(bench), "decode"),
            ("cancel", cancel(bench), "decode"),
        ]
        only = set(filter(None, args.only.split(",")))
        for name, fault, target in scenarios:
            if only and name not in only and name != "baseline":
                continue
            rows.append(bench.run(name, fault, target))
            print(f"# {rows[-1]}", file=sys.stderr, flush=True)
        if not only or "hang" in only:
            rows.append(hang(bench))
            print(f"# {rows[-1]}", file=sys.stderr, flush=True)
        if not only or "rescale-x2-to-x4" in only:
            rows.append(rescale(bench))
            print(f"# {rows[-1]}", file=sys.stderr, flush=True)
    finally:
        bench.stop_all()
        bench.proxy.close()
        bench.moto.stop()
        bench.redis.stop()
    base = rows[0][1]
    print(
        f"\n{args.items} items, chunk 4, {args.slow} s per item per stage, "
        f"default lease and sweep settings; logs in {logdir}\n"
    )
    print("| fault | job wall (s) | fault → job done (s) | recovery: wall − baseline (s) | exit | check |")
    print("|---|---|---|---|---|---|")
    for name, wall, after, rc, check in rows:
        after_text = "" if after is None else f"{after:.1f}"
        extra = "" if name in ("baseline", "rescale-x2-to-x4", "hang") else f"{wall - base:+.1f}"
        print(f"| {name} | {wall:.1f} | {after_text} | {extra} | {rc} | {check} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
