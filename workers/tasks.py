"""The three stage tasks: encode -> plan -> decode, chained per chunk of items.

Delivery is at-least-once (see the ``workers`` package docstring), so every task here is
idempotent. Each task takes and returns a ``ChunkMessage`` as JSON: ids, keys and text only.
Items fail one by one, with a reason, and their neighbours go on.

The stage bodies (``encode_chunk``, ``plan_chunk``, ``decode_chunk``) do the work; what
happens around them (poison pills, retries, finishing a chunk) is ``workers.policy``, run
under a lease on the chunk with a watchdog on its time budget (``workers.lease``). The
Celery tasks are thin adapters, registered by ``register(app)`` when the app is created
(``celery_app.get_app``), so importing this module needs no settings and no broker.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Callable, Sequence, TypeVar

from celery import Celery, Task

from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline.imageio import DecodedImage, ImageDecodeError, decode_image, encode_image, format_for_uri
from pixelrelay.pipeline.messages import ChunkMessage, ItemRecord
from pixelrelay.pipeline.storage import StorageError
from pixelrelay.workers.celery_app import task_name
from pixelrelay.workers.flow import sender
from pixelrelay.workers.lease import LeaseTiming, deliver_leased
from pixelrelay.workers.policy import TRANSIENT_ERRORS, Delivery, DeliveryPolicy, Limits, Retry, Split, Stale
from pixelrelay.workers.policy import reason as _reason
from pixelrelay.workers.runtime import Runtime, runtime

log = logging.getLogger("pixelrelay.worker")

In = TypeVar("In")
Out = TypeVar("Out")


def _batches(seq: Sequence[In], size: int) -> list[Sequence[In]]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def _call_isolated(fn: Callable[[Sequence[In]], list[Out]], batch: Sequence[In]) -> list[Out | Exception]:
    """Run a batched model call; if the batch fails, retry item by item so that one bad
    item fails alone. Transient errors propagate (the whole task retries)."""
    try:
        results = fn(batch)
        if len(results) != len(batch):
            raise RuntimeError(f"backend returned {len(results)} results for {len(batch)} inputs")
        return list(results)
    except TRANSIENT_ERRORS:
        raise
    except Exception as exc:
        if len(batch) == 1:
            return [exc]
        log.warning("batch of %d failed (%s); retrying items one by one", len(batch), exc)
    out: list[Out | Exception] = []
    for one in batch:
        try:
            out.append(fn([one])[0])
        except TRANSIENT_ERRORS:
            raise
        except Exception as exc:
            out.append(exc)
    return out


def _load_one(rt: Runtime, record: ItemRecord, stage: str) -> DecodedImage | None:
    try:
        data = rt.storage(record.input).get(record.input)
        return decode_image(data, rt.settings.max_image_pixels)
    except ImageDecodeError as exc:
        record.fail(stage, str(exc))
    except StorageError as exc:
        record.fail(stage, f"cannot read input: {exc}")
    return None


def _load_images(rt: Runtime, records: Sequence[ItemRecord], stage: str) -> list[tuple[ItemRecord, DecodedImage]]:
    """Read and decode sources in parallel threads; records that can't be read fail here."""
    images = list(rt.io.map(lambda r: _load_one(rt, r, stage), records))
    return [(r, image) for r, image in zip(records, images) if image is not None]


def _prefetched(rt: Runtime, records: Sequence[ItemRecord], stage: str):
    """Yield (batch, loaded images) per model batch while the next batch loads, so the
    model (the GPU) does not wait for storage."""
    batches = _batches(records, rt.settings.batch_size)
    upcoming = rt.prefetch.submit(_load_images, rt, batches[0], stage) if batches else None
    for i, batch in enumerate(batches):
        loaded = upcoming.result()
        upcoming = rt.prefetch.submit(_load_images, rt, batches[i + 1], stage) if i + 1 < len(batches) else None
        yield batch, loaded


def _stage_backend(rt: Runtime, stage: str, spec: str | None, records: Sequence[ItemRecord]):
    try:
        return rt.stage(stage, spec)
    except Exception as exc:
        for record in records:
            record.fail(stage, f"backend {spec or rt.default_spec(stage)} unavailable: {_reason(exc)}")
        return None


# --- stage bodies -----------------------------------------------------------------------


def encode_chunk(rt: Runtime, state: JobState, msg: ChunkMessage) -> None:
    # Items already done (an earlier submission or a duplicate chain) leave the chain here.
    done = state.done_flags([r.index for r in msg.records])
    msg.records = [r for r, d in zip(msg.records, done) if not d]
    pending = [r for r in msg.records if r.status is None]
    encoder = _stage_backend(rt, "encode", msg.backends.encoder, pending)
    if encoder is None:
        return
    for batch, loaded in _prefetched(rt, pending, "encode"):
        started = time.perf_counter()
        for record, image in loaded:
            record.notes.extend(image.notes)
            record.source_size = (image.width, image.height)
        results = _call_isolated(encoder.describe, [image for _, image in loaded])
        share = (time.perf_counter() - started) / max(1, len(batch))
        for (record, _), result in zip(loaded, results):
            record.timings["encode_s"] = round(share, 6)
            record.backends["encoder"] = encoder.spec
            if isinstance(result, Exception):
                record.fail("encode", _reason(result))
            else:
                record.description = result


