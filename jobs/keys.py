"""Every Redis key pixelrelay writes, in one module (arq's habit).

All keys start with ``PREFIX``; a job's keys share ``pixelrelay:job:<job_id>``, so one
``SCAN MATCH pixelrelay:job:<id>*`` finds all of a job's state.
"""

from __future__ import annotations

PREFIX = "pixelrelay:"
JOB = PREFIX + "job:{job_id}"  # hash: spec, total, seq, n_chunks, timestamps (progress_at,
# cancelled_at, ...), manifest counts: see ``pixelrelay.jobs.state``
DONE_BITS = JOB + ":done"  # bitmap, bit i set = item i done
FAILED_BITS = JOB + ":failed"  # bitmap, failed in the current submission
CURSOR = JOB + ":cursor"  # next chunk to enqueue
FINALIZED = JOB + ":finalized:{seq}"  # "writing" (a lease, FINALIZE_LEASE_S, kept alive while
# writing) or "written": the manifest of submission seq is being / was written
GROUP_CLAIM = JOB + ":group:{seq}:{group}"  # SET NX: one merger writes a group file (``pixelrelay.jobs.merge``)
DELIVERIES = JOB + ":deliveries:{stage}:{seq}:{chunk}"  # deliveries of one chain (poison pills)
CHUNKS = JOB + ":chunks"  # hash: slot -> JSON {stage, since, wait, feeds}, chunks in flight
LEASE = JOB + ":lease:{slot}"  # string: worker id, PX lease; the worker running that slot
BATCHES = JOB + ":batches"  # hash: slot -> JSON {done, failed, at}: the decode stage's items of
# a chain in flight, per batch, before its part and bits are written (display only)
RESEND_LOCK = JOB + ":resend:{slot}"  # SET NX PX: one sweeper re-sends a lost slot
REBUILD_LOCK = JOB + ":rebuild"  # SET NX PX: one process rebuilds a job whose state was lost
ACTIVE_JOBS = PREFIX + "jobs:active"  # set of job ids with chunks in flight (the sweep's list)
JOBS = PREFIX + "jobs"  # sorted set: job id -> time of its latest submission (``pixelrelay jobs``)
JOBS_KEEP = 1000  # the newest this many ids are kept in JOBS
WORKERS = PREFIX + "workers:{stage}"  # sorted set: worker id -> when it was last seen consuming
WORKERS_KEEP = 1000  # the most recently seen this many ids are kept per stage
WORKERS_TTL_S = 24 * 3600  # a stage nobody has run for this long loses its set

# Kombu's Redis transport (not pixelrelay's keys, read by the sweep only): a queue is a list
# named after it (plus ``<queue>\x06\x16<priority>`` variants), a message taken by a worker
# sits in the ``unacked`` hash (delivery tag -> JSON [message, exchange, routing key]) with
# its delivery time in the ``unacked_index`` sorted set.
KOMBU_PRIORITY_SEP = "\x06\x16"
KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)
KOMBU_UNACKED = "unacked"
KOMBU_UNACKED_INDEX = "unacked_index"

# Model identities that stage workers run (``pixelrelay.jobs.identities``): a hash per stage and spec,
# and one per stage for "the worker's own default"; field = JSON {spec, identity}, value =
# the unix time it stays valid until. Workers refresh their fields every MODELS_REFRESH_S.
MODELS = PREFIX + "models:{stage}:{spec}"
MODELS_DEFAULT = PREFIX + "models-default:{stage}"
MODELS_TTL_S = 300
MODELS_REFRESH_S = 60

FINALIZE_LEASE_S = 120  # a finisher that died holding the claim gives it up after this long
JOB_TTL_S = 7 * 24 * 3600  # a job's keys are kept this long after its manifest is written
CHUNKS_TTL_S = 7 * 24 * 3600  # refreshed on every write: a forgotten job's hash goes away
DELIVERIES_TTL_S = 7 * 24 * 3600


def text(reply: bytes | str) -> str:
    """A Redis reply as text: the package's clients read bytes, which redis-py types as
    ``bytes | str`` (a client made with ``decode_responses`` reads str)."""
    return reply.decode(errors="replace") if isinstance(reply, bytes) else reply


def raw(reply: bytes | str) -> bytes:
    """A Redis reply as bytes (see ``text``)."""
    return reply if isinstance(reply, bytes) else reply.encode()


def job(job_id: str) -> str:
    return JOB.format(job_id=job_id)


def done_bits(job_id: str) -> str:
    return DONE_BITS.format(job_id=job_id)


def failed_bits(job_id: str) -> str:
    return FAILED_BITS.format(job_id=job_id)


def cursor(job_id: str) -> str:
    return CURSOR.format(job_id=job_id)


def finalized(job_id: str, seq: int) -> str:
    return FINALIZED.format(job_id=job_id, seq=seq)


def group_claim(job_id: str, seq: int, group: int) -> str:
    return GROUP_CLAIM.format(job_id=job_id, seq=seq, group=group)


def deliveries(job_id: str, stage: str, seq: int, chunk: str) -> str:
    return DELIVERIES.format(job_id=job_id, stage=stage, seq=seq, chunk=chunk)


def models(stage: str, spec: str | None) -> str:
    """The identities published for ``spec`` at ``stage``; None: the workers' defaults."""
    if spec is None:
        return MODELS_DEFAULT.format(stage=stage)
    return MODELS.format(stage=stage, spec=spec)


def chunks(job_id: str) -> str:
    return CHUNKS.format(job_id=job_id)


def lease(job_id: str, slot: str) -> str:
    return LEASE.format(job_id=job_id, slot=slot)


def batches(job_id: str) -> str:
    return BATCHES.format(job_id=job_id)


def workers(stage: str) -> str:
    return WORKERS.format(stage=stage)


def resend_lock(job_id: str, slot: str) -> str:
    return RESEND_LOCK.format(job_id=job_id, slot=slot)


def rebuild_lock(job_id: str) -> str:
    return REBUILD_LOCK.format(job_id=job_id)


def kombu_queue_lists(queue: str) -> list[str]:
    """Every list kombu's Redis transport may keep ``queue``'s messages in."""
    return [queue if not pri else f"{queue}{KOMBU_PRIORITY_SEP}{pri}" for pri in KOMBU_PRIORITY_STEPS]
