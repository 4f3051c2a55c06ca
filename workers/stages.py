"""The three stage bodies, encode -> plan -> decode: one stage's work on a chunk's pending items.

A body runs inside a delivery (``tasks.run_stage``, under ``workers.policy``) and must be
idempotent: delivery is at-least-once (``docs/design.md``, "Delivery guarantees"). Items
fail one by one, with a reason, and their neighbours go on; a transient error propagates
(the task retries). A source whose output is over ``PIXELRELAY_MAX_OUTPUT_PIXELS`` fails
from its header twice: at the encode stage with the job's options, at the decode stage with
the plan's, before the model (``batching``). Each model call is timed (``workers.metrics``)
and told to the watchdog (``workers.watch.model_call``: its items are the suspects of a hang).
A body reads its sources as ``inputs`` says (``workers.guard.input_root`` of the job's spec).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Literal, overload

from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline import fingerprint as fp
from pixelrelay.pipeline import outsize
from pixelrelay.pipeline.imageio import format_for_uri
from pixelrelay.pipeline.messages import ChunkMessage, ItemRecord
from pixelrelay.pipeline.stages.base import Decoder, Encoder, Planner, RestoredImage
from pixelrelay.pipeline.stages.decoders.edits import restore_with_edits
from pixelrelay.pipeline.stages.registry import BackendNotAllowedError
from pixelrelay.workers import metrics, observe
from pixelrelay.workers.batching import Loaded, batches, call_isolated, described, planned, prefetched
from pixelrelay.workers.guard import NAME_NOT_FOLLOWED, InputRoot
from pixelrelay.workers.outputs import Output, Written, wait_written, write_in_background
from pixelrelay.workers.policy import reason as _reason
from pixelrelay.workers.reuse import Planned, expected, reuse_existing, write_actions
from pixelrelay.workers.runtime import Runtime
from pixelrelay.workers.watch import model_call


@overload
def _stage_backend(
    rt: Runtime, stage: Literal["encode"], spec: str | None, records: Sequence[ItemRecord]
) -> Encoder | None: ...
@overload
def _stage_backend(
    rt: Runtime, stage: Literal["plan"], spec: str | None, records: Sequence[ItemRecord]
) -> Planner | None: ...
@overload
def _stage_backend(
    rt: Runtime, stage: Literal["decode"], spec: str | None, records: Sequence[ItemRecord]
) -> Decoder | None: ...
def _stage_backend(
    rt: Runtime, stage: str, spec: str | None, records: Sequence[ItemRecord]
) -> Encoder | Planner | Decoder | None:
    """The stage's backend; if it cannot be had, every record fails with the reason."""
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


def encode_chunk(rt: Runtime, state: JobState, msg: ChunkMessage, inputs: InputRoot = NAME_NOT_FOLLOWED) -> None:
    # Items already done (an earlier submission or a duplicate chain) leave the chain here.
    done = state.done_flags([r.index for r in msg.records])
    msg.records = [r for r, d in zip(msg.records, done, strict=True) if not d]
    pending = [r for r in msg.records if r.status is None]
    encoder = _stage_backend(rt, "encode", msg.backends.encoder, pending)
    if encoder is None:
        return
    pending = reuse_existing(rt, msg, pending, encoder)
    scale = outsize.options_sizer(msg.options)  # the plan's may differ: the decode stage checks again
    for batch, loaded in prefetched(rt, pending, "encode", lambda r: scale, inputs=inputs):
        started = time.perf_counter()
        for record, image in loaded:
            record.notes.extend(image.notes)
            record.source_size = (image.width, image.height)
        with model_call([record for record, _ in loaded]):
            results = call_isolated(encoder.describe, [image for _, image in loaded])
        share = (time.perf_counter() - started) / max(1, len(batch))
        metrics.observe_batch("encode", time.perf_counter() - started, len(loaded))
        for (record, _), result in zip(loaded, results, strict=True):
            record.timings["encode_s"] = round(share, 6)
            record.backends["encoder"] = encoder.spec
            record.models["encoder"] = encoder.identity()
            if isinstance(result, Exception):
                record.fail("encode", _reason(result))
            else:
                record.description = result


