"""Signed job data: an HMAC-SHA256 over every message body and every value in Redis that
drives work, so that write access to Redis alone cannot make a worker read or write
anything the job's producer did not ask for (issue #11, section 1). Stdlib only.

**Key.** ``PIXELRELAY_SIGNING_KEY`` (the key itself, at least ``MIN_KEY_CHARS`` characters)
or ``PIXELRELAY_SIGNING_KEY_FILE`` (a file holding it); see ``pipeline.settings``. The key
lives in the environment or a file only: never in argv, Redis, storage or a log line
(``Signer``'s repr hides it).

**What is signed.** A JSON object ``obj`` of kind ``kind`` (a purpose tag) is signed as

    HMAC-SHA256(key, b"pixelrelay:" + kind + b"\\0" + canonical(obj))

where ``canonical`` is ``json.dumps(obj, sort_keys=True, separators=(",", ":"),
ensure_ascii=True)``, so the signature survives any JSON round trip (kombu's serializer, a
Redis string) that keeps the values. The kind tags keep a signature of one kind of object
from being replayed as another: ``chunk:<stage>`` (a stage task's body, bound to the stage
that is to run it), ``spec`` (the job hash's ``spec`` field, which also names its job id),
``cursor`` (a job's chunk cursor, bound to its job id).

**Wire form.** A signed object is the object plus one field, ``sig``: the lowercase hex
digest over the object *without* ``sig`` (``sign`` / ``verify``). A chunk message on the
wire is therefore ``ChunkMessage.model_dump(mode="json")`` (its oldest wire version: see
``pipeline.messages``) plus ``sig``; ``verify`` strips ``sig`` before ``upgrade_message``
parses the body, which (``extra="forbid"``) would refuse it otherwise. The empty body ``{}``
(a split chain's later stages: nothing to do) is never signed.

**Insecure mode** (``Signer.insecure()``, no key: ``--insecure-no-signing``): ``sign``
returns the object unchanged and ``verify`` accepts it with or without ``sig`` (stripped,
not checked). A signer *with* a key refuses (``SignatureError``) an object without ``sig``
or with a wrong one. Comparisons are constant-time (``hmac.compare_digest``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from pixelrelay.pipeline.settings import ConfigError

SIG_FIELD = "sig"
MIN_KEY_CHARS = 16
_PREFIX = b"pixelrelay:"


class SignatureError(ValueError):
    """Signed data that fails its check: unsigned, signed with another key, or altered."""


def canonical(obj: Any) -> bytes:
    """The one byte form that is signed (see the module docstring)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


class Signer:
    """Signs and verifies objects with one key; ``Signer.insecure()`` has none."""

    __slots__ = ("_key",)

    def __init__(self, key: str | None, setting: str = "PIXELRELAY_SIGNING_KEY") -> None:
        if key is not None:
            if not isinstance(key, str) or len(key) < MIN_KEY_CHARS:
                raise ConfigError(f"{setting}: the signing key must be at least {MIN_KEY_CHARS} characters")
        self._key = key.encode("utf-8") if key is not None else None

    @classmethod
    def insecure(cls) -> Signer:
        """No key: signs nothing, accepts everything (``--insecure-no-signing``)."""
        return cls(None)

    @property
    def secure(self) -> bool:
        return self._key is not None

    def __repr__(self) -> str:  # never the key
        return "Signer(secure)" if self.secure else "Signer(insecure)"

    def mac(self, kind: str, obj: Any) -> str:
        """The hex HMAC of ``obj`` as kind ``kind`` (a secure signer only)."""
        if self._key is None:
            raise SignatureError("an insecure signer has no key")
        return hmac.new(self._key, _PREFIX + kind.encode() + b"\0" + canonical(obj), hashlib.sha256).hexdigest()

    def check(self, kind: str, obj: Any, sig: Any) -> None:
        """Raise ``SignatureError`` unless ``sig`` is ``obj``'s signature as ``kind``."""
        if not isinstance(sig, str) or not sig:
            raise SignatureError(f"{kind}: not signed")
        if not hmac.compare_digest(self.mac(kind, obj), sig):
            raise SignatureError(f"{kind}: bad signature (altered, or signed with another key)")

    def sign(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` plus its ``sig`` (unchanged in insecure mode)."""
        if self._key is None:
            return body
        unsigned = {k: v for k, v in body.items() if k != SIG_FIELD}
        return {**unsigned, SIG_FIELD: self.mac(kind, unsigned)}

    def verify(self, kind: str, body: Any) -> dict[str, Any]:
        """``body`` without its ``sig``, once the signature checks out (``SignatureError``
        otherwise). In insecure mode any ``sig`` is stripped unchecked."""
        if not isinstance(body, dict):
            raise SignatureError(f"{kind}: a signed object is a JSON object, not {type(body).__name__}")
        unsigned = {k: v for k, v in body.items() if k != SIG_FIELD}
        if self._key is not None:
            self.check(kind, unsigned, body.get(SIG_FIELD))
        return unsigned
