"""pixelrelay's own cost per item: the null backends through the production path.

    python benchmarks/bench_overhead.py [--items 10000] [--chunk-size 16] [--repeats 3]

The job is ``--items`` small PNGs (``--size`` px square, generated into a temporary
folder), read from and written to a local folder, with the ``null`` encoder, planner and
decoder (``pipeline/stages/*/null.py``): the models cost nothing, so what is left is
pixelrelay itself: broker, storage, image decode / encode, signing, validation and
bookkeeping. It runs like ``bench_pipeline.py``: an embedded Redis, one real ``pixelrelay
worker`` subprocess per stage (``pixelrelay.producer.run.LocalWorkers``, solo pools), warmed up on a
small job first; this process is the producer (``submit`` + ``wait_for_job``, as
``pixelrelay submit --wait`` runs them).

What it counts, between just before the submission and the job's manifest:

* **CPU**: user + system seconds of each stage worker's whole process tree (the worker and
  any prefork children, from ``/proc``), and of this process (the producer), divided by the
  items. The embedded ``redis-server``'s own CPU (``INFO cpu``) is shown apart, outside the
  total: it is the broker's cost, not pixelrelay's.
* **Redis commands** per item, by command (``INFO commandstats`` before and after), from
  every client: producer, workers, their idle polling and events.

The inputs are flushed to disk (``sync``) before the first job: the decode stage's group
commit makes its outputs durable with one ``syncfs`` per batch, which also writes back
whatever else is dirty on that file system, and the bench's freshly written inputs are not
the job's cost. Each repeat is a new job over the same inputs into a new output folder;
the table shows the median of the repeats (and min - max). CPU time, not wall time, is the measure: on a
shared machine it is still noisy (caches, frequency), so repeat and compare medians.
Linux only (``/proc``).

``--profile DIR`` also samples the producer and each worker with py-spy (``pip install
py-spy``; not a dependency of pixelrelay) during the timed jobs, every thread, and writes
their collapsed stacks (``DIR/<process>.txt``, flamegraph input) and a summary of the
functions with the most samples, inclusive and self (``DIR/<process>.top.txt``).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import redis  # noqa: E402
from PIL import Image  # noqa: E402

from pixelrelay.jobs.state import JobState  # noqa: E402
from pixelrelay.pipeline import constants as C  # noqa: E402
from pixelrelay.pipeline.messages import Backends, JobOptions  # noqa: E402
from pixelrelay.pipeline.settings import Settings  # noqa: E402
from pixelrelay.producer.embedded import EmbeddedRedis  # noqa: E402
from pixelrelay.producer.run import LocalWorkers  # noqa: E402
from pixelrelay.producer.status import wait_for_job  # noqa: E402
from pixelrelay.producer.submit import submit  # noqa: E402

NULL = {"encoder": "null", "planner": "null", "decoder": "null"}
TICKS = os.sysconf("SC_CLK_TCK")
TARGET_MS = 2.0  # the target: producer + all workers, user + system, per item, at chunk 16


def make_inputs(folder: Path, n: int, size: int) -> None:
    """``n`` distinct ``size`` x ``size`` RGB PNGs (noise, so each is its own file)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(sub / f"{i:05d}.png")


# --- CPU of process trees, from /proc ---------------------------------------------------------


