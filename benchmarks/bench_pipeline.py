"""Pipeline throughput vs calling the same three backends directly in one process.

    python benchmarks/bench_pipeline.py [--items 48] [--size 160] [--encoder analysis ...]

Both sides read the source from disk, decode, encode -> plan -> decode, and write the
output. The pipeline side runs the production path (embedded Redis, one `pixelrelay worker`
per stage as subprocesses) on warmed-up workers, so start-up is not counted. Prints a table:
wall time, items/s, per-stage items/s (busy time from the manifest), the ratio to the direct
run, and Redis traffic per item (task messages = LPUSHes to the stage queues).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
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
from pixelrelay.pipeline.imageio import decode_image, encode_image  # noqa: E402
from pixelrelay.pipeline.messages import JobOptions  # noqa: E402
from pixelrelay.pipeline.settings import Settings  # noqa: E402
from pixelrelay.pipeline.stages import create_decoder, create_encoder, create_planner  # noqa: E402
from pixelrelay.producer.embedded import EmbeddedRedis  # noqa: E402
from pixelrelay.producer.run import LocalWorkers  # noqa: E402
from pixelrelay.producer.status import wait_for_job  # noqa: E402
from pixelrelay.producer.submit import submit  # noqa: E402


def make_inputs(folder: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        y, x = np.mgrid[0:size, 0:size].astype(np.float32)
        img = np.stack([128 + 100 * np.sin(x / (4 + i % 5)), 128 + 100 * np.cos(y / 7), x], -1)
        img += rng.normal(0, 10, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")


def direct(folder: Path, out: Path, options: JobOptions, specs: dict, batch: int) -> float:
    encoder = create_encoder(specs["encoder"])
    planner = create_planner(specs["planner"])
    decoder = create_decoder(specs["decoder"])
    paths = sorted(folder.glob("*.png"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for i in range(0, len(paths), batch):
        group = paths[i : i + batch]
        images = [decode_image(p.read_bytes()) for p in group]
        descriptions = encoder.describe(images)
        plans = planner.plan(descriptions, [options] * len(images))
        images = [decode_image(p.read_bytes()) for p in group]  # the pipeline decodes twice too
        for p, restored in zip(group, decoder.restore(images, plans), strict=True):
            data, _ = encode_image(restored.rgb, "png", alpha=restored.alpha)
            (out / p.name).write_bytes(data)
    return time.perf_counter() - started


def commandstats(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def pipeline_run(folder: Path, out: Path, options: JobOptions, specs: dict, batch: int, chunk: int) -> dict:
    os.environ.setdefault("PIXELRELAY_SIGNING_KEY", secrets.token_urlsafe(32))  # workers and producer share it
    with EmbeddedRedis() as server:
        env = dict(
            os.environ,
            PIXELRELAY_REDIS_URL=server.url,
            PIXELRELAY_BATCH_SIZE=str(batch),
            PIXELRELAY_TORCH_THREADS="1",
            PYTHONPATH=str(REPO),
        )
        args = {
            "encode": ["--encoder", specs["encoder"]],
            "plan": ["--planner", specs["planner"]],
            "decode": ["--decoder", specs["decoder"]],
        }
        workers = LocalWorkers(env, args)
        workers.start()
        try:
            settings = Settings.from_env(redis_url=server.url, chunk_size=chunk, window=64, batch_size=batch)
            client = redis.Redis.from_url(server.url)
            # Warm-up job: workers load their backends before the timed run.
            warm = folder.parent / "warm"
            make_inputs(warm, 2, 32)
            job = submit(settings, str(warm), str(out.parent / "warm-out"), options).job_id
            wait_for_job(
                JobState(client, job, settings.signer()),
                settings,
                open(os.devnull, "w"),
                poll_s=0.05,
                health=workers.problem,
            )

            before = commandstats(client)
            started = time.perf_counter()
            job = submit(settings, str(folder), str(out), options).job_id
            wait_for_job(
                JobState(client, job, settings.signer()),
                settings,
                open(os.devnull, "w"),
                poll_s=0.25,
                health=workers.problem,
            )
            wall = time.perf_counter() - started
            after = commandstats(client)
        finally:
            workers.stop()
    rows = [json.loads(line) for line in (out / "_jobs" / job / "manifest.jsonl").read_text().splitlines()]
    busy = {stage: sum(r["timings"].get(f"{stage}_s", 0.0) for r in rows) for stage in ("encode", "plan", "decode")}
    calls = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return {"wall": wall, "rows": rows, "busy": busy, "lpush": calls.get("lpush", 0), "commands": sum(calls.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--task", default="upscale")
    parser.add_argument("--encoder", default="analysis")
    parser.add_argument("--planner", default="rules")
    parser.add_argument("--decoder", default="classic")
    args = parser.parse_args(argv)
    specs = {"encoder": args.encoder, "planner": args.planner, "decoder": args.decoder}
    options = JobOptions(task=args.task)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_inputs(tmp / "in", args.items, args.size)
        import torch

        torch.set_num_threads(1)  # the pipeline's workers get one thread each, too
        direct_s = direct(tmp / "in", tmp / "direct", options, specs, args.batch_size)
        result = pipeline_run(tmp / "in", tmp / "out", options, specs, args.batch_size, args.chunk_size)
    n = args.items
    done = sum(r["status"] == "done" for r in result["rows"])
    print(
        f"{n} items of {args.size}x{args.size} px, task {args.task}, backends {specs}, "
        f"batch {args.batch_size}, chunk {args.chunk_size}"
    )
    print(f"{'measure':<40}{'value':>12}")
    print("-" * 52)
    table = [
        ("items done", f"{done}/{n}"),
        ("direct in-process wall (s)", f"{direct_s:.2f}"),
        ("direct items/s", f"{n / direct_s:.2f}"),
        ("pipeline wall, submit->manifest (s)", f"{result['wall']:.2f}"),
        ("pipeline items/s", f"{n / result['wall']:.2f}"),
        ("pipeline / direct throughput", f"{direct_s / result['wall']:.2f}"),
        *[(f"{stage} stage items/s (busy)", f"{n / max(busy, 1e-9):.1f}") for stage, busy in result["busy"].items()],
        ("task messages (LPUSH) per item", f"{result['lpush'] / n:.3f}"),
        ("Redis commands per item (all)", f"{result['commands'] / n:.2f}"),
    ]
    for name, value in table:
        print(f"{name:<40}{value:>12}")
    return 0 if done == n else 1


if __name__ == "__main__":
    sys.exit(main())
