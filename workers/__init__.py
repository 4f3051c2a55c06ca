"""Celery workers: one pool per stage (encode, plan, decode), each on its own queue.

Delivery guarantee: **at-least-once**. Every stage task is therefore idempotent.

- Serialization is JSON only (``accept_content=['json']``); messages carry job ids, storage
  keys and text, never pixels and never pickle.
- **Signed bodies** (``pixelrelay.pipeline.signing``): every body sent carries an HMAC of the
  key all workers and producers share (``PIXELRELAY_SIGNING_KEY`` / ``_FILE``, never in
  Redis); a stage checks it before parsing and drops (logs, acks, never retries) a body that
  fails, and signs the body it returns for the next stage. The job spec and cursor that the
  feed and the sweep read back from Redis are signed too (``jobs.state``). Without a key a
  worker refuses to start unless ``--insecure-no-signing``. Celery remote control (``celery
  inspect``/``control``) is off unless ``--remote-control``.
- ``task_acks_late`` + ``task_reject_on_worker_lost`` + prefetch 1: a message is acked only
  after its task finished, so a worker that dies mid-batch leaves its message unacked.
- **Chunks in flight are tracked and leased** (``pixelrelay.jobs.chunks``, ``lease``,
  ``sweep``): every chain has an entry in Redis from the moment it is sent until its manifest
  part is written; the worker running a stage holds a lease on it (``PIXELRELAY_LEASE_S``,
  default 60 s), renewed by a heartbeat thread while the chunk is within its time budget
  (pending items x ``PIXELRELAY_ITEM_BUDGET_S``, default 600 s). Every worker sweeps every
  ``PIXELRELAY_SWEEP_INTERVAL_S`` (default 15 s): a chain with no live lease and no message
  in a queue (found by its task id, which names the chain) for longer than the lease -- its
  worker was killed, or the queues were purged -- is rebuilt from storage and sent again,
  once. A chain that merely waits in a queue is never re-sent, however long it waits. So a
  SIGKILLed worker's chunk moves on within about lease + sweep interval (once some worker of
  that stage is running), not after the visibility timeout.
- **A chunk that overruns its budget** (a hung model call) stops renewing its lease; the
  watchdog fails its pending items with "timed out after N s", finishes the chunk, and exits
  the worker process (code 75) for its supervisor to restart: a model call cannot be
  interrupted. Run workers under a supervisor that restarts them (systemd, Kubernetes,
  compose ``restart: unless-stopped``).
- The Redis visibility timeout (``PIXELRELAY_VISIBILITY_TIMEOUT_S``; unset, derived from the
  longest batch, at least 2 h) stays as the last resort (e.g. a sweep that cannot run); it must
  be longer than the longest batch, or a slow batch is delivered twice, so a shorter one is
  refused at start (``Settings.longest_batch_s``). A redelivered message of a chain that was finished in
  the meantime (its part written, its entry gone) is dropped unread (``Stale``).
- Idempotency: output keys derive from the job's output root + the input's relative path;
  the encode stage skips items whose done-bit is set; an output whose fingerprint answers
  the same request and models is reused, and a new output is written conditionally (S3
  ``If-None-Match: *``, local ``link``), so a duplicate delivery never replaces it with
  other bytes (``reuse``, ``outputs``); manifest parts are overwritten whole. Job counts are
  bitmaps (one bit per item), so a duplicate delivery cannot count an item twice.
- A message that kills its worker repeatedly (a poison pill) is delivered at most
  ``PIXELRELAY_MAX_DELIVERIES`` times (default 3); then a chunk of several items is split into
  single-item chains, and a single item fails with that reason; the job goes on. A sweep
  re-send counts as a delivery exactly as a redelivery does (the dead delivery's count is
  never cleared), so this holds for solo workers whose death leaves no redelivery.
- GPU safety: nothing touches CUDA in a parent process before fork. Models load once per
  worker process: in the process itself for the solo pool (concurrency 1), and in each child
  after fork (``worker_process_init``) for prefork pools. The start-up ``--device`` check
  counts CUDA devices through NVML, which does not initialise CUDA.
- Transient errors (storage timeouts, connection resets, 5xx) retry with exponential backoff
  up to ``PIXELRELAY_MAX_RETRIES`` times; after that the chunk's items fail with the reason.
  A bad item (corrupt file, bomb, model error on that item alone) fails alone.
- Redis holds only counters and bitmaps per job; per-item results go to storage.

Modules:

* ``celery_app`` the Celery app's configuration; ``create_app(settings)`` for senders and
  ``get_app()``, the workers' app, created on first use with the tasks registered;
* ``policy``     what happens to a delivery (poison pills, retries, finishing a chunk),
  without Celery: ``DeliveryPolicy.deliver`` returns the message, a ``Retry`` or a ``Split``;
* ``tasks``      the thin Celery tasks around the policy (``run_stage``, ``register``);
* ``stages``     the stage bodies (encode, plan, decode), on top of ``batching`` (batches loaded
  ahead of the model, the I/O threads), ``reuse`` (fingerprints, reuse of existing outputs)
  and ``outputs`` (encoding and conditional group writes of the outputs);
* ``guard``      what a message may ask: checked against its job before any work (a message
  that asks for anything else is dropped);
* ``flow``       a chunk as a Celery chain (task ids naming the chain, bodies signed), and
  ``sender(app, signer)``;
* ``lease``      the lease on a running chunk, its heartbeat, budget and watchdog;
* ``sweep``      ``sweep_once``: re-send chains that are neither leased nor queued (Celery-free
  but for its ``send``), and the ``Sweeper`` timer thread every worker runs;
* ``runtime``    per-process settings, Redis, storage and loaded models;
* ``metrics``    Prometheus series of a worker (``--metrics-port``; multiprocess for prefork);
* ``observe``    what operators see: one INFO line per chunk (Celery's result dump dropped),
  the health heartbeat file's consumer step (task events and heartbeats: ``main``);
* ``main``       ``pixelrelay worker``.

``celery -A pixelrelay.workers <command>`` works: the package's ``app`` attribute is
``get_app()``, looked up lazily, so importing the package needs no settings.
"""

from __future__ import annotations


def __getattr__(name: str):
    # `celery -A pixelrelay.workers` asks for `app` (then `celery`); build it only then.
    if name in ("app", "celery"):
        from pixelrelay.workers.celery_app import get_app

        return get_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
