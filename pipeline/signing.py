"""Signed job data: an HMAC-SHA256 over every message body and every value in Redis that
drives work, so that write access to Redis alone cannot make a worker read or write anything
the job's producer did not ask for. Stdlib only.

An object of kind ``kind`` is signed as ``HMAC(key, b"pixelrelay:" + kind + b"\\0" +
canonical(obj))`` (sorted keys, compact, ASCII) and carries it in ``sig``. The kinds
(``chunk:<stage>``, ``spec``, ``cursor``) keep one kind from being replayed as another. The
empty body ``{}`` is never signed. A keyed signer refuses a missing or wrong ``sig``
(constant-time); an insecure one strips ``sig`` unchecked. The key never reaches argv,
Redis, storage or a log.
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
