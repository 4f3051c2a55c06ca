"""Prometheus metrics, scraped over HTTP as an operator's Prometheus would: real stage
workers (``pixelrelay worker --metrics-port N``, the decode one a ``--concurrency 2`` prefork
pool in multiprocess mode) and the backlog exporter, on a Redis of this test's own (so the
session's workers take none of its chains)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline.settings import Settings
from pixelrelay.producer import exporter
from pixelrelay.producer.embedded import EmbeddedRedis, free_port
from tests.conftest import REPO, TEST_BACKENDS, TEST_SIGNER, WorkerPool, run_cli, wait_until, worker_env
from tests.images import good_images

pytestmark = pytest.mark.e2e

N_ITEMS, CHUNK = 12, 2


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def answers(port: int) -> bool:
    try:
        scrape(port)
        return True
    except OSError:
        return False


def start_workers(env: dict, logdir: Path, ports: dict[str, int]) -> WorkerPool:
    pool = WorkerPool(env, logdir, TEST_BACKENDS)
    backend = {"encode": "--encoder", "plan": "--planner", "decode": "--decoder"}
    names = {"encode": "encoder", "plan": "planner", "decode": "decoder"}
    for stage, port in ports.items():
        extra = ["--concurrency", "2"] if stage == "decode" else []
        cmd = [
            sys.executable,
            "-m",
            "pixelrelay",
            "worker",
            "--stage",
            stage,
            "--loglevel",
            "WARNING",
            backend[stage],
            TEST_BACKENDS[names[stage]],
            "--metrics-port",
            str(port),
            *extra,
        ]
        log = open(logdir / f"{stage}.log", "wb")
        pool.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
    return pool


def test_metrics_add_up_to_the_job_and_the_exporter_serves_the_true_backlog(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name, data in good_images(N_ITEMS).items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    with EmbeddedRedis() as server:
        env = worker_env(server.url, PIXELRELAY_CHUNK_SIZE=str(CHUNK), PIXELRELAY_WINDOW="3")
        # Submitted before any worker runs: the queues hold only the window, the backlog all.
        result = run_cli(["submit", str(src), "--out", str(out), "--job-id", "metrics-job"], env)
        assert result.returncode == 0, result.stderr

        stop = threading.Event()
        exporter_port = free_port()
        settings = Settings.from_env(redis_url=server.url)
        threading.Thread(target=exporter.serve, args=(settings, exporter_port, stop), daemon=True).start()
        try:
            wait_until(lambda: answers(exporter_port), timeout=10)
            before = scrape(exporter_port)
            for stage in ("encode", "plan", "decode"):
                assert value(before, "pixelrelay_backlog_items", stage=stage) == N_ITEMS
            assert value(before, "pixelrelay_job_pending_items", job="metrics-job") == N_ITEMS
            assert value(before, "pixelrelay_queue_length", stage="encode") == 3  # the window: not the backlog

            ports = {stage: free_port() for stage in ("encode", "plan", "decode")}
            pool = start_workers(env, tmp_path, ports)
            try:
                state = JobState(redis_client(server.url), "metrics-job", TEST_SIGNER)
                during = []
                deadline = time.monotonic() + 90
                while not state.counts().complete and time.monotonic() < deadline:
                    assert pool.alive(), pool.logs()
                    if all(answers(p) for p in ports.values()):
                        during.append({stage: scrape(p) for stage, p in ports.items()})
                    time.sleep(0.3)
                assert state.counts().complete, pool.logs()
                wait_until(
                    lambda: (
                        value(scrape(ports["decode"]), "pixelrelay_items_total", stage="decode", status="done")
                        == N_ITEMS
                    ),
                    timeout=10,
                )
                after = {stage: scrape(p) for stage, p in ports.items()}
            finally:
                pool.stop()
            wait_until(
                lambda: value(scrape(exporter_port), "pixelrelay_backlog_items", stage="decode") == 0, timeout=20
            )
            assert value(scrape(exporter_port), "pixelrelay_active_jobs") == 0
        finally:
            stop.set()

    assert during, "no scrape answered while the job ran"
    n_chunks = N_ITEMS // CHUNK
    for stage, samples in after.items():
        assert value(samples, "pixelrelay_items_total", stage=stage, status="done") == N_ITEMS, (stage, samples)
        assert value(samples, "pixelrelay_items_total", stage=stage, status="failed") == 0
        assert value(samples, "pixelrelay_batch_size_sum", stage=stage) == N_ITEMS
        assert value(samples, "pixelrelay_batch_seconds_count", stage=stage) >= n_chunks
        assert value(samples, "pixelrelay_queue_wait_seconds_count", stage=stage) >= n_chunks
        backend = TEST_BACKENDS[{"encode": "encoder", "plan": "planner", "decode": "decoder"}[stage]]
        assert value(samples, "pixelrelay_model_loaded", stage=stage, backend=backend) == 1
    # Before the decode worker started, chains waited: the wait is measured from enqueue.
    assert value(after["encode"], "pixelrelay_queue_wait_seconds_sum", stage="encode") > 0


def redis_client(url: str):
    import redis

    return redis.Redis.from_url(url)
