"""Output fingerprints: whether an existing output answers a request, and may be reused.

Two sha256 digests over canonical JSON: the request (``request_fingerprint``; a field added
to it hashes only when set, so older requests keep their fingerprints) and the models
(``model_fingerprint``: each stage's spec and identity, plus ``DECODE_PATH_VERSION``).
``decide`` is the one rule that encode and decode both apply; a missing or malformed
fingerprint is never reused. With a signing key an output also carries ``META_MAC``: the
sha256 of its exact bytes and an HMAC (kind ``output``) over fingerprint, job and that
digest, so that a writer of the storage without the key cannot forge a reusable output
(``authentic``; the bytes are checked against the digest when reuse is considered).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from pixelrelay.pipeline.constants import DECODE_PATH_VERSION
from pixelrelay.pipeline.messages import Backends, Fingerprint, ItemOutcome, JobOptions
from pixelrelay.pipeline.signing import SignatureError, Signer

META_FINGERPRINT = "pixelrelay-fingerprint"  # S3: x-amz-meta-pixelrelay-fingerprint
META_JOB = "pixelrelay-job"  # the job that wrote the output
META_MAC = "pixelrelay-mac"  # v1;sha256=<bytes digest>;mac=<HMAC>, with a signing key only
MAC_KIND = "output"
STAGE_BACKENDS = ("encoder", "planner", "decoder")
UNKNOWN_IDENTITY = "unknown"

_VALUE_RE = re.compile(r"^v1;request=([0-9a-f]{64});model=([0-9a-f]{64})$")
_MAC_RE = re.compile(r"^v1;sha256=([0-9a-f]{64});mac=([0-9a-f]{64})$")
_JOB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _digest(value: object) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def request_fingerprint(options: JobOptions, backends: Backends, input_uri: str, output_format: str) -> str:
    """What was asked of one item: task, effective scale (an int where integral, None for a
    box), instruction, output format, quality, lossless, the job's backend specs (None: the
    worker's default) and the input URI, plus ``strip_metadata``, ``width`` and ``height``
    when set. Not ``overwrite``, nor the package version."""
    fields = {
        "task": options.task,
        "scale": options.effective_scale(),
        "instruction": options.instruction,
        "format": output_format,
        "quality": options.quality,
        "lossless": options.lossless,
        "backends": {name: getattr(backends, name) for name in STAGE_BACKENDS},
        "input": input_uri,
    }
    if options.strip_metadata:  # only when set: requests without it keep their fingerprints
        fields["strip_metadata"] = True
    for name in ("width", "height"):  # likewise (a box's scale is None)
        if getattr(options, name) is not None:
            fields[name] = getattr(options, name)
    return _digest(fields)


def model_fingerprint(specs: Mapping[str, str], identities: Mapping[str, str]) -> str:
    """What answered it: per backend (encoder, planner, decoder) the spec that ran and its
    identity (missing ones count as ``unknown``), plus the decode-path version."""
    stages = {
        name: {"spec": specs.get(name, ""), "identity": identities.get(name, UNKNOWN_IDENTITY)}
        for name in STAGE_BACKENDS
    }
    return _digest({"decode_path": DECODE_PATH_VERSION, "stages": stages})


# --- stored form ------------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """An output's fingerprint as read back from storage, the job that wrote it and, when
    written with a signing key, the sha256 of its bytes and the MAC over all three."""

    fingerprint: Fingerprint
    job: str
    sha256: str | None = None
    mac: str | None = None


def _fingerprint_value(fingerprint: Fingerprint) -> str:
    return f"v1;request={fingerprint.request};model={fingerprint.model}"


def _mac_body(fingerprint: Fingerprint, job_id: str, sha256: str) -> dict[str, str]:
    return {"fingerprint": _fingerprint_value(fingerprint), "job": job_id, "sha256": sha256}


def to_metadata(
    fingerprint: Fingerprint, job_id: str, data: bytes | None = None, signer: Signer | None = None
) -> dict[str, str]:
    """Object metadata for an output (ASCII only, as S3 headers require); with a keyed
    ``signer`` and the output's ``data``, also its digest and MAC (``META_MAC``)."""
    metadata = {META_FINGERPRINT: _fingerprint_value(fingerprint), META_JOB: job_id}
    if signer is not None and signer.secure and data is not None:
        digest = hashlib.sha256(data).hexdigest()
        mac = signer.mac(MAC_KIND, _mac_body(fingerprint, job_id, digest))
        metadata[META_MAC] = f"v1;sha256={digest};mac={mac}"
    return metadata


