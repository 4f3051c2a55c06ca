"""What a waiting producer does besides showing progress: it keeps the job alive.

Each tick of a wait loop (``Keeper.tick``) rebuilds a job Redis lost
(``pixelrelay.jobs.recover``, locked per job) and sweeps for lost chains every
``sweep_interval_s``. Redis errors are the wait loop's to retry; a storage error while
rebuilding is logged and tried again on the next tick.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from pixelrelay.jobs.feed import Send
from pixelrelay.jobs.recover import rebuild
from pixelrelay.jobs.registry import open_registry
from pixelrelay.pipeline.settings import Settings
from pixelrelay.pipeline.storage import StorageError, TransientStorageError, open_storage

log = logging.getLogger("pixelrelay.keeper")


class Keeper:
    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        job_id: str,
        output: str,
        send: Send | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Keep one job alive while a producer waits for it.

        Args:
            client: Redis.
            settings: sweep interval, window and signing key.
            job_id: the job.
            output: its output root (where it is rebuilt from).
            send: sends a chain; None: a Celery app's sender, made on first use.
            clock: monotonic seconds (tests).
        """
        self.client, self.settings, self.job_id, self.output = client, settings, job_id, output
        self._send, self.clock = send, clock
        self.last_sweep = clock()
        self.rebuilds: list[int] = []  # seqs of the rebuilds this keeper did

    @property
    def send(self) -> Send:
        if self._send is None:
            from pixelrelay.workers.celery_app import create_app
            from pixelrelay.workers.flow import sender, stored_budgets

            signer = self.settings.signer()
            self._send = sender(create_app(self.settings), signer, stored_budgets(self.client, signer))
        return self._send

    def _storage(self, uri: str):
        return open_storage(uri, self.settings.s3_endpoint_url)

    def tick(self) -> None:
        try:
            seq = rebuild(
                self.client,
                self._storage(self.output),
                self.output,
                self.job_id,
                self.send,
                self.settings.window,
                signer=self.settings.signer(),
            )
        except (StorageError, TransientStorageError, OSError) as exc:  # try again on the next tick
            log.warning("job %s: cannot rebuild it from storage yet: %s", self.job_id, exc)
            return
        if seq is not None:
            self.rebuilds.append(seq)
        interval = self.settings.sweep_interval_s
        if interval > 0 and self.clock() - self.last_sweep >= interval:
            self.last_sweep = self.clock()
            from pixelrelay.workers.sweep import sweep_and_log

            sweep_and_log(self.client, self.send, self._storage, self.settings.lease_s, signer=self.settings.signer())

    def finished(self) -> None:
        """The job's manifest is written: take it off the storage registry (if any)."""
        registry = open_registry(self.settings.state_uri, self.settings.s3_endpoint_url)
        if registry is not None:
            registry.remove(self.job_id)
