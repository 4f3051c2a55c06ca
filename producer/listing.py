"""Input listing: a local folder, an ``s3://`` prefix or a manifest file -> Items, streaming.

Invariants: an item's index is its position in S3's lexicographic order (a manifest keeps
its line order); its output key is its normalised path under the input root, with the output
format's extension; a source whose key cannot be made safe (``..``, NUL, empty) becomes an
item with ``error``, failed in its chain; colliding keys keep their source extension, and a
key still shared goes to the lowest index, the others rejected: no two items share an output.
A manifest's duplicate inputs give one item; symlinks are followed only with
``follow_symlinks``. Memory stays flat (a temporary SQLite file sorts and deduplicates).
``list_versioned_items`` adds each source's version (S3 ETag, local ``<size>:<mtime_ns>``).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from typing import NamedTuple

from PIL import features

from pixelrelay.jobs.files import JOBS_DIR
from pixelrelay.pipeline import constants as C
from pixelrelay.pipeline import imageio
from pixelrelay.pipeline.imageio import format_for_extension, output_extension
from pixelrelay.pipeline.messages import Item
from pixelrelay.pipeline.storage import Storage, StorageNotFoundError, is_s3, join_uri
from pixelrelay.pipeline.storage.base import ObjectInfo
from pixelrelay.pipeline.storage.local import sorted_walk

MANIFEST_EXTENSIONS = C.MANIFEST_EXTENSIONS
MAX_REJECTED_INPUT_CHARS = 1024  # a rejected line is kept this long in its item
_BATCH = 10_000  # rows per SQLite insert
_SQLITE_CACHE_KIB = 8 * 1024  # SQLite page cache (and sorter memory) per listing: the RSS bound


class InputError(ValueError):
    """The job's input can't be listed; the message says why."""


@functools.lru_cache(maxsize=1)
def listed_extensions() -> tuple[str, ...]:
    """The extensions a folder or prefix listing takes: ``pixelrelay.pipeline.constants.INPUT_EXTENSIONS``, plus
    ``.avif`` when this Pillow reads AVIF and ``.heic``/``.heif`` with ``pillow-heif``."""
    extensions: tuple[str, ...] = C.INPUT_EXTENSIONS
    if features.check("avif"):
        extensions += C.AVIF_EXTENSIONS
    if imageio.HEIF_READABLE:
        extensions += C.HEIF_EXTENSIONS
    return extensions


class Source(NamedTuple):
    """One listed input: its URI and its key segments, or the reason it is rejected."""

    input: str
    segments: tuple[str, ...] = ()
    error: str | None = None
    unique: bool = False  # a manifest entry: a second one with the same input is dropped
    version: str = ""  # with versions asked for: ETag or "<size>:<mtime_ns>" (see the docstring)


def _is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(listed_extensions())


def _is_manifest(uri: str, storage: Storage) -> bool:
    if not uri.lower().endswith(MANIFEST_EXTENSIONS):
        return False
    return storage.exists(uri)


def _segments(path: str) -> tuple[tuple[str, ...], str | None]:
    """A path's segments, empty and ``.`` ones dropped; or a reason it is unsafe."""
    parts = path.split("/")
    if "" in parts or "." in parts or ".." in parts or "\0" in path:
        if "\0" in path:
            return (), "NUL byte in the path"
        parts = [p for p in parts if p not in ("", ".")]
        if ".." in parts:
            return (), "'..' in the path: outputs must stay under --out"
        if not parts:
            return (), "empty name"
    return tuple(parts), None


def _rejected(text: str, reason: str) -> Source:
    if len(text) > MAX_REJECTED_INPUT_CHARS:
        text = text[:MAX_REJECTED_INPUT_CHARS] + "..."
    return Source(input=text, error=reason)


# --- folders and prefixes -----------------------------------------------------------------


def local_version(st: os.stat_result) -> str:
    """A local file's version: its size and modified time (ns)."""
    return f"{st.st_size}:{st.st_mtime_ns}"


def _entry_version(uri: str, storage: Storage) -> str:
    """A manifest entry's version: stat (local) or HEAD (S3); "" when it cannot be read
    (the item then fails in the encode stage as it would without versions)."""
    try:
        if is_s3(uri):
            head = storage.head(uri)
            return head.version if head is not None else ""
        return local_version(os.stat(uri))
    except (OSError, StorageNotFoundError):
        return ""


