"""Local-folder storage. Writes go to a temp file in the same folder, then ``os.replace``.

The temp file is created with ``O_CREAT | O_EXCL`` and mode 0666, so the kernel applies the
process umask as it does for any new file (0644 under umask 022); ``mkstemp``'s fixed 0600
would leave outputs unreadable to everyone else. Content types do not apply here.
"""

from __future__ import annotations

import os
import secrets
import shutil
from typing import BinaryIO, Iterator

from pixelrelay.pipeline.storage.base import Storage, StorageError, StorageNotFoundError


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

    def _atomic_write(self, uri: str, write) -> None:
        folder = os.path.dirname(os.path.abspath(uri))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = _create_temp(folder)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, uri)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def put(self, uri: str, data: bytes, content_type: str | None = None) -> None:
        self._atomic_write(uri, lambda f: f.write(data))

    def put_file(self, uri: str, fileobj: BinaryIO, content_type: str | None = None) -> None:
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
        try:
            os.unlink(uri)
        except FileNotFoundError:
            pass