def _stat(pid: int) -> tuple[int, float, float] | None:
    """(parent pid, user s, system s) of a live process (all its threads); None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[11]) / TICKS, int(fields[12]) / TICKS  # ppid, utime, stime


def tree_cpu(root: int) -> tuple[float, float]:
    """(user, system) seconds of ``root`` and all its live descendants (all threads)."""
    stats = {pid: s for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if (s := _stat(pid))}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    user = system = 0.0
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            user, system = user + stats[pid][1], system + stats[pid][2]
            todo.extend(children.get(pid, ()))
    return user, system


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def commandstats(client: redis.Redis) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in client.info("commandstats").items()}


# --- one run ------------------------------------------------------------------------------


def snapshot(workers: LocalWorkers, client: redis.Redis) -> dict:
    cpu = {stage: tree_cpu(proc.pid) for stage, proc in workers.procs.items()}
    own = os.times()
    cpu["producer"] = (own.user, own.system)
    return {"cpu": cpu, "redis_cpu": redis_cpu(client), "commands": commandstats(client)}


class Profiler:
    """py-spy recording the producer (this process) and the workers while it is entered."""

    def __init__(self, folder: Path | None, workers: LocalWorkers) -> None:
        self.folder, self.workers, self.procs = folder, workers, []
        self.spy = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
        if folder is not None and self.spy is None:
            raise SystemExit("--profile needs py-spy: pip install py-spy")

    def __enter__(self) -> Profiler:
        if self.folder is None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        pids = {"producer": os.getpid(), **{stage: p.pid for stage, p in self.workers.procs.items()}}
        for name, pid in pids.items():
            cmd = [
                self.spy,
                "record",
                "--pid",
                str(pid),
                "--nonblocking",
                "--gil",
                "--threads",
                "--format",
                "raw",
                "--rate",
                "200",
                "--output",
                str(self.folder / f"{name}.txt"),
            ]
            self.procs.append((name, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        time.sleep(1.0)  # py-spy attaches
        return self

    def __exit__(self, *exc) -> None:
        for _, proc in self.procs:
            proc.send_signal(signal.SIGINT)
        for name, proc in self.procs:
            proc.wait(60)
            summarise(self.folder / f"{name}.txt", self.folder / f"{name}.top.txt")


def summarise(collapsed: Path, out: Path, top: int = 60) -> None:
    """The functions with the most samples in a collapsed-stack file: inclusive and self."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    if not collapsed.exists():
        return
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n, frames = int(count), stack.split(";")
        total += n
        for frame in set(frames[1:]):  # the first frame is the thread
            inclusive[frame] = inclusive.get(frame, 0) + n
        own[frames[-1]] = own.get(frames[-1], 0) + n
    lines = [f"{total} samples"]
    for title, table in (("inclusive", inclusive), ("self", own)):
        lines += ["", f"--- {title}"]
        lines += [
            f"{100 * n / max(total, 1):6.1f}%  {name}" for name, n in sorted(table.items(), key=lambda kv: -kv[1])[:top]
        ]
    out.write_text("\n".join(lines) + "\n")


def run_job(
    settings: Settings, client: redis.Redis, workers: LocalWorkers, folder: Path, out: Path, options: JobOptions
) -> dict:
    """One job, submit to manifest; the counters' differences."""
    before = snapshot(workers, client)
    started = time.perf_counter()
    job = submit(settings, str(folder), str(out), options, Backends(**NULL)).job_id
    counts = wait_for_job(JobState(client, job, settings.signer()), settings, None, health=workers.problem)
    wall = time.perf_counter() - started
    after = snapshot(workers, client)
    commands = {k: after["commands"].get(k, 0) - before["commands"].get(k, 0) for k in after["commands"]}
    return {
        "job": job,
        "done": counts.done,
        "wall": wall,
        "cpu": {k: sum(after["cpu"][k]) - sum(before["cpu"][k]) for k in before["cpu"]},
        "system": {k: after["cpu"][k][1] - before["cpu"][k][1] for k in before["cpu"]},
        "redis_cpu": after["redis_cpu"] - before["redis_cpu"],
        "commands": {k: v for k, v in commands.items() if v},
    }


