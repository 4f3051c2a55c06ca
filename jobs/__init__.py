"""Job bookkeeping, in one place: what a job is made of and where each part lives.

* ``keys``   every Redis key (and its prefix) that pixelrelay writes;
* ``files``  the job's files in its output storage (job.json, listing shards, manifest
  parts, the manifest), the source of truth;
* ``state``  the job's state in Redis (a hash and two bitmaps), a cache of ``files``;
* ``feed``   the Celery-free windowed feed (which chunk goes next);
* ``finish`` the job's finish: its manifest written once, by one caller;
* ``merge``  manifest parts folded into group files of ~10,000 items as a job runs, and the
  manifest written from them (the finish reads one object per group, not every part);
* ``chunks`` chunks in flight (sent, not yet finished), the active jobs, and the task ids
  that name a chain's stage messages: what the sweep reads to find lost chains;
* ``backlog`` items of active jobs not yet through each stage (``pixelrelay exporter``).

Imports Redis and the compute path's messages and storage; never Celery, never torch.
"""
