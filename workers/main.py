"""``pixelrelay worker --stage S``: run one stage's pool on this machine.

concurrency 1 runs Celery's solo pool and loads the model before taking tasks; higher
concurrency runs a prefork pool whose children each load the model after fork (so the
parent never initialises CUDA). A missing model stops the worker here, at start-up.
"""

from __future__ import annotations

import logging
import os
import socket

from pixelrelay.pipeline import constants as C
from pixelrelay.pipeline.settings import ConfigError, Settings
from pixelrelay.pipeline.stages.base import ModelUnavailableError
from pixelrelay.pipeline.stages.registry import backend_class
from pixelrelay.workers.celery_app import get_app, queue_name

log = logging.getLogger("pixelrelay.worker")


def export_settings(**values) -> None:
    """Put flag values into the environment so every worker process sees the same settings."""
    for name, value in values.items():
        if value is not None:
            os.environ["PIXELRELAY_" + name.upper()] = str(value)


def run_worker(stage: str, concurrency: int = 1, loglevel: str | None = None) -> int:
    if stage not in C.STAGES:
        raise ConfigError(f"--stage: must be one of {', '.join(C.STAGES)}")
    settings = Settings.from_env()
    if not settings.redis:
        raise ConfigError("PIXELRELAY_REDIS_URL: not set; a worker needs the job broker's Redis URL")
    spec = getattr(settings, C.STAGE_BACKEND[stage])
    try:
        backend_class(C.STAGE_BACKEND[stage], spec).check_available(spec.partition(":")[2] or None)
    except ModelUnavailableError as exc:
        log.error("%s", exc)
        print(f"pixelrelay worker: {exc}", flush=True)
        return 2

    from celery.signals import worker_process_init

    from pixelrelay.workers.runtime import runtime

    if concurrency <= 1:
        runtime().stage(stage)  # load the model now, in this very process
    else:

        @worker_process_init.connect(weak=False)
        def _load_in_child(**_):
            runtime().stage(stage)

    log.info("stage %s: backend %s on %s, broker %s", stage, spec, settings.device, settings.redacted_redis_url)
    argv = [
        "worker",
        "--queues", queue_name(stage),
        "--pool", "solo" if concurrency <= 1 else "prefork",
        "--concurrency", str(max(1, concurrency)),
        "--prefetch-multiplier", "1",
        "--hostname", f"{stage}-{os.getpid()}@{socket.gethostname()}",
        "--loglevel", (loglevel or settings.log_level),
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-O", "fair",
    ]
    get_app().worker_main(argv)
    return 0
