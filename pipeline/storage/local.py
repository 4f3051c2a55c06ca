"""Local-folder storage. Writes go to a temp file in the same folder, then a rename or link.

Invariants: a name never points at bytes not yet on disk (``put_many``: temp files, one
``syncfs``, then the names, then an fsync of each folder); temp files are created 0666 under
the umask and named for their writer (``.pixelrelay-<host>-<pid>-<token>.part``), so that
one left by a killed writer is removed (``remove_stale_parts``) by the next write into its
folder, by the end of a job and by ``pixelrelay gc``, never one a live writer still uses; a
hidden sidecar (``SIDECAR_SUFFIX``) never describes bytes it was not written
for (removed before a replace, written after); ``if_absent`` links, so an existing file is
never replaced; with a root, the resolved parent folder is checked and written to, and the
target name is never followed. ``list`` yields S3's order without collecting paths.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO, Literal

from pixelrelay.pipeline.storage.base import (
    ObjectHead,
    ObjectInfo,
    PutRequest,
    Storage,
    StorageConflictError,
    StorageError,
    StorageEscapeError,
    os_error,
)

SIDECAR_SUFFIX = ".pixelrelay.json"


def sidecar_path(uri: str) -> str:
    """Where the metadata of the file ``uri`` is kept: a hidden file beside it, ``.<name>`` + ``SIDECAR_SUFFIX``."""
    folder, name = os.path.split(uri)
    return os.path.join(folder, f".{name}{SIDECAR_SUFFIX}")


_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
STALE_PART_S = 3600.0  # a temp file untouched this long is stale, whoever wrote it
SWEEP_EVERY_S = 300.0  # a process looks for stale temp files in a folder it writes to at most this often
_PART_NAME = re.compile(r"^\.pixelrelay-(?:(?P<owner>.+)-(?P<pid>\d+)-)?[0-9a-f]{16}\.part$")
_swept: dict[str, float] = {}  # folder -> when this process last removed stale temp files there


def _owner() -> str:
    """This host and pid namespace, as a name part: a pid in a temp file's name is checked
    for life only by a process that sees the same pids."""
    try:
        namespace = os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        namespace = ""
    return re.sub(r"[^A-Za-z0-9_.]", "_", f"{socket.gethostname()}.{namespace}")[:80]


_OWNER = _owner()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def is_stale_part(name: str, mtime: float, now: float) -> bool:
    """Whether the temp file ``name`` (last modified at ``mtime``) is left by a writer that is
    gone: its pid, on this host, is dead, or it is older than ``STALE_PART_S``."""
    match = _PART_NAME.match(name)
    if match is None:
        return False
    if now - mtime > STALE_PART_S:
        return True
    return match["owner"] == _OWNER and not _alive(int(match["pid"]))


def remove_stale_parts(folder: str, now: float | None = None) -> int:
    """Remove the stale temp files (``is_stale_part``) directly in ``folder``: how many."""
    now = time.time() if now is None else now
    removed = 0
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.name.startswith(".pixelrelay-"):
                    continue
                try:
                    if is_stale_part(entry.name, entry.stat(follow_symlinks=False).st_mtime, now):
                        os.unlink(entry.path)
                        removed += 1
                except OSError:
                    continue  # gone meanwhile, or not ours to remove
    except OSError:
        return removed
    return removed


def remove_stale_parts_under(root: str) -> int:
    """``remove_stale_parts`` in ``root`` and every folder below it (symlinked folders are
    not entered): how many were removed."""
    removed = 0
    stack = [root]
    while stack:
        folder = stack.pop()
        removed += remove_stale_parts(folder)
        try:
            with os.scandir(folder) as entries:
                stack += [e.path for e in entries if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
    return removed


def _sweep_folder(folder: str) -> None:
    """Remove stale temp files in ``folder`` unless this process did so recently."""
    now = time.monotonic()
    if now - _swept.get(folder, -SWEEP_EVERY_S) < SWEEP_EVERY_S:
        return
    _swept[folder] = now
    remove_stale_parts(folder)


def _create_temp(folder: str) -> tuple[int, str]:
    """A new, empty, uniquely named temp file in ``folder``: (fd, path), mode 0666 & ~umask."""
    for _ in range(100):
        path = os.path.join(folder, f".pixelrelay-{_OWNER}-{os.getpid()}-{secrets.token_hex(8)}.part")
        try:
            return os.open(path, _TEMP_FLAGS, 0o666), path
        except FileExistsError:
            continue
        except OSError as exc:
            raise _mapped(exc, path) from None
    raise StorageError(f"cannot create a temp file in {folder}")


def _write_temp(folder: str, data: bytes) -> str:
    """A new temp file in ``folder`` holding ``data`` (not synced): its path."""
    fd, path = _create_temp(folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        _unlink(path)
        raise
    return path


class _Staged:
    """One request of a group commit: its checked target and its temp files."""

    def __init__(self, request: PutRequest, target: str) -> None:
        self.request = request
        self.target = target
        self.data_tmp: str | None = None
        self.meta_tmp: str | None = None

    def temps(self) -> list[str]:
        return [p for p in (self.data_tmp, self.meta_tmp) if p]

    def commit(self) -> None:
        """Name the (durable) temp files as ``put`` says: the bytes at the target, the
        metadata in the sidecar, keeping the sidecar invariant of the module docstring."""
        r, uri, sidecar = self.request, self.target, sidecar_path(self.target)
        data_tmp = self.data_tmp
        assert data_tmp is not None  # staged: the bytes were written
        if r.if_absent:
            if os.path.lexists(uri):
                raise StorageConflictError(f"already exists: {uri}")
            if self.meta_tmp:
                os.replace(self.meta_tmp, sidecar)
            else:
                _unlink(sidecar)  # one left by a crash between a sidecar and its link
            try:
                os.link(data_tmp, uri)  # fails if the name exists: O_EXCL semantics
            except FileExistsError:
                raise StorageConflictError(f"already exists: {uri}") from None
            return
        if r.if_version is not None and _version(uri) != r.if_version:
            raise StorageConflictError(f"changed since it was read: {uri}")
        _unlink(sidecar)  # never let old metadata describe the new bytes
        os.replace(data_tmp, uri)
        if self.meta_tmp:
            os.replace(self.meta_tmp, sidecar)

    def discard(self) -> None:
        """Remove what is left of the temp files (after a link, or after a failure)."""
        for path in self.temps():
            _unlink(path)


_libc_syncfs: Callable[..., int] | Literal[False] | None = None  # None: not looked up yet


def _syncfs() -> Callable[..., int] | None:
    """libc's ``syncfs`` (Linux), or None where there is none."""
    global _libc_syncfs
    if _libc_syncfs is None:
        fn: Callable[..., int] | Literal[False]
        try:
            found = ctypes.CDLL(None, use_errno=True).syncfs
            found.argtypes, found.restype = [ctypes.c_int], ctypes.c_int
            fn = found
        except (AttributeError, OSError):
            fn = False
        _libc_syncfs = fn
    return _libc_syncfs or None