def plan_chunk(rt: Runtime, state: JobState, msg: ChunkMessage, inputs: InputRoot = NAME_NOT_FOLLOWED) -> None:
    pending = [r for r in msg.records if r.status is None]
    planner = _stage_backend(rt, "plan", msg.backends.planner, pending)
    if planner is None:
        return
    for batch in batches(pending, rt.settings.batch_size):
        started = time.perf_counter()
        with model_call(batch):
            results = call_isolated(lambda rs: planner.plan([described(r) for r in rs], [msg.options] * len(rs)), batch)
        share = (time.perf_counter() - started) / max(1, len(batch))
        metrics.observe_batch("plan", time.perf_counter() - started, len(batch))
        for record, result in zip(batch, results, strict=True):
            record.timings["plan_s"] = round(share, 6)
            record.backends["planner"] = planner.spec
            record.models["planner"] = planner.identity()
            if isinstance(result, Exception):
                record.fail("plan", _reason(result))
                continue
            # The output key was fixed at submission; its extension decides the format.
            result.output_format = format_for_uri(record.output)
            record.plan = result


def decode_chunk(rt: Runtime, state: JobState, msg: ChunkMessage, inputs: InputRoot = NAME_NOT_FOLLOWED) -> None:
    pending = [r for r in msg.records if r.status is None]
    decoder = _stage_backend(rt, "decode", msg.backends.decoder, pending)
    if decoder is None:
        return
    for record in pending:
        record.backends["decoder"] = decoder.spec
        record.models["decoder"] = decoder.identity()
        record.fingerprint = expected(msg, record, record.backends, record.models)
    wait_written(_decode_batches(rt, state, msg, decoder, write_actions(rt, msg, pending), inputs))
    for record in pending:
        if record.failed:  # a failed item answers nothing
            record.fingerprint = record.outcome = None


def _decode_batches(
    rt: Runtime, state: JobState, msg: ChunkMessage, decoder: Decoder, todo: list[Planned], inputs: InputRoot
) -> list[Future[Written]]:
    """Run the model on ``todo`` batch by batch (sources read as ``inputs`` says), each
    batch's outputs written while the next one runs."""
    writes_as = {id(record): (action, version) for record, action, version in todo}
    writes: list[Future[Written]] = []
    processed: list[ItemRecord] = []
    for batch, loaded in prefetched(
        rt, [record for record, _, _ in todo], "decode", lambda r: outsize.plan_sizer(planned(r)), inputs=inputs
    ):
        if state.cancelled():  # the rest stays pending: the policy ends the chain (cancelled)
            break
        started = time.perf_counter()
        with model_call([record for record, _ in loaded]):
            results = call_isolated(
                lambda pairs: restore_with_edits(decoder, [img for _, img in pairs], [planned(r) for r, _ in pairs]),
                loaded,
            )
        share = (time.perf_counter() - started) / max(1, len(batch))
        metrics.observe_batch("decode", time.perf_counter() - started, len(loaded))
        writes += write_in_background(rt, _decoded(loaded, results, writes_as), msg)  # while the next batch runs
        for record in batch:
            record.timings["decode_s"] = round(share, 6)
        processed += batch
        observe.batch_progress(state.r, msg, processed)  # ``status`` counts move per batch
    return writes


def _decoded(
    loaded: Loaded, results: list[RestoredImage | Exception], writes_as: dict[int, tuple[fp.Decision, str | None]]
) -> list[Output]:
    """The batch's outputs to write; an item the model failed on fails here."""
    done = []
    for (record, image), result in zip(loaded, results, strict=True):
        if isinstance(result, Exception):
            record.fail("decode", _reason(result))
        else:
            done.append(Output(record, image, result, *writes_as[id(record)]))
    return done