def run_all(args: argparse.Namespace, tmp: Path) -> list[dict]:
    make_inputs(tmp / "in", args.items, args.size)
    make_inputs(tmp / "warm", args.warmup, args.size)
    os.sync()  # the decode stage's group commit syncs the file system: not the bench's own inputs
    os.environ.setdefault("PIXELRELAY_SIGNING_KEY", secrets.token_urlsafe(32))  # workers and producer share it
    options = JobOptions(task="restore")
    runs = []
    with EmbeddedRedis() as server:
        env = dict(
            os.environ,
            PIXELRELAY_REDIS_URL=server.url,
            PIXELRELAY_CHUNK_SIZE=str(args.chunk_size),
            PIXELRELAY_BATCH_SIZE=str(args.batch_size),
            PIXELRELAY_TORCH_THREADS="1",
        )
        extra = ["--no-events"] if args.no_events else []
        workers = LocalWorkers(env, {stage: [f"--{C.STAGE_BACKEND[stage]}", "null", *extra] for stage in C.STAGES})
        workers.start()
        try:
            settings = Settings.from_env(redis_url=server.url, chunk_size=args.chunk_size, batch_size=args.batch_size)
            client = redis.Redis.from_url(server.url)
            run_job(settings, client, workers, tmp / "warm", tmp / "warm-out", options)  # loads, imports, connects
            with Profiler(args.profile, workers):
                for i in range(args.repeats):
                    runs.append(run_job(settings, client, workers, tmp / "in", tmp / f"out{i}", options))
                    print(
                        f"repeat {i + 1}/{args.repeats}: {runs[-1]['done']}/{args.items} done in "
                        f"{runs[-1]['wall']:.1f} s",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            workers.stop()
            workers.finish_logs(ok=all(r["done"] == args.items for r in runs), keep=args.keep_logs)
    return runs


# --- the table ----------------------------------------------------------------------------


def _median_range(values: list[float], fmt: str) -> str:
    med = format(statistics.median(values), fmt)
    return med if len(values) == 1 else f"{med} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def table(args: argparse.Namespace, runs: list[dict]) -> list[str]:
    n = args.items
    per_item = lambda run, key: 1000 * run["cpu"][key] / n  # noqa: E731  ms
    rows = []
    for name in ("producer", *C.STAGES):
        rows.append((f"{name} CPU, ms/item", [per_item(r, name) for r in runs]))
        rows.append(("  of which system", [1000 * r["system"][name] / n for r in runs]))
    totals = [sum(r["cpu"].values()) * 1000 / n for r in runs]
    rows.append(("total (producer + workers), ms/item", totals))
    # The system part is mostly the decode stage's syncfs (its group commit), which also pays
    # for whatever else the file system has pending: shown apart, as it swings with the disk.
    rows.append(("  of which system", [sum(r["system"].values()) * 1000 / n for r in runs]))
    rows.append(("redis-server CPU, ms/item (not in total)", [1000 * r["redis_cpu"] / n for r in runs]))
    rows.append(("wall, s", [r["wall"] for r in runs]))
    rows.append(("Redis commands/item (all)", [sum(r["commands"].values()) / n for r in runs]))
    names = sorted(
        {k for r in runs for k in r["commands"]},
        key=lambda k: -statistics.median([r["commands"].get(k, 0) for r in runs]),
    )
    rows += [(f"  {name}", [r["commands"].get(name, 0) / n for r in runs]) for name in names]
    width = max(len(name) for name, _ in rows) + 2
    lines = [
        f"{n} items of {args.size}x{args.size} px PNG, null backends, "
        f"chunk {args.chunk_size}, batch {args.batch_size}, "
        f"task events {'off' if args.no_events else 'on'}, {args.repeats} repeat(s): median (min-max)",
        f"{'measure':<{width}}value",
        "-" * (width + 24),
    ]
    for name, values in rows:
        fmt = ".1f" if name.startswith("wall") else ".3f"
        lines.append(f"{name:<{width}}{_median_range(values, fmt)}")
    verdict = "met" if statistics.median(totals) <= TARGET_MS else "NOT met"
    lines.append(f"target: total <= {TARGET_MS:g} ms/item at chunk 16: {verdict}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=32, help="image side, px")
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=Settings.defaults().batch_size)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=64, help="items of the warm-up job (not counted)")
    parser.add_argument("--no-events", action="store_true", help="workers without Celery task events (default: on)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the workers' logs")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="sample every process with py-spy into DIR")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        runs = run_all(args, Path(tmp))
        print("\n".join(table(args, runs)), flush=True)  # before the (slow) clean-up of the outputs
    return 0 if all(r["done"] == args.items for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