def _make_durable(group: list[_Staged]) -> None:
    """Make every staged temp file's bytes durable: one ``syncfs`` per file system the
    group writes to (one for a whole batch, where ``fsync`` would be one per file), or an
    ``fsync`` per file where the system has no ``syncfs`` or the group is a single file."""
    paths = [p for s in group for p in s.temps()]
    syncfs = _syncfs()
    if syncfs is None or len(paths) <= 1:
        for path in paths:
            _fsync_path(path)
        return
    folders: dict[int, str] = {}
    for s in group:
        folder = os.path.dirname(s.target)
        if folder not in folders.values():
            folders.setdefault(os.stat(folder).st_dev, folder)
    for folder in folders.values():
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            if syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), folder)
        finally:
            os.close(fd)


def _fsync_path(path: str) -> None:
    """fsync a file or folder by path (a folder: the names in it become durable)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _as_storage_error(exc: Exception, path: str) -> Exception:
    """An exception met while writing ``path``, as the storage error it means."""
    return _mapped(exc, path) if isinstance(exc, OSError) else exc


def _mapped(exc: OSError, path: str) -> Exception:
    """The storage error for an OSError the system raised (it has an errno); one raised by
    other code (a caller's file object) is passed on as it is."""
    return os_error(exc, path) if exc.errno is not None else exc


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class LocalStorage(Storage):
    def __init__(self, root: str | None = None) -> None:
        self.root = root
        self._real_root = os.path.realpath(root) if root else None

    def _target(self, uri: str, resolved: dict[str, str] | None = None) -> str:
        """``uri`` with its parent folder resolved to its real path, checked to stay under
        the root (when there is one). ``resolved`` memoises checked folders for one group."""
        folder, name = os.path.split(uri)
        if name in ("", ".", "..") or "\0" in uri:
            raise StorageEscapeError(f"not a file name: {uri!r}")
        real = resolved.get(folder) if resolved is not None else None
        if real is None:
            real = os.path.realpath(folder or ".")
            if self._real_root is not None and not _within(real, self._real_root):
                raise StorageEscapeError(f"refused: {uri} resolves to {os.path.join(real, name)}, outside {self.root}")
            if resolved is not None:
                resolved[folder] = real
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

    def _folder_for(self, target: str, made: set[str] | None = None) -> str:
        """Create ``target``'s (checked, real) folder; refuse it if it changed meanwhile.
        ``made`` memoises the folders already made and checked for one group."""
        folder = os.path.dirname(target)
        if made is not None and folder in made:
            return folder
        os.makedirs(folder, exist_ok=True)
        if os.path.realpath(folder) != folder:  # a folder turned into a symlink meanwhile
            raise StorageEscapeError(f"refused: {folder} changed while it was created")
        _sweep_folder(folder)
        if made is not None:
            made.add(folder)
        return folder

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
        error = self.put_many([PutRequest(uri, data, content_type, metadata, if_absent, if_version)])[0]
        if error is not None:
            raise error

    def put_many(self, requests: Sequence[PutRequest]) -> list[Exception | None]:
        """Group commit (see the module docstring): stage every request's temp files, make
        them durable with one sync, then name them, then make the names durable."""
        outcomes: list[Exception | None] = [None] * len(requests)
        staged: dict[int, _Staged] = {}
        resolved: dict[str, str] = {}  # each folder resolved, checked and made once per group
        made: set[str] = set()
        try:
            for i, request in enumerate(requests):
                try:
                    staged[i] = self._stage(request, resolved, made)
                except Exception as exc:
                    outcomes[i] = _as_storage_error(exc, request.uri)
            try:
                _make_durable([s for s in staged.values()])
            except OSError as exc:
                for i in staged:
                    outcomes[i] = _as_storage_error(exc, requests[i].uri)
                return outcomes
            named: dict[str, list[int]] = {}
            for i, s in staged.items():
                try:
                    s.commit()
                except Exception as exc:
                    outcomes[i] = _as_storage_error(exc, requests[i].uri)
                else:
                    named.setdefault(os.path.dirname(s.target), []).append(i)
            for folder, indices in named.items():
                try:
                    _fsync_path(folder)
                except OSError as exc:
                    for i in indices:
                        outcomes[i] = _as_storage_error(exc, requests[i].uri)
        finally:
            for s in staged.values():
                s.discard()
        return outcomes

    def _stage(self, request: PutRequest, resolved: dict[str, str], made: set[str]) -> _Staged:
        """Write ``request``'s bytes (and its metadata, if any) to temp files in the target's
        checked real folder; nothing is named or synced yet."""
        target = self._target(os.path.abspath(request.uri), resolved)  # the checked real path: all below use it
        folder = self._folder_for(target, made)
        staged = _Staged(request, target)
        try:
            staged.data_tmp = _write_temp(folder, request.data)
            if request.metadata:
                staged.meta_tmp = _write_temp(folder, json.dumps(request.metadata, sort_keys=True).encode())
        except BaseException:
            staged.discard()
            raise
        return staged

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
        """Streamed: a temp file copied from ``fileobj``, fsynced, renamed, folder fsynced."""
        target = self._target(os.path.abspath(uri))
        try:
            folder = self._folder_for(target)
            fd, tmp = _create_temp(folder)
            try:
                with os.fdopen(fd, "wb") as f:
                    shutil.copyfileobj(fileobj, f, 1 << 20)
                    f.flush()
                    os.fsync(f.fileno())
                _unlink(sidecar_path(target))
                os.replace(tmp, target)
            except BaseException:
                _unlink(tmp)
                raise
            _fsync_path(folder)
        except OSError as exc:
            raise _mapped(exc, uri) from None

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

    def remove_debris(self, prefix: str) -> int:
        return remove_stale_parts_under(prefix) if os.path.isdir(prefix) else 0

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        for uri in self.list(prefix):
            try:
                st = os.stat(uri)
            except FileNotFoundError:  # gone since the walk
                continue
            yield ObjectInfo(uri, st.st_size, st.st_mtime)


_READ_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
_NOT_FOLLOWED = "a symlink, not followed (submit with --follow-symlinks to follow it)"


def read_nofollow(path: str, beneath: str | None = None) -> bytes:
    """The bytes of the regular file ``path``, no symlink followed: with ``beneath`` (a folder
    ``path`` lies lexically under), in no folder from ``beneath`` down either, each one opened
    relative to the last, so a link swapped in anywhere below ``beneath`` is refused; without,
    in the last component only. ``beneath`` itself is opened as named.

    Raises:
        StorageEscapeError: ``path`` is not under ``beneath``, or a symlink is on its way.
        StorageError: it cannot be read, or is not a regular file.
    """
    folder, name = os.path.split(path)
    parts = [name]
    if beneath is not None:
        rel = os.path.relpath(path, beneath)
        parts = rel.split(os.sep)
        if not os.path.isabs(path) or rel.startswith(os.pardir) or os.pardir in parts or os.curdir in parts:
            raise StorageEscapeError(f"refused: {path} is not under {beneath}")
        folder = beneath
    try:
        fd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise _mapped(exc, path) from None
    try:
        for i, part in enumerate(parts):
            child = _open_below(fd, part, i == len(parts) - 1, os.path.join(folder, *parts[: i + 1]))
            os.close(fd)
            fd = child
        return _read_regular(fd, path)
    finally:
        os.close(fd)


def _open_below(dir_fd: int, name: str, last: bool, shown: str) -> int:
    """Open ``name`` in the folder ``dir_fd`` without following a link."""
    flags = _READ_FLAGS | (os.O_NONBLOCK if last else os.O_DIRECTORY)
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK) and os.path.islink(shown):
            raise StorageEscapeError(f"refused: {shown} is {_NOT_FOLLOWED}") from None
        raise _mapped(exc, shown) from None


def _read_regular(fd: int, path: str) -> bytes:
    """All the bytes of the open file ``fd``, once it is a regular file."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise StorageError(f"not a regular file: {path}")
    os.set_blocking(fd, True)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


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
    if not stat.S_ISREG(st.st_mode):
        return None
    return f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
