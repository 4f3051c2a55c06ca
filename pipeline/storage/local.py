"""Local-folder storage. Writes go to a temp file in the same folder, then ``os.replace``."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import BinaryIO, Iterator

from pixelrelay.pipeline.storage.base import Storage, StorageError, StorageNotFoundError


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
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".pixelrelay-", suffix=".part")
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

    def put_file(self, uri: str, fileobj: BinaryIO) -> None:
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
