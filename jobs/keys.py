"""Every Redis key pixelrelay writes, in one module (arq's habit).

All keys start with ``PREFIX``; a job's keys share ``pixelrelay:job:<job_id>``, so one
``SCAN MATCH pixelrelay:job:<id>*`` finds all of a job's state.
"""

from __future__ import annotations

PREFIX = "pixelrelay:"
JOB = PREFIX + "job:{job_id}"  # hash: spec, total, seq, n_chunks, timestamps, manifest counts
DONE_BITS = JOB + ":done"  # bitmap, bit i set = item i done
FAILED_BITS = JOB + ":failed"  # bitmap, failed in the current submission
CURSOR = JOB + ":cursor"  # next chunk to enqueue
FINALIZED = JOB + ":finalized:{seq}"  # set once: the manifest of submission seq is being/was written
DELIVERIES = JOB + ":deliveries:{stage}:{seq}:{chunk}"  # deliveries of one chain (poison pills)

# Model identities that stage workers run (``jobs.identities``): a hash per stage and spec,
# and one per stage for "the worker's own default"; field = JSON {spec, identity}, value =
# the unix time it stays valid until. Workers refresh their fields every MODELS_REFRESH_S.
MODELS = PREFIX + "models:{stage}:{spec}"
MODELS_DEFAULT = PREFIX + "models-default:{stage}"
MODELS_TTL_S = 300
MODELS_REFRESH_S = 60

JOB_TTL_S = 7 * 24 * 3600  # a job's keys are kept this long after its manifest is written
DELIVERIES_TTL_S = 7 * 24 * 3600


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


def deliveries(job_id: str, stage: str, seq: int, chunk: str) -> str:
    return DELIVERIES.format(job_id=job_id, stage=stage, seq=seq, chunk=chunk)


def models(stage: str, spec: str | None) -> str:
    """The identities published for ``spec`` at ``stage``; None: the workers' defaults."""
    if spec is None:
        return MODELS_DEFAULT.format(stage=stage)
    return MODELS.format(stage=stage, spec=spec)
