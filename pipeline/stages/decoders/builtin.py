"""The builtin learned decoder: conditional restoration + upscaling for x1, x2, x4.

Two ``pipeline.nets.RestoreNet`` networks ship in ``pipeline/weights/``, and the plan picks
one per item (``route``):

* the **upscaler** (``builtin_upscaler.safetensors``) for a plan without operations: a clean
  image gets plain super-resolution at x2/x4 (and at x1 is returned untouched). It is trained
  on clean inputs only, so it never denoises, deblocks or sharpens;
* the **restorer** (``builtin_restorer.safetensors``) for a plan with operations: it removes
  noise, JPEG blocking and blur while upscaling, FiLM-conditioned on the plan's estimates of
  the degradations it is asked to remove (``plan_condition``). It adds a multi-scale context
  branch (a wide receptive field for heavy noise) and is trained on degraded inputs only.

Both predict a residual over bicubic. ``model`` may name one weights file (used for every
item) or ``UPSCALER,RESTORER``. Items of one network, scale and size are batched together;
images larger than one tile run tiled (``pipeline.tiling``). Alpha is upscaled separately
(bilinear) and re-attached. Output is exactly ``scale`` x the input size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pixelrelay.pipeline import tensors
from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.messages import Plan
from pixelrelay.pipeline.stages.base import Decoder, ModelUnavailableError, RestoredImage
from pixelrelay.pipeline.stages.decoders.classic import resize_alpha

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"
DEFAULT_WEIGHTS = {
    "upscaler": WEIGHTS_DIR / "builtin_upscaler.safetensors",
    "restorer": WEIGHTS_DIR / "builtin_restorer.safetensors",
}
ROLES = ("upscaler", "restorer")
TILE = 256  # input pixels; bigger images run tiled
OVERLAP = 32
TILE_BATCH = 4
NOISE_FULL_STRENGTH = 0.3  # the rules planner's strength at its denoise threshold
FORCED_NOISE_PER_STRENGTH = 25.0


def _weights_file(name: str) -> Path:
    path = Path(name)
    return path if path.suffix else WEIGHTS_DIR / f"{name}.safetensors"


def weights_paths(model: str | None) -> dict[str, Path]:
    """Role -> weights file: the shipped pair, ``model`` for both roles, or ``UPSCALER,RESTORER``."""
    if not model:
        return dict(DEFAULT_WEIGHTS)
    names = [m.strip() for m in model.split(",")]
    if len(names) == 1:
        names *= 2
    if len(names) != 2 or not all(names):
        raise ModelUnavailableError(f"builtin decoder model {model!r}: give one weights file or UPSCALER,RESTORER")
    return {role: _weights_file(n) for role, n in zip(ROLES, names)}


def route(cond: Sequence[float]) -> str:
    """The network for a plan's condition: the restorer when there is anything to remove."""
    return "restorer" if any(cond) else "upscaler"


def _rules_thresholds() -> tuple[float, float, float, float]:
    """(denoise min sigma, sharpen min blur, sharpen max noise, deblock max quality) of the
    rules planner: an estimate past its threshold whose operation is missing from the plan
    was turned down on purpose (an instruction, or the noise guard on sharpening)."""
    from pixelrelay.pipeline.stages.planners import rules

    return rules.DENOISE_MIN_SIGMA, rules.SHARPEN_MIN_BLUR, rules.SHARPEN_MAX_NOISE, rules.DEBLOCK_MAX_QUALITY


def plan_condition(plan: Plan) -> list[float]:
    """The network's condition vector for a plan.

    A plan without operations (a clean image) gets the zero condition: no denoising, no
    deblocking, no deblurring, ever. Otherwise the network gets the plan's estimates of all
    three degradations, except one whose operation the planner turned down although its
    estimate is past the planner's threshold (e.g. "no denoising" in the instruction); a
    denoise strength under the planner's base strength (a "gentle" request) scales the noise
    condition down, and an operation forced without an estimate gets a default from its
    strength. The noise guard on sharpening is not applied: the network denoises and
    deblurs jointly."""
    from pixelrelay.pipeline.nets import cond_vector

    if not plan.operations:
        return cond_vector(0.0, 0.0, None)
    min_noise, min_blur, max_noise_sharpen, max_quality = _rules_thresholds()
    denoise, deblock = plan.strength("denoise"), plan.strength("deblock")
    deblur = max(plan.strength("deblur"), plan.strength("sharpen"))

    noise = plan.noise_sigma
    if denoise > 0:
        noise = noise * min(1.0, denoise / NOISE_FULL_STRENGTH) if noise > 0 else FORCED_NOISE_PER_STRENGTH * denoise
    elif noise >= min_noise:
        noise = 0.0  # turned down on purpose

    blur = plan.blur_sigma
    if deblur > 0:
        blur = blur if blur > 0 else 1.0 + deblur
    elif blur >= min_blur and plan.noise_sigma <= max_noise_sharpen:
        blur = 0.0  # turned down on purpose (not by the noise guard)

    quality = plan.jpeg_quality
    if deblock > 0:
        if quality is None:
            quality = float(np.clip(85.0 - 65.0 * (deblock - 0.2), 10.0, 95.0))
    elif quality is not None and quality < max_quality:
        quality = None  # turned down on purpose
    return cond_vector(noise, blur, quality)


