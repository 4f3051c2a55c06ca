"""Local-folder storage. Writes go to a temp file in the same folder, then ``os.replace``.

The temp file is created with ``O_CREAT | O_EXCL`` and mode 0666, so the kernel applies the
process umask as it does for any new file (0644 under umask 022); ``mkstemp``'s fixed 0600
would leave outputs unreadable to everyone else. Content types do not apply here.

Metadata lives in a hidden sidecar next to the file, ``.<name>.pixelrelay.json`` (a JSON
object of strings); listings of inputs skip it (hidden, and not an image name). Invariant:
a sidecar never describes bytes it was not written for. A write that replaces a file
removes its sidecar first and writes the new one after the new bytes are in place, so a
crash in between leaves a file without metadata (never reused), not one with stale
metadata. A conditional write (``if_absent``) writes the sidecar, then ``os.link``s the
temp file to the name, which fails if the name exists (O_EXCL semantics): the existing
file is never replaced. ``if_version`` compares the file's inode, size and mtime just
before the rename: that narrows a replace race to an instant, without closing it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from typing import BinaryIO, Callable, Iterator

from pixelrelay.pipeline.storage.base import (
    ObjectHead,
    ObjectInfo,
    Storage,
    StorageConflictError,
    StorageError,
    StorageNotFoundError,
)

SIDECAR_SUFFIX = ".pixelrelay.json"


def sidecar_path(uri: str) -> str:
    """Where the metadata of the file ``uri`` is kept: ``.<name>.pixelrelay.json`` beside it."""
    folder, name = os.path.split(uri)
    return os.path.join(folder, f".{name}{SIDECAR_SUFFIX}")


_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def _create_temp(folder: str) -> tuple[int, str]:
    """A new, empty, uniquely named temp file in ``folder``: (fd, path), mode 0666 & ~umask."""
    for _ in range(100):
        path = os.path.join(folder, f".pixelrelay-{secrets.token_hex(8)}.part")
        try:
            return os.open(path, _TEMP_FLAGS, 0o666), path
        except FileExistsError:
            continue
    raise StorageError(f"cannot create a temp file in {folder}")


class LocalStorage(Storage):
    def get(self, uri: str) -> bytes:
        try:
            with open(uri, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise StorageNotFoundError(f"no such file: {uri}") from None
        except IsADirectoryError:
            raise StorageError(f"is a directory: {uri}") from None
        except PermissionError:
            raise StorageError(f"permission denied: {uri}") from None

    def _atomic_write(self, uri: str, write: Callable, exclusive: bool = False, version: str | None = None) -> None:
        """Write via a temp file, then rename it over ``uri`` (if still at ``version``, when
        given) or, with ``exclusive``, link it to ``uri`` (StorageConflictError if ``uri``
        exists; the existing file is untouched)."""
        folder = os.path.dirname(os.path.abspath(uri))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = _create_temp(folder)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            if not exclusive:
                if version is not None and _version(uri) != version:
                    raise StorageConflictError(f"changed since it was read: {uri}")
                os.replace(tmp, uri)
                return
            try:
                os.link(tmp, uri)
            except FileExistsError:
                raise StorageConflictError(f"already exists: {uri}") from None
        except BaseException:
            _unlink(tmp)
            raise
        _unlink(tmp)

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
        sidecar = sidecar_path(uri)
        meta = json.dumps(metadata or {}, sort_keys=True).encode()
        if if_absent:
            if os.path.lexists(uri):
                raise StorageConflictError(f"already exists: {uri}")
            if metadata:
                self._atomic_write(sidecar, lambda f: f.write(meta))
            self._atomic_write(uri, lambda f: f.write(data), exclusive=True)
            return
        if if_version is not None and _version(uri) != if_version:
            raise StorageConflictError(f"changed since it was read: {uri}")
        _unlink(sidecar)  # never let old metadata describe the new bytes
        self._atomic_write(uri, lambda f: f.write(data), version=if_version)
        if metadata:
            self._atomic_write(sidecar, lambda f: f.write(meta))

    def head(self, uri: str) -> ObjectHead | None:
        version = _version(uri)
        if version is None:
            return None
        try:
            with open(sidecar_path(uri), "rb") as f:
                loaded = json.loads(f.read())
        except (OSError, ValueError):
            return ObjectHead({}, version)
        if not isinstance(loaded, dict):
            return ObjectHead({}, version)
        return ObjectHead({str(k): v for k, v in loaded.items() if isinstance(v, str)}, version)

    def put_file(self, uri: str, fileobj: BinaryIO, content_type: str | None = None) -> None:
        _unlink(sidecar_path(uri))
        self._atomic_write(uri, lambda f: shutil.copyfileobj(fileobj, f, 1 << 20))

    def exists(self, uri: str) -> bool:
        return os.path.isfile(uri)

    def list(self, prefix: str) -> Iterator[str]:
        if os.path.isfile(prefix):
            yield prefix
            return
        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(prefix):
            dirnames.sort()
            found.extend(os.path.join(dirpath, name) for name in filenames)
        yield from sorted(found)

    def delete(self, uri: str) -> None:
        _unlink(sidecar_path(uri))
        _unlink(uri)

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        for uri in self.list(prefix):
            try:
                st = os.stat(uri)
            except FileNotFoundError:  # gone since the walk
                continue
            yield ObjectInfo(uri, st.st_size, st.st_mtime)

    def read_lines(self, uri: str) -> Iterator[bytes]:
        try:
            f = open(uri, "rb")
        except FileNotFoundError:
            raise StorageNotFoundError(f"no such file: {uri}") from None
        except (IsADirectoryError, PermissionError) as exc:
            raise StorageError(f"cannot read {uri}: {type(exc).__name__}") from None
        with f:
            for line in f:
                yield line.rstrip(b"\r\n")


def _version(uri: str) -> str | None:
    """The file's version token (inode, size, mtime), or None when it is not a file."""
    try:
        st = os.stat(uri)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not os.path.isfile(uri):
        return None
    return f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
