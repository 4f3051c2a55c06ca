"""The storage interface, its errors, and URI helpers.

Contracts of every backend: objects are addressed by full URI; writes are atomic (never a
partial object); ``put(if_absent=True)`` raises ``StorageConflictError`` where an object
exists, leaving it alone, and ``if_version`` replaces only the version ``head`` saw;
``put_many`` answers one outcome per request; ``iter_lines`` streams. A local root refuses
escaping writes (``StorageEscapeError``), and ``os_error`` maps every local ``OSError`` to a
storage error (a full disk is permanent).
"""

from __future__ import annotations

import errno
import mimetypes
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO


class StorageError(Exception):
    """A permanent storage error (missing object, access denied, bad bucket)."""


class StorageNotFoundError(StorageError):
    pass


class StorageFullError(StorageError):
    """No space left (ENOSPC), quota exceeded (EDQUOT) or file too large (EFBIG)."""


class StorageAccessError(StorageError):
    """Permission denied (EACCES, EPERM) or a read-only file system (EROFS)."""


class StorageEscapeError(StorageError):
    """A write whose real path leaves the storage's root: refused, nothing written."""


class StorageConflictError(StorageError):
    """A conditional write found the object there (``if_absent``) or changed (``if_version``);
    nothing was written."""


@dataclass(frozen=True)
class ObjectHead:
    """What ``head`` tells about an object: its metadata ({} if none) and a version token
    that changes whenever its bytes are replaced (S3: the ETag)."""

    metadata: dict[str, str] = field(default_factory=dict)
    version: str = ""


@dataclass(frozen=True)
class ObjectInfo:
    """One object of a listing: its URI, size in bytes, last-modified time (unix s) and,
    where the backend's listing gives it (S3), its ETag ("" otherwise)."""

    uri: str
    size: int
    modified: float
    etag: str = ""


@dataclass(frozen=True)
class PutRequest:
    """One write of a ``put_many`` group: ``put``'s arguments as a value."""

    uri: str
    data: bytes
    content_type: str | None = None
    metadata: dict[str, str] | None = None
    if_absent: bool = False
    if_version: str | None = None


class TransientStorageError(Exception):
    """A storage error worth retrying (timeout, connection reset, throttling, 5xx)."""


_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_ACCESS_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}
# Worth retrying: a busy or slow file system, or a network mount (NFS, SMB) that went away.
_TRANSIENT_ERRNOS = {
    errno.EAGAIN,
    errno.EBUSY,
    errno.ETIMEDOUT,
    errno.ESTALE,
    errno.ENOTCONN,
    errno.ECONNRESET,
    errno.EHOSTDOWN,
    errno.EHOSTUNREACH,
    errno.ENETDOWN,
    errno.ENETUNREACH,
}


def os_error(exc: OSError, path: str) -> Exception:
    """A local ``OSError`` as the storage error it means, its message naming the path and the
    system's reason: ``StorageNotFoundError``; ``StorageFullError`` (ENOSPC, EDQUOT, EFBIG:
    permanent, so the item fails at once rather than retrying into a full disk);
    ``StorageAccessError`` (EACCES, EPERM, EROFS); ``TransientStorageError`` (timeouts,
    EAGAIN, EBUSY, a stale or unreachable network mount); else ``StorageError``."""
    what = exc.strerror or str(exc) or type(exc).__name__
    message = f"{what}: {path}"
    if isinstance(exc, FileNotFoundError):
        return StorageNotFoundError(f"no such file: {path}")
    if exc.errno in _FULL_ERRNOS:
        return StorageFullError(message)
    if isinstance(exc, PermissionError) or exc.errno in _ACCESS_ERRNOS:
        return StorageAccessError(message)
    if exc.errno in _TRANSIENT_ERRNOS or isinstance(exc, TimeoutError):
        return TransientStorageError(message)
    return StorageError(message)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ("bucket", "a/b"); a local path -> ("", path)."""
    if is_s3(uri):
        bucket, _, key = uri[len("s3://") :].partition("/")
        return bucket, key
    return "", uri


def join_uri(root: str, *parts: str) -> str:
    if is_s3(root):
        return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return os.path.join(root, *parts)


# Types we write, by extension; mimetypes (the platform's table) covers the rest.
CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".json": "application/json",
    ".jsonl": "application/x-ndjson",
}


def content_type_for(uri: str) -> str | None:
    """The MIME type a key's extension names, or None when it names none."""
    ext = os.path.splitext(uri.rsplit("/", 1)[-1])[1].lower()
    if not ext:
        return None
    return CONTENT_TYPES.get(ext) or mimetypes.guess_type("x" + ext)[0]


