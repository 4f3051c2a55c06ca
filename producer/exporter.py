"""``pixelrelay exporter --port N``: an always-on process that serves the backlog, computed from
Redis at each scrape (``pixelrelay.jobs.backlog``), since workers may scale to zero. The
series are listed in docs/operations.md, "Metrics".

Invariant: a Redis error fails the scrape (HTTP 500), so a stale value is never served.
Without the signing key every pending item counts at every stage.
"""

from __future__ import annotations

import logging
import threading

import redis

from pixelrelay.jobs.backlog import active_backlogs
from pixelrelay.pipeline import constants as C
from pixelrelay.pipeline.settings import ConfigError, Settings

log = logging.getLogger("pixelrelay.exporter")
DEFAULT_PORT = 9808


class BacklogCollector:
    """A prometheus_client collector reading Redis at each ``collect``."""

    def __init__(self, client: redis.Redis, signer) -> None:
        self.r, self.signer = client, signer

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        jobs = active_backlogs(self.r, self.signer)
        backlog = GaugeMetricFamily(
            "pixelrelay_backlog_items", "Items of active jobs not yet through the stage", labels=["stage"]
        )
        chains = GaugeMetricFamily(
            "pixelrelay_chains_in_flight", "Chains of active jobs at the stage", labels=["stage"]
        )
        queue = GaugeMetricFamily(
            "pixelrelay_queue_length", "Messages waiting in the stage's queue (windowed)", labels=["stage"]
        )
        for stage in C.STAGES:
            backlog.add_metric([stage], sum(j.stages[stage] for j in jobs))
            chains.add_metric([stage], sum(j.chains[stage] for j in jobs))
            queue.add_metric([stage], self.r.llen(C.QUEUE_PREFIX + stage))
        pending = GaugeMetricFamily(
            "pixelrelay_job_pending_items", "Items of an active job without a final status", labels=["job"]
        )
        for job in jobs:
            pending.add_metric([job.job_id], job.pending)
        active = GaugeMetricFamily("pixelrelay_active_jobs", "Jobs with chains in flight", value=len(jobs))
        return [backlog, pending, chains, queue, active]


def registry_for(client: redis.Redis, signer):
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(BacklogCollector(client, signer))
    return registry


def signer_or_none(settings: Settings):
    try:
        return settings.signer()
    except ConfigError:
        log.warning("exporter: no signing key: the backlog counts every pending item at every stage")
        return None


def serve(settings: Settings, port: int, stop: threading.Event | None = None, addr: str | None = None) -> None:
    """Serve ``/metrics`` on ``addr:port`` until ``stop`` is set (forever without one); ``addr``
    None: the settings' ``metrics_addr`` (loopback unless set)."""
    from prometheus_client import start_http_server

    if not settings.redis:
        raise ConfigError("PIXELRELAY_REDIS_URL: not set; the exporter reads the job broker's Redis")
    client = redis.Redis.from_url(settings.redis, socket_timeout=10)
    addr = addr or settings.metrics_addr
    server, thread = start_http_server(port, addr, registry=registry_for(client, signer_or_none(settings)))
    log.info("exporter: backlog metrics on %s:%d/metrics, from %s", addr, port, settings.redacted_redis_url)
    try:
        (stop or threading.Event()).wait()
    finally:
        server.shutdown()