def plan_chunk(rt: Runtime, state: JobState, msg: ChunkMessage) -> None:
    pending = [r for r in msg.records if r.status is None]
    planner = _stage_backend(rt, "plan", msg.backends.planner, pending)
    if planner is None:
        return
    for batch in _batches(pending, rt.settings.batch_size):
        started = time.perf_counter()
        results = _call_isolated(
            lambda rs: planner.plan([r.description for r in rs], [msg.options] * len(rs)), batch
        )
        share = (time.perf_counter() - started) / max(1, len(batch))
        for record, result in zip(batch, results):
            record.timings["plan_s"] = round(share, 6)
            record.backends["planner"] = planner.spec
            if isinstance(result, Exception):
                record.fail("plan", _reason(result))
                continue
            # The output key was fixed at submission; its extension decides the format.
            result.output_format = format_for_uri(record.output)
            record.plan = result


def decode_chunk(rt: Runtime, state: JobState, msg: ChunkMessage) -> None:
    pending = [r for r in msg.records if r.status is None]
    present = rt.io.map(lambda r: rt.storage(r.output).exists(r.output), pending)
    todo = []
    for record, exists in zip(pending, present):
        if exists:
            record.status = "done"  # written by an earlier delivery of this chain
            record.notes.append("output already present: decode skipped")
        else:
            todo.append(record)
    decoder = _stage_backend(rt, "decode", msg.backends.decoder, todo)
    if decoder is None:
        return
    writes = []
    for batch, loaded in _prefetched(rt, todo, "decode"):
        started = time.perf_counter()
        results = _call_isolated(
            lambda pairs: decoder.restore([img for _, img in pairs], [r.plan for r, _ in pairs]), loaded
        )
        share = (time.perf_counter() - started) / max(1, len(batch))
        for (record, image), result in zip(loaded, results):
            record.backends["decoder"] = decoder.spec
            if isinstance(result, Exception):
                record.fail("decode", _reason(result))
            else:  # encode + upload in the background while the next batch runs
                writes.append((record, rt.io.submit(_write_output, rt, record, image, result)))
        for record in batch:
            record.timings["decode_s"] = round(share, 6)
    for record, write in writes:
        try:
            write.result()
        except TRANSIENT_ERRORS:
            raise
        except Exception as exc:
            record.fail("decode", f"cannot write output: {_reason(exc)}")


def _write_output(rt: Runtime, record: ItemRecord, image: DecodedImage, restored) -> None:
    scale = record.plan.scale
    expected = (image.height * scale, image.width * scale)
    if tuple(restored.rgb.shape[:2]) != expected:
        raise RuntimeError(f"decoder returned {restored.rgb.shape[1]}x{restored.rgb.shape[0]}, expected {expected[1]}x{expected[0]}")
    data, notes = encode_image(
        restored.rgb,
        record.plan.output_format,
        alpha=restored.alpha,
        icc_profile=image.icc_profile,
        exif=image.exif,
    )
    rt.storage(record.output).put(record.output, data)  # one PUT / atomic rename
    record.notes.extend([*restored.notes, *notes])
    record.output_size = (expected[1], expected[0])
    record.status = "done"


# --- the tasks --------------------------------------------------------------------------

StageBody = Callable[[Runtime, JobState, ChunkMessage], None]
STAGE_BODIES: dict[str, StageBody] = {"encode": encode_chunk, "plan": plan_chunk, "decode": decode_chunk}


def policy_for(rt: Runtime, state: JobState, app: Celery) -> DeliveryPolicy:
    limits = Limits(max_deliveries=rt.settings.max_deliveries, max_retries=rt.settings.max_retries)
    return DeliveryPolicy(state, sender(app), rt.storage, limits)


def run_stage(task: Task, stage: str, body: dict) -> dict:
    """One delivery: validate the body, let the policy run the stage body, map its outcome."""
    msg = ChunkMessage.model_validate(body)
    rt = runtime()
    state = JobState(rt.redis, msg.job_id)
    work = functools.partial(STAGE_BODIES[stage], rt, state)
    timing = LeaseTiming(rt.settings.lease_s, rt.settings.item_budget_s)
    delivery = Delivery(stage, msg, task.request.retries)
    outcome = deliver_leased(policy_for(rt, state, task.app), delivery, work, timing)
    if isinstance(outcome, Retry):
        raise task.retry(exc=outcome.error, countdown=outcome.countdown)
    if isinstance(outcome, (Split, Stale)):
        return {}  # split: the split chains carry the items on; stale: finished already
    return outcome.model_dump(mode="json")


def register(app: Celery) -> None:
    """Register the three stage tasks on ``app``."""
    for stage in STAGE_BODIES:
        _stage_task(app, stage)


def _stage_task(app: Celery, stage: str) -> Task:
    @app.task(name=task_name(stage), bind=True, max_retries=None, shared=False)
    def stage_task(self: Task, body: dict) -> dict:
        if not body:  # the chain was split upstream; nothing to do
            return {}
        return run_stage(self, stage, body)

    return stage_task
