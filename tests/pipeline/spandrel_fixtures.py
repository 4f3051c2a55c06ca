"""Tiny, randomly initialised models of spandrel's own architecture classes, saved as the
community ships them (``.pth`` state dicts, ``.safetensors``), so their keys are genuine and
spandrel detects them as it would a downloaded checkpoint.

* ``compact``: Real-ESRGAN's SRVGGNetCompact (realesr-general-x4v3, the anime video models);
* ``esrgan``: ESRGAN's RRDBNet (RealESRGAN_x4plus, 4x-UltraSharp, most community models);
* ``swinir``: SwinIR (a transformer: windows, relative position tables; tiling discouraged).

Checkpoints with side effects for the refusal tests are built by ``evil_pickle``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

ARCHITECTURES = ("compact", "esrgan", "swinir")


def build(arch: str, scale: int = 2, seed: int = 0, channels: int = 3) -> torch.nn.Module:
    from spandrel.architectures.Compact import Compact
    from spandrel.architectures.ESRGAN import ESRGAN
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(seed)
    if arch == "compact":
        return Compact(num_in_ch=channels, num_out_ch=channels, num_feat=8, num_conv=2, upscale=scale)
    if arch == "esrgan":
        return ESRGAN(in_nc=channels, out_nc=channels, num_filters=8, num_blocks=1, scale=scale)
    if arch == "swinir":
        return SwinIR(
            upscale=scale,
            img_size=16,
            window_size=4,
            embed_dim=12,
            depths=[1],
            num_heads=[2],
            mlp_ratio=2,
            upsampler="pixelshuffledirect",
        )
    raise ValueError(arch)


def save(net: torch.nn.Module, path: str | Path, wrap: str | None = None) -> Path:
    """Save ``net``'s state dict at ``path`` (.safetensors or a torch file); ``wrap``: inside
    a dict under that key (``params_ema``, as BasicSR trainers write)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({wrap: state} if wrap else state, path)
    return path


_BUILT: dict[tuple, Path] = {}


def checkpoint(tmp_path_factory, arch: str, name: str, **kwargs) -> Path:
    """A tiny checkpoint file named ``name`` (its extension picks the format), built once per
    session."""
    key = (arch, name, tuple(sorted(kwargs.items())))
    if key not in _BUILT:
        wrap = kwargs.pop("wrap", None)
        _BUILT[key] = save(build(arch, **kwargs), tmp_path_factory.mktemp("spandrel") / name, wrap=wrap)
    return _BUILT[key]


class _SideEffect:
    """Unpickling this runs ``os.system`` (creates ``marker``): what a malicious .pth does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_pickle(path: Path, marker: Path, inside_state_dict: bool = True) -> Path:
    """A checkpoint whose unpickling creates ``marker``: a real state dict with one poisoned
    entry (torch.save), or a bare pickled object (pickle.dump)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if inside_state_dict:
        state = build("compact").state_dict()
        state["body.0.weight_hook"] = _SideEffect(marker)
        torch.save(state, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(_SideEffect(marker), f)
    return path
