"""The three stage tasks: encode -> plan -> decode, chained per chunk of items.

Delivery is at-least-once (see the ``workers`` package docstring), so every task here is
idempotent. Each task takes and returns a ``ChunkMessage`` as JSON: ids, keys and text only.
Items fail one by one, with a reason, and their neighbours go on.

The stage bodies (``encode_chunk``, ``plan_chunk``, ``decode_chunk``) do the work; what
happens around them (poison pills, retries, finishing a chunk) is ``workers.policy``, run
under a lease on the chunk with a watchdog on its time budget (``workers.lease``). The
Celery tasks are thin adapters, registered by ``register(app)`` when the app is created
(``celery_app.get_app``), so importing this module needs no settings and no broker.

Metrics (``workers.metrics``, off unless ``--metrics-port``): ``run_stage`` observes the
queue wait and counts the items a stage handled by status; the stage bodies time each model
call. A metrics error never fails a task.

Signing (``pipeline.signing``): ``run_stage`` checks a body's signature (kind
``chunk:<stage>``) before it parses it, and drops one that fails (``verify_body``); the body
it returns, the next stage's, is signed for that stage (``NEXT_STAGE``). The decode stage,
the chain's last, returns a short unsigned summary (``chunk_summary``) that no task reads:
Celery keeps no results, and its events and Flower show it as the task's result.

Bounded resources: a source whose output (pixels x scale^2, or an output target's real size:
``pipeline.outsize``) is over ``PIXELRELAY_MAX_OUTPUT_PIXELS`` fails from its header, before
its decode: at the encode stage with the job's options, again at the decode stage with the
plan's, before the model. The
decoded images a worker holds (the batch the model runs, plus the next one prefetched) stay
within ``PIXELRELAY_PREFETCH_BYTES`` (``runtime.DecodeBudget``). ``strip_metadata`` in the job's
options writes outputs without EXIF.

Reuse (``pipeline.fingerprint``): every output carries the fingerprint of the request and
models that made it. ``encode_chunk`` passes an item straight to done (``reused``) when its
output's fingerprint matches what this job would produce, computed from its own encoder
and the identities the plan and decode workers published (``jobs.identities``); if any is
unknown it processes the item. ``decode_chunk`` checks again with its own decoder before
running the model, then writes conditionally: where no output exists (``If-None-Match``
/ ``link``), or over the very version it checked where the output answers another request
or model (``overwritten``; S3 ``If-Match``). A delivery that loses either race re-reads the
output and keeps it if it now answers this request: a duplicate delivery never puts other
bytes over a same-request output. ``overwrite`` in the job's options skips reuse, except of an
output this very job wrote (a duplicate delivery).

Writes: a batch's outputs are encoded on the I/O threads while the next batch runs, then
stored as one group (``Storage.put_many``): on local storage one sync makes the whole
batch durable before any output is named. A chunk reports an item done only after its
output is durable and named.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from celery import Celery, Task
from celery.exceptions import Reject
from celery.exceptions import Retry as CeleryRetry

from pixelrelay import logs
from pixelrelay.jobs import identities
from pixelrelay.jobs.chunks import Slot
from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline import constants as C
from pixelrelay.pipeline import fingerprint as fp
from pixelrelay.pipeline import outsize
from pixelrelay.pipeline.imageio import (
    DecodedImage,
    ImageDecodeError,
    OutputScale,
    content_type,
    decode_image,
    encode_image,
    format_for_uri,
    output_size,
    probe_size,
)
from pixelrelay.pipeline.messages import (
    ChunkMessage,
    Fingerprint,
    ItemOutcome,
    ItemRecord,
    JobOptions,
    WireVersionError,
    upgrade_message,
)
from pixelrelay.pipeline.signing import SignatureError
from pixelrelay.pipeline.stages.base import StageSpec
from pixelrelay.pipeline.stages.decoders.edits import restore_with_edits
from pixelrelay.pipeline.stages.registry import BackendNotAllowedError
from pixelrelay.pipeline.storage import PutRequest, Storage, StorageConflictError, StorageError, is_s3
from pixelrelay.workers import balance, metrics, observe
from pixelrelay.workers.celery_app import task_name
from pixelrelay.workers.flow import sender, signed_body
from pixelrelay.workers.guard import ForgedMessage, check_message, transient_retry
from pixelrelay.workers.lease import LeaseTiming, deliver_leased
from pixelrelay.workers.policy import (
    TRANSIENT_ERRORS,
    Cancelled,
    Delivery,
    DeliveryPolicy,
    Limits,
    Retry,
    Split,
    Stale,
    look,
)
from pixelrelay.workers.policy import reason as _reason
from pixelrelay.workers.runtime import DecodeBudget, Runtime, runtime

log = logging.getLogger("pixelrelay.worker")

In = TypeVar("In")
Out = TypeVar("Out")


def _batches(seq: Sequence[In], size: int) -> list[Sequence[In]]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


# Work smaller than this runs on the calling thread: a hop to an I/O thread and back (a
# submit, a wake-up, a result, the GIL passed to and fro) costs tens of microseconds of CPU
# and a dozen futex calls, more than reading a local file or decoding or encoding a small
# image takes (``benchmarks/bench_overhead.py``). Storage round trips (S3) always use the threads.
INLINE_BYTES = 256 * 1024  # encoded bytes of the sources a batch decodes
INLINE_PIXELS = 256 * 1024  # pixels of the outputs a batch encodes


def _io_map(rt: Runtime, fn: Callable[[In], Out], items: Sequence[In], inline: bool = False) -> list[Out]:
    """``[fn(x) for x in items]`` on the I/O threads, in order, with one task per thread
    rather than one per item (``items[i::n]`` for ``n = min(len(items), io_threads)``): as
    parallel, at a fraction of the futures' cost on small items. A single item, or
    ``inline`` work (too small to be worth a thread hop), runs on the calling thread. An
    exception propagates, as from ``Executor.map``."""
    n = 1 if inline else min(len(items), max(1, rt.settings.io_threads))
    if n <= 1:
        return [fn(x) for x in items]
    out: list = [None] * len(items)
    for i, results in enumerate(rt.io.map(lambda group: [fn(x) for x in group], [items[i::n] for i in range(n)])):
        out[i::n] = results
    return out


def _all_local(uris: Iterable[str]) -> bool:
    """Whether every URI is on local storage (a read or head there is a system call, not a
    network round trip: not worth a thread hop)."""
    return not any(is_s3(uri) for uri in uris)


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


def _read_one(rt: Runtime, record: ItemRecord, stage: str) -> bytes | None:
    try:
        return rt.storage(record.input).get(record.input)
    except StorageError as exc:
        record.fail(stage, f"cannot read input: {exc}")
    return None


def _decode_one(rt: Runtime, record: ItemRecord, data: bytes, stage: str, scale: OutputScale) -> DecodedImage | None:
    """Decode a source; one over the image or output pixel limit fails before its decode."""
    try:
        return decode_image(
            data, rt.settings.max_image_pixels, scale=scale, max_output_pixels=rt.settings.max_output_pixels
        )
    except ImageDecodeError as exc:
        record.fail(stage, str(exc))
    return None


def _decoded_bytes(rt: Runtime, data: bytes, scale: OutputScale) -> int:
    """What decoding ``data`` will hold (RGB + alpha), from its header; 0 for a source
    that ``decode_image`` refuses before decoding it."""
    size = probe_size(data)
    if size is None:
        return 0
    pixels = size[0] * size[1]
    out_w, out_h = output_size(*size, scale)
    if pixels > rt.settings.max_image_pixels or out_w * out_h > rt.settings.max_output_pixels:
        return 0
    return pixels * 4


def _load_images(
    rt: Runtime,
    records: Sequence[ItemRecord],
    stage: str,
    scale_of: Callable[[ItemRecord], OutputScale] = lambda r: 1,
    budget: DecodeBudget | None = None,
) -> tuple[list[tuple[ItemRecord, DecodedImage]], int]:
    """Read, then decode sources in parallel threads, once ``budget`` admits their decoded
    size; records that can't be read or decoded fail here. Returns the loaded pairs and the
    bytes taken from ``budget`` for them (nothing is loaded once the budget is closed)."""
    raw = _io_map(rt, lambda r: _read_one(rt, r, stage), records, inline=_all_local(r.input for r in records))
    todo = [(r, data) for r, data in zip(records, raw) if data is not None]
    held = sum(_decoded_bytes(rt, data, scale_of(r)) for r, data in todo)
    if budget is not None and not budget.take(held):
        return [], 0
    small = sum(len(data) for _, data in todo) < INLINE_BYTES
    images = _io_map(rt, lambda pair: _decode_one(rt, *pair, stage, scale_of(pair[0])), todo, inline=small)
    return [(r, image) for (r, _), image in zip(todo, images) if image is not None], held


def _prefetched(
    rt: Runtime,
    records: Sequence[ItemRecord],
    stage: str,
    scale_of: Callable[[ItemRecord], OutputScale] = lambda r: 1,
    budget: DecodeBudget | None = None,
):
    """Yield (batch, loaded images) per model batch while the next batch loads, so the
    model (the GPU) does not wait for storage. The decoded images held (this batch and the
    next) stay within ``PIXELRELAY_PREFETCH_BYTES`` (``runtime.DecodeBudget``): the next
    batch is decoded ahead only when it fits beside this one."""
    budget = budget or DecodeBudget(rt.settings.prefetch_bytes)
    batches = _batches(records, rt.settings.batch_size)
    load = functools.partial(_load_images, rt, stage=stage, scale_of=scale_of, budget=budget)
    upcoming = rt.prefetch.submit(load, batches[0]) if batches else None
    try:
        for i, batch in enumerate(batches):
            loaded, held = upcoming.result()
            upcoming = rt.prefetch.submit(load, batches[i + 1]) if i + 1 < len(batches) else None
            try:
                yield batch, loaded
            finally:
                budget.give(held)
                observe.beat()  # alive between batches (pixelrelay health)
    finally:
        budget.close()  # a chunk that ends early (cancelled) frees the pending load


def _stage_backend(rt: Runtime, stage: str, spec: str | None, records: Sequence[ItemRecord]):
    try:
        return rt.stage(stage, spec)
    except BackendNotAllowedError as exc:  # refused before anything was loaded
        for record in records:
            record.fail(stage, str(exc))
        return None
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
    pending = _reuse_existing(rt, msg, pending, encoder)
    scale = outsize.options_sizer(msg.options)  # the plan's may differ: the decode stage checks again
    for batch, loaded in _prefetched(rt, pending, "encode", lambda r: scale):
        started = time.perf_counter()
        for record, image in loaded:
            record.notes.extend(image.notes)
            record.source_size = (image.width, image.height)
        results = _call_isolated(encoder.describe, [image for _, image in loaded])
        share = (time.perf_counter() - started) / max(1, len(batch))
        metrics.observe_batch("encode", time.perf_counter() - started, len(loaded))
        for (record, _), result in zip(loaded, results):
            record.timings["encode_s"] = round(share, 6)
            record.backends["encoder"] = encoder.spec
            record.models["encoder"] = encoder.identity()
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
        results = _call_isolated(lambda rs: planner.plan([r.description for r in rs], [msg.options] * len(rs)), batch)
        share = (time.perf_counter() - started) / max(1, len(batch))
        metrics.observe_batch("plan", time.perf_counter() - started, len(batch))
        for record, result in zip(batch, results):
            record.timings["plan_s"] = round(share, 6)
            record.backends["planner"] = planner.spec
            record.models["planner"] = planner.identity()
            if isinstance(result, Exception):
                record.fail("plan", _reason(result))
                continue
            # The output key was fixed at submission; its extension decides the format.
            result.output_format = format_for_uri(record.output)
            record.plan = result


def decode_chunk(rt: Runtime, state: JobState, msg: ChunkMessage) -> None:
    pending = [r for r in msg.records if r.status is None]
    decoder = _stage_backend(rt, "decode", msg.backends.decoder, pending)
    if decoder is None:
        return
    for record in pending:
        record.backends["decoder"] = decoder.spec
        record.models["decoder"] = decoder.identity()
        record.fingerprint = _expected(msg, record, record.backends, record.models)
    todo: list[tuple[ItemRecord, fp.Decision, str | None]] = []
    found_all = _io_map(rt, lambda r: _existing(rt, r.output), pending, inline=_all_local(r.output for r in pending))
    for record, found in zip(pending, found_all):
        action = fp.decide(found.present, found.stored, record.fingerprint, msg.job_id, msg.options.overwrite)
        if action == "reuse":  # an earlier job, or an earlier delivery of this chain
            _mark_reused(record, found.stored, msg.job_id, "decode")
        else:
            todo.append((record, action, found.version))
    writes_as = {id(record): (action, version) for record, action, version in todo}
    writes = []
    for batch, loaded in _prefetched(
        rt, [record for record, _, _ in todo], "decode", lambda r: outsize.plan_sizer(r.plan)
    ):
        if state.cancelled():  # the rest stays pending: the policy ends the chain (cancelled)
            break
        started = time.perf_counter()
        results = _call_isolated(
            lambda pairs: restore_with_edits(decoder, [img for _, img in pairs], [r.plan for r, _ in pairs]), loaded
        )
        share = (time.perf_counter() - started) / max(1, len(batch))
        metrics.observe_batch("decode", time.perf_counter() - started, len(loaded))
        done = []
        for (record, image), result in zip(loaded, results):
            if isinstance(result, Exception):
                record.fail("decode", _reason(result))
            else:
                done.append(_Output(record, image, result, *writes_as[id(record)]))
        writes += _write_in_background(rt, done, msg)  # while the next batch runs
        for record in batch:
            record.timings["decode_s"] = round(share, 6)
    for write in writes:
        for record, exc in write.result():
            if isinstance(exc, TRANSIENT_ERRORS):
                raise exc
            if exc is not None:
                record.fail("decode", f"cannot write output: {_reason(exc)}")
    for record in pending:
        if record.failed:  # a failed item answers nothing
            record.fingerprint = record.outcome = None


@dataclass(frozen=True)
class _Output:
    """A decoded item waiting to be written: what the model made, and how to write it (the
    action the fingerprint check chose, over which version)."""

    record: ItemRecord
    image: DecodedImage
    restored: Any
    action: fp.Decision = "replace"
    version: str | None = None


def _write_in_background(rt: Runtime, outputs: list[_Output], msg: ChunkMessage) -> list:
    """Encode and store ``outputs`` on the I/O threads while the next batch runs: the images
    are encoded in parallel, one task per thread (``outputs[i::n]``), and then stored by one
    more task as one group (``Storage.put_many``: on local storage, one sync for the whole
    batch). Futures of lists of ``(record, exception or None)``, every item tried whatever
    its neighbours did."""
    if not outputs:
        return []
    if sum(_pixels(o.restored) for o in outputs) < INLINE_PIXELS:
        # Small outputs: encoded by the one task that stores them, no hop per encode.
        return [rt.io.submit(lambda: _store_encoded(rt, _encode_all(outputs, msg.options), msg))]
    n = min(len(outputs), max(1, rt.settings.io_threads))
    encoding = [rt.io.submit(_encode_all, outputs[i::n], msg.options) for i in range(n)]
    # Submitted after the encodes, so (FIFO) every encode has started before this waits on it.
    return [rt.io.submit(lambda: _store_encoded(rt, [pair for f in encoding for pair in f.result()], msg))]


def _pixels(restored) -> int:
    """A decoder output's pixel count; one it cannot tell (a malformed output, which its
    encode then fails alone) counts as too many to encode inline."""
    shape = getattr(getattr(restored, "rgb", None), "shape", None)
    try:
        return int(shape[0]) * int(shape[1])
    except (TypeError, ValueError, IndexError):
        return INLINE_PIXELS


def _encode_all(group: list[_Output], options: JobOptions) -> list[tuple[_Output, _Encoded | Exception]]:
    out = []
    for o in group:
        try:
            out.append((o, _encode_output(o.record, o.image, o.restored, options)))
        except Exception as exc:
            out.append((o, exc))
    return out


def _store_encoded(
    rt: Runtime, encoded: list[tuple[_Output, _Encoded | Exception]], msg: ChunkMessage
) -> list[tuple[ItemRecord, Exception | None]]:
    results = [(o.record, enc) for o, enc in encoded if isinstance(enc, Exception)]
    ready = [(o, enc) for o, enc in encoded if not isinstance(enc, Exception)]
    writes = [_Write(o.record, enc.data, enc.content_type, o.action, o.version) for o, enc in ready]
    outcomes = _store_all(rt, writes, msg.options, msg.job_id, msg.output) if writes else []
    for (o, enc), outcome in zip(ready, outcomes):
        if isinstance(outcome, Exception):
            results.append((o.record, outcome))
        else:
            _mark_written(o.record, o.image, o.restored, enc, outcome)
            results.append((o.record, None))
    return results


@dataclass(frozen=True)
class _Encoded:
    """An output image encoded for storage, and the notes the encoder made."""

    data: bytes
    content_type: str
    notes: list[str]


@dataclass(frozen=True)
class _Write:
    """One output to store: which action the fingerprint check chose, over which version."""

    record: ItemRecord
    data: bytes
    content_type: str
    action: fp.Decision = "replace"
    version: str | None = None


def _encode_output(record: ItemRecord, image: DecodedImage, restored, options: JobOptions | None) -> _Encoded:
    """Check the decoder's output size and encode it in the plan's format."""
    options = options or JobOptions()
    width, height = outsize.plan_size(record.plan, image.width, image.height)
    if tuple(restored.rgb.shape[:2]) != (height, width):
        raise RuntimeError(
            f"decoder returned {restored.rgb.shape[1]}x{restored.rgb.shape[0]}, expected {width}x{height}"
        )
    data, notes = encode_image(
        restored.rgb,
        record.plan.output_format,
        alpha=restored.alpha,
        icc_profile=image.icc_profile,
        exif=None if options.strip_metadata else image.exif,
        quality=options.quality,
        lossless=options.lossless,
    )
    return _Encoded(data, content_type(record.plan.output_format), notes)


def _mark_written(record: ItemRecord, image: DecodedImage, restored, enc: _Encoded, outcome: ItemOutcome) -> None:
    record.outcome = outcome
    record.notes.extend([*restored.notes, *enc.notes])
    width, height = outsize.plan_size(record.plan, image.width, image.height)
    record.output_size = (width, height)
    if record.plan.target is not None:  # what ran, and what came out (wire version 4)
        record.native_scale = restored.native_scale
        record.final_scale = float(f"{outsize.factor(record.plan.target, image.width, image.height):.6g}")
    record.status = "done"


def _write_output(
    rt: Runtime,
    record: ItemRecord,
    image: DecodedImage,
    restored,
    options: JobOptions | None = None,
    job_id: str = "",
    action: fp.Decision = "replace",
    version: str | None = None,
    root: str | None = None,
) -> None:
    """Encode and store one output (the batch path is ``_write_in_background``)."""
    enc = _encode_output(record, image, restored, options)
    outcome = _store_all(
        rt, [_Write(record, enc.data, enc.content_type, action, version)], options or JobOptions(), job_id, root
    )[0]
    if isinstance(outcome, Exception):
        raise outcome
    _mark_written(record, image, restored, enc, outcome)


def _store(
    rt: Runtime,
    record: ItemRecord,
    data: bytes,
    ctype: str,
    options: JobOptions,
    job_id: str,
    action: fp.Decision,
    version: str | None = None,
    root: str | None = None,
) -> ItemOutcome:
    """Store one output (``_store_all`` of one); raises what it met."""
    outcome = _store_all(rt, [_Write(record, data, ctype, action, version)], options, job_id, root)[0]
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def _store_all(
    rt: Runtime, writes: list[_Write], options: JobOptions, job_id: str, root: str | None = None
) -> list[ItemOutcome | Exception]:
    """Write outputs as each ``action`` says, conditionally, as one group per storage
    (``put_many``): ``create`` only where none exists, ``replace`` only over the ``version``
    that was checked. If an output changed meanwhile and now answers this request (another
    delivery wrote it), it is kept: a duplicate delivery never puts other bytes over it.
    Anything else there is replaced. Per write: its outcome, or the exception it met."""
    outcomes: list[ItemOutcome | Exception] = [RuntimeError("not written")] * len(writes)
    by_storage: dict[bool, list[int]] = {}
    for i, w in enumerate(writes):
        by_storage.setdefault(is_s3(w.record.output), []).append(i)
    for indices in by_storage.values():
        storage = rt.storage(writes[indices[0]].record.output, root=root)  # local: refuses a path outside the output
        requests = [_request(writes[i], job_id) for i in indices]
        for i, error in zip(indices, storage.put_many(requests)):
            w = writes[i]
            if error is None:
                outcomes[i] = "processed" if w.action == "create" else "overwritten"
            elif isinstance(error, StorageConflictError):
                outcomes[i] = _after_conflict(rt, storage, w, options, job_id)
            else:
                outcomes[i] = error
    return outcomes


def _request(w: _Write, job_id: str) -> PutRequest:
    metadata = fp.to_metadata(w.record.fingerprint, job_id) if w.record.fingerprint and job_id else None
    if w.action == "create":
        return PutRequest(w.record.output, w.data, w.content_type, metadata, if_absent=True)
    return PutRequest(w.record.output, w.data, w.content_type, metadata, if_version=w.version)


def _after_conflict(
    rt: Runtime, storage: Storage, w: _Write, options: JobOptions, job_id: str
) -> ItemOutcome | Exception:
    """A conditional write lost: keep the output if it now answers this request, else
    replace it unconditionally (another request's output)."""
    record = w.record
    now = _existing(rt, record.output)
    if (
        record.fingerprint
        and fp.decide(now.present, now.stored, record.fingerprint, job_id, options.overwrite) == "reuse"
    ):
        record.notes.append("output written meanwhile by another delivery: kept")
        return fp.reuse_outcome(now.stored, job_id)
    request = _request(replace(w, action="replace", version=None), job_id)  # unconditional
    try:
        storage.put(request.uri, request.data, request.content_type, metadata=request.metadata)
    except Exception as exc:
        return exc
    return "overwritten"


# --- fingerprints -----------------------------------------------------------------------


def _expected(msg: ChunkMessage, record: ItemRecord, specs: dict[str, str], ids: dict[str, str]) -> Fingerprint:
    """The fingerprint this job gives the item's output, with these specs and identities."""
    request = fp.request_fingerprint(msg.options, msg.backends, record.input, format_for_uri(record.output))
    return Fingerprint(request=request, model=fp.model_fingerprint(specs, ids))


@dataclass(frozen=True)
class _Existing:
    """An output as found: whether it exists, its validated fingerprint, its version."""

    present: bool
    stored: fp.Stored | None = None
    version: str | None = None


def _existing(rt: Runtime, uri: str) -> _Existing:
    """Read an output's fingerprint. A permanent error reading it counts as an output of
    unknown fingerprint and version: never reused, replaced unconditionally."""
    try:
        head = rt.storage(uri).head(uri)
    except StorageError as exc:
        log.warning("cannot read the fingerprint of %s: %s", uri, exc)
        return _Existing(True)
    if head is None:
        return _Existing(False)
    return _Existing(True, fp.from_metadata(head.metadata), head.version)


def _mark_reused(record: ItemRecord, stored: fp.Stored | None, job_id: str, stage: str) -> None:
    record.status = "done"
    record.outcome = fp.reuse_outcome(stored, job_id)
    record.notes.append(f"output already answers this request ({stage} stage): {record.outcome}, not redone")


def _published_models(rt: Runtime, msg: ChunkMessage, encoder) -> tuple[dict[str, str], dict[str, str]] | None:
    """Specs and identities of the three stages as they would run this chunk now, or None
    when the plan or decode workers' identities are not known (not published, or disagreeing)."""
    specs, ids = {"encoder": encoder.spec}, {"encoder": encoder.identity()}
    stages = (("plan", "planner"), ("decode", "decoder"))
    wanted = [
        (stage, str(StageSpec.parse(w)) if (w := getattr(msg.backends, name)) else None) for stage, name in stages
    ]
    for (_, name), entry in zip(stages, identities.lookup_many(rt.redis, wanted)):  # one round trip
        if entry is None:
            return None
        specs[name], ids[name] = entry.spec, entry.identity
    return specs, ids


def _reuse_existing(rt: Runtime, msg: ChunkMessage, records: list[ItemRecord], encoder) -> list[ItemRecord]:
    """Pass items whose output already answers this request straight to done, before any
    work; returns the others. Unknown identities or ``overwrite``: everything is processed."""
    if not records or msg.options.overwrite:
        return records
    known = _published_models(rt, msg, encoder)
    if known is None:
        return records
    specs, ids = known
    rest = []
    found_all = _io_map(rt, lambda r: _existing(rt, r.output), records, inline=_all_local(r.output for r in records))
    for record, found in zip(records, found_all):
        expected = _expected(msg, record, specs, ids)
        if fp.decide(found.present, found.stored, expected, msg.job_id, overwrite=False) != "reuse":
            rest.append(record)
            continue
        record.backends.update(specs)
        record.models.update(ids)
        record.fingerprint = expected
        _mark_reused(record, found.stored, msg.job_id, "encode")
    return rest


# --- the tasks --------------------------------------------------------------------------

StageBody = Callable[[Runtime, JobState, ChunkMessage], None]
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


def policy_for(rt: Runtime, state: JobState, app: Celery) -> DeliveryPolicy:
    limits = Limits(max_deliveries=rt.settings.max_deliveries, max_retries=rt.settings.max_retries)
    return DeliveryPolicy(state, sender(app, rt.signer), functools.partial(output_storage, rt), limits)


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


def verify_body(task: Task, stage: str, signer, body: dict) -> dict:
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
        check_message(state, functools.partial(output_storage, rt), msg, stage, seen)
    except ForgedMessage as exc:  # dropped (acked): the sweep re-sends a genuine chain from storage
        log.warning("%s: dropped a message for job %s chunk %d: %s", stage, msg.job_id, msg.chunk, exc)
        return {}
    except TRANSIENT_ERRORS as exc:
        raise task.retry(exc=exc, countdown=transient_retry(state, stage, msg, task.request.retries, exc))
    work = functools.partial(STAGE_BODIES[stage], rt, state)
    timing = LeaseTiming(rt.settings.lease_s, rt.settings.item_budget_s)
    delivery = Delivery(stage, msg, task.request.retries, seen=seen)
    entering = metrics.entering(rt.redis, stage, msg)  # counts queue wait; {} while metrics are off
    started = time.monotonic()
    with logs.context(job=msg.job_id, chunk=msg.chunk, stage=stage):
        outcome = deliver_leased(policy_for(rt, state, task.app), delivery, work, timing)
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


def _log_chunk(stage: str, msg: ChunkMessage, outcome, seconds: float) -> None:
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
