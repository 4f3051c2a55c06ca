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

**Root.** ``LocalStorage(root)`` refuses (``StorageEscapeError``) a write or delete whose real
path leaves the root's real path: the parent folder of the target is resolved with
``os.path.realpath`` (symlinks and ``..`` in order, as the kernel would), checked, and the
write then goes to that resolved folder, so the path checked is the path written. Folders are
created below it only after the check, and checked again once they exist. The target name
itself is never followed: a rename or link replaces a symlink there, it does not write
through it. (A folder swapped for a symlink between the second check and the write is a race
this cannot close; the output root is the job's own folder.) Without a root, writes go
anywhere (the producer's own files, tests). Reads are never restricted by the root.

**Errors.** Every ``OSError`` becomes a storage error (``base.os_error``): a full disk is a
``StorageFullError`` naming the path, never a bare ``OSError`` that a worker would treat as a bug.

**Listing** (``list``) streams a sorted walk: the entries of each folder are sorted by name,
a folder counting as its name plus ``/``, which yields exactly the lexicographic order of the
full paths (S3's order) without collecting them. Symlinked folders are not entered.
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
    StorageEscapeError,
    os_error,
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
        except OSError as exc:
            raise _mapped(exc, path) from None
    raise StorageError(f"cannot create a temp file in {folder}")


def _mapped(exc: OSError, path: str) -> BaseException:
    """The storage error for an OSError the system raised (it has an errno); one raised by
    other code (a caller's file object) is passed on as it is."""
    return os_error(exc, path) if exc.errno is not None else exc


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class LocalStorage(Storage):
    def __init__(self, root: str | None = None) -> None:
        self.root = root
        self._real_root = os.path.realpath(root) if root else None

    def _target(self, uri: str) -> str:
        """``uri`` with its parent folder resolved to its real path, checked to stay under
        the root (when there is one)."""
        folder, name = os.path.split(uri)
        if name in ("", ".", "..") or "\0" in uri:
            raise StorageEscapeError(f"not a file name: {uri!r}")
        real = os.path.realpath(folder or ".")
        if self._real_root is not None and not _within(real, self._real_root):
            raise StorageEscapeError(f"refused: {uri} resolves to {os.path.join(real, name)}, outside {self.root}")
        return os.path.join(real, name)

    def get(self, uri: str) -> bytes:
        try:
            with open(uri, "rb") as f:
                return f.read()
        except IsADirectoryError:
            raise StorageError(f"is a directory: {uri}") from None
        except OSError as exc:
            raise _mapped(exc, uri) from None

    def iter_lines(self, uri: str) -> Iterator[bytes]:
        try:
            with open(uri, "rb") as f:
                for line in f:
                    yield line.rstrip(b"\r\n")
        except IsADirectoryError:
            raise StorageError(f"is a directory: {uri}") from None
        except OSError as exc:
            raise _mapped(exc, uri) from None

    def _atomic_write(self, uri: str, write: Callable, exclusive: bool = False, version: str | None = None) -> None:
        try:
            self._write_checked(self._target(os.path.abspath(uri)), write, exclusive, version)
        except OSError as exc:
            raise _mapped(exc, uri) from None

    def _write_checked(self, uri: str, write: Callable, exclusive: bool, version: str | None) -> None:
        """Write via a temp file, then rename it over ``uri`` (if still at ``version``, when
        given) or, with ``exclusive``, link it to ``uri`` (StorageConflictError if ``uri``
        exists; the existing file is untouched). ``uri``'s folder is a checked real path."""
        folder = os.path.dirname(uri)
        os.makedirs(folder, exist_ok=True)
        if os.path.realpath(folder) != folder:  # a folder turned into a symlink meanwhile
            raise StorageEscapeError(f"refused: {folder} changed while it was created")
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
        target = self._target(os.path.abspath(uri))  # the checked real path: all below use it
        try:
            self._put(target, data, metadata, if_absent, if_version)
        except OSError as exc:
            raise _mapped(exc, uri) from None

    def _put(self, uri: str, data: bytes, metadata: dict[str, str] | None, if_absent: bool, if_version: str | None) -> None:
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
        target = self._target(os.path.abspath(uri))
        try:
            _unlink(sidecar_path(target))
        except OSError as exc:
            raise _mapped(exc, uri) from None
        self._atomic_write(target, lambda f: shutil.copyfileobj(fileobj, f, 1 << 20))

    def exists(self, uri: str) -> bool:
        return os.path.isfile(uri)

    def list(self, prefix: str) -> Iterator[str]:
        if os.path.isfile(prefix):
            yield prefix
            return
        for path, _ in sorted_walk(prefix):
            yield path

    def delete(self, uri: str) -> None:
        target = self._target(os.path.abspath(uri))
        try:
            _unlink(sidecar_path(target))
            _unlink(target)
        except OSError as exc:
            raise _mapped(exc, uri) from None

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        for uri in self.list(prefix):
            try:
                st = os.stat(uri)
            except FileNotFoundError:  # gone since the walk
                continue
            yield ObjectInfo(uri, st.st_size, st.st_mtime)


def sorted_walk(folder: str, follow_symlinks: bool = False, skip=None) -> Iterator[tuple[str, os.DirEntry]]:
    """Yield (path, entry) for every file under ``folder``, in lexicographic order of the
    paths, streaming (one folder's entries in memory per level). Symlinks to folders are
    entered only with ``follow_symlinks`` (never one that leads back into a folder being
    walked); symlinks to files are yielded either way (the caller decides). ``skip(path,
    entry)`` prunes entries (files and folders). Unreadable folders are skipped."""
    seen: set[tuple[int, int]] = set()

    def walk(path: str) -> Iterator[tuple[str, os.DirEntry]]:
        try:
            st = os.stat(path)
            with os.scandir(path) as it:
                entries = list(it)
        except OSError:
            return
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop
            return
        seen.add((st.st_dev, st.st_ino))
        keyed = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()
                if is_dir and not follow_symlinks and entry.is_symlink():
                    continue  # a symlinked folder: not entered
            except OSError:
                continue
            keyed.append((entry.name + "/" if is_dir else entry.name, is_dir, entry))
        keyed.sort(key=lambda k: k[0])
        for _, is_dir, entry in keyed:
            child = os.path.join(path, entry.name)
            if skip is not None and skip(child, entry):
                continue
            if is_dir:
                yield from walk(child)
            else:
                yield child, entry
        seen.discard((st.st_dev, st.st_ino))

    yield from walk(folder)


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
