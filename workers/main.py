"""``pixelrelay worker --stage S``: run one stage's pool on this machine.

Concurrency 1 runs the solo pool (the model loads before any task); more runs a prefork pool
whose children load it after fork, so the parent never initialises CUDA and runs no threads
of ours (a fork never copies a held lock). Every task-running process runs the sweep
(``pixelrelay.workers.sweep.Sweeper``). A missing model, an absent ``--device`` or no signing
key (without ``--insecure-no-signing``) stops the worker at start-up with exit 2, and so does
a model that cannot be built (solo: before the pool starts; prefork: a child reports it through
``pixelrelay.workers.refusal`` and the parent stops the pool).
"""

from __future__ import annotations

import logging
import os
import socket
import sys

from pixelrelay.exitcodes import ExitCode
from pixelrelay.health import health_path
from pixelrelay.pipeline import constants as C
from pixelrelay.pipeline.settings import ConfigError, Settings
from pixelrelay.pipeline.stages.base import ModelUnavailableError
from pixelrelay.pipeline.stages.registry import backend_class
from pixelrelay.workers.celery_app import configure_pool, get_app, queue_name
from pixelrelay.workers.observe import enable_health, json_shutdown_notes, quiet_task_success

log = logging.getLogger("pixelrelay.worker")


def device_problem(device: str) -> str | None:
    """Why ``device`` can't be used on this machine, in one line; None if it can.

    Counts CUDA devices with ``torch.cuda.device_count()``, which asks NVML and so does not
    initialise CUDA in this (parent) process where NVML answers.
    """
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return None
    import torch

    if kind == "mps":
        if torch.backends.mps.is_available():
            return None
        built = "with" if torch.backends.mps.is_built() else "without"
        return f"--device mps: no usable MPS device (torch {torch.__version__} built {built} MPS)"
    count = torch.cuda.device_count()
    if count > int(index or 0):
        return None
    built = f"with CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA"
    if count == 0:
        return f"--device {device}: no usable CUDA device (torch {torch.__version__} built {built}; none visible)"
    return f"--device {device}: no such CUDA device (this machine has {count}: cuda:0..cuda:{count - 1})"


def export_settings(**values) -> None:
    """Put flag values into the environment so every worker process sees the same settings."""
    for name, value in values.items():
        if value is not None:
            os.environ["PIXELRELAY_" + name.upper()] = str(value)


def start_sweeper():
    """Start this process's sweep thread (None when ``sweep_interval_s`` is 0)."""
    from pixelrelay.workers.flow import sender, stored_budgets
    from pixelrelay.workers.runtime import runtime
    from pixelrelay.workers.sweep import Sweeper

    rt = runtime()
    if rt.settings.sweep_interval_s <= 0:
        return None
    from pixelrelay.jobs.registry import open_registry

    settings = rt.settings
    registry = open_registry(settings.state_uri, settings.s3_endpoint_url, settings)
    sweeper = Sweeper(
        rt.redis,
        sender(get_app(), rt.signer, stored_budgets(rt.redis, rt.signer)),
        rt.storage,
        settings.sweep_interval_s,
        settings.lease_s,
        registry=registry,
        registry_scan_s=settings.registry_scan_s,
        window=settings.window,
        signer=rt.signer,
    )
    sweeper.start()
    return sweeper


def refuse_remote_control() -> None:
    """Make this worker refuse every Celery remote-control command (``celery inspect`` /
    ``control``, ``app.control.shutdown()``): any Redis client could otherwise stop or
    reconfigure it. The control mailbox itself stays (``worker_enable_remote_control`` left
    on): with it off, Celery 5.x's consumer did not resume consuming after a Redis restart
    (tests/workers/test_redis_loss.py). Its command table is emptied instead, so every command
    is answered with an error and does nothing. Task events are unaffected."""
    from celery.worker.control import Panel

    Panel.data.clear()
    Panel.meta.clear()
    quiet = logging.getLogger("kombu.pidbox")
    if not any(isinstance(f, _RefusedCommandNote) for f in quiet.filters):
        quiet.addFilter(_RefusedCommandNote())


