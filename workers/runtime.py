"""Per-process state of a stage worker: settings, Redis, storage and the loaded models.

Invariants: a backend is built once per process (after fork in a prefork child) and only from
an allowed spec (``BackendNotAllowedError`` before anything is imported), cached under its
canonical spelling so that no message can grow the cache. Built backends' identities are
published in Redis (``pixelrelay.jobs.identities``) and refreshed by a daemon thread; a
publish error is only logged. ``BackendLoadError`` never quotes a folder's contents.
``DecodeBudget`` bounds the decoded source bytes a stage holds at once.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import redis

from pixelrelay.jobs import identities, keys
from pixelrelay.pipeline import constants as C
from pixelrelay.pipeline.memory import tune_allocator
from pixelrelay.pipeline.settings import Settings
from pixelrelay.pipeline.stages.base import Decoder, Encoder, ModelUnavailableError, Planner, StageSpec
from pixelrelay.pipeline.stages.registry import (
    BackendNotAllowedError,
    canonical_spec,
    create_decoder,
    create_encoder,
    create_planner,
    parse_allowlist,
    spec_allowed,
)
from pixelrelay.pipeline.storage import Storage, open_storage
from pixelrelay.workers import metrics

log = logging.getLogger("pixelrelay.worker")

_FACTORIES: dict[str, Callable[..., Encoder | Planner | Decoder]] = {
    "encode": create_encoder,
    "plan": create_planner,
    "decode": create_decoder,
}
MAX_LOAD_ERROR_CHARS = 300


class BackendLoadError(RuntimeError):
    """A backend that could not be built; the message names the spec and the reason only."""


def load_error(exc: BaseException) -> BackendLoadError:
    """The error to report for a backend that failed to load: our own messages whole, a
    library's first line only, at most ``MAX_LOAD_ERROR_CHARS``."""
    if isinstance(exc, ModelUnavailableError):
        text = str(exc)
    else:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    if len(text) > MAX_LOAD_ERROR_CHARS:
        text = text[: MAX_LOAD_ERROR_CHARS - 3] + "..."
    return BackendLoadError(text)


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stages: dict[tuple[str, str], Encoder | Planner | Decoder] = {}
        self._lock = threading.Lock()
        self._redis: redis.Redis | None = None
        self._redis_pid = 0
        self._pools: tuple[int, ThreadPoolExecutor, ThreadPoolExecutor] | None = None
        self._refresher_pid = 0

    def _thread_pools(self) -> tuple[ThreadPoolExecutor, ThreadPoolExecutor]:
        # Threads don't survive a fork: make the pools in the process that uses them.
        if self._pools is None or self._pools[0] != os.getpid():
            io = ThreadPoolExecutor(self.settings.io_threads, thread_name_prefix="pixelrelay-io")
            prefetch = ThreadPoolExecutor(1, thread_name_prefix="pixelrelay-prefetch")
            self._pools = (os.getpid(), io, prefetch)
        return self._pools[1], self._pools[2]

    @property
    def io(self) -> ThreadPoolExecutor:
        """Threads for storage reads/writes and image decode/encode (they release the GIL)."""
        return self._thread_pools()[0]

    @property
    def prefetch(self) -> ThreadPoolExecutor:
        """One thread that loads the next batch while the model runs on this one."""
        return self._thread_pools()[1]

    @functools.cached_property
    def signer(self):
        """The ``pixelrelay.pipeline.signing.Signer`` of this worker's settings (its key, or insecure)."""
        return self.settings.signer()

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None or self._redis_pid != os.getpid():
            self._redis = redis.Redis.from_url(self.settings.redis, socket_timeout=30, health_check_interval=30)
            self._redis_pid = os.getpid()
        return self._redis

    def storage(self, uri: str, root: str | None = None) -> Storage:
        """The storage of ``uri``; with ``root`` (the job's output root), a local one refuses
        writes whose real path leaves it (``pixelrelay.pipeline.storage.local``)."""
        return open_storage(uri, self.settings.s3_endpoint_url, self.settings, root=root)

    def default_spec(self, stage: str) -> str:
        return getattr(self.settings, C.STAGE_BACKEND[stage])

    def allowed(self, stage: str, spec: str | None = None) -> str:
        """``spec`` (default: the worker's own) in its one spelling, if this worker may build
        it; else ``BackendNotAllowedError`` (``UnknownBackendError`` for an unknown kind)."""
        spec = canonical_spec(spec) if spec and spec.strip() else self.default_spec(stage)
        if spec == self.default_spec(stage):
            return spec
        extra = parse_allowlist(self.settings.allowed_backends)
        allowlist = None if extra is None else [StageSpec.parse(self.default_spec(stage)), *extra]
        if not spec_allowed(C.STAGE_BACKEND[stage], spec, allowlist):
            raise BackendNotAllowedError(spec)
        return spec

    def stage(self, stage: str, spec: str | None = None):
        """The backend for ``stage`` (the job's choice, else the worker's), built once; only
        allowed specs are built (see the module docstring)."""
        spec = self.allowed(stage, spec)
        key = (stage, spec)
        with self._lock:
            if key not in self._stages:
                log.info("loading %s backend %s on %s", stage, spec, self.settings.device)
                try:
                    backend = _FACTORIES[stage](spec, device=self.settings.device, settings=self.settings)
                except Exception as exc:
                    raise load_error(exc) from exc
                self._stages[key] = backend
                metrics.model_loaded(stage, backend.spec)
                self._publish(stage, spec, backend)
                self._start_refresher()
            return self._stages[key]

    # --- model identities ---------------------------------------------------------------
    def _publish(self, stage: str, spec: str, backend) -> None:
        if not self.settings.redis:
            return
        try:
            entry = identities.Published(spec=backend.spec, identity=backend.identity())
            identities.publish(self.redis, stage, entry, default=spec == self.default_spec(stage))
        except (redis.RedisError, OSError) as exc:
            log.warning("cannot publish the identity of %s backend %s: %s", stage, spec, exc)

    def withdraw_all(self) -> None:
        """Withdraw every published identity of this process (at worker shutdown)."""
        with self._lock:
            built = list(self._stages.items())
        for (stage, spec), backend in built:
            try:
                entry = identities.Published(spec=backend.spec, identity=backend.identity())
                identities.withdraw(self.redis, stage, entry, default=spec == self.default_spec(stage))
            except (redis.RedisError, OSError) as exc:
                log.warning("cannot withdraw the identity of %s backend %s: %s", stage, spec, exc)

    def publish_all(self) -> None:
        """Re-publish every backend this process has built (the refresher calls this)."""
        with self._lock:
            built = list(self._stages.items())
        for (stage, spec), backend in built:
            self._publish(stage, spec, backend)

    def _start_refresher(self) -> None:
        # Called with the lock held; one daemon thread per process (threads don't survive fork).
        if self._refresher_pid == os.getpid() or not self.settings.redis:
            return
        self._refresher_pid = os.getpid()
        threading.Thread(target=self._refresh_forever, name="pixelrelay-identity", daemon=True).start()

    def _refresh_forever(self) -> None:
        while True:
            time.sleep(keys.MODELS_REFRESH_S)
            self.publish_all()


class DecodeBudget:
    """Bytes of decoded source images a worker holds at once (``PIXELRELAY_PREFETCH_BYTES``):
    the batch the model runs on plus the next one, prefetched. A batch is admitted (``take``
    blocks) while what is held plus it fits, or when nothing is held: a batch larger than
    the whole budget runs alone. ``close`` frees every waiter (the chunk ended early)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0  # the most held at once, for logs and tests
        self._closed = False
        self._cond = threading.Condition()

    def take(self, nbytes: int) -> bool:
        """Wait until ``nbytes`` fit, then hold them; False (nothing held) once closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self.held == 0 or self.held + nbytes <= self.limit)
            if self._closed:
                return False
            self.held += nbytes
            self.peak = max(self.peak, self.held)
            return True

    def give(self, nbytes: int) -> None:
        with self._cond:
            self.held -= nbytes
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@functools.cache
def runtime() -> Runtime:
    settings = Settings.from_env()
    if settings.allocator == "tuned":
        tune_allocator()  # feature maps stay in the heap between batches (pipeline.memory)
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    return Runtime(settings)
