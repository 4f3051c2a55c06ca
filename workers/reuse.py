"""Reuse of existing outputs: an item whose output already answers this request is not made again.

Every output carries the fingerprint of the request and models that made it
(``pipeline.fingerprint``). The encode stage checks it with its own encoder and the
identities the plan and decode workers published (``jobs.identities``): if any is unknown
it processes the item (``reuse_existing``). The decode stage checks again with its own
decoder before running the model, and picks how to write each other output
(``write_actions``). ``overwrite`` in the job's options skips reuse, except of an output this
very job wrote (a duplicate delivery). With a signing key, an output is reused only if its
MAC verifies and its bytes, read once, hash to the digest the MAC covers (``decision``);
anything else is re-processed. Why this makes a duplicate delivery harmless:
``docs/design.md``, "Delivery guarantees".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pixelrelay.jobs import identities
from pixelrelay.pipeline import fingerprint as fp
from pixelrelay.pipeline.imageio import format_for_uri
from pixelrelay.pipeline.messages import ChunkMessage, Fingerprint, ItemRecord
from pixelrelay.pipeline.stages.base import Encoder, StageSpec
from pixelrelay.pipeline.storage import StorageError
from pixelrelay.workers.batching import all_local, fingerprinted, io_map
from pixelrelay.workers.runtime import Runtime

log = logging.getLogger("pixelrelay.worker")

Planned = tuple[ItemRecord, fp.Decision, str | None]  # an item to decode: the write it needs, over which version


@dataclass(frozen=True)
class Existing:
    """An output as found: whether it exists, its validated fingerprint, its version."""

    present: bool
    stored: fp.Stored | None = None
    version: str | None = None


def existing(rt: Runtime, uri: str) -> Existing:
    """Read an output's fingerprint (only if authentic: ``fp.authentic``). A permanent error
    reading it counts as an output of unknown fingerprint and version: never reused,
    replaced unconditionally."""
    try:
        head = rt.storage(uri).head(uri)
    except StorageError as exc:
        log.warning("cannot read the fingerprint of %s: %s", uri, exc)
        return Existing(True)
    if head is None:
        return Existing(False)
    return Existing(True, fp.authentic(fp.from_metadata(head.metadata), rt.signer), head.version)


def _genuine(rt: Runtime, uri: str, stored: fp.Stored | None) -> bool:
    """Whether the output's bytes are those its MAC covers (one read; no read without a key)."""
    if stored is None or stored.sha256 is None:
        return stored is not None
    try:
        data = rt.storage(uri).get(uri)
    except StorageError as exc:
        log.warning("cannot read %s to check it: %s", uri, exc)
        return False
    if fp.bytes_match(stored, data):
        return True
    log.warning("output %s does not match the digest its metadata was signed with: re-processed", uri)
    return False


def decision(
    rt: Runtime, uri: str, found: Existing, expected: Fingerprint, job_id: str, overwrite: bool
) -> fp.Decision:
    """``fp.decide``, with ``reuse`` only for an output whose bytes are genuine (``replace`` else)."""
    action = fp.decide(found.present, found.stored, expected, job_id, overwrite)
    if action == "reuse" and not _genuine(rt, uri, found.stored):
        return "replace"
    return action


def expected(msg: ChunkMessage, record: ItemRecord, specs: dict[str, str], ids: dict[str, str]) -> Fingerprint:
    """The fingerprint this job gives the item's output, with these specs and identities."""
    request = fp.request_fingerprint(msg.options, msg.backends, record.input, format_for_uri(record.output))
    return Fingerprint(request=request, model=fp.model_fingerprint(specs, ids))


def _decisions(
    rt: Runtime,
    records: list[ItemRecord],
    founds: list[Existing],
    fingerprints: list[Fingerprint],
    job_id: str,
    overwrite: bool,
) -> list[fp.Decision]:
    """``decision`` for each record, the outputs to reuse read on the I/O threads."""
    actions = [fp.decide(f.present, f.stored, e, job_id, overwrite) for f, e in zip(founds, fingerprints, strict=True)]
    check = [i for i, action in enumerate(actions) if action == "reuse"]
    local = all_local(records[i].output for i in check)
    genuine = io_map(rt, lambda i: _genuine(rt, records[i].output, founds[i].stored), check, inline=local)
    for i, ok in zip(check, genuine, strict=True):
        if not ok:
            actions[i] = "replace"
    return actions


def _existing_all(rt: Runtime, records: list[ItemRecord]) -> list[Existing]:
    return io_map(rt, lambda r: existing(rt, r.output), records, inline=all_local(r.output for r in records))


def _mark_reused(record: ItemRecord, stored: fp.Stored | None, job_id: str, stage: str) -> None:
    record.status = "done"
    record.outcome = fp.reuse_outcome(stored, job_id)
    record.notes.append(f"output already answers this request ({stage} stage): {record.outcome}, not redone")


def _published_models(rt: Runtime, msg: ChunkMessage, encoder: Encoder) -> tuple[dict[str, str], dict[str, str]] | None:
    """Specs and identities of the three stages as they would run this chunk now, or None
    when the plan or decode workers' identities are not known (not published, or disagreeing)."""
    specs, ids = {"encoder": encoder.spec}, {"encoder": encoder.identity()}
    stages = (("plan", "planner"), ("decode", "decoder"))
    wanted = [
        (stage, str(StageSpec.parse(w)) if (w := getattr(msg.backends, name)) else None) for stage, name in stages
    ]
    for (_, name), entry in zip(stages, identities.lookup_many(rt.redis, wanted), strict=True):  # one round trip
        if entry is None:
            return None
        specs[name], ids[name] = entry.spec, entry.identity
    return specs, ids


def reuse_existing(rt: Runtime, msg: ChunkMessage, records: list[ItemRecord], encoder: Encoder) -> list[ItemRecord]:
    """Pass items whose output already answers this request straight to done, before any
    work; returns the others. Unknown identities or ``overwrite``: everything is processed."""
    if not records or msg.options.overwrite:
        return records
    known = _published_models(rt, msg, encoder)
    if known is None:
        return records
    specs, ids = known
    rest = []
    founds, fingerprints = _existing_all(rt, records), [expected(msg, r, specs, ids) for r in records]
    actions = _decisions(rt, records, founds, fingerprints, msg.job_id, overwrite=False)
    for record, found, fingerprint, action in zip(records, founds, fingerprints, actions, strict=True):
        if action != "reuse":
            rest.append(record)
            continue
        record.backends.update(specs)
        record.models.update(ids)
        record.fingerprint = fingerprint
        _mark_reused(record, found.stored, msg.job_id, "encode")
    return rest


def write_actions(rt: Runtime, msg: ChunkMessage, records: list[ItemRecord]) -> list[Planned]:
    """The decode stage's check, each record's ``fingerprint`` set: items whose output
    answers this request pass to done; the others are returned with the write each needs."""
    planned: list[Planned] = []
    founds = _existing_all(rt, records)
    actions = _decisions(rt, records, founds, [fingerprinted(r) for r in records], msg.job_id, msg.options.overwrite)
    for record, found, action in zip(records, founds, actions, strict=True):
        if action == "reuse":  # an earlier job, or an earlier delivery of this chain
            _mark_reused(record, found.stored, msg.job_id, "decode")
        else:
            planned.append((record, action, found.version))
    return planned
