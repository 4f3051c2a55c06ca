"""The decode stage's outputs: encoded in the plan's format, then stored conditionally, one group a batch.

A batch's outputs are encoded on the I/O threads while the next batch runs, then stored as
one group (``Storage.put_many``): on local storage one sync makes the whole batch durable
before any output is named. An item is reported done only once its output is durable and
named. Writes are conditional, as ``reuse.write_actions`` chose: ``create`` where no output
exists (S3 ``If-None-Match``, local ``link``), ``replace`` over the very version checked
(S3 ``If-Match``). A write that loses either race re-reads the output and keeps it if it now
answers this request, so a duplicate delivery never puts other bytes over a same-request
output (``docs/design.md``, "Delivery guarantees"). ``strip_metadata`` in the job's options
writes outputs without EXIF.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, replace

from pixelrelay.pipeline import fingerprint as fp
from pixelrelay.pipeline import outsize
from pixelrelay.pipeline.imageio import DecodedImage, content_type, encode_image
from pixelrelay.pipeline.messages import ChunkMessage, ItemOutcome, ItemRecord, JobOptions
from pixelrelay.pipeline.signing import Signer
from pixelrelay.pipeline.stages.base import RestoredImage
from pixelrelay.pipeline.storage import PutRequest, Storage, StorageConflictError, is_s3
from pixelrelay.workers.batching import planned
from pixelrelay.workers.policy import TRANSIENT_ERRORS
from pixelrelay.workers.policy import reason as _reason
from pixelrelay.workers.reuse import decision, existing
from pixelrelay.workers.runtime import Runtime

# Outputs of fewer pixels than this per batch are encoded on the thread that stores them,
# with no hop per encode (why: ``batching.INLINE_BYTES``).
INLINE_PIXELS = 256 * 1024

Written = list[tuple[ItemRecord, Exception | None]]  # per item: the error its write met, or None


@dataclass(frozen=True)
class Output:
    """A decoded item waiting to be written: what the model made, and how to write it (the
    action the fingerprint check chose, over which version)."""

    record: ItemRecord
    image: DecodedImage
    restored: RestoredImage
    action: fp.Decision = "replace"
    version: str | None = None


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


def write_in_background(rt: Runtime, outputs: list[Output], msg: ChunkMessage) -> list[Future[Written]]:
    """Encode and store ``outputs`` on the I/O threads while the next batch runs: the images
    are encoded in parallel, one task per thread (``outputs[i::n]``), and then stored by one
    more task as one group (``Storage.put_many``: on local storage, one sync for the whole
    batch). Every item is tried whatever its neighbours did."""
    if not outputs:
        return []
    if sum(_pixels(o.restored) for o in outputs) < INLINE_PIXELS:
        # Small outputs: encoded by the one task that stores them, no hop per encode.
        return [rt.io.submit(lambda: _store_encoded(rt, _encode_all(outputs, msg.options), msg))]
    n = min(len(outputs), max(1, rt.settings.io_threads))
    encoding = [rt.io.submit(_encode_all, outputs[i::n], msg.options) for i in range(n)]
    # Submitted after the encodes, so (FIFO) every encode has started before this waits on it.
    return [rt.io.submit(lambda: _store_encoded(rt, [pair for f in encoding for pair in f.result()], msg))]


def wait_written(writes: list[Future[Written]]) -> None:
    """Wait for ``write_in_background``'s writes; an item whose write failed fails, and a
    transient error propagates (the whole task retries)."""
    for write in writes:
        for record, exc in write.result():
            if isinstance(exc, TRANSIENT_ERRORS):
                raise exc
            if exc is not None:
                record.fail("decode", f"cannot write output: {_reason(exc)}")


def _pixels(restored: object) -> int:
    """A decoder output's pixel count; one it cannot tell (a malformed output, which its
    encode then fails alone) counts as too many to encode inline."""
    shape = getattr(getattr(restored, "rgb", None), "shape", None)
    if shape is None:
        return INLINE_PIXELS
    try:
        return int(shape[0]) * int(shape[1])
    except (TypeError, ValueError, IndexError):
        return INLINE_PIXELS


def _encode_all(group: list[Output], options: JobOptions) -> list[tuple[Output, _Encoded | Exception]]:
    out: list[tuple[Output, _Encoded | Exception]] = []
    for o in group:
        try:
            out.append((o, _encode_output(o.record, o.image, o.restored, options)))
        except Exception as exc:
            out.append((o, exc))
    return out


def _store_encoded(rt: Runtime, encoded: list[tuple[Output, _Encoded | Exception]], msg: ChunkMessage) -> Written:
    results: Written = [(o.record, enc) for o, enc in encoded if isinstance(enc, Exception)]
    ready = [(o, enc) for o, enc in encoded if not isinstance(enc, Exception)]
    writes = [_Write(o.record, enc.data, enc.content_type, o.action, o.version) for o, enc in ready]
    outcomes = _store_all(rt, writes, msg.options, msg.job_id, msg.output) if writes else []
    for (o, enc), outcome in zip(ready, outcomes, strict=True):
        if isinstance(outcome, Exception):
            results.append((o.record, outcome))
        else:
            _mark_written(o.record, o.image, o.restored, enc, outcome)
            results.append((o.record, None))
    return results


def _encode_output(
    record: ItemRecord, image: DecodedImage, restored: RestoredImage, options: JobOptions | None
) -> _Encoded:
    """Check the decoder's output size and encode it in the plan's format."""
    options = options or JobOptions()
    plan = planned(record)
    width, height = outsize.plan_size(plan, image.width, image.height)
    if tuple(restored.rgb.shape[:2]) != (height, width):
        raise RuntimeError(
            f"decoder returned {restored.rgb.shape[1]}x{restored.rgb.shape[0]}, expected {width}x{height}"
        )
    data, notes = encode_image(
        restored.rgb,
        plan.output_format,
        alpha=restored.alpha,
        icc_profile=image.icc_profile,
        exif=None if options.strip_metadata else image.exif,
        quality=options.quality,
        lossless=options.lossless,
    )
    return _Encoded(data, content_type(plan.output_format), notes)


def _mark_written(
    record: ItemRecord, image: DecodedImage, restored: RestoredImage, enc: _Encoded, outcome: ItemOutcome
) -> None:
    record.outcome = outcome
    record.notes.extend([*restored.notes, *enc.notes])
    plan = planned(record)
    width, height = outsize.plan_size(plan, image.width, image.height)
    record.output_size = (width, height)
    if plan.target is not None:  # what ran, and what came out (wire version 4)
        record.native_scale = restored.native_scale
        record.final_scale = float(f"{outsize.factor(plan.target, image.width, image.height):.6g}")
    record.status = "done"


def _write_output(
    rt: Runtime,
    record: ItemRecord,
    image: DecodedImage,
    restored: RestoredImage,
    options: JobOptions | None = None,
    job_id: str = "",
    action: fp.Decision = "replace",
    version: str | None = None,
    root: str | None = None,
) -> None:
    """Encode and store one output (the batch path is ``write_in_background``)."""
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
        requests = [_request(writes[i], job_id, rt.signer) for i in indices]
        for i, error in zip(indices, storage.put_many(requests), strict=True):
            w = writes[i]
            if error is None:
                outcomes[i] = "processed" if w.action == "create" else "overwritten"
            elif isinstance(error, StorageConflictError):
                outcomes[i] = _after_conflict(rt, storage, w, options, job_id)
            else:
                outcomes[i] = error
    return outcomes


def _request(w: _Write, job_id: str, signer: Signer) -> PutRequest:
    fingerprint = w.record.fingerprint
    metadata = fp.to_metadata(fingerprint, job_id, w.data, signer) if fingerprint and job_id else None
    if w.action == "create":
        return PutRequest(w.record.output, w.data, w.content_type, metadata, if_absent=True)
    return PutRequest(w.record.output, w.data, w.content_type, metadata, if_version=w.version)


def _after_conflict(
    rt: Runtime, storage: Storage, w: _Write, options: JobOptions, job_id: str
) -> ItemOutcome | Exception:
    """A conditional write lost: keep the output if it now answers this request, else
    replace it unconditionally (another request's output)."""
    record = w.record
    now = existing(rt, record.output)
    if (
        record.fingerprint
        and decision(rt, record.output, now, record.fingerprint, job_id, options.overwrite) == "reuse"
    ):
        record.notes.append("output written meanwhile by another delivery: kept")
        return fp.reuse_outcome(now.stored, job_id)
    request = _request(replace(w, action="replace", version=None), job_id, rt.signer)  # unconditional
    try:
        storage.put(request.uri, request.data, request.content_type, metadata=request.metadata)
    except Exception as exc:
        return exc
    return "overwritten"