def _folder_sources(root: str, output_uri: str, follow_symlinks: bool, versions: bool = False) -> Iterator[Source]:
    out_root = os.path.abspath(output_uri) if output_uri and not is_s3(output_uri) else None

    def skip(path: str, entry: os.DirEntry) -> bool:
        if entry.name.startswith("."):
            return True  # hidden files and folders (sidecars, temp files)
        if entry.is_dir():
            return entry.name == JOBS_DIR or path == out_root
        return not _is_image_name(entry.name)

    for path, entry in sorted_walk(root, follow_symlinks, skip):
        rel = path[len(root) :].lstrip(os.sep).replace(os.sep, "/")
        if entry.is_symlink():
            if not follow_symlinks:
                yield _rejected(path, "symlink not followed (pass --follow-symlinks to follow it)")
                continue
            if not os.path.isfile(path):
                continue  # dangling, or not a file
        segments, error = _segments(rel)
        if error is not None:
            yield _rejected(path, error)
            continue
        try:
            version = local_version(entry.stat()) if versions else ""
        except OSError:
            continue  # gone since the walk
        yield Source(path, segments, error, version=version)


def _prefix_sources(root: str, storage: Storage, output_uri: str, versions: bool = False) -> Iterator[Source]:
    prefix = root.rstrip("/") + "/"
    skip = [join_uri(output_uri.rstrip("/"), JOBS_DIR) + "/"] if output_uri else []
    if is_s3(output_uri) and output_uri.rstrip("/").startswith(prefix):
        skip.append(output_uri.rstrip("/") + "/")  # outputs written under the input
    listed = storage.list_info(prefix) if versions else (ObjectInfo(uri, 0, 0.0) for uri in storage.list(prefix))
    for info in listed:
        uri = info.uri
        rel = uri[len(prefix) :]
        parts = rel.split("/")
        if any(uri.startswith(s) for s in skip) or JOBS_DIR in parts[:-1]:
            continue
        if any(p.startswith(".") and p not in (".", "..") for p in parts) or not _is_image_name(uri):
            continue
        segments, error = _segments(rel)
        version = (info.etag or f"{info.size}:{info.modified}") if versions else ""
        yield Source(uri, segments, error, version=version) if error is None else _rejected(uri, error)


# --- manifests ----------------------------------------------------------------------------