class Storage(ABC):
    """Byte-level object access by URI."""

    @abstractmethod
    def get(self, uri: str) -> bytes: ...

    @abstractmethod
    def put(
        self,
        uri: str,
        data: bytes,
        content_type: str | None = None,
        *,
        metadata: dict[str, str] | None = None,
        if_absent: bool = False,
        if_version: str | None = None,
    ) -> None:
        """Write one object atomically.

        Args:
            uri: the object.
            data: its bytes.
            content_type: None: ``content_type_for(uri)``.
            metadata: ASCII str -> str that travels with the object (``head`` reads it back).
            if_absent: write only where no object exists yet.
            if_version: replace the object only if it is still this version (``head``'s).

        Raises:
            StorageConflictError: ``if_absent`` or ``if_version`` does not hold; nothing written.
            StorageError: any other failure (``TransientStorageError`` when worth retrying).
        """

    def put_many(self, requests: Sequence[PutRequest]) -> list[Exception | None]:
        """Write every request as ``put`` would; per request, None or the exception it met
        (each is tried whatever the others did). Backends may commit the group together."""
        outcomes: list[Exception | None] = []
        for r in requests:
            try:
                self.put(
                    r.uri, r.data, r.content_type, metadata=r.metadata, if_absent=r.if_absent, if_version=r.if_version
                )
            except Exception as exc:
                outcomes.append(exc)
            else:
                outcomes.append(None)
        return outcomes

    @abstractmethod
    def head(self, uri: str) -> ObjectHead | None:
        """The object's metadata as ``put`` stored it and its version, or None when there is
        no object. Metadata values are as stored: callers validate them."""

    @abstractmethod
    def put_file(self, uri: str, fileobj: BinaryIO, content_type: str | None = None) -> None:
        """Upload a (possibly large) file object atomically (``content_type`` as for put)."""

    @abstractmethod
    def exists(self, uri: str) -> bool: ...

    @abstractmethod
    def iter_lines(self, uri: str) -> Iterator[bytes]:
        """Yield the object's lines (without their line ends), streaming: never the whole
        object in memory."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[str]:
        """Yield the URIs of every object under ``prefix`` in sorted order."""

    @abstractmethod
    def delete(self, uri: str) -> None: ...

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        """``list`` with sizes and modified times (backends override this: one listing)."""
        for uri in self.list(prefix):
            yield ObjectInfo(uri, len(self.get(uri)), 0.0)

    def remove_debris(self, prefix: str) -> int:
        """Remove what killed writers left under ``prefix`` (local temp files; S3 writes leave
        none): how many objects. Never one a live writer uses."""
        return 0


def open_storage(uri: str, endpoint_url: str | None = None, settings=None, root: str | None = None) -> Storage:
    """The storage that serves ``uri``.

    Args:
        uri: a local path or ``s3://bucket/key``.
        endpoint_url: overrides the settings' S3 endpoint.
        settings: configures the S3 client (a ``Settings``; None: the environment's); clients
            are cached per configuration.
        root: a local storage refuses writes whose real path leaves it (S3 keys have no real
            path: the workers check keys under the root).

    Returns:
        A ``LocalStorage`` or an ``S3Storage``.
    """
    if is_s3(uri):
        from pixelrelay.pipeline.storage.s3 import S3Storage

        return S3Storage.shared(endpoint_url, settings)
    from pixelrelay.pipeline.storage.local import LocalStorage

    return LocalStorage(root)
