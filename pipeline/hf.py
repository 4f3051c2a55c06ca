"""Shared helpers for the Hugging Face backends.

A MODEL is a local folder or a hub id; weights load only from that folder or the Hugging
Face cache (``local_files_only=True``): only ``pixelrelay models pull`` touches the network.
torch and transformers are imported lazily.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pixelrelay.pipeline.stages.base import ModelUnavailableError

# Files a usable checkpoint folder must hold (any one of each group).
CONFIG_FILES = ("config.json", "model_index.json")
WEIGHT_PATTERNS = (
    "*.safetensors",
    "*.bin",
    "*.safetensors.index.json",
    "*.bin.index.json",
)
# What `models pull` fetches: configs, tokenizer/processor files and safetensors weights
# (pickled .bin files only when a repo has no safetensors).
PULL_PATTERNS = (
    "*.json",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "*.jinja",
    "*.safetensors",
)
PULL_FALLBACK_PATTERNS = ("*.bin",)


def is_local_model(model: str) -> bool:
    """True when ``model`` names a folder on disk rather than a hub id."""
    if model.startswith(("/", "./", "../", "~")) or os.path.isabs(model):
        return True
    return Path(model).expanduser().is_dir()


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _has_weights(folder: Path) -> bool:
    # The folder and its direct subfolders (diffusers pipelines keep weights in unet/, vae/,
    # ...): never a walk of a whole tree, whatever folder a spec names.
    return any(any(folder.glob(p)) or any(folder.glob("*/" + p)) for p in WEIGHT_PATTERNS)


def _has_config(folder: Path) -> bool:
    return any((folder / name).is_file() for name in CONFIG_FILES)


def pull_hint(stage: str, model: str, kind: str | None = None) -> str:
    if is_local_model(model):
        return f"the folder {model!r} must hold a save_pretrained() checkpoint (config.json + weights)"
    spec = f"{kind}:{model}" if kind else model
    return (
        f"fetch it ahead of time with `pixelrelay models pull {spec}` "
        f"(or `hf download {model}`), or pass a local folder: --{stage} {kind or 'KIND'}:/path/to/model"
    )


def local_snapshot(model: str) -> Path | None:
    """The folder holding ``model`` locally, or None when it is not there. Never downloads."""
    if is_local_model(model):
        folder = Path(model).expanduser()
        return folder if folder.is_dir() else None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = snapshot_download(model, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None
    except Exception:  # e.g. an invalid repo id: treat as missing, the caller names it
        return None
    return Path(path)


def snapshot_identity(model: str) -> str:
    """Which weights ``model`` names here: a hub model's snapshot folder is named by its
    commit sha (``ID@SHA``); a local folder is identified by its files' paths, sizes and
    mtimes (``dir:HASH``). Cheap: no weights are read. ``ID@missing`` when not present."""
    from pixelrelay.pipeline.fingerprint import folder_identity

    folder = local_snapshot(model)
    if folder is None:
        return f"{model}@missing"
    if is_local_model(model):
        return "dir:" + folder_identity(folder)
    return f"{model}@{folder.name}"


def model_present(model: str) -> bool:
    folder = local_snapshot(model)
    return folder is not None and _has_config(folder) and _has_weights(folder)


def require_model(model: str, stage_kind: str, kind: str | None = None) -> Path:
    """Return the local folder for ``model`` or raise ModelUnavailableError naming it.

    Cheap: no torch, no CUDA, no network. Workers call this at start-up (check_available).
    """
    folder = local_snapshot(model)
    if folder is None:
        where = (
            "folder does not exist" if is_local_model(model) else (f"not in the Hugging Face cache ({hub_cache_dir()})")
        )
        raise ModelUnavailableError(
            f"{stage_kind} model {model!r} is not available: {where}; {pull_hint(stage_kind, model, kind)}"
        )
    missing = []
    if not _has_config(folder):
        missing.append("config.json")
    if not _has_weights(folder):
        missing.append("weights (*.safetensors / *.bin)")
    if missing:
        raise ModelUnavailableError(
            f"{stage_kind} model {model!r} at {folder} is incomplete (missing "
            f"{', '.join(missing)}); {pull_hint(stage_kind, model, kind)}"
        )
    return folder


def load_path(model: str, stage_kind: str, kind: str | None = None) -> str:
    """The path to hand to ``from_pretrained`` (always a local folder)."""
    return str(require_model(model, stage_kind, kind))


class ModelMismatchError(ModelUnavailableError):
    """A model whose weights do not fit its architecture (missing, unexpected or mis-shaped
    tensors): it would run partly randomly initialised, so it is never built."""


def _not_a_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def _quiet_load_report() -> Iterator[None]:
    # transformers logs a mismatch as a many-line WARNING table (the refusal says it in one
    # line) and draws a progress bar on stderr. A filter, not a level: transformers runs extra
    # checks when that logger's level is raised.
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("transformers.modeling_utils")
    bars = hf_logging.is_progress_bar_enabled()
    logger.addFilter(_not_a_load_report)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.removeFilter(_not_a_load_report)
        if bars:
            hf_logging.enable_progress_bar()


def load_pretrained(loader: Any, path: str, model: str, stage_kind: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(path, **kwargs)`` from local files only, refused
    (``ModelMismatchError``) unless every weight of the architecture came from the checkpoint,
    in its shape, and the checkpoint holds no other."""
    with _quiet_load_report():
        net, info = loader.from_pretrained(
            path, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
    check_loading_info(info, model, stage_kind)
    return net


def check_loading_info(info: Mapping[str, Any], model: str, stage_kind: str) -> None:
    """Raise ``ModelMismatchError`` when transformers' loading info lists any missing,
    mis-shaped or unexpected weight, or a load error. Only counts and the first missing name
    (the architecture's, never the checkpoint's) are quoted."""
    missing = sorted(str(k) for k in info.get("missing_keys") or ())
    counts = {
        "missing": len(missing),
        "of the wrong shape": len(info.get("mismatched_keys") or ()),
        "unexpected": len(info.get("unexpected_keys") or ()),
        "unreadable": len(info.get("error_msgs") or ()),
    }
    if not any(counts.values()):
        return
    found = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
    example = f", first missing {missing[0][:80]!r}" if missing else ""
    raise ModelMismatchError(
        f"{stage_kind} model {model!r}: its weights do not match its config ({found}{example}); "
        "refused, as missing weights would run randomly initialised"
    )


def pull_model(model: str, extra_patterns: Iterable[str] = ()) -> str:
    """Download ``model`` into the HF cache (configs, tokenizer files, safetensors weights).

    Returns the snapshot folder. A local folder is only checked.
    """
    if is_local_model(model):
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise ModelUnavailableError(f"local model folder {model!r} does not exist")
        return str(folder)
    from huggingface_hub import snapshot_download

    patterns = list(PULL_PATTERNS) + list(extra_patterns)
    path = Path(snapshot_download(model, allow_patterns=patterns))
    if not _has_weights(path):  # repo ships pickled weights only
        path = Path(snapshot_download(model, allow_patterns=patterns + list(PULL_FALLBACK_PATTERNS)))
    return str(path)


# What a diffusers pipeline's pull fetches: its model_index.json and each component folder's
# configs, tokenizer files and safetensors weights; not the fp16 copies, the non-EMA weights
# or the single-file checkpoints such repos also carry (several GB each).
DIFFUSERS_PULL_ALLOW = ("model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors")
DIFFUSERS_PULL_IGNORE = ("*.fp16.safetensors", "*non_ema*", "*.ckpt")


def pull_diffusers(model: str, kind: str) -> str:
    """Fetch a diffusers pipeline's folders into the hub cache (``DIFFUSERS_PULL_ALLOW`` less
    ``DIFFUSERS_PULL_IGNORE``); a present or local model is only checked."""
    if is_local_model(model) or model_present(model):
        return str(require_model(model, "decoder", kind))
    if hub_offline():
        raise ModelUnavailableError(f"{model!r} is missing, and HF_HUB_OFFLINE=1 forbids downloading")
    from huggingface_hub import snapshot_download

    return snapshot_download(
        model, allow_patterns=list(DIFFUSERS_PULL_ALLOW), ignore_patterns=list(DIFFUSERS_PULL_IGNORE)
    )


# --- devices and dtypes ------------------------------------------------------------------


DTYPES = {
    "fp32": "float32",
    "float32": "float32",
    "fp16": "float16",
    "float16": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
}


def choose_dtype(device: str, prefer: str = "auto") -> Any:
    """fp32 on CPU (and MPS); on CUDA ``prefer`` ("fp32", "fp16", "bf16"), or with "auto"
    bf16 where the GPU supports it, else fp16. The caller passes the setting
    (``Settings.dtype``); nothing here reads the environment."""
    import torch

    if torch.device(device).type != "cuda":
        return torch.float32
    name = DTYPES.get((prefer or "auto").lower())
    if name is not None:
        return getattr(torch, name)
    try:
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
    except Exception:  # pragma: no cover - very old drivers
        pass
    return torch.float16


@functools.cache
def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16, read from /proc/cpuinfo
    once per process)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_autocast_dtype(device: str, prefer: str = "auto") -> Any:
    """The dtype a CPU forward pass may autocast its convolutions to: bf16 on a CPU that
    computes it natively, when the setting (``Settings.dtype``) is "auto" or "bf16"; else
    None (fp32). Weights, inputs and outputs stay fp32; only the conv trunk runs in bf16,
    about half the time there. Elsewhere bf16 is emulated and slower than fp32. A model
    opts in only where its outputs were measured against fp32 (the builtin networks)."""
    import torch

    if torch.device(device).type != "cpu" or (prefer or "auto").lower() not in ("auto", "bf16"):
        return None
    return torch.bfloat16 if native_cpu_bf16() else None


def oom_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "out of device memory"."""
    import torch

    types: list[type[BaseException]] = []
    for name in ("OutOfMemoryError",):
        t = getattr(torch, name, None)
        if isinstance(t, type):
            types.append(t)
    t = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if isinstance(t, type) and t not in types:
        types.append(t)
    return tuple(types)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, oom_errors()):
        return True
    # Some kernels raise a plain RuntimeError with the allocator's message.
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def empty_cache(device: str | Any = None) -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        try:
            torch.cuda.empty_cache()
        except Exception:  # pragma: no cover
            pass
