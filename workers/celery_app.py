"""The Celery app and its configuration. Importing this module imports no torch and needs no
settings.

Not called ``app``: a submodule of that name would shadow the package's ``app`` attribute
that ``celery -A pixelrelay.workers`` looks up.
"""

from __future__ import annotations

import functools
from urllib.parse import parse_qs, urlsplit, urlunsplit

from celery import Celery

from pixelrelay.pipeline import constants as C
from pixelrelay.pipeline.settings import ConfigError, Settings
from pixelrelay.workers.transport import SOCKET_TRANSPORT, TRANSPORT


def queue_name(stage: str) -> str:
    return C.QUEUE_PREFIX + stage


def task_name(stage: str) -> str:
    return C.TASK_PREFIX + stage


def broker(redis_url: str) -> tuple[str, str | None]:
    """The broker URL and transport for a Redis URL. redis-py's ``unix://[:PW@]/path?db=N``
    is kombu's ``socket://[:PW@]/path?virtual_host=N``; ``rediss://`` keeps kombu's own
    transport (its TLS defaults)."""
    parts = urlsplit(redis_url)
    if parts.scheme == "unix":
        db = parse_qs(parts.query).get("db", ["0"])[0]
        return urlunsplit(parts._replace(scheme="socket", query=f"virtual_host={db}")), SOCKET_TRANSPORT
    return redis_url, TRANSPORT if parts.scheme == "redis" else None


def configure(app: Celery, settings: Settings) -> Celery:
    broker_url, transport = broker(settings.redis)
    app.conf.update(
        broker_url=broker_url,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        # Losing Redis is not fatal: workers and producers reconnect for as long as it takes
        # (then the job is rebuilt from storage if Redis came back empty: jobs.recover).
        broker_connection_retry=True,
        broker_connection_max_retries=None,
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 20, "interval_start": 0, "interval_step": 0.5, "interval_max": 2},
        # body_encoding None: a message's JSON body goes into kombu's Redis envelope as it is,
        # not base64'd (kombu's default for every virtual transport): each message is ~20 %
        # smaller in Redis and cheaper to wrap and unwrap. Each message names its encoding
        # (``properties.body_encoding``), so either kind is read by any kombu version.
        # max_message_bytes: queue entries longer than this are dropped unread (workers.screen).
        broker_transport_options={
            "visibility_timeout": settings.visibility_s(),
            "body_encoding": None,
            "max_message_bytes": settings.max_message_bytes,
        },
        task_routes={task_name(stage): {"queue": queue_name(stage)} for stage in C.STAGES},
        task_default_queue=queue_name("encode"),
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        broker_pool_limit=4,
    )
    if transport:
        app.conf.broker_transport = transport
    return app


def time_limits(settings: Settings) -> tuple[float, float]:
    """Celery's default (soft, hard) time limits per task for a prefork pool: for a message
    without limits of its own (a job whose spec has no item budget; a job's messages carry
    theirs, ``pixelrelay.pipeline.limits``). The hard limit is ``PIXELRELAY_TASK_TIME_LIMIT_S``
    or, when 0, this worker's full chunk's watchdog budget (``item_budget_s x chunk_size``)
    plus two leases and a minute: the lease watchdog (``pixelrelay.workers.lease``) always acts
    first and finishes the chunk cleanly; these limits only end a child that the watchdog
    could not. The soft limit is 30 s before the hard one."""
    hard = settings.task_time_limit_s or settings.longest_batch_s()
    return max(1.0, hard - 30), hard


def configure_pool(app: Celery, settings: Settings, concurrency: int) -> Celery:
    """Per-task time limits and the memory ceiling per child, for a prefork pool
    (``concurrency`` > 1). Celery applies neither to the solo pool, where the lease
    watchdog alone bounds a chunk's time; nothing is set there."""
    if concurrency > 1:
        soft, hard = time_limits(settings)
        app.conf.update(task_soft_time_limit=soft, task_time_limit=hard)
        if settings.max_memory_per_child_kb:
            app.conf.update(worker_max_memory_per_child=settings.max_memory_per_child_kb)
    return app


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings.from_env()
    if not settings.redis:
        raise ConfigError("PIXELRELAY_REDIS_URL: not set (use `pixelrelay run` for the embedded Redis)")
    app = Celery("pixelrelay", set_as_current=True)
    return configure(app, settings)


@functools.cache
def get_app() -> Celery:
    """The workers' app, built on first use (a ``ConfigError`` is raised, not cached, when
    the environment names no Redis), with the stage tasks registered."""
    from pixelrelay.workers import tasks

    app = create_app()
    tasks.register(app)
    return app
