"""Celery workers: one pool per stage (encode, plan, decode), each on its own queue.

Delivery guarantee: **at-least-once**. Every stage task is therefore idempotent.

- Serialization is JSON only (``accept_content=['json']``); messages carry job ids, storage
  keys and text, never pixels and never pickle.
- ``task_acks_late`` + ``task_reject_on_worker_lost`` + prefetch 1: a message is acked only
  after its task finished, so a worker that dies mid-batch leaves its message to be
  redelivered. The Redis visibility timeout (``PIXELRELAY_VISIBILITY_TIMEOUT_S``, default 2 h)
  must be longer than the longest batch, or a slow batch is delivered twice.
- Idempotency: output keys derive from the job's output root + the input's relative path;
  the encode stage skips items whose done-bit is set; the decode stage skips the model when
  the output object already exists; manifest parts are overwritten whole. Job counts are
  bitmaps (one bit per item), so a duplicate delivery cannot count an item twice.
- A message that kills its worker repeatedly (a poison pill) is delivered at most
  ``PIXELRELAY_MAX_DELIVERIES`` times (default 3); then its items fail with that reason and the job goes on.
- GPU safety: nothing touches CUDA in a parent process before fork. Models load once per
  worker process: in the process itself for the solo pool (concurrency 1), and in each child
  after fork (``worker_process_init``) for prefork pools.
- Transient errors (storage timeouts, connection resets, 5xx) retry with exponential backoff
  up to ``PIXELRELAY_MAX_RETRIES`` times; after that the chunk's items fail with the reason.
  A bad item (corrupt file, bomb, model error on that item alone) fails alone.
- Redis holds only counters and bitmaps per job; per-item results go to storage.
"""
