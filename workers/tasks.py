"""The three stage tasks: encode -> plan -> decode, chained per chunk of items.

Delivery is at-least-once (see the ``workers`` package docstring), so every task here is
idempotent. Each task takes and returns a ``ChunkMessage`` as JSON: ids, keys and text only.
Items fail one by one, with a reason, and their neighbours go on.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Callable, Sequence, TypeVar

import redis
from celery import Task

from pixelrelay.pipeline import constants as C
from pixelrelay.pipeline.imageio import DecodedImage, ImageDecodeError, content_type, decode_image, encode_image, format_for_uri
from pixelrelay.jobs.files import write_part
from pixelrelay.pipeline.messages import ChunkMessage, ItemRecord, JobOptions
from pixelrelay.pipeline.storage import StorageError, TransientStorageError
from pixelrelay.workers.app import create_app, task_name
from pixelrelay.jobs.feed import feed, finalize_if_complete
from pixelrelay.workers.flow import chunk_chain, sender
from pixelrelay.jobs.state import JobState
from pixelrelay.workers.runtime import Runtime, runtime

log = logging.getLogger("pixelrelay.worker")

app = create_app()

TRANSIENT_ERRORS = (TransientStorageError, redis.ConnectionError, redis.TimeoutError)

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


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
                writes.append((record, rt.io.submit(_write_output, rt, record, image, result, msg.options)))
        for record in batch:
            record.timings["decode_s"] = round(share, 6)
    for record, write in writes:
        try:
            write.result()
        except TRANSIENT_ERRORS:
            raise
        except Exception as exc:
            record.fail("decode", f"cannot write output: {_reason(exc)}")


def _write_output(
    rt: Runtime, record: ItemRecord, image: DecodedImage, restored, options: JobOptions | None = None
) -> None:
    options = options or JobOptions()
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
        quality=options.quality,
        lossless=options.lossless,
    )
    # One PUT (with its image/* Content-Type) / one atomic rename.
    rt.storage(record.output).put(record.output, data, content_type(record.plan.output_format))
    record.notes.extend([*restored.notes, *notes])
    record.output_size = (expected[1], expected[0])
    record.status = "done"


# --- the tasks --------------------------------------------------------------------------


def _fail_pending(msg: ChunkMessage, stage: str, reason: str) -> None:
    for record in msg.records:
        if record.status is None:
            record.fail(stage, reason)


def _split_chunk(msg: ChunkMessage) -> None:
    """After repeated worker deaths: re-send every pending item as its own chain."""
    pending = [r for r in msg.records if r.status is None]
    for i, record in enumerate(pending):
        single = msg.model_copy(update={"records": [record], "feeds": msg.feeds and i == 0, "part": str(record.index)})
        chunk_chain(app, single).apply_async()


def run_stage(task: Task, stage: str, body: dict, work: Callable[[Runtime, JobState, ChunkMessage], None]) -> dict:
    msg = ChunkMessage.model_validate(body)
    rt = runtime()
    state = JobState(rt.redis, msg.job_id)
    delivery_key = f"{msg.part or 'all'}:{task.request.retries}"
    deliveries = state.count_delivery(stage, msg.seq, f"{msg.chunk}:{delivery_key}")
    if deliveries > rt.settings.max_deliveries:
        if len([r for r in msg.records if r.status is None]) > 1:
            log.error("chunk %s/%d killed its %s worker %d times: splitting", msg.job_id, msg.chunk, stage, deliveries - 1)
            _split_chunk(msg)
            return {}  # the split chains carry the items on; this chain ends here
        _fail_pending(msg, stage, f"worker process died {deliveries - 1} times on this item (crash or out of memory)")
    else:
        try:
            work(rt, state, msg)
        except TRANSIENT_ERRORS as exc:
            if task.request.retries >= rt.settings.max_retries:
                _fail_pending(msg, stage, f"gave up after {task.request.retries} retries: {_reason(exc)}")
            else:
                raise _retry(task, rt, stage, msg, exc) from None
        except Exception as exc:  # a bug or a permanent fault: the items still get a reason
            log.exception("%s chunk %s/%d failed", stage, msg.job_id, msg.chunk)
            _fail_pending(msg, stage, f"internal error: {_reason(exc)}")
    state.clear_delivery(stage, msg.seq, f"{msg.chunk}:{delivery_key}")
    if stage == "decode":
        try:
            _finish_chunk(rt, state, msg)
        except TRANSIENT_ERRORS as exc:
            # The retry redoes nothing costly: outputs already written are skipped.
            if task.request.retries >= rt.settings.max_retries:
                raise
            raise _retry(task, rt, stage, msg, exc) from None
    return msg.model_dump(mode="json")


def _retry(task: Task, rt: Runtime, stage: str, msg: ChunkMessage, exc: Exception):
    retries = task.request.retries
    countdown = min(C.RETRY_BACKOFF_MAX_S, C.RETRY_BACKOFF_BASE_S * 2**retries) * random.uniform(0.5, 1.0)
    log.warning(
        "%s chunk %s/%d: transient error (%s), retry %d in %.1fs", stage, msg.job_id, msg.chunk, exc, retries + 1, countdown
    )
    return task.retry(exc=exc, countdown=countdown)


def _finish_chunk(rt: Runtime, state: JobState, msg: ChunkMessage) -> None:
    _fail_pending(msg, "decode", "item left the chain without a result")  # defensive: never lose one
    storage = rt.storage(msg.output)
    try:
        write_part(storage, msg.output, msg.job_id, msg.chunk, msg.seq, msg.records, msg.part)
    except StorageError as exc:
        # Permanent (e.g. access denied): count the items anyway so the job can end; the
        # manifest then reports them as missing, and a re-submission retries them.
        log.error("cannot write the manifest part of chunk %s/%d: %s", msg.job_id, msg.chunk, exc)
        for record in msg.records:
            record.fail("decode", f"manifest part not written: {exc}")
    state.mark(msg.seq, [(r.index, r.status) for r in msg.records])
    spec = state.spec()
    if msg.feeds:
        feed(sender(app), state, storage, spec, state.seq(), 1)
    finalize_if_complete(state, storage, spec, msg.seq)


def _stage_task(stage: str, work):
    @app.task(name=task_name(stage), bind=True, max_retries=None)
    def stage_task(self: Task, body: dict) -> dict:
        if not body:  # the chain was split upstream; nothing to do
            return {}
        return run_stage(self, stage, body, work)

    return stage_task


encode_task = _stage_task("encode", encode_chunk)
plan_task = _stage_task("plan", plan_chunk)
decode_task = _stage_task("decode", decode_chunk)
