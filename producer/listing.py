"""Input listing: a local folder, an ``s3://`` prefix, or a manifest file -> Items.

Each source maps to ``OUTPUT/<its path relative to the input root, new extension>``. Two
sources that would map to the same output (``a.png`` and ``a.jpg``) keep their old
extension in the name (``a.jpg.png``) rather than overwrite each other. An input that
lists no images is an ``InputError`` (a usage error): most often a wrong path or prefix.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Iterator

from pixelrelay.pipeline import constants as C
from pixelrelay.jobs.files import JOBS_DIR
from pixelrelay.pipeline.imageio import format_for_extension, output_extension
from pixelrelay.pipeline.messages import Item
from pixelrelay.pipeline.storage import Storage, StorageNotFoundError, is_s3, join_uri

MANIFEST_EXTENSIONS = (".txt", ".jsonl", ".json", ".lst", ".csv")


class InputError(ValueError):
    """The job's input can't be listed; the message says why."""


def _is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(C.INPUT_EXTENSIONS)


def _is_manifest(uri: str, storage: Storage) -> bool:
    if not uri.lower().endswith(MANIFEST_EXTENSIONS):
        return False
    return storage.exists(uri)


def _manifest_uris(uri: str, storage: Storage) -> list[str]:
    try:
        text = storage.get(uri).decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"manifest {uri} is not UTF-8 text") from None
    base = uri.rsplit("/", 1)[0] if is_s3(uri) else os.path.dirname(os.path.abspath(uri))
    uris = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                line = str(json.loads(line)["uri"])
            except (ValueError, KeyError, TypeError):
                raise InputError(f"manifest {uri} line {number}: expected JSON with a 'uri' field") from None
        if not is_s3(line) and not os.path.isabs(line):
            line = join_uri(base, line)
        uris.append(line)
    return list(dict.fromkeys(uris))  # a URI listed twice is one item


def _common_root(uris: list[str]) -> str:
    if not uris:
        return ""
    dirs = [u.rsplit("/", 1)[0] if is_s3(u) else os.path.dirname(u) for u in uris]
    if all(is_s3(u) for u in uris):
        return "s3://" + posixpath.commonpath([d[len("s3://") :] for d in dirs])
    if any(is_s3(u) for u in uris):
        return ""  # mixed local and S3: keep full paths under OUTPUT
    return os.path.commonpath(dirs)


def _relative(uri: str, root: str) -> str:
    if root and uri.startswith(root.rstrip("/") + "/"):
        return uri[len(root.rstrip("/")) + 1 :]
    if is_s3(uri):
        return uri[len("s3://") :]
    return uri.lstrip("/")


def list_sources(input_uri: str, storage: Storage, output_uri: str = "") -> tuple[list[str], str]:
    """Return (sorted source URIs, root they are relative to)."""
    if _is_manifest(input_uri, storage):
        uris = _manifest_uris(input_uri, storage)
        return uris, _common_root(uris)
    if not is_s3(input_uri) and not os.path.isdir(input_uri):
        raise InputError(f"input {input_uri} is not a folder, an s3:// prefix or a manifest file")
    root = input_uri if is_s3(input_uri) else os.path.abspath(input_uri)
    prefix = root.rstrip("/") + "/" if is_s3(root) else root
    skip = join_uri(output_uri.rstrip("/"), JOBS_DIR) if output_uri else None
    uris = []
    for uri in storage.list(prefix):
        rel = _relative(uri, root)
        if skip and (uri.startswith(skip) or f"/{JOBS_DIR}/" in f"/{rel}"):
            continue
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        if _is_image_name(uri):
            uris.append(uri)
    if output_uri and not is_s3(output_uri):
        out_root = os.path.abspath(output_uri) + os.sep
        uris = [u for u in uris if not u.startswith(out_root)]
    return sorted(uris), root


def plan_items(sources: list[str], root: str, output_uri: str, fmt: str | None) -> Iterator[Item]:
    """Map sources to Items with stable indices and collision-free output URIs."""
    stems: dict[str, int] = {}
    outputs = []
    for uri in sources:
        rel = _relative(uri, root)
        stem, ext = posixpath.splitext(rel)
        out_fmt = fmt or format_for_extension(ext)
        outputs.append((uri, stem, ext, out_fmt))
        key = stem + output_extension(out_fmt)
        stems[key] = stems.get(key, 0) + 1
    for index, (uri, stem, ext, out_fmt) in enumerate(outputs):
        name = stem + output_extension(out_fmt)
        if stems[name] > 1:
            name = stem + ext + output_extension(out_fmt)
        yield Item(index=index, input=uri, output=join_uri(output_uri, *name.split("/")))


def _nothing_listed(input_uri: str, storage: Storage) -> InputError:
    if _is_manifest(input_uri, storage):
        return InputError(f"manifest {input_uri} lists no images: is it the right file?")
    kinds = ", ".join(sorted({e.lstrip(".") for e in C.INPUT_EXTENSIONS}))
    if is_s3(input_uri):
        hint = f"is the prefix right? It is read as a folder ({input_uri.rstrip('/')}/...); keys are case-sensitive"
    else:
        hint = "is the path right? Hidden files and folders are skipped"
    return InputError(f"input {input_uri} lists no images ({kinds}): {hint}")


def list_items(input_uri: str, output_uri: str, storage: Storage, fmt: str | None) -> Iterator[Item]:
    """The job's items; InputError when the input can't be listed or lists nothing."""
    try:
        sources, root = list_sources(input_uri, storage, output_uri)
    except StorageNotFoundError as exc:
        raise InputError(str(exc)) from None
    if not sources:
        raise _nothing_listed(input_uri, storage)
    return plan_items(sources, root, output_uri, fmt)
