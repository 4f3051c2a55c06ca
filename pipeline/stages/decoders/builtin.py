"""The builtin learned decoder: conditional restoration + upscaling for x1, x2, x4.

Two ``RestoreNet`` weights ship in ``pipeline/weights/``; ``route`` picks one per item: the
upscaler (trained on clean inputs: it never denoises) for a plan without operations, the
restorer, FiLM-conditioned on the plan's estimates (``plan_condition``), for the rest. A
clean plan at x1 returns the image untouched. ``model`` may name one file or
``UPSCALER,RESTORER``. Each tile batch carries its items' condition vectors; the rest is
``LearnedDecoder``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pixelrelay.pipeline.messages import Plan
from pixelrelay.pipeline.stages.base import ModelUnavailableError
from pixelrelay.pipeline.stages.decoders.learned import LearnedDecoder, TileConfig

if TYPE_CHECKING:
    import torch

    from pixelrelay.pipeline.settings import Settings

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"
DEFAULT_WEIGHTS = {
    "upscaler": WEIGHTS_DIR / "builtin_upscaler.safetensors",
    "restorer": WEIGHTS_DIR / "builtin_restorer.safetensors",
}
ROLES = ("upscaler", "restorer")
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
    return {role: _weights_file(n) for role, n in zip(ROLES, names, strict=True)}


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


class BuiltinDecoder(LearnedDecoder):
    """Learned conditional restoration + upscaling (x1, x2, x4)."""

    kind = "builtin"
    tile_settings = "builtin"
    pad_mode = "replicate"  # odd sizes at x1: as the networks were always run
    # bf16 autocast on CPUs with native bf16: on 12 validation images (256 px crops) PSNR
    # moved by 0.000-0.001 dB (upscaler and restorer, x2 and x4), outputs by 2 levels at most
    cpu_autocast = True

    def __init__(
        self,
        model: str | None = None,
        device: str = "cpu",
        settings: Settings | None = None,
        tiles: TileConfig | None = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(model=model, device=device, settings=settings, tiles=tiles, dtype=dtype)
        import torch

        from pixelrelay.pipeline import nets

        self.check_available(model)
        self.nets: dict[str, torch.nn.Module] = {}
        self.metas: dict[str, dict[str, str]] = {}
        loaded: dict[Path, tuple[torch.nn.Module, dict[str, str]]] = {}
        for role, path in weights_paths(model).items():
            if path not in loaded:  # one file for both roles loads once
                net, meta = nets.load_model(str(path), kind="decoder", device=device)
                # channels-last: the faster conv layout on CPU (oneDNN) and on tensor cores
                loaded[path] = (net.to(self.dtype).to(memory_format=torch.channels_last), meta)
            self.nets[role], self.metas[role] = loaded[path]
        self.meta = self.metas["restorer"]

    def compute_identity(self) -> str:
        from pixelrelay.pipeline.fingerprint import file_sha256

        paths = weights_paths(self.model)
        return "builtin:" + ",".join(f"{role}=sha256:{file_sha256(paths[role])}" for role in ROLES)

    @classmethod
    def check_available(cls, model: str | None) -> None:
        for path in weights_paths(model).values():
            if not path.is_file():
                raise ModelUnavailableError(
                    f"builtin decoder weights {path} are missing; they ship with pixelrelay "
                    f"(reinstall it) or train them: pixelrelay train decoder --data DIR --out {path}"
                )

    # -- LearnedDecoder hooks

    def choose(self, plan: Plan) -> str:
        return route(plan_condition(plan))

    def model_name(self, m: str) -> str:
        return m

    def native_scale(self, m: str, plan: Plan) -> int:
        return plan.scale  # one network does x1, x2 and x4

    def window(self, m: str, scale: int) -> int:
        return 2 if scale == 1 else 1  # x1 runs pixel-unshuffled: even tile sizes and starts

    def pixel_bytes(self, m: str, scale: int) -> float:
        """From the network's width: ``maps`` feature maps of ``channels`` live at once (two
        more with the context branch), plus the head and the bicubic base; x1 runs
        pixel-unshuffled (features at a quarter of the pixels), x4 has a wider head. Peak RSS
        measured on CPU (fp32, 512-768 px): upscaler 0.21/0.57/1.44 KB per input pixel at
        x1/x2/x4, restorer 0.25/0.89/1.55 KB; this estimate is 1.1-1.4x those."""
        config = getattr(self.nets[m], "config", None) or {}
        c = int(config.get("channels", 32))
        maps = 5 + (2 if config.get("context_channels") else 0)
        if scale == 1:
            floats = maps * c / 4 + 24
        else:
            floats = maps * c + 9 * scale * scale + (6 * c if scale >= 4 else 0)
        return self.itemsize * floats

    def unchanged(self, plan: Plan) -> str | None:
        if plan.scale == 1 and not any(plan_condition(plan)):
            if plan.edit is not None:  # graded afterwards (decoders.edits)
                return "no restoration planned at x1, network not run"
            return "no operation planned at x1, image unchanged"
        return None

    def forward(self, m: str, x: torch.Tensor, plans: Sequence[Plan], items: Sequence[int]) -> torch.Tensor:
        import torch

        scale = plans[0].scale  # a group shares its native scale
        conds = {i: plan_condition(plans[i]) for i in set(items)}
        cond = torch.tensor([conds[i] for i in items], dtype=torch.float32)
        x = x.to(self.torch_device, self.dtype).contiguous(memory_format=torch.channels_last)
        return self.nets[m](x, cond.to(self.torch_device, self.dtype), scale)
