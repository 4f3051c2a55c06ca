"""Resumable training: a run that stops mid-way loses nothing, and the next run picks it up.

The checkpoint (``OUT`` + ``.ckpt``) holds the net, optimiser, step, RNGs, logging window and
the run's identity (never continued under another config). Written atomically every
``checkpoint_every`` steps, at the end and on SIGTERM/SIGINT; read with
``torch.load(weights_only=True)``. A resumed run ends with the weights of an uninterrupted
one (same torch build and thread count).
"""

from __future__ import annotations

import json
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

SUFFIX = ".ckpt"
FORMAT = 1


class CheckpointMismatch(ValueError):
    """The checkpoint belongs to another run (kind, seed or config)."""


def path_for(out: Path) -> Path:
    return out.with_suffix(SUFFIX)


def identity(kind: str, seed: int, cfg: dict[str, Any]) -> str:
    return json.dumps({"kind": kind, "seed": seed, "config": cfg}, sort_keys=True, default=str)


@dataclass
class Progress:
    """The loop's own state besides the net and the optimiser."""

    step: int = 0
    running: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0


def save(
    path: Path,
    run_id: str,
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    rng: np.random.Generator,
    progress: Progress,
) -> None:
    """Write the checkpoint atomically (temporary file, fsync, ``os.replace``).

    Args:
        path: the checkpoint file.
        run_id: the run's identity (kind, seed, config); a resume checks it.
        net: the network.
        opt: its optimiser.
        rng: the generator that draws crops and degradations.
        progress: the step, the logging window and the training seconds.
    """
    state = {
        "format": FORMAT,
        "identity": run_id,
        "step": progress.step,
        "running": [float(x) for x in progress.running],
        "elapsed_s": float(progress.elapsed_s),
        "net": net.state_dict(),
        "optimizer": opt.state_dict(),
        "numpy_rng": json.dumps(rng.bit_generator.state),
        "torch_rng": torch.get_rng_state(),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(
    path: Path, run_id: str, net: torch.nn.Module, opt: torch.optim.Optimizer, rng: np.random.Generator
) -> Progress:
    """Restore a run from its checkpoint.

    Args:
        path: the checkpoint.
        run_id: this run's identity: it must be the checkpoint's.
        net: restored in place.
        opt: restored in place.
        rng: restored in place.

    Returns:
        The loop's progress.

    Raises:
        CheckpointMismatch: not a training checkpoint, or another run's.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointMismatch(f"{path}: not a pixelrelay training checkpoint (format {FORMAT})")
    if state.get("identity") != run_id:
        raise CheckpointMismatch(
            f"{path} was made by a run with another kind, seed or config; pass --fresh to start over (it is replaced)"
        )
    net.load_state_dict(state["net"])
    opt.load_state_dict(state["optimizer"])
    rng.bit_generator.state = json.loads(state["numpy_rng"])
    torch.set_rng_state(state["torch_rng"])
    return Progress(step=int(state["step"]), running=list(state["running"]), elapsed_s=float(state["elapsed_s"]))


class StopRequest:
    """SIGTERM / SIGINT during training: finish the step, save, then stop (not mid-step)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach the main thread only: nothing to catch here
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._old[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._old.items():
            signal.signal(signum, handler)

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)
