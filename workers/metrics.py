"""Prometheus metrics of a stage worker (``--metrics-port N``, ``PIXELRELAY_METRICS_PORT``), on
``--metrics-addr`` (``PIXELRELAY_METRICS_ADDR``; loopback unless set).

The series are listed in docs/operations.md, "Metrics". Queue wait is ``now - since - wait`` of the
chain's entry (``pixelrelay.jobs.chunks``): a Celery message carries no send time.

Invariants: nothing is created, and prometheus_client is not imported, until ``serve``; a
prefork pool uses multiprocess mode, its folder set before the first import and the fork; a
metrics error never fails a task.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

log = logging.getLogger("pixelrelay.worker")

_enabled = False
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def enabled() -> bool:
    return _enabled


def serve(port: int, concurrency: int = 1, addr: str = "127.0.0.1") -> WSGIServer | None:
    """Turn metrics on and serve ``/metrics`` on ``addr:port`` (port 0: off, None returned). Call
    it in the worker's main process before Celery forks (see the module docstring)."""
    global _enabled
    if not port:
        return None
    if concurrency > 1:
        folder = tempfile.mkdtemp(prefix="pixelrelay-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        owner = os.getpid()
        atexit.register(_remove_in, owner, folder)
        _mark_dead_children()
    else:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)  # an inherited one would split the values
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    _enabled = True
    if concurrency > 1:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        _series()  # the parent's own series (none observed there) keep their names listed
        server, _ = start_http_server(port, addr, registry=registry)
    else:
        server, _ = start_http_server(port, addr)
    log.info("metrics on %s:%d/metrics%s", addr, port, " (multiprocess)" if concurrency > 1 else "")
    return server


def _remove_in(owner: int, folder: str) -> None:
    """Remove ``folder`` at exit of the process ``owner`` only (forked children inherit the hook)."""
    if os.getpid() == owner:
        shutil.rmtree(folder, ignore_errors=True)


def _mark_dead_children() -> None:
    from celery.signals import worker_process_shutdown

    def mark(pid=None, **_):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())

    worker_process_shutdown.connect(mark, weak=False)


@functools.cache
def _series():
    from prometheus_client import Counter, Gauge, Histogram

    return {
        "items": Counter("pixelrelay_items_total", "Items that left a stage, by status", ["stage", "status"]),
        "batch_seconds": Histogram(
            "pixelrelay_batch_seconds", "Seconds per model call", ["stage"], buckets=SECONDS_BUCKETS
        ),
        "batch_size": Histogram("pixelrelay_batch_size", "Items per model call", ["stage"], buckets=SIZE_BUCKETS),
        "queue_wait": Histogram(
            "pixelrelay_queue_wait_seconds", "Seconds from enqueue to start", ["stage"], buckets=WAIT_BUCKETS
        ),
        "model_loaded": Gauge(
            "pixelrelay_model_loaded",
            "1 when this worker has the backend loaded",
            ["stage", "backend"],
            multiprocess_mode="livemax",
        ),
        "gpu_memory": Gauge(
            "pixelrelay_gpu_memory_bytes",
            "CUDA memory reserved by the worker's processes",
            ["device"],
            multiprocess_mode="livesum",
        ),
    }


def _guarded(fn):
    """A hook: a no-op while metrics are off; an error in it is logged, never raised."""

    @functools.wraps(fn)
    def hook(*args, **kwargs):
        if not _enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # metrics never fail a task
            log.warning("metrics: %s failed: %s", fn.__name__, exc)
            return None

    return hook


@_guarded
def observe_items(stage: str, entering: set[int], outcome) -> None:
    """Count the items of ``entering`` (indices pending when the delivery began) by where
    ``outcome`` (the chunk after the stage, or a ``Cancelled``) left them."""
    records = getattr(outcome, "records", None)
    if records is None:
        cancelled = getattr(outcome, "dropped", None)  # policy.Cancelled
        if isinstance(cancelled, int) and cancelled:
            _series()["items"].labels(stage, "cancelled").inc(cancelled)
        return
    counts: dict[str, int] = {}
    for record in records:
        if record.index not in entering:
            continue
        if record.status == "failed":
            status = "failed"
        elif record.outcome == "reused":
            status = "reused"
        else:
            status = "done"
        counts[status] = counts.get(status, 0) + 1
    for status, n in counts.items():
        _series()["items"].labels(stage, status).inc(n)


@_guarded
def observe_batch(stage: str, seconds: float, size: int) -> None:
    series = _series()
    series["batch_seconds"].labels(stage).observe(seconds)
    series["batch_size"].labels(stage).observe(size)
    _gpu_memory()


def entering(client, stage: str, msg) -> set[int]:
    """Before a delivery runs: observe its queue wait (from the chain's entry in Redis) and
    return the indices of the items still pending, for ``observe_items``. Empty when off."""
    if not _enabled:
        return set()
    from pixelrelay.jobs.chunks import ChunksInFlight, Slot

    try:
        observe_queue_wait(stage, ChunksInFlight(client, msg.job_id).get(Slot.of(msg)))
    except Exception as exc:  # a Redis error here is the policy's to handle, not ours
        log.warning("metrics: queue wait of %s: %s", stage, exc)
    return {r.index for r in msg.records if r.status is None}


@_guarded
def observe_queue_wait(stage: str, entry, now: float | None = None) -> None:
    """``entry``: the chain's ``pixelrelay.jobs.chunks.Entry`` as read before the stage rewrote it."""
    if entry is None or entry.stage != stage:
        return
    wait = (time.time() if now is None else now) - entry.since - entry.wait
    _series()["queue_wait"].labels(stage).observe(max(0.0, wait))


@_guarded
def model_loaded(stage: str, backend: str) -> None:
    _series()["model_loaded"].labels(stage, backend).set(1)
    _gpu_memory()


def _gpu_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():  # never initialise CUDA for a metric
        return
    for index in range(torch.cuda.device_count()):
        _series()["gpu_memory"].labels(f"cuda:{index}").set(torch.cuda.memory_reserved(index))
