"""A chunk's items in model batches: loaded ahead of the model, spread over the I/O threads.

``call_isolated`` runs a batched model call so that one bad item fails alone. ``described``,
``planned`` and ``fingerprinted`` give what an earlier stage set on a pending item.

The decoded images a worker holds (the batch the model runs, plus the next one prefetched)
stay within ``PIXELRELAY_PREFETCH_BYTES`` (``runtime.DecodeBudget``). A source over the
image or output pixel limit (``PIXELRELAY_MAX_OUTPUT_PIXELS``; ``pipeline.outsize`` gives an
output target's real size) fails from its header, before its decode. A local source is read
as the job's ``workers.guard.InputRoot`` says (no symlink followed, unless the job follows them).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from pixelrelay.pipeline.imageio import (
    DecodedImage,
    ImageDecodeError,
    OutputScale,
    decode_image,
    output_size,
    probe_size,
)
from pixelrelay.pipeline.messages import Description, Fingerprint, ItemRecord, Plan
from pixelrelay.pipeline.storage import StorageError, is_s3
from pixelrelay.pipeline.storage.local import read_nofollow
from pixelrelay.workers import observe
from pixelrelay.workers.guard import NAME_NOT_FOLLOWED, InputRoot
from pixelrelay.workers.policy import TRANSIENT_ERRORS
from pixelrelay.workers.runtime import DecodeBudget, Runtime

log = logging.getLogger("pixelrelay.worker")

In = TypeVar("In")
Out = TypeVar("Out")
Loaded = list[tuple[ItemRecord, DecodedImage]]  # the records of a batch that loaded, with their images

# Work smaller than this runs on the calling thread: a hop to an I/O thread and back (a
# submit, a wake-up, a result, the GIL passed to and fro) costs tens of microseconds of CPU
# and a dozen futex calls, more than reading a local file or decoding or encoding a small
# image takes (``benchmarks/bench_overhead.py``). Storage round trips (S3) always use the
# threads. Outputs have their own threshold: ``outputs.INLINE_PIXELS``.
INLINE_BYTES = 256 * 1024  # encoded bytes of the sources a batch decodes


class MissingStageResultError(RuntimeError):
    """A pending item lacks what an earlier stage sets on it (a fault of the chain, not of the item)."""


def _missing(record: ItemRecord, what: str, stage: str) -> MissingStageResultError:
    return MissingStageResultError(f"item {record.index} ({record.input}) reached the {stage} stage with no {what}")


def described(record: ItemRecord) -> Description:
    """A pending item's description (the encode stage sets it)."""
    if record.description is None:
        raise _missing(record, "description", "plan")
    return record.description


def planned(record: ItemRecord) -> Plan:
    """A pending item's plan (the plan stage sets it)."""
    if record.plan is None:
        raise _missing(record, "plan", "decode")
    return record.plan


def fingerprinted(record: ItemRecord) -> Fingerprint:
    """A pending item's expected fingerprint (the decode stage sets it before its check)."""
    if record.fingerprint is None:
        raise _missing(record, "fingerprint", "decode")
    return record.fingerprint


def batches(seq: Sequence[In], size: int) -> list[Sequence[In]]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def io_map(rt: Runtime, fn: Callable[[In], Out], items: Sequence[In], inline: bool = False) -> list[Out]:
    """``[fn(x) for x in items]`` on the I/O threads, in order, with one task per thread
    rather than one per item (``items[i::n]`` for ``n = min(len(items), io_threads)``): as
    parallel, at a fraction of the futures' cost on small items. A single item, or
    ``inline`` work (too small to be worth a thread hop), runs on the calling thread. An
    exception propagates, as from ``Executor.map``."""
    n = 1 if inline else min(len(items), max(1, rt.settings.io_threads))
    if n <= 1:
        return [fn(x) for x in items]
    out: list[Any] = [None] * len(items)
    for i, results in enumerate(rt.io.map(lambda group: [fn(x) for x in group], [items[i::n] for i in range(n)])):
        out[i::n] = results
    return out


def all_local(uris: Iterable[str]) -> bool:
    """Whether every URI is on local storage (a read or head there is a system call, not a
    network round trip: not worth a thread hop)."""
    return not any(is_s3(uri) for uri in uris)


def call_isolated(
    fn: Callable[[Sequence[In]], Sequence[Out | Exception]], batch: Sequence[In]
) -> list[Out | Exception]:
    """Run a batched model call; if the batch fails, retry item by item so that one bad
    item fails alone. ``fn`` may also return an exception in an item's slot (that item
    failed alone). Transient errors propagate (the whole task retries)."""
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


def _read_one(rt: Runtime, record: ItemRecord, stage: str, inputs: InputRoot) -> bytes | None:
    """The source's bytes, read as ``inputs`` says; None, the record failed, when it can't be."""
    try:
        if inputs.follow or is_s3(record.input):
            return rt.storage(record.input).get(record.input)
        return read_nofollow(record.input, inputs.folder)
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
    inputs: InputRoot = NAME_NOT_FOLLOWED,
) -> tuple[Loaded, int]:
    """Read (as ``inputs`` says), then decode sources in parallel threads, once ``budget``
    admits their decoded size; records that can't be read or decoded fail here. Returns the
    loaded pairs and the bytes taken from ``budget`` for them (nothing is loaded once the
    budget is closed)."""
    raw = io_map(rt, lambda r: _read_one(rt, r, stage, inputs), records, inline=all_local(r.input for r in records))
    todo = [(r, data) for r, data in zip(records, raw, strict=True) if data is not None]
    held = sum(_decoded_bytes(rt, data, scale_of(r)) for r, data in todo)
    if budget is not None and not budget.take(held):
        return [], 0
    small = sum(len(data) for _, data in todo) < INLINE_BYTES
    images = io_map(rt, lambda pair: _decode_one(rt, *pair, stage, scale_of(pair[0])), todo, inline=small)
    return [(r, image) for (r, _), image in zip(todo, images, strict=True) if image is not None], held


def prefetched(
    rt: Runtime,
    records: Sequence[ItemRecord],
    stage: str,
    scale_of: Callable[[ItemRecord], OutputScale] = lambda r: 1,
    budget: DecodeBudget | None = None,
    inputs: InputRoot = NAME_NOT_FOLLOWED,
) -> Iterator[tuple[Sequence[ItemRecord], Loaded]]:
    """Yield (batch, loaded images) per model batch while the next batch loads, so the
    model (the GPU) does not wait for storage. The decoded images held (this batch and the
    next) stay within ``PIXELRELAY_PREFETCH_BYTES`` (``runtime.DecodeBudget``): the next
    batch is decoded ahead only when it fits beside this one. Sources are read as ``inputs``
    says (the job's ``workers.guard.input_root``)."""
    budget = budget or DecodeBudget(rt.settings.prefetch_bytes)
    chunks = batches(records, rt.settings.batch_size)
    load = functools.partial(_load_images, rt, stage=stage, scale_of=scale_of, budget=budget, inputs=inputs)
    try:
        if not chunks:
            return
        upcoming = rt.prefetch.submit(load, chunks[0])
        for i, batch in enumerate(chunks):
            loaded, held = upcoming.result()
            if i + 1 < len(chunks):
                upcoming = rt.prefetch.submit(load, chunks[i + 1])
            try:
                yield batch, loaded
            finally:
                budget.give(held)
                observe.beat()  # alive between batches (pixelrelay health)
    finally:
        budget.close()  # a chunk that ends early (cancelled) frees the pending load
