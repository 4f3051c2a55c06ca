"""The Celery adapter: the three stage tasks around the delivery policy (``run_stage``).

``register(app)`` registers them when the app is created (``celery_app.get_app``), so
importing this module needs no settings and no broker.

Each task takes and returns a ``ChunkMessage`` as JSON: ids, keys and text only. A delivery
(``run_stage``) checks the body's signature (kind ``chunk:<stage>``, ``verify_body``: one
that fails is dropped), upgrades and guards the message (``workers.guard``), and runs the
stage body (``workers.stages``) under the delivery policy (``workers.policy``) with a lease on
the chunk (``workers.lease``). The body it returns, the next stage's, is signed for that
stage (``NEXT_STAGE``); the decode stage returns a short unsigned summary (``chunk_summary``)
that no task reads, shown by Celery's events and Flower. ``run_stage`` also observes the
queue wait and counts items by status (``workers.metrics``; a metrics error never fails a
task). Delivery guarantees and recovery: ``docs/design.md``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

from celery import Celery, Task
from celery.exceptions import Reject
from celery.exceptions import Retry as CeleryRetry

from pixelrelay import logs
from pixelrelay.jobs.chunks import Slot
from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline import constants as C
from pixelrelay.pipeline.messages import ChunkMessage, JobSpec, WireVersionError, upgrade_message
from pixelrelay.pipeline.signing import SignatureError, Signer
from pixelrelay.pipeline.storage import Storage
from pixelrelay.workers import balance, metrics, observe
from pixelrelay.workers.celery_app import task_name
from pixelrelay.workers.flow import job_budget, sender, signed_body
from pixelrelay.workers.guard import ForgedMessage, InputRoot, check_message, input_root, transient_retry
from pixelrelay.workers.lease import LeaseTiming, deliver_leased
from pixelrelay.workers.policy import (
    TRANSIENT_ERRORS,
    Cancelled,
    Delivery,
    DeliveryPolicy,
    Limits,
    Outcome,
    Retry,
    Split,
    Stale,
    look,
)
from pixelrelay.workers.runtime import Runtime, runtime
from pixelrelay.workers.stages import decode_chunk, encode_chunk, plan_chunk

log = logging.getLogger("pixelrelay.worker")

StageBody = Callable[[Runtime, JobState, ChunkMessage, InputRoot], None]
STAGE_BODIES: dict[str, StageBody] = {"encode": encode_chunk, "plan": plan_chunk, "decode": decode_chunk}
NEXT_STAGE = {"encode": "plan", "plan": "decode"}  # whose body a stage returns (decode: a summary)
RESULT_REPR_CHARS = 96  # of a stage's return value in Celery's success log line and event (its default: 1,024)


@functools.lru_cache(maxsize=16)
def output_storage(rt: Runtime, output: str) -> Storage:
    """One storage per job output root in this process, its writes confined to the root.
    Being one object, the listing shards read through it stay cached (``jobs.files`` caches
    them per storage and URI): the guard reads a shard at every delivery and the decode
    stage's ``feed`` at every chunk, and a new storage each time re-read and re-validated
    all ``LISTING_SHARD_SIZE`` lines of a shard per chunk."""
    return rt.storage(output, root=output)


def policy_for(rt: Runtime, state: JobState, app: Celery, spec: JobSpec) -> DeliveryPolicy:
    limits = Limits(max_deliveries=rt.settings.max_deliveries, max_retries=rt.settings.max_retries)
    send = sender(app, rt.signer, job_budget(spec))
    return DeliveryPolicy(state, send, functools.partial(output_storage, rt), limits)


def requeue_for_newer_worker(task: Task, stage: str, exc: WireVersionError) -> CeleryRetry:
    """A body from a newer release (a producer upgraded before this worker): send it back
    to the stage's queue, in ``WIRE_REQUEUE_DELAY_S``, for an upgraded worker to take. It is
    never failed or dropped here. The copy keeps the chain, the task id and the retry count
    (the retries the policy allows for transient errors are not spent on this). Returns the
    exception to raise, which acks this delivery."""
    countdown = C.WIRE_REQUEUE_DELAY_S
    log.warning("%s task %s: %s; re-queued in %ds for an upgraded worker", stage, task.request.id, exc, countdown)
    sig = task.signature_from_request(countdown=countdown)
    try:
        sig.apply_async()
    except Exception as err:  # not re-sent: the broker puts this delivery back instead
        raise Reject(err, requeue=True) from err
    return CeleryRetry(str(exc), exc, countdown, sig=sig)


def verify_body(task: Task, stage: str, signer: Signer, body: dict) -> dict:
    """The body without its signature, once it checks out (``pipeline.signing``). A body that
    fails is dropped: logged (task id and reason, never the key) and rejected without
    requeue, so it is acked, never retried, and the rest of its chain is never sent."""
    try:
        return signer.verify("chunk:" + stage, body)
    except SignatureError as exc:
        log.warning("%s task %s dropped: %s", stage, task.request.id, exc)
        raise Reject(f"signature check failed: {exc}", requeue=False) from None


def run_stage(task: Task, stage: str, body: dict) -> dict:
    """One delivery: check the body's signature, validate it, check it against its job
    (``workers.guard``: a message that asks for anything else is dropped), let the policy run
    the stage body, map its outcome. The body returned (the next stage's) is signed for that
    stage."""
    rt = runtime()
    body = verify_body(task, stage, rt.signer, body)  # before any parsing
    try:
        msg = upgrade_message(body)  # any wire version up to ours (the broker's data is input)
    except WireVersionError as exc:
        raise requeue_for_newer_worker(task, stage, exc) from None
    state = JobState(rt.redis, msg.job_id, rt.signer)
    try:  # before anything is read or written (see workers.guard)
        seen = look(state, Slot.of(msg))  # the job and the chain's entry, one round trip for the guard and the policy
        spec = check_message(state, functools.partial(output_storage, rt), msg, stage, seen)
    except ForgedMessage as exc:  # dropped (acked): the sweep re-sends a genuine chain from storage
        log.warning("%s: dropped a message for job %s chunk %d: %s", stage, msg.job_id, msg.chunk, exc)
        return {}
    except TRANSIENT_ERRORS as exc:
        raise task.retry(exc=exc, countdown=transient_retry(state, stage, msg, task.request.retries, exc)) from exc
    work = functools.partial(_run_body, STAGE_BODIES[stage], rt, state, input_root(spec))
    timing = LeaseTiming(rt.settings.lease_s, spec.item_budget_s or rt.settings.item_budget_s)
    delivery = Delivery(stage, msg, task.request.retries, seen=seen)
    entering = metrics.entering(rt.redis, stage, msg)  # counts queue wait; {} while metrics are off
    started = time.monotonic()
    with logs.context(job=msg.job_id, chunk=msg.chunk, stage=stage):
        policy = policy_for(rt, state, task.app, spec)
        outcome = deliver_leased(policy, delivery, work, timing, task_id=task.request.id)
        _log_chunk(stage, msg, outcome, time.monotonic() - started)
    metrics.observe_items(stage, entering, outcome)
    balance.after_chunk(stage, len(msg.records))  # pixelrelay run's thread balance; off elsewhere
    if isinstance(outcome, Retry):
        raise task.retry(exc=outcome.error, countdown=outcome.countdown)
    if isinstance(outcome, (Split, Stale, Cancelled)):
        return {}  # split: the split chains carry the items on; stale: finished already; cancelled: ended
    if stage not in NEXT_STAGE:
        return chunk_summary(outcome)
    return signed_body(rt.signer, NEXT_STAGE[stage], outcome)


def _run_body(body: StageBody, rt: Runtime, state: JobState, inputs: InputRoot, msg: ChunkMessage) -> None:
    body(rt, state, msg, inputs)


def chunk_summary(msg: ChunkMessage) -> dict:
    """What the last stage returns: the chunk and its counts, for Celery's events (no task
    reads it: the manifest part is the chunk's result)."""
    failed = sum(r.failed for r in msg.records)
    return {
        "job": msg.job_id,
        "seq": msg.seq,
        "chunk": msg.chunk,
        "part": msg.part,
        "done": len(msg.records) - failed,
        "failed": failed,
    }


def _log_chunk(stage: str, msg: ChunkMessage, outcome: Outcome, seconds: float) -> None:
    """The one INFO line per delivered chunk (``workers.observe.chunk_done``)."""
    records = outcome.records if isinstance(outcome, ChunkMessage) else msg.records
    kind = "done" if isinstance(outcome, ChunkMessage) else type(outcome).__name__.lower()
    observe.chunk_done(stage, msg.job_id, msg.chunk, len(records), seconds, sum(r.failed for r in records), kind)
    observe.beat()


def register(app: Celery) -> None:
    """Register the three stage tasks on ``app``."""
    for stage in STAGE_BODIES:
        _stage_task(app, stage)


def _stage_task(app: Celery, stage: str) -> Task:
    # resultrepr_maxsize: Celery reprs every return value (the next stage's signed body) for
    # its success log line and event, walking up to this many characters of it per task.
    @app.task(name=task_name(stage), bind=True, max_retries=None, shared=False, resultrepr_maxsize=RESULT_REPR_CHARS)
    def stage_task(self: Task, body: dict) -> dict:
        if not body:  # the chain was split upstream; nothing to do
            return {}
        return run_stage(self, stage, body)

    return stage_task
