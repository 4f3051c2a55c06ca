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
import base64
import json
import logging
import os
import random
import secrets
import shutil
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
import psutil  # noqa: E402
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
PART = ".pixelrelay-"  # a temp file's name prefix: none may outlive its write


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
        self.all_procs: list[subprocess.Popen] = []  # every worker started: the stray check's list
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
        self.all_procs.append(self.procs[stage])

    def restart_all(self, **env: str) -> None:
        """Every stage's worker stopped and started again with ``env`` over the bench's settings."""
        for stage in STAGES:
            stop_worker(self, stage)
        for stage in STAGES:
            self.start(stage, **env)

    def strays(self) -> list[int]:
        """Pids of workers that were stopped or replaced and still run (waits up to 10 s for them)."""
        current = set(map(id, self.procs.values()))
        old = [p for p in self.all_procs if id(p) not in current]
        deadline = time.monotonic() + 10
        while any(p.poll() is None for p in old) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [p.pid for p in old if p.poll() is None]

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
        debris = [k for k in (o["Key"] for o in listed) if PART in k]
        strays = self.strays()
        counts = JobState(self.client, job_id).counts()
        return (
            f"{'ok' if once else 'LOST/DUPLICATED'}; {'/'.join(sorted(statuses))}; "
            f"{'one object per done item' if exact else 'OBJECTS DIFFER'}; "
            f"counts {counts.done}+{counts.failed}/{counts.total}; "
            f"{f'{len(debris)} .part LEFT' if debris else 'no .part'}; "
            f"{f'STRAY workers {strays}' if strays else 'no stray process'}"
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
    bench.env.update(settings)  # the item budget travels in the job's spec: the submitter sets it
    try:
        row = bench.run("hang", None, job_id=job_id)
    finally:
        bench.env.pop("PIXELRELAY_ITEM_BUDGET_S")
        stopping.set()
        supervisor.join(10)
        stop_worker(bench, "decode")
        bench.start("decode")
    try:
        body = bench.s3.get_object(Bucket=bucket, Key=f"out/_jobs/{job_id}/manifest.jsonl")["Body"].read()
    except bench.s3.exceptions.NoSuchKey:
        return (*row[:4], f"{row[4]}; NO MANIFEST; decode exits {exits}")
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


# -- rows on a local output folder: `pixelrelay run` killed, a full disk, a churn soak
def local_inputs(bench: Bench) -> Path:
    """The bench's images in a local folder (written once)."""
    folder = bench.logdir / "in"
    if not folder.exists():
        for rel, data in bench.files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
    return folder


def check_local(bench: Bench, out: Path, job_id: str | None, counts_from: redis.Redis | None = None) -> str:
    """The row's check on a local output: every item once in the manifest, one file per done
    item (sidecars aside) and nothing else, no ``.pixelrelay-*.part`` file."""
    manifests = sorted((out / "_jobs").glob(f"{job_id or '*'}/manifest.jsonl"))
    if not manifests:
        return "NO MANIFEST"
    rows = [json.loads(line) for line in manifests[-1].read_text().splitlines()]
    once = sorted(r["index"] for r in rows) == list(range(len(bench.files)))
    statuses = sorted({r["status"] for r in rows})
    files = {p for p in out.rglob("*") if p.is_file() and "_jobs" not in p.relative_to(out).parts}
    visible = {str(p.relative_to(out)) for p in files if not p.name.startswith(".")}
    done = {str(Path(r["output"]).resolve().relative_to(out.resolve())) for r in rows if r["status"] == "done"}
    debris = [p for p in out.rglob(f"{PART}*")]
    reasons = sorted({(r.get("error") or "")[:60] for r in rows if r["status"] != "done"})
    text = (
        f"{'ok' if once else 'LOST/DUPLICATED'}; {'/'.join(statuses)}; "
        f"{'one file per done item' if visible == done else f'FILES DIFFER ({len(visible)} vs {len(done)})'}; "
        f"{f'{len(debris)} .part LEFT' if debris else 'no .part'}"
    )
    if counts_from is not None and job_id:
        counts = JobState(counts_from, job_id).counts()
        text += f"; counts {counts.done}+{counts.failed}/{counts.total}"
    return text + (f"; reasons {reasons}" if reasons else "")


def submit_local(bench: Bench, job_id: str, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pixelrelay", "submit", str(local_inputs(bench)), "--out", str(out)]
    log = open(bench.logdir / f"submit-{job_id}.log", "wb")
    cmd += ["--job-id", job_id, "--wait", *extra]
    return subprocess.Popen(cmd, env=bench.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def run_cmd(bench: Bench, out: Path) -> tuple[list[str], dict[str, str]]:
    """``pixelrelay run`` of the bench's images, light backends, its own embedded Redis."""
    cmd = [sys.executable, "-m", "pixelrelay", "run", str(local_inputs(bench)), "--out", str(out)]
    cmd += ["--encoder", "slow", "--planner", "slow", "--decoder", "slow", "--chunk-size", "4"]
    env = {k: v for k, v in bench.env.items() if k not in ("PIXELRELAY_REDIS_URL",)}
    return cmd, env


def run_sigkill(bench: Bench) -> list[tuple]:
    """``pixelrelay run`` SIGKILLed once an output exists, then the same command again. The
    row's wall is both together; its baseline a fault-free ``run`` of the same images."""
    rows = []
    base_out = bench.logdir / "run-baseline"
    cmd, env = run_cmd(bench, base_out)
    t0 = time.monotonic()
    rc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, timeout=bench.args.row_timeout).returncode
    base = time.monotonic() - t0
    rows.append(("run-baseline", base, None, rc, check_local(bench, base_out, None)))
    out = bench.logdir / "run-killed"
    cmd, env = run_cmd(bench, out)
    t0 = time.monotonic()
    log = open(bench.logdir / "run-killed.log", "wb")
    first = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    while first.poll() is None and not [p for p in out.glob("*") if p.is_file() and not p.name.startswith(".")]:
        time.sleep(0.02)
    children = psutil.Process(first.pid).children(recursive=True) if first.poll() is None else []
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    killed_at = time.monotonic()
    _, alive = psutil.wait_procs(children, timeout=10)
    ended_s = time.monotonic() - killed_at
    again = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, timeout=bench.args.row_timeout)
    wall = time.monotonic() - t0
    survivors = (
        f"{len(alive)} of {len(children)} children ALIVE 10 s after the kill"
        if alive
        else (f"its {len(children)} children ended {ended_s:.1f} s after the kill")
    )
    for proc in alive:
        proc.kill()
    check = f"{check_local(bench, out, None)}; {survivors}; re-run exit {again.returncode}"
    rows.append(("run-SIGKILL", wall, time.monotonic() - killed_at, again.returncode, check, base))
    return rows


def fill(path: Path) -> None:
    """Write ``path`` until its file system has no space left."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 16384)
                f.flush()
        except OSError:
            pass


def disk_full(bench: Bench) -> tuple:
    """A local output on a 2 MiB tmpfs, filled to the last byte once the decode stage is
    inside a chunk; the filler removed once an item failed (or 10 s later). Skipped where
    mount is refused."""
    mount = bench.logdir / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        return "disk-full", 0.0, None, "skipped", f"mount refused: {done.stderr.decode().strip()[:80]}"
    try:
        job_id = f"rec-disk-{uuid.uuid4().hex[:4]}"
        out = mount / "out"
        t0 = time.monotonic()
        waiter = submit_local(bench, job_id, out)
        deadline = time.monotonic() + 120
        while not bench.inside(job_id, "decode") and time.monotonic() < deadline and waiter.poll() is None:
            time.sleep(0.02)
        fill(mount / "filler")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and waiter.poll() is None:
            if JobState(bench.client, job_id).counts().failed:
                break
            time.sleep(0.05)
        freed_at = time.monotonic()
        failed_full = JobState(bench.client, job_id).counts().failed
        (mount / "filler").unlink()
        try:
            rc = waiter.wait(bench.args.row_timeout)
        except subprocess.TimeoutExpired:
            waiter.kill()
            rc = "STALLED"
        t1 = time.monotonic()
        check = check_local(bench, out, job_id, bench.client)
        return "disk-full", t1 - t0, t1 - freed_at, rc, f"{check}; {failed_full} failed while full"
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def long_chunk(bench: Bench) -> tuple:
    """Workers whose own settings assume one-item chunks at 0.5 s an item run a job submitted
    with 16-item chunks (0.8 s an item at decode), while a broker client with a 2 s visibility
    timeout restores unacked messages as kombu does. The workers' leases are 1 s, so their
    renewals (every lease / 3) come inside that window, as the settings require of any real
    visibility timeout (over 2 x lease + 60 s). Check: each item decoded once."""
    from kombu import Connection

    calls = bench.logdir / "long-chunk-decoded.log"
    own = {"PIXELRELAY_CHUNK_SIZE": "1", "PIXELRELAY_ITEM_BUDGET_S": "0.5", "PIXELRELAY_BATCH_SIZE": "1"}
    own["PIXELRELAY_LEASE_S"] = "1"
    own.update(PIXELRELAY_TEST_SLOW_S="0.8", PIXELRELAY_TEST_CALL_LOG=str(calls))
    bench.restart_all(**own)
    running = threading.Event()
    running.set()

    def restore() -> None:
        with Connection(bench.redis.url, transport_options={"visibility_timeout": 2}) as conn:
            while running.is_set():
                conn.default_channel.qos.restore_visible(num=100, interval=1)
                time.sleep(0.25)

    thread = threading.Thread(target=restore, daemon=True)
    thread.start()
    try:
        row = bench.run("long-chunk", None, extra=("--chunk-size", "16"))
    finally:
        running.clear()
        thread.join(10)
        bench.restart_all()
    sizes = [line.split()[-1] for line in calls.read_text().splitlines()] if calls.exists() else []
    twice = len(sizes) - len(set(sizes))  # the bench's images differ in size: a size seen twice is a re-run
    once = f"{twice} items DECODED TWICE" if twice else "no item decoded twice"
    return (*row[:4], f"{row[4]}; {once} ({len(sizes)} decode calls for {len(bench.files)} items)")


def junk_entries() -> list[bytes]:
    """A non-JSON entry, a deeply nested one, an oversized one and Celery's own task by name."""
    body = base64.b64encode(json.dumps([[], {}, {"callbacks": None, "errbacks": None}]).encode()).decode()
    foreign = {
        "body": body,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": "celery.accumulate", "id": str(uuid.uuid4()), "retries": 0},
        "properties": {
            "delivery_tag": str(uuid.uuid4()),
            "body_encoding": "base64",
            "delivery_info": {"exchange": "", "routing_key": "pixelrelay.encode"},
            "priority": 0,
        },
    }
    return [
        b"this is not json",
        b"[" * 100_000 + b"]" * 100_000,
        json.dumps({"x": "A" * 4_000_000}).encode(),
        json.dumps(foreign).encode(),
    ]


def junk(bench: Bench) -> tuple:
    """Junk LPUSHed onto every stage queue once the decode stage is inside a chunk; a
    supervisor loop restarts any worker that exits, and the check counts those exits."""

    def fault(job_id: str, stage: str) -> None:
        for queue in QUEUES:
            for entry in junk_entries():
                bench.client.lpush(queue, entry)

    exits: list[str] = []
    stopping = threading.Event()

    def supervise() -> None:  # systemd or Kubernetes in production
        while not stopping.wait(0.05):
            for stage, proc in list(bench.procs.items()):
                if proc.poll() is not None:
                    exits.append(f"{stage} {proc.returncode}")
                    bench.start(stage)

    supervisor = threading.Thread(target=supervise, daemon=True)
    supervisor.start()
    try:
        row = bench.run("junk", fault, "decode")
    finally:
        stopping.set()
        supervisor.join(10)
    verdict = (
        f"{len(exits)} WORKER EXITS ({', '.join(exits)}), restarted by a supervisor" if exits else "no worker exited"
    )
    return (*row[:4], f"{row[4]}; {verdict}")


def churn(bench: Bench, seed: int = 2718) -> list[tuple]:
    """The suite's churn soak at bench scale: 4× the items into a local folder, leases of 2 s
    and a sweep every 0.5 s, a random worker SIGKILLed or SIGTERMed every 2-4 s and replaced (12 kills),
    decode kills timed to land while a file is being written, until the job ends. Its baseline:
    the same job on the same workers with no kill."""
    rng = random.Random(seed)
    bench.restart_all(PIXELRELAY_LEASE_S="2", PIXELRELAY_SWEEP_INTERVAL_S="0.5")
    saved = bench.files
    bench.files = good_images(4 * len(saved))
    (bench.logdir / "in").rename(bench.logdir / "in-small") if (bench.logdir / "in").exists() else None
    job_id = f"rec-churn-{uuid.uuid4().hex[:4]}"
    out = bench.logdir / "churn-out"
    kills: list[str] = []
    try:
        base_id = f"rec-churn-base-{uuid.uuid4().hex[:4]}"
        t0 = time.monotonic()
        base_rc = submit_local(bench, base_id, bench.logdir / "churn-base").wait(bench.args.row_timeout)
        base = time.monotonic() - t0
        base_row = ("churn-baseline", base, None, base_rc, check_local(bench, bench.logdir / "churn-base", base_id))
        t0 = time.monotonic()
        waiter = submit_local(bench, job_id, out)
        while waiter.poll() is None and len(kills) < 12 and time.monotonic() - t0 < bench.args.row_timeout:
            time.sleep(rng.uniform(2.0, 4.0))
            stage = rng.choice((*STAGES, "decode"))
            timed = stage == "decode"
            until = time.monotonic() + 5
            seen = len(list(out.glob("*"))) if out.exists() else 0
            while timed and time.monotonic() < until and waiter.poll() is None:
                names = [p.name for p in out.glob("*")] if out.exists() else []
                if len(names) > seen or any(n.startswith(PART) for n in names):
                    break
                time.sleep(0.003)
            if waiter.poll() is not None:
                break
            sig = signal.SIGKILL if timed or rng.random() < 0.6 else signal.SIGTERM
            proc = bench.procs.pop(stage)
            proc.send_signal(sig)
            proc.wait(60)
            bench.start(stage, PIXELRELAY_LEASE_S="2", PIXELRELAY_SWEEP_INTERVAL_S="0.5")
            kills.append(f"{stage[0]}{'K' if sig == signal.SIGKILL else 'T'}")
        try:
            rc = waiter.wait(max(5.0, bench.args.row_timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            waiter.kill()
            rc = "STALLED"
        wall = time.monotonic() - t0
        check = check_local(bench, out, job_id, bench.client)
    finally:
        bench.files = saved
        shutil.rmtree(bench.logdir / "in", ignore_errors=True)
        if (bench.logdir / "in-small").exists():
            (bench.logdir / "in-small").rename(bench.logdir / "in")
        bench.restart_all()
    strays = bench.strays()
    check += f"; {'STRAY workers ' + str(strays) if strays else 'no stray process'}"
    return [base_row, ("churn", wall, None, rc, f"{check}; seed {seed}, {len(kills)} kills {' '.join(kills)}", base)]


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
        extra_rows: list[tuple[str, Callable[[], tuple | list[tuple]]]] = [
            ("run-SIGKILL", lambda: run_sigkill(bench)),
            ("disk-full", lambda: disk_full(bench)),
            ("long-chunk", lambda: long_chunk(bench)),
            ("junk", lambda: junk(bench)),
            ("churn", lambda: churn(bench)),
        ]
        for name, make in extra_rows:
            if only and name not in only:
                continue
            try:
                made = make()
            except Exception as err:  # a row that breaks is reported, the others still run
                made = (name, 0.0, None, "ERROR", f"{type(err).__name__}: {err}"[:200])
            for row in made if isinstance(made, list) else [made]:
                rows.append(row)
                print(f"# {row}", file=sys.stderr, flush=True)
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
    for name, wall, after, rc, check, *own_base in rows:
        after_text = "" if after is None else f"{after:.1f}"
        ref = own_base[0] if own_base else base  # run-SIGKILL and churn: against their own fault-free job
        plain = name in ("baseline", "rescale-x2-to-x4", "hang", "run-baseline", "churn-baseline", "long-chunk")
        extra = "" if plain or rc == "skipped" else f"{wall - ref:+.1f}"
        print(f"| {name} | {wall:.1f} | {after_text} | {extra} | {rc} | {check} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
