"""Single-file checkpoints named in a spec: where each one comes from, and reading it safely.

A name is a local file (as ``pixelrelay.pipeline.stages.registry.is_local_path`` judges it),
an ``s3://`` object (cached once per ETag, its size checked before the download) or a hub file
(read from the cache only; ``pull`` downloads it). ``read_state_dict`` never runs pickled
code (safetensors, or ``torch.load(weights_only=True)``; other extensions refused), refuses a
file over ``max_bytes`` unread and raises ``CheckpointError`` naming the checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from pixelrelay.pipeline.stages.base import ModelUnavailableError

if TYPE_CHECKING:
    from pixelrelay.pipeline.storage import Storage

PICKLE_EXTENSIONS = (".pth", ".pt", ".ckpt", ".bin")
SAFE_EXTENSIONS = (".safetensors",)
EXTENSIONS = SAFE_EXTENSIONS + PICKLE_EXTENSIONS
CACHE_FOLDER = "pixelrelay-checkpoints"  # under HF_HOME, beside the hub cache

SourceKind = Literal["local", "s3", "hub"]


class CheckpointError(ValueError):
    """A checkpoint that is refused: unreadable, too large, not a state dict, or one that
    would need pickled code to load. The message names the checkpoint."""


@dataclass(frozen=True)
class Source:
    name: str  # as the spec names it
    kind: SourceKind

    @property
    def repo_and_file(self) -> tuple[str, str | None]:
        """Hub sources: ("org/repo", "path/in/repo.pth" or None for the repo's only file)."""
        parts = self.name.split("/")
        return "/".join(parts[:2]), "/".join(parts[2:]) or None


def source_of(name: str) -> Source:
    """Where ``name`` is read from (see the module docstring)."""
    from pixelrelay.pipeline.stages.registry import is_local_path

    if name.startswith("s3://"):
        return Source(name, "s3")
    if is_local_path(name):
        return Source(name, "local")
    parts = name.split("/")
    if len(parts) >= 2 and all(parts):
        return Source(name, "hub")
    raise ModelUnavailableError(f"checkpoint {name!r} is not a file, an s3:// URI or a hub id (org/repo[/file.pth])")


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / CACHE_FOLDER


# --- finding the file ------------------------------------------------------------------------


def local_file(source: Source) -> Path | None:
    """The file that holds ``source`` here, or None. Never downloads; for S3 the newest
    cached copy, whose version is not checked (that needs the store: ``fetch_s3``)."""
    if source.kind == "local":
        path = Path(source.name).expanduser()
        return path if path.is_file() else None
    if source.kind == "hub":
        return _hub_file(source, download=False)
    return _cached_s3(source.name)


def require_file(source: Source, hint: str) -> Path:
    """``local_file`` or ModelUnavailableError naming the checkpoint and ``hint``."""
    path = local_file(source)
    if path is None:
        where = "no such file" if source.kind == "local" else "not in the Hugging Face cache"
        raise ModelUnavailableError(f"checkpoint {source.name!r} is not available: {where}; {hint}")
    return path


@overload
def _hub_file(source: Source, download: Literal[True]) -> Path: ...


@overload
def _hub_file(source: Source, download: Literal[False]) -> Path | None: ...


def _hub_file(source: Source, download: bool) -> Path | None:
    from huggingface_hub import hf_hub_download, snapshot_download

    repo, filename = source.repo_and_file
    try:
        if filename is not None:
            return Path(hf_hub_download(repo, filename, local_files_only=not download))
        folder = Path(
            snapshot_download(repo, allow_patterns=[f"*{e}" for e in EXTENSIONS], local_files_only=not download)
        )
    except Exception:  # not cached, no such repo or file, offline: the caller names it
        if download:
            raise
        return None
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS)
    if len(files) != 1:
        found = ", ".join(p.name for p in files) or "none"
        raise CheckpointError(f"hub repo {repo!r} holds {len(files)} weights files ({found}): name one, {repo}/FILE")
    return files[0]


def pull(name: str, storage_for: Callable[[str], Storage], max_bytes: int) -> Path:
    """Fetch a checkpoint ahead of time (``models pull``): a hub file into the hub cache, an
    S3 object into the checkpoint cache; a local file is only looked up."""
    source = source_of(name)
    if source.kind == "hub":
        return _hub_file(source, download=True)
    if source.kind == "s3":
        return fetch_s3(name, storage_for(name), max_bytes)
    return require_file(source, "nothing to pull")


