"""One job, four systems, side by side: the direct loop, pixelrelay with warm workers,
``pixelrelay run`` cold, and Ray Data.

    python benchmarks/bench_compare.py [--items 96] [--size 256] [--repeats 3] [--systems ...]

The job: ``--items`` photo crops of ``--size``² (centre crops of the training photos in
``../shared/data/train``, or generated images where that folder is missing), upscaled ×2 with
the default backends (``builtin`` / ``rules`` / ``builtin``). Every system reads PNGs from
disk and writes PNGs to disk, and decodes each source twice (for the encoder and for the
decoder), as the pipeline does.

* **direct**: one process, one batch after another, torch on all cores.
* **warm**: pixelrelay's production path (embedded Redis, one ``pixelrelay worker`` per stage
  as subprocesses), warmed up by a small job first so models are loaded and the thread split
  (``pixelrelay.workers.balance``, the same one ``pixelrelay run`` uses) has been measured; timed from
  submit to manifest.
* **run (cold)**: ``pixelrelay run`` as a user types it: start-up, model loading and
  shutdown included.
* **ray**: Ray Data (``pip install -e '.[bench]'``), three ``map_batches`` stages on actors
  with the same backends, the same batch size, one actor per stage and the same torch threads
  per stage as the warm pixelrelay workers (printed with the table). Each Ray Data execution
  starts its actor pools, which load the models, so this row pays start-up as ``run (cold)``
  does (Ray itself is started once, before the first round). Skipped, with a message, when
  Ray is not installed.

Repeats are interleaved (the order rotates each round) and the table shows medians; the
ratios at the bottom are of medians from this one run. The machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import redis  # noqa: E402
from PIL import Image  # noqa: E402

from pixelrelay.jobs.state import JobState  # noqa: E402
from pixelrelay.pipeline.imageio import decode_image, encode_image  # noqa: E402
from pixelrelay.pipeline.memory import tune_allocator  # noqa: E402
from pixelrelay.pipeline.messages import Description, JobOptions, Plan  # noqa: E402
from pixelrelay.pipeline.settings import Settings  # noqa: E402
from pixelrelay.pipeline.stages import create_decoder, create_encoder, create_planner  # noqa: E402
from pixelrelay.producer.embedded import EmbeddedRedis  # noqa: E402
from pixelrelay.producer.run import LocalWorkers  # noqa: E402
from pixelrelay.producer.status import wait_for_job  # noqa: E402
from pixelrelay.producer.submit import submit  # noqa: E402
from pixelrelay.workers import balance  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "train"
SPECS = {"encoder": "builtin", "planner": "rules", "decoder": "builtin"}
OPTIONS = JobOptions(task="upscale", scale=2)
SYSTEMS = ("direct", "warm", "run", "ray")


def make_inputs(folder: Path, n: int, size: int) -> str:
    """``n`` PNG crops of ``size``²; where they came from."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted(p for p in DATA.rglob("*") if p.suffix.lower() in (".webp", ".png", ".jpg"))
    if photos:
        for i in range(n):
            img = Image.open(photos[i % len(photos)]).convert("RGB")
            # A different crop each time a photo is reused.
            dx = (i // len(photos)) * size // 3
            left = min(max(0, (img.width - size) // 2 + dx), max(0, img.width - size))
            top = max(0, (img.height - size) // 2)
            img.crop((left, top, left + size, top + size)).save(folder / f"{i:04d}.png")
        return f"centre crops of {len(photos)} photos in {DATA}"
    rng = np.random.default_rng(0)
    for i in range(n):
        y, x = np.mgrid[0:size, 0:size].astype(np.float32)
        img = np.stack([128 + 100 * np.sin(x / (4 + i % 5)), 128 + 100 * np.cos(y / 7), x], -1)
        img += rng.normal(0, 8, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return "generated images (no training photos found)"


# --- direct ---------------------------------------------------------------------------


def direct(folder: Path, out: Path, batch: int) -> float:
    import torch

    tune_allocator()  # the workers' allocator policy, for a like-for-like baseline
    torch.set_num_threads(os.cpu_count() or 1)
    encoder, planner, decoder = (
        create_encoder(SPECS["encoder"]),
        create_planner(SPECS["planner"]),
        create_decoder(SPECS["decoder"]),
    )
    _direct_pass(sorted(folder.glob("*.png"))[:batch], out / "warm", encoder, planner, decoder, batch)  # warm-up
    started = time.perf_counter()
    _direct_pass(sorted(folder.glob("*.png")), out, encoder, planner, decoder, batch)
    return time.perf_counter() - started


def _direct_pass(paths, out: Path, encoder, planner, decoder, batch: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(paths), batch):
        group = paths[i : i + batch]
        descriptions = encoder.describe([decode_image(p.read_bytes()) for p in group])
        plans = planner.plan(descriptions, [OPTIONS] * len(group))
        images = [decode_image(p.read_bytes()) for p in group]
        for p, restored in zip(group, decoder.restore(images, plans), strict=True):
            (out / p.name).write_bytes(encode_image(restored.rgb, "png", alpha=restored.alpha)[0])


# --- pixelrelay, warm workers ----------------------------------------------------------


class WarmPixelrelay:
    """One embedded Redis and three workers, kept for every repeat."""

    def __init__(self, tmp: Path, batch: int, chunk: int) -> None:
        self.tmp, self.batch, self.chunk = tmp, batch, chunk
        self.server = EmbeddedRedis().__enter__()
        env = dict(
            os.environ, PIXELRELAY_REDIS_URL=self.server.url, PIXELRELAY_BATCH_SIZE=str(batch), PYTHONPATH=str(REPO)
        )
        env.pop("PIXELRELAY_TORCH_THREADS", None)
        args = {
            stage: [f"--{kind}", SPECS[kind]]
            for stage, kind in (("encode", "encoder"), ("plan", "planner"), ("decode", "decoder"))
        }
        self.workers = LocalWorkers(env, args)
        self.balancer = balance.Balancer(self.workers.logdir, os.cpu_count() or 1)
        env[balance.ENV_DIR] = self.workers.logdir
        self.workers.stage_env = {s: {"PIXELRELAY_TORCH_THREADS": str(n)} for s, n in self.balancer.current.items()}
        self.workers.start()
        self.settings = Settings.from_env(redis_url=self.server.url, chunk_size=chunk, window=64, batch_size=batch)
        self.client = redis.Redis.from_url(self.server.url)
        self.runs = 0

    def _health(self):
        self.balancer.tick()
        return self.workers.problem()

    def job(self, folder: Path, out: Path) -> tuple[float, str]:
        started = time.perf_counter()
        job = submit(self.settings, str(folder), str(out), OPTIONS).job_id
        wait_for_job(
            JobState(self.client, job, self.settings.signer()),
            self.settings,
            open(os.devnull, "w"),
            poll_s=0.1,
            health=self._health,
        )
        return time.perf_counter() - started, job

    def warm_up(self, folder: Path) -> None:
        """Two warm-up jobs: models load, costs are measured, the split is applied."""
        for i in range(2):
            self.job(folder, self.tmp / f"warm-out-{i}")
            self.balancer.last = 0.0
            self._health()

    def close(self) -> None:
        self.workers.stop()
        self.server.__exit__(None, None, None)


# --- pixelrelay run, cold --------------------------------------------------------------


def run_cold(folder: Path, out: Path, batch: int, chunk: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for name in ("PIXELRELAY_REDIS_URL", "PIXELRELAY_TORCH_THREADS", "PIXELRELAY_SIGNING_KEY"):
        env.pop(name, None)
    started = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pixelrelay",
            "run",
            str(folder),
            "--out",
            str(out),
            "--task",
            "upscale",
            "--scale",
            "2",
            "--batch-size",
            str(batch),
            "--chunk-size",
            str(chunk),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"pixelrelay run failed ({result.returncode}): {result.stderr[-2000:]}")
    return wall


# --- Ray Data --------------------------------------------------------------------------


class _Encode:
    def __init__(self, threads: int) -> None:
        import torch

        tune_allocator()
        torch.set_num_threads(threads)
        self.encoder = create_encoder(SPECS["encoder"])

    def __call__(self, batch: dict) -> dict:
        images = [decode_image(Path(p).read_bytes()) for p in batch["path"]]
        batch["description"] = np.array([d.model_dump_json() for d in self.encoder.describe(images)], dtype=object)
        return batch


class _Plan:
    def __init__(self, threads: int) -> None:
        import torch

        tune_allocator()
        torch.set_num_threads(threads)
        self.planner = create_planner(SPECS["planner"])

    def __call__(self, batch: dict) -> dict:
        descriptions = [Description.model_validate_json(d) for d in batch["description"]]
        plans = self.planner.plan(descriptions, [OPTIONS] * len(descriptions))
        batch["plan"] = np.array([p.model_dump_json() for p in plans], dtype=object)
        return batch


class _Decode:
    def __init__(self, threads: int, out: str) -> None:
        import torch

        tune_allocator()
        torch.set_num_threads(threads)
        self.decoder = create_decoder(SPECS["decoder"])
        self.out = Path(out)

    def __call__(self, batch: dict) -> dict:
        images = [decode_image(Path(p).read_bytes()) for p in batch["path"]]
        plans = [Plan.model_validate_json(p) for p in batch["plan"]]
        for p, restored in zip(batch["path"], self.decoder.restore(images, plans), strict=True):
            (self.out / Path(p).name).write_bytes(encode_image(restored.rgb, "png", alpha=restored.alpha)[0])
        return {"path": batch["path"]}


def ray_job(ray, folder: Path, out: Path, batch: int, threads: dict[str, int]) -> float:
    out.mkdir(parents=True, exist_ok=True)
    paths = sorted(str(p) for p in folder.glob("*.png"))
    started = time.perf_counter()
    ds = ray.data.from_items([{"path": p} for p in paths])
    ds = ds.map_batches(
        _Encode,
        fn_constructor_kwargs={"threads": threads["encode"]},
        batch_size=batch,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=threads["encode"],
    )
    ds = ds.map_batches(
        _Plan,
        fn_constructor_kwargs={"threads": threads["plan"]},
        batch_size=batch,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=threads["plan"],
    )
    ds = ds.map_batches(
        _Decode,
        fn_constructor_kwargs={"threads": threads["decode"], "out": str(out)},
        batch_size=batch,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=threads["decode"],
    )
    count = ds.count()
    wall = time.perf_counter() - started
    if count != len(paths):
        raise RuntimeError(f"ray wrote {count} of {len(paths)}")
    return wall


# --- the table -------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=96)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    return parser.parse_args(argv)


def _import_ray(systems: list[str]) -> ModuleType | None:
    """The ``ray`` module, or None (and "ray" dropped from ``systems``) where it is not installed."""
    if "ray" not in systems:
        return None
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        print("ray is not installed (pip install -e '.[bench]'): the Ray Data row is skipped", file=sys.stderr)
        systems.remove("ray")
        return None
    return ray


def _start_ray(ray: ModuleType, tmp: Path, batch: int, threads: dict[str, int]) -> None:
    """Ray started with the warm workers' thread split, and warmed up on ``tmp/warm-in``."""
    ray.init(
        num_cpus=max(os.cpu_count() or 1, sum(threads.values())),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_job(ray, tmp / "warm-in", tmp / "ray-warm", batch, threads)


def _run_system(
    system: str,
    args: argparse.Namespace,
    tmp: Path,
    out: Path,
    warm: WarmPixelrelay | None,
    ray: ModuleType | None,
    threads: dict[str, int],
) -> float:
    """One timed run of ``system`` over ``tmp/in``: its wall seconds."""
    if system == "direct":
        return direct(tmp / "in", out, args.batch_size)
    if system == "warm":
        assert warm is not None
        return warm.job(tmp / "in", out)[0]
    if system == "run":
        return run_cold(tmp / "in", out, args.batch_size, args.chunk_size)
    return ray_job(ray, tmp / "in", out, args.batch_size, threads)


def _print_table(
    args: argparse.Namespace, source: str, threads: dict[str, int], systems: list[str], times: dict[str, list[float]]
) -> None:
    """The markdown table of items/s per system, and the ratios between them."""
    rates = {s: args.items / statistics.median(t) for s, t in times.items()}
    names = {
        "direct": "direct loop, one process, all cores",
        "warm": "pixelrelay, warm workers (submit --wait)",
        "run": "pixelrelay run, cold",
        "ray": "Ray Data, three map_batches actor stages",
    }
    print(
        f"{args.items} × {args.size}² PNG ({source}), upscale ×2, backends {SPECS}, batch {args.batch_size}, "
        f"chunk {args.chunk_size}, {os.cpu_count()} cores, median of {args.repeats} interleaved repeats"
    )
    print(f"torch threads per stage (pixelrelay warm workers and Ray actors; one actor/worker per stage): {threads}")
    print()
    print(f"| {'system':<44} | {'items/s':>8} | {'all repeats':<24} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 26}|")
    for s in systems:
        all_rates = ", ".join(f"{args.items / t:.2f}" for t in times[s])
        print(f"| {names[s]:<44} | {rates[s]:8.2f} | {all_rates:<24} |")
    print()
    for a, b in (("warm", "ray"), ("warm", "direct"), ("run", "direct"), ("run", "ray")):
        if a in rates and b in rates:
            print(f"{a} / {b}: {rates[a] / rates[b]:.2f}×")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    os.environ.setdefault("PIXELRELAY_SIGNING_KEY", secrets.token_urlsafe(32))
    systems = list(args.systems)
    ray = _import_ray(systems)
    times: dict[str, list[float]] = {s: [] for s in systems}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = make_inputs(tmp / "in", args.items, args.size)
        make_inputs(tmp / "warm-in", args.chunk_size * 2, args.size)
        warm = None
        if "warm" in systems or "ray" in systems:  # ray takes the warm workers' thread split
            warm = WarmPixelrelay(tmp, args.batch_size, args.chunk_size)
            warm.warm_up(tmp / "warm-in")
        threads = dict(warm.balancer.current) if warm else balance.prior(os.cpu_count() or 1)
        if ray is not None:
            _start_ray(ray, tmp, args.batch_size, threads)
        try:
            for r in range(args.repeats):
                order = systems[r % len(systems) :] + systems[: r % len(systems)]
                for system in order:
                    wall = _run_system(system, args, tmp, tmp / f"out-{system}-{r}", warm, ray, threads)
                    times[system].append(wall)
                    print(f"round {r + 1}: {system:<7}{args.items / wall:8.2f} items/s", file=sys.stderr, flush=True)
        finally:
            if warm is not None:
                warm.close()
    _print_table(args, source, threads, systems, times)
    return 0


if __name__ == "__main__":
    sys.exit(main())