def _manifest_lines(uri: str, storage: Storage) -> Iterator[tuple[int, str]]:
    """(line number, entry) for every entry line, a JSON line's ``uri`` field taken."""
    for number, raw in enumerate(storage.iter_lines(uri), 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise InputError(f"manifest {uri} line {number} is not UTF-8 text") from None
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                line = str(json.loads(line)["uri"])
            except (ValueError, KeyError, TypeError):
                raise InputError(f"manifest {uri} line {number}: expected JSON with a 'uri' field") from None
        yield number, line


def _manifest_entry(line: str, base: str, base_segments: tuple[str, ...]) -> tuple[str, tuple[str, ...], bool] | Source:
    """An entry's input URI, its location's segments (S3: the bucket first) and whether it
    is on S3; or a rejected Source. Local paths are normalised; S3 keys are read as written."""
    if line.startswith("s3://"):
        segments, error = _segments(line[5:])
        return (line, segments, True) if error is None else _rejected(line, error)
    if line.startswith("/"):
        segments, error = _segments(line)
        return ("/" + "/".join(segments), segments, False) if error is None else _rejected(line, error)
    segments, error = _segments(line)
    if error is not None:
        return _rejected(line, error)
    if base.startswith("s3://"):
        return base + "/" + line, base_segments + segments, True
    segments = base_segments + segments
    return "/" + "/".join(segments), segments, False


class _ManifestRoot:
    """The deepest folder that holds every accepted entry of a manifest, found as the
    entries stream by: ``strip`` is how many leading characters of a full key to drop (the
    root and its ``/``; 0 when the manifest mixes local paths and S3 URIs)."""

    def __init__(self) -> None:
        self.folder: tuple[str, ...] | None = None
        self.kind: bool | None = None  # True: S3
        self.mixed = False

    def add(self, segments: tuple[str, ...], s3: bool) -> None:
        folder = segments[:-1]
        if self.folder is None:
            self.folder, self.kind = folder, s3
        elif s3 != self.kind:
            self.mixed = True
        elif folder[: len(self.folder)] != self.folder:
            n = 0
            while n < min(len(self.folder), len(folder)) and self.folder[n] == folder[n]:
                n += 1
            self.folder = self.folder[:n]

    @property
    def strip(self) -> int:
        if self.mixed or not self.folder:
            return 0
        return len("/".join(self.folder)) + 1


def _manifest_sources(uri: str, storage: Storage, root: _ManifestRoot, versions: bool = False) -> Iterator[Source]:
    """The manifest's entries, keyed by their full path (S3: bucket/key); ``root`` learns the
    common folder on the way."""
    base = uri.rsplit("/", 1)[0] if is_s3(uri) else os.path.dirname(os.path.abspath(uri))
    base_segments = _segments(base[5:] if is_s3(base) else base)[0]
    for _, line in _manifest_lines(uri, storage):
        entry = _manifest_entry(line, base, base_segments)
        if isinstance(entry, Source):
            yield entry
            continue
        input_uri, segments, s3 = entry
        root.add(segments, s3)
        version = _entry_version(input_uri, storage) if versions else ""
        yield Source(input_uri, segments, unique=True, version=version)


# --- naming: natural keys, contested keys, collisions (SQLite, on disk) -------------------


def _keys(segments: tuple[str, ...], fmt: str | None) -> tuple[str, str]:
    """(natural key, key keeping the source extension) of a source's segments."""
    name = segments[-1]
    dot = name.rfind(".")
    ext = name[dot:] if dot > 0 and name[:dot].strip(".") else ""  # as posixpath.splitext
    stem = "/".join(segments)[: -len(ext) or None]
    out_ext = output_extension(fmt or format_for_extension(ext))
    return stem + out_ext, stem + ext + out_ext


class _Listing:
    """The sources of a listing, on disk, with their final keys (see the module docstring)."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="pixelrelay-listing-")
        self.db = sqlite3.connect(os.path.join(self.folder, "listing.sqlite"))
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=FILE", f"cache_size=-{_SQLITE_CACHE_KIB}"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute(
            "CREATE TABLE src (idx INTEGER PRIMARY KEY, input TEXT NOT NULL, uniq TEXT UNIQUE,"
            " natural TEXT, fallback TEXT, error TEXT, version TEXT)"
        )
        self.count = 0

    def fill(self, sources: Iterator[Source], fmt: str | None) -> int:
        rows: list[tuple[str, str | None, str | None, str | None, str | None, str]] = []
        for source in sources:
            if source.error is not None:
                rows.append((source.input, None, None, None, source.error, ""))
            else:
                natural, fallback = _keys(source.segments, fmt)
                rows.append(
                    (source.input, source.input if source.unique else None, natural, fallback, None, source.version)
                )
            if len(rows) >= _BATCH:
                self._insert(rows)
                rows = []
        self._insert(rows)
        self.count = self.db.execute("SELECT count(*) FROM src").fetchone()[0]
        return self.count

    def _insert(self, rows: list) -> None:
        self.db.executemany(
            "INSERT OR IGNORE INTO src (input, uniq, natural, fallback, error, version) VALUES (?, ?, ?, ?, ?, ?)", rows
        )

    def _resolve(self) -> None:
        """Find contested natural keys, then the items that lose a final key to an earlier one."""
        db = self.db
        db.execute("CREATE TABLE contested (natural TEXT PRIMARY KEY) WITHOUT ROWID")
        db.execute(
            "INSERT INTO contested SELECT natural FROM src WHERE error IS NULL GROUP BY natural HAVING count(*) > 1"
        )
        db.execute("CREATE TABLE losers (idx INTEGER PRIMARY KEY, holder INTEGER)")
        if db.execute("SELECT 1 FROM contested LIMIT 1").fetchone() is None:
            return  # every natural key is unique: nothing collides
        db.execute(
            "INSERT INTO losers SELECT idx, holder FROM ("
            " SELECT idx, min(idx) OVER (PARTITION BY final) AS holder FROM ("
            "  SELECT s.idx, CASE WHEN c.natural IS NULL THEN s.natural ELSE s.fallback END AS final"
            "  FROM src s LEFT JOIN contested c ON c.natural = s.natural WHERE s.error IS NULL))"
            " WHERE idx != holder"
        )

    def items(self, output_uri: str, strip: int = 0, versions: bool = False) -> Iterator:
        """The items in index order; keys lose their first ``strip`` characters (a
        manifest's common root). With ``versions``: (item, version) pairs."""
        self._resolve()
        rows = self.db.execute(
            "SELECT s.idx, s.input, s.natural, s.fallback, s.error, c.natural IS NOT NULL, l.holder, h.input, s.version"
            " FROM src s LEFT JOIN contested c ON c.natural = s.natural"
            " LEFT JOIN losers l ON l.idx = s.idx LEFT JOIN src h ON h.idx = l.holder ORDER BY s.idx"
        )
        prefix = output_uri.rstrip("/") + "/"
        for idx, input_uri, natural, fallback, error, contested, holder, holder_input, version in rows:
            key = (fallback if contested else natural)[strip:] if error is None else ""
            if error is None and holder is not None:
                error = f"output {key} is also the output of item {holder - 1} ({holder_input})"
            if error is not None:
                item = Item(index=idx - 1, input=input_uri, output="", error=error)
            else:
                item = Item(index=idx - 1, input=input_uri, output=prefix + key)
            yield (item, version if error is None else "") if versions else item

    def close(self) -> None:
        self.db.close()
        shutil.rmtree(self.folder, ignore_errors=True)


# --- the listing --------------------------------------------------------------------------


def iter_sources(
    input_uri: str,
    storage: Storage,
    output_uri: str = "",
    follow_symlinks: bool = False,
    root: _ManifestRoot | None = None,
    versions: bool = False,
) -> Iterator[Source]:
    """The input's sources, streaming, in listing order.

    Args:
        input_uri: a folder, an ``s3://`` prefix or a manifest file.
        storage: storage for ``input_uri``.
        output_uri: the output root, never listed as an input.
        follow_symlinks: follow symlinked files and folders.
        root: learns a manifest's common folder, when given.
        versions: read each source's version too.

    Returns:
        The sources; a manifest's entries carry their full path.
    """
    if _is_manifest(input_uri, storage):
        return _manifest_sources(input_uri, storage, root or _ManifestRoot(), versions)
    if is_s3(input_uri):
        return _prefix_sources(input_uri, storage, output_uri, versions)
    if not os.path.isdir(input_uri):
        raise InputError(f"input {input_uri} is not a folder, an s3:// prefix or a manifest file")
    return _folder_sources(os.path.abspath(input_uri), output_uri, follow_symlinks, versions)


def list_sources(input_uri: str, storage: Storage, output_uri: str = "") -> tuple[list[str], str]:
    """The accepted source URIs, collected (for small inputs and tests), and the input root."""
    sources = iter_sources(input_uri, storage, output_uri)
    root = input_uri if is_s3(input_uri) else os.path.abspath(input_uri)
    return [s.input for s in sources if s.error is None], root


def _nothing_listed(input_uri: str, storage: Storage) -> InputError:
    if _is_manifest(input_uri, storage):
        return InputError(f"manifest {input_uri} lists no images: is it the right file?")
    kinds = ", ".join(sorted({e.lstrip(".") for e in listed_extensions()}))
    if is_s3(input_uri):
        hint = f"is the prefix right? It is read as a folder ({input_uri.rstrip('/')}/...); keys are case-sensitive"
    else:
        hint = "is the path right? Hidden files and folders are skipped"
    return InputError(f"input {input_uri} lists no images ({kinds}): {hint}")


def list_items(
    input_uri: str, output_uri: str, storage: Storage, fmt: str | None, follow_symlinks: bool = False
) -> Iterator[Item]:
    """The job's items, in index order. The sources are read before this returns; the items
    stream from a temporary SQLite file, removed once they are consumed.

    Args:
        input_uri: a folder, an ``s3://`` prefix or a manifest file.
        output_uri: the output root (output keys are under it).
        storage: storage for ``input_uri``.
        fmt: the output format; None: each source's own.
        follow_symlinks: follow symlinked files and folders.

    Raises:
        InputError: the input cannot be listed or lists nothing (before any item).
    """
    return _list(input_uri, output_uri, storage, fmt, follow_symlinks, versions=False)


def list_versioned_items(
    input_uri: str, output_uri: str, storage: Storage, fmt: str | None, follow_symlinks: bool = False
) -> Iterator[tuple[Item, str]]:
    """``list_items`` as (item, version) pairs, for ``submit --incremental``. A version
    changes when the source's bytes are replaced: an S3 object's ETag (from the listing pages:
    no extra request), a local file's ``<size>:<mtime_ns>``; a manifest's entries are
    ``stat``-ed or ``HEAD``-ed one by one; a rejected source's version is ""."""
    return _list(input_uri, output_uri, storage, fmt, follow_symlinks, versions=True)


def _list(
    input_uri: str, output_uri: str, storage: Storage, fmt: str | None, follow_symlinks: bool, versions: bool
) -> Iterator:
    listing, root = _Listing(), _ManifestRoot()
    try:
        count = listing.fill(iter_sources(input_uri, storage, output_uri, follow_symlinks, root, versions), fmt)
        if not count:
            raise _nothing_listed(input_uri, storage)
    except StorageNotFoundError as exc:
        listing.close()
        raise InputError(str(exc)) from None
    except BaseException:
        listing.close()
        raise
    return _streamed(listing, output_uri, root.strip, versions)


def _streamed(listing: _Listing, output_uri: str, strip: int, versions: bool = False) -> Iterator:
    try:
        yield from listing.items(output_uri, strip, versions)
    finally:
        listing.close()
