"""The true backlog: items of active jobs not yet through each stage, from Redis job state.

backlog(stage) = pending items - items whose chain's entry names a later stage (never below
0). An estimate by design, a few reads per active job: malformed entries are ignored, and a
job whose spec fails its signature counts all its pending items at every stage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import redis

from pixelrelay.jobs import keys
from pixelrelay.jobs.chunks import ChunksInFlight, parse_entries
from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline import constants as C
from pixelrelay.pipeline.messages import JOB_ID_PATTERN
from pixelrelay.pipeline.signing import SignatureError, Signer


@dataclass
class JobBacklog:
    job_id: str
    pending: int
    chains: dict[str, int] = field(default_factory=dict)  # chains in flight, by the stage they are at
    stages: dict[str, int] = field(default_factory=dict)  # items not yet through each stage


def job_backlog(client: redis.Redis, job_id: str, signer: Signer | None) -> JobBacklog:
    state = JobState(client, job_id, signer)
    counts = state.counts()
    try:
        chunk_size = state.spec().chunk_size if signer is not None else 0
    except (SignatureError, KeyError, ValueError):
        chunk_size = 0
    seq = state.seq()
    entries, _ = parse_entries(client.hgetall(ChunksInFlight(client, job_id).key))
    chains = dict.fromkeys(C.STAGES, 0)
    at_stage = dict.fromkeys(C.STAGES, 0)  # items in chains at each stage
    for slot, entry in entries.items():
        if slot.seq != seq:
            continue
        chains[entry.stage] += 1
        if chunk_size:
            size = 1 if slot.part else max(0, min(chunk_size, counts.total - slot.chunk * chunk_size))
            at_stage[entry.stage] += size
    stages = {}
    for i, stage in enumerate(C.STAGES):
        past = sum(at_stage[later] for later in C.STAGES[i + 1 :])
        stages[stage] = max(0, counts.pending - past)
    return JobBacklog(job_id, counts.pending, chains, stages)


def active_backlogs(client: redis.Redis, signer: Signer | None) -> list[JobBacklog]:
    """The backlog of every active job (jobs with chains in flight), by job id."""
    ids = sorted(keys.text(m) for m in client.smembers(keys.ACTIVE_JOBS))
    return [job_backlog(client, job_id, signer) for job_id in ids if re.match(JOB_ID_PATTERN, job_id)]