def from_metadata(metadata: Mapping[str, str] | None) -> Stored | None:
    """The fingerprint an output's metadata holds, or None (absent or malformed); its MAC
    is parsed, not checked (``authentic``)."""
    if not metadata:
        return None
    match = _VALUE_RE.match(str(metadata.get(META_FINGERPRINT, "")))
    job = str(metadata.get(META_JOB, ""))
    if match is None or not _JOB_RE.match(job):
        return None
    signed = _MAC_RE.match(str(metadata.get(META_MAC, "")))
    sha256, mac = (signed.group(1), signed.group(2)) if signed else (None, None)
    return Stored(Fingerprint(request=match.group(1), model=match.group(2)), job, sha256, mac)


def authentic(stored: Stored | None, signer: Signer) -> Stored | None:
    """``stored`` if it may be trusted: any, for an insecure signer (no key, nothing to
    check); with a key, only one whose MAC verifies (else None: never reused)."""
    if stored is None or not signer.secure:
        return stored
    if stored.sha256 is None:
        return None
    try:
        signer.check(MAC_KIND, _mac_body(stored.fingerprint, stored.job, stored.sha256), stored.mac)
    except SignatureError:
        return None
    return stored


def bytes_match(stored: Stored | None, data: bytes) -> bool:
    """Whether ``data`` are the bytes ``stored``'s MAC covers (True when it covers none:
    an insecure setup)."""
    if stored is None or stored.sha256 is None:
        return stored is not None
    return hmac.compare_digest(hashlib.sha256(data).hexdigest(), stored.sha256)


# --- the reuse rule -----------------------------------------------------------------------

Decision = Literal["reuse", "create", "replace"]


def decide(present: bool, stored: Stored | None, expected: Fingerprint, job_id: str, overwrite: bool) -> Decision:
    """What to do with an item whose output is ``present`` (with ``stored`` metadata):

    * ``create``  no output yet: write it, only if still absent (a conditional write);
    * ``reuse``   it answers the same request with the same models and was written by this
      job (a duplicate delivery, even under ``overwrite``) or, without ``overwrite``, by
      any job: keep it, never write over it;
    * ``replace`` anything else (another request, other models, no or bad fingerprint,
      ``overwrite``): re-process and write over it.

    Args:
        present: whether the output exists.
        stored: the fingerprint and job id read back with it, or None.
        expected: the fingerprint this request and these models give.
        job_id: the job asking.
        overwrite: the job's ``--overwrite``.

    Returns:
        The decision.
    """
    if not present:
        return "create"
    if stored is not None and stored.fingerprint == expected and (stored.job == job_id or not overwrite):
        return "reuse"
    return "replace"


def reuse_outcome(stored: Stored | None, job_id: str) -> ItemOutcome:
    """The outcome of a reused output: ``processed`` when this very job wrote it."""
    return "processed" if stored is not None and stored.job == job_id else "reused"


# --- weights identities -------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex of a file; computed once per (path, size, mtime) in a process."""
    st = os.stat(path)
    return _file_sha256(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_identity(folder: str | os.PathLike[str]) -> str:
    """A cheap identity for a local model folder: sha256 over its files' relative paths,
    sizes and mtimes (a changed or replaced weights file changes it)."""
    rows = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            rows.append([os.path.relpath(path, folder), st.st_size, st.st_mtime_ns])
    return _digest(rows)
