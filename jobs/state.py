"""Job state in Redis: a small hash per job plus two bitmaps (one bit per item).

Counts are BITCOUNTs, so they stay exact however often a message is delivered: marking an
item done twice sets the same bit twice. Finished items cost one bit each in Redis; their
results live in storage. Keys get a TTL once the job's manifest is written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from pixelrelay.jobs import keys
from pixelrelay.pipeline.messages import JobSpec

# KEYS: job hash, done bits, failed bits. ARGV: seq, then index/status pairs.
# Items of a stale submission may only be marked done (never failed), so that a late
# duplicate from an older submission cannot end the current one early.
_MARK_SCRIPT = """
local current = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local stale = tonumber(ARGV[1]) < current
for i = 2, #ARGV, 2 do
  local index = tonumber(ARGV[i])
  if ARGV[i + 1] == 'done' then
    redis.call('SETBIT', KEYS[2], index, 1)
    redis.call('SETBIT', KEYS[3], index, 0)
  elseif not stale and redis.call('GETBIT', KEYS[2], index) == 0 then
    redis.call('SETBIT', KEYS[3], index, 1)
  end
end
return {redis.call('BITCOUNT', KEYS[2]), redis.call('BITCOUNT', KEYS[3])}
"""


@dataclass
class Counts:
    total: int
    done: int
    failed: int

    @property
    def pending(self) -> int:
        return max(0, self.total - self.done - self.failed)

    @property
    def complete(self) -> bool:
        return self.done + self.failed >= self.total


class JobState:
    def __init__(self, client: redis.Redis, job_id: str) -> None:
        self.r = client
        self.job_id = job_id
        self.key = keys.job(job_id)
        self.done_key = keys.done_bits(job_id)
        self.failed_key = keys.failed_bits(job_id)
        self.cursor_key = keys.cursor(job_id)
        self._mark = client.register_script(_MARK_SCRIPT)

    # --- lifecycle ------------------------------------------------------------------
    def exists(self) -> bool:
        return bool(self.r.exists(self.key))

    def spec(self) -> JobSpec:
        raw = self.r.hget(self.key, "spec")
        if raw is None:
            raise KeyError(f"unknown job {self.job_id!r}")
        return JobSpec.model_validate_json(raw)

    def seq(self) -> int:
        return int(self.r.hget(self.key, "seq") or 0)

    def n_chunks(self) -> int:
        return int(self.r.hget(self.key, "n_chunks") or 0)

    def start_submission(self, spec: JobSpec) -> int:
        """Create the job, or begin its next submission (a resume). Returns the new seq."""
        n_chunks = -(-spec.total // spec.chunk_size)
        pipe = self.r.pipeline()
        pipe.hset(
            self.key,
            mapping={
                "spec": spec.model_dump_json(),
                "total": spec.total,
                "n_chunks": n_chunks,
                "submitted_at": time.time(),
                "done_at_submit": self.r.bitcount(self.done_key),
            },
        )
        pipe.hdel(self.key, "finished_at")
        pipe.hincrby(self.key, "seq", 1)
        pipe.delete(self.failed_key, self.cursor_key)
        for key in (self.key, self.done_key):
            pipe.persist(key)
        seq = pipe.execute()[2]
        return int(seq)

    def restore(self, last_seq: int, done_indices: list[int]) -> None:
        """Rebuild the job from storage (its Redis state was lost): the submission counter
        continues after the newest part, and done items get their bits back."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(self.key, "seq", last_seq)
        for index in done_indices:
            pipe.setbit(self.done_key, index, 1)
        pipe.execute()

    # --- items ----------------------------------------------------------------------
    def done_flags(self, indices: list[int]) -> list[bool]:
        if not indices:
            return []
        pipe = self.r.pipeline(transaction=False)
        for index in indices:
            pipe.getbit(self.done_key, index)
        return [bool(bit) for bit in pipe.execute()]

    def mark(self, seq: int, results: list[tuple[int, str]]) -> tuple[int, int]:
        """Record (index, 'done'|'failed') pairs; returns (done, failed) counts."""
        args: list = [seq]
        for index, status in results:
            args += [index, status]
        done, failed = self._mark(keys=[self.key, self.done_key, self.failed_key], args=args)
        return int(done), int(failed)

    def counts(self) -> Counts:
        pipe = self.r.pipeline(transaction=False)
        pipe.hget(self.key, "total")
        pipe.bitcount(self.done_key)
        pipe.bitcount(self.failed_key)
        total, done, failed = pipe.execute()
        return Counts(int(total or 0), int(done), int(failed))

    def next_chunk(self) -> int:
        return int(self.r.incr(self.cursor_key)) - 1

    # --- delivery accounting (poison pills) -------------------------------------------
    def count_delivery(self, stage: str, seq: int, chunk: str) -> int:
        key = keys.deliveries(self.job_id, stage, seq, chunk)
        pipe = self.r.pipeline()
        pipe.incr(key)
        pipe.expire(key, keys.DELIVERIES_TTL_S)
        return int(pipe.execute()[0])

    def clear_delivery(self, stage: str, seq: int, chunk: str) -> None:
        self.r.delete(keys.deliveries(self.job_id, stage, seq, chunk))

    # --- finishing ------------------------------------------------------------------
    def claim_finalize(self, seq: int) -> bool:
        """True for exactly one caller per submission: that one writes the manifest."""
        key = keys.finalized(self.job_id, seq)
        return bool(self.r.set(key, "writing", nx=True, ex=keys.JOB_TTL_S))

    def release_finalize(self, seq: int) -> None:
        self.r.delete(keys.finalized(self.job_id, seq))

    def finish(self, seq: int, manifest: str, done: int, failed: int, missing: int = 0) -> None:
        pipe = self.r.pipeline()
        pipe.hset(
            self.key,
            mapping={
                "finished_at": time.time(),
                "finished_seq": seq,
                "manifest": manifest,
                "manifest_done": done,
                "manifest_failed": failed,
                "manifest_missing": missing,
            },
        )
        for key in (self.key, self.done_key, self.failed_key, self.cursor_key):
            pipe.expire(key, keys.JOB_TTL_S)
        pipe.execute()

    def info(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.r.hgetall(self.key).items() if k != b"spec"}