class BuiltinDecoder(Decoder):
    """Learned conditional restoration + upscaling (x1, x2, x4)."""

    kind = "builtin"

    def __init__(self, model: str | None = None, device: str = "cpu", batch_size: int = 8) -> None:
        super().__init__(model=model, device=device)
        from pixelrelay.pipeline import nets

        self.check_available(model)
        self.torch_device = torch.device(device)
        self.nets: dict[str, torch.nn.Module] = {}
        self.metas: dict[str, dict[str, str]] = {}
        loaded: dict[Path, tuple[torch.nn.Module, dict[str, str]]] = {}
        for role, path in weights_paths(model).items():
            if path not in loaded:  # one file for both roles loads once
                net, meta = nets.load_model(str(path), kind="decoder", device=device)
                # channels-last: the faster conv layout on CPU (oneDNN) and on tensor cores
                loaded[path] = (net.float().to(memory_format=torch.channels_last), meta)
            self.nets[role], self.metas[role] = loaded[path]
        self.meta = self.metas["restorer"]
        self.batch_size = max(1, batch_size)

    @classmethod
    def check_available(cls, model: str | None) -> None:
        for path in weights_paths(model).values():
            if not path.is_file():
                raise ModelUnavailableError(
                    f"builtin decoder weights {path} are missing; they ship with pixelrelay "
                    f"(reinstall it) or train them: pixelrelay train decoder --data DIR --out {path}"
                )

    def _forward(self, x: torch.Tensor, cond: torch.Tensor, scale: int, role: str | None = None) -> torch.Tensor:
        """x: Bx3xHxW on the CPU; returns Bx3x(sH)x(sW) on the CPU. ``role`` defaults to the
        route of the first condition (all rows of one call share a network)."""
        net = self.nets[role or route(cond[0].tolist())]
        h, w = x.shape[-2:]
        ph, pw = (h % 2, w % 2) if scale == 1 else (0, 0)
        if ph or pw:  # x1 runs pixel-unshuffled: needs even sizes
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        dev = self.torch_device
        x = x.to(dev).contiguous(memory_format=torch.channels_last)
        y = net(x, cond.to(dev), scale).float().cpu()
        return y[:, :, : h * scale, : w * scale]

    @torch.inference_mode()
    def restore(self, images: Sequence[DecodedImage], plans: Sequence[Plan]) -> list[RestoredImage]:
        if len(images) != len(plans):
            raise ValueError(f"{len(images)} images but {len(plans)} plans")
        results: list[RestoredImage | None] = [None] * len(images)
        conds = [plan_condition(p) for p in plans]
        groups: dict[tuple[str, int, int, int], list[int]] = {}
        for i, (im, plan) in enumerate(zip(images, plans)):
            if plan.scale == 1 and not any(conds[i]):
                # Nothing to remove and nothing to upscale: leave the image alone.
                results[i] = RestoredImage(rgb=im.rgb.copy(), alpha=None if im.alpha is None else im.alpha.copy(),
                                           notes=("builtin: no operation planned at x1, image unchanged",))
                continue
            groups.setdefault((route(conds[i]), plan.scale, im.height, im.width), []).append(i)
        for (role, scale, h, w), idx in groups.items():
            outs = self._restore_group([images[i] for i in idx], [conds[i] for i in idx], role, scale, h, w)
            for i, rgb in zip(idx, outs):
                alpha = images[i].alpha
                results[i] = RestoredImage(rgb=rgb, alpha=None if alpha is None else resize_alpha(alpha, scale))
        return results  # type: ignore[return-value]

    def _restore_group(self, images, conds, role: str, scale: int, h: int, w: int) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        if h <= TILE and w <= TILE:
            for k in range(0, len(images), self.batch_size):
                x = torch.cat([tensors.to_tensor(im.rgb) for im in images[k : k + self.batch_size]])
                c = torch.tensor(conds[k : k + self.batch_size], dtype=torch.float32)
                y = self._forward(x, c, scale, role)
                out.extend(tensors.to_uint8(t) for t in y)
            return out
        from pixelrelay.pipeline.tiling import run_tiled

        for im, cond in zip(images, conds):
            c1 = torch.tensor([cond], dtype=torch.float32)
            x = tensors.to_tensor(im.rgb)
            y = run_tiled(
                lambda tiles: self._forward(tiles, c1.expand(tiles.shape[0], -1), scale, role),
                x, scale, TILE, OVERLAP, batch_size=TILE_BATCH, align=2 if scale == 1 else 1,
            )
            out.append(tensors.to_uint8(y))
        return out