def fetch_s3(uri: str, storage: Storage, max_bytes: int, folder: Path | None = None) -> Path:
    """The cached copy of an S3 checkpoint, downloaded when absent or when the object changed.

    Args:
        uri: the ``s3://`` object.
        storage: storage for ``uri``.
        max_bytes: refuse a larger object, before the download.
        folder: the cache folder; None: ``cache_dir()``.

    Returns:
        The cached file's path.

    Raises:
        ModelUnavailableError: no such object.
        CheckpointError: the object is over ``max_bytes``.
    """
    info = next((i for i in storage.list_info(uri) if i.uri == uri), None)
    if info is None:
        raise ModelUnavailableError(f"checkpoint {uri!r} is not available: no such object")
    _check_size(uri, info.size, max_bytes)
    folder = folder or cache_dir()
    version = hashlib.sha256((info.etag or f"{info.size}:{info.modified}").encode()).hexdigest()[:12]
    target = folder / f"{_uri_key(uri)}-{version}-{_safe_name(uri)}"
    if target.is_file() and target.stat().st_size == info.size:
        return target
    data = storage.get(uri)
    _check_size(uri, len(data), max_bytes)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for old in folder.glob(f"{_uri_key(uri)}-*"):  # one version per URI stays cached
        if old != target:
            old.unlink(missing_ok=True)
    return target


def _uri_key(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def _cached_s3(uri: str, folder: Path | None = None) -> Path | None:
    copies = sorted((folder or cache_dir()).glob(f"{_uri_key(uri)}-*"), key=lambda p: p.stat().st_mtime)
    return copies[-1] if copies else None


def _safe_name(uri: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]", "_", uri.rsplit("/", 1)[-1])[-100:]
    return base or "checkpoint"


def _check_size(name: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise CheckpointError(
            f"checkpoint {name!r} is {size} bytes, over the {max_bytes}-byte bound (PIXELRELAY_CHECKPOINT_MAX_BYTES)"
        )


# --- reading it ------------------------------------------------------------------------------


def read_state_dict(path: Path, name: str, max_bytes: int) -> dict[str, Any]:
    """The checkpoint at ``path`` (named ``name`` in the spec) as a dict, read without
    running pickled code (see the module docstring)."""
    ext = path.suffix.lower()
    if ext not in EXTENSIONS:
        raise CheckpointError(
            f"checkpoint {name!r}: unsupported file type {ext or '(none)'!r}; want one of {', '.join(EXTENSIONS)}"
        )
    _check_size(name, path.stat().st_size, max_bytes)
    loaded = _load_safetensors(path, name) if ext in SAFE_EXTENSIONS else _load_pickle(path, name)
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"checkpoint {name!r} is not a state dict (it holds a {type(loaded).__name__})")
    return dict(loaded)


def _load_safetensors(path: Path, name: str) -> Any:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"checkpoint {name!r} is not a readable safetensors file ({_first_line(exc)})") from None


def _load_pickle(path: Path, name: str) -> Any:
    import pickle

    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"checkpoint {name!r} is refused: loading it would run pickled code (only tensors and plain "
            "containers are read, torch.load(weights_only=True)); convert it to .safetensors"
        ) from None
    except RuntimeError as exc:
        if "TorchScript" in str(exc):
            raise CheckpointError(f"checkpoint {name!r} is refused: a TorchScript archive, not a state dict") from None
        raise CheckpointError(f"checkpoint {name!r} is not a readable torch file ({_first_line(exc)})") from None
    except Exception as exc:  # truncated zip, junk bytes (KeyError, EOFError, ...)
        raise CheckpointError(f"checkpoint {name!r} is not a readable torch file ({_first_line(exc)})") from None


def require_tensors(state_dict: Mapping[str, Any], name: str, unwrap: Callable[[dict], dict] = lambda d: d) -> dict:
    """``unwrap(state_dict)`` (e.g. spandrel's ``canonicalize_state_dict``: a ``params_ema``
    or ``state_dict`` wrapper, a ``module.`` prefix) when every value is a tensor; else
    CheckpointError naming the first entry that is not."""
    import torch

    flat = unwrap(dict(state_dict))
    if not flat:
        raise CheckpointError(f"checkpoint {name!r} is not a state dict (it is empty)")
    for key, value in flat.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"checkpoint {name!r} is not a state dict "
                f"(entry {str(key)[:60]!r} is a {type(value).__name__}, not a tensor)"
            )
    return flat


def _first_line(exc: BaseException) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__