class _RefusedCommandNote(logging.Filter):
    """A refused command (Flower asks ``enable_events`` every few seconds, and ``inspect``)
    reaches kombu as an unknown one and would log an ERROR with a traceback each time; log
    one WARNING per command name instead, and drop the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.args[0] if isinstance(record.args, tuple) and record.args else None
        if not (record.msg == "pidbox command error: %r" and isinstance(exc, KeyError)):
            return True
        name = str(exc.args[0]) if exc.args else "?"
        if name not in self.seen:
            self.seen.add(name)
            log.warning(
                "refused Celery remote-control command %r (remote control is off; "
                "`pixelrelay worker --remote-control` accepts it); further ones are not logged",
                name,
            )
        return False


def run_worker(
    stage: str, concurrency: int = 1, loglevel: str | None = None, remote_control: bool = False, events: bool = True
) -> int:
    """Run one stage's worker until it is stopped.

    Args:
        stage: encode, plan or decode.
        concurrency: 1: the solo pool; more: a prefork pool.
        loglevel: the log level; None: the settings' ``log_level``.
        remote_control: allow ``celery inspect`` / ``control``.
        events: send task events and heartbeats.

    Returns:
        The exit code: 2 (``ExitCode.USAGE``) at start-up for a missing model or device, or a
        model that cannot be built: a refused checkpoint, weights that do not fit it.

    Raises:
        ConfigError: a bad stage or setting, no Redis URL, or no signing key.
    """
    if stage not in C.STAGES:
        raise ConfigError(f"--stage: must be one of {', '.join(C.STAGES)}")
    settings = Settings.from_env()
    if not settings.redis:
        raise ConfigError("PIXELRELAY_REDIS_URL: not set; a worker needs the job broker's Redis URL")
    if not settings.signer().secure:  # no key: a ConfigError (exit 2) unless --insecure-no-signing
        log.warning(
            "stage %s: --insecure-no-signing: message bodies are not verified; anyone who can write "
            "to Redis controls what this worker reads and writes",
            stage,
        )
    problem = device_problem(settings.device)
    if problem:
        print(f"pixelrelay worker: {problem}", file=sys.stderr, flush=True)
        return ExitCode.USAGE
    spec = getattr(settings, C.STAGE_BACKEND[stage])
    try:
        backend_class(C.STAGE_BACKEND[stage], spec).check_available(spec.partition(":")[2] or None)
    except ModelUnavailableError as exc:
        log.error("%s", exc)
        print(f"pixelrelay worker: {exc}", flush=True)
        return 2

    from celery.signals import worker_process_init, worker_process_shutdown, worker_shutdown

    from pixelrelay.workers import metrics, refusal
    from pixelrelay.workers.runtime import BackendLoadError, runtime

    # before the model loads and before any fork
    metrics.serve(settings.metrics_port, concurrency, settings.metrics_addr)
    if concurrency <= 1:
        try:
            runtime().stage(stage)  # load the model now, in this very process (publishes its identity)
        except BackendLoadError as exc:  # a refused checkpoint, weights that do not fit the model, ...
            print(f"pixelrelay worker: stage {stage}: backend {spec} not loaded: {exc}", file=sys.stderr, flush=True)
            return ExitCode.USAGE
        worker_shutdown.connect(lambda **_: runtime().withdraw_all(), weak=False)
        start_sweeper()
    else:
        refusal.open_pipe()

        @worker_process_init.connect(weak=False)
        def _load_in_child(**_):
            try:
                runtime().stage(stage)
            except BackendLoadError as exc:  # the parent stops the worker, as the solo pool does
                refusal.report_and_exit(f"stage {stage}: backend {spec} not loaded: {exc}")
            start_sweeper()

        worker_process_shutdown.connect(lambda **_: runtime().withdraw_all(), weak=False)

    log.info("stage %s: backend %s on %s, broker %s", stage, spec, settings.device, settings.redacted_redis_url)
    argv = [
        "worker",
        "--queues",
        queue_name(stage),
        "--pool",
        "solo" if concurrency <= 1 else "prefork",
        "--concurrency",
        str(max(1, concurrency)),
        "--prefetch-multiplier",
        "1",
        "--hostname",
        f"{stage}-{os.getpid()}@{socket.gethostname()}",
        "--loglevel",
        (loglevel or settings.log_level),
        "--without-gossip",
        "--without-mingle",
        "-O",
        "fair",
    ]
    argv += ["-E"] if events else ["--without-heartbeat"]
    if settings.log_format == "json":
        argv.insert(0, "--quiet")  # celery's own option: no banner, so every line is JSON
        json_shutdown_notes()
    if not remote_control:
        refuse_remote_control()
    app = get_app()
    app.conf.worker_send_task_events = events
    quiet_task_success()
    enable_health(app, health_path(stage), settings.health_interval_s, stage)
    refusal.watch(app)  # a no-op for the solo pool, which opens no pipe
    configure_pool(app, settings, concurrency).worker_main(argv)
    refused = refusal.reason()
    if refused:
        print(f"pixelrelay worker: {refused}", file=sys.stderr, flush=True)
        return ExitCode.USAGE
    return 0
