"""The base of every learned decoder: grouping, tiled inference, precision, resize, alpha.

A subclass supplies ``choose``, its model's name, native scale and window, and ``forward``
(tiles arrive on the CPU in float32 [0, 1]; it moves them to the device in ``self.dtype``);
optionally ``pixel_bytes``, ``batch_key`` and ``unchanged``. Here, once for all: items with
the same model, scale, size and ``batch_key`` share tile batches (``forward`` learns each
tile's item); tiling follows ``pixelrelay.pipeline.tiling``; fp32 on CPU (bf16 autocast where
``cpu_autocast`` and the CPU computes bf16), bf16/fp16 on CUDA; the output is exactly
``plan.scale`` x the input; alpha is resized on its own. torch is imported lazily.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.messages import Plan
from pixelrelay.pipeline.stages.base import Decoder, RestoredImage, check_batch, filled

if TYPE_CHECKING:
    import torch

    from pixelrelay.pipeline.settings import Settings
    from pixelrelay.pipeline.tiling import TileSettings


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tiled-inference settings of one decoder, in input pixels: ``tile`` caps the tile side
    (0: no cap), ``memory_mb`` / ``memory_fraction`` set the memory budget of a forward call
    (``pixelrelay.pipeline.tiling.memory_budget``; memory_mb 0: the device's default)."""

    tile: int = 0
    overlap: int = 32
    tile_batch: int = 4
    min_tile: int = 32
    memory_mb: int = 0
    memory_fraction: float = 0.8

    def __post_init__(self) -> None:
        if (
            self.tile < 0
            or self.overlap < 0
            or self.tile_batch < 1
            or self.min_tile < 1
            or self.memory_mb < 0
            or not 0.0 < self.memory_fraction <= 1.0
        ):
            raise ValueError(f"bad tile settings: {self}")

    @classmethod
    def from_settings(cls, settings: Settings, name: str) -> TileConfig:
        """``settings.<name>_tile`` & co, e.g. name "sr" for PIXELRELAY_SR_TILE, and the
        shared budget (PIXELRELAY_TILE_MEMORY_MB, PIXELRELAY_TILE_MEMORY_FRACTION)."""
        fields = {f: getattr(settings, f"{name}_{f}") for f in ("tile", "overlap", "tile_batch", "min_tile")}
        return cls(**fields, memory_mb=settings.tile_memory_mb, memory_fraction=settings.tile_memory_fraction)

    def with_(self, **overrides: int | None) -> TileConfig:
        """A copy with the given (non-None) integer fields replaced."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


class LearnedDecoder(Decoder):
    """A decoder that runs a learned model; see the module docstring for what it guarantees."""

    tile_settings: ClassVar[str]  # the Settings prefix of its tile fields ("builtin", "sr", "sd")
    pad_mode: ClassVar[str] = "reflect"  # how an image is padded to the window ("replicate")
    cpu_autocast: ClassVar[bool] = False  # bf16 autocast on CPUs with native bf16 (see Precision)

    def __init__(
        self,
        model: str | None = None,
        device: str = "cpu",
        settings: Settings | None = None,
        tiles: TileConfig | None = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(model=model, device=device, settings=settings)
        import torch

        from pixelrelay.pipeline.hf import choose_dtype, cpu_autocast_dtype
        from pixelrelay.pipeline.tiling import PixelCostMeter

        self.tiles = tiles or TileConfig.from_settings(self.settings, self.tile_settings)
        self.dtype = dtype or choose_dtype(device, self.settings.dtype)
        self.autocast_dtype = (
            cpu_autocast_dtype(device, self.settings.dtype) if self.cpu_autocast and not dtype else None
        )
        self.torch_device = torch.device(device)
        self.meter = PixelCostMeter()  # CUDA: what forward calls really cost per pixel

    # -- what a subclass supplies

    @abstractmethod
    def choose(self, plan: Plan) -> Any:
        """The loaded model that serves ``plan``."""

    @abstractmethod
    def model_name(self, m: Any) -> str:
        """A name for a chosen model, unique within this decoder (groups and notes use it)."""

    @abstractmethod
    def native_scale(self, m: Any, plan: Plan) -> int:
        """The scale ``m`` upscales by when it serves ``plan``."""

    def window(self, m: Any, scale: int) -> int:
        """Tile sizes and starts are multiples of this (e.g. a transformer's window)."""
        return 1

    @abstractmethod
    def forward(self, m: Any, x: torch.Tensor, plans: Sequence[Plan], items: Sequence[int]) -> torch.Tensor:
        """Run one batch of tiles: x is (B,3,h,w) float32 in [0,1] on the CPU, tile k comes
        from the item whose plan is ``plans[items[k]]``; returns (B,3,h*s,w*s) in [0,1],
        s being the native scale (any device and float dtype)."""

    def pixel_bytes(self, m: Any, scale: int) -> float:
        """Device bytes one input pixel costs a forward call of ``m`` at ``scale`` in
        ``self.dtype`` (activations, output included; weights not). An estimate from the
        network's widths; a subclass that knows its network says better than this generic
        one (a 64-channel conv upscaler)."""
        from pixelrelay.pipeline.tiling import conv_pixel_bytes

        return conv_pixel_bytes(64, scale, self.itemsize)

    def batch_key(self, plan: Plan) -> Hashable:
        """Plans with different keys never share a forward call (default: no constraint)."""
        return None

    def notes(self, m: Any, plan: Plan) -> list[str]:
        return []

    def unchanged(self, plan: Plan) -> str | None:
        """A reason to return the image as it is (no model run), or None."""
        return None

    def runs_at(self, plan: Plan) -> int:
        """The native scale of the model that serves ``plan`` (``choose``); the plan's own
        where no model runs for it."""
        if self.unchanged(plan) is not None:
            return plan.scale
        return self.native_scale(self.choose(plan), plan)

    # -- the shared machinery

    def restore(self, images: Sequence[DecodedImage], plans: Sequence[Plan]) -> list[RestoredImage]:
        check_batch(images, plans)
        results: list[RestoredImage | None] = [None] * len(images)
        groups: dict[tuple, tuple[Any, list[int]]] = {}
        for i, (image, plan) in enumerate(zip(images, plans, strict=True)):
            reason = self.unchanged(plan)
            if reason is not None:
                results[i] = _untouched(image, f"{self.kind}: {reason}")
                continue
            m = self.choose(plan)
            key = (self.model_name(m), self.native_scale(m, plan), image.height, image.width, self.batch_key(plan))
            groups.setdefault(key, (m, []))[1].append(i)
        for m, idx in groups.values():
            group_plans = [plans[i] for i in idx]
            x = _stack([images[i] for i in idx])
            out, used = self.upscale_tensor(m, x, group_plans)
            for k, i in enumerate(idx):
                results[i] = self._finish(images[i], plans[i], m, out[k : k + 1], used)
        return filled(results)

    @property
    def itemsize(self) -> int:
        """Bytes per element in ``self.dtype``."""
        import torch

        return torch.empty((), dtype=self.dtype).element_size()

    def forward_pixels(self, m: Any, scale: int, tiles: TileConfig | None = None) -> int:
        """Input pixels one forward call of ``m`` may take now: the memory budget over the
        cost per pixel (the estimate, or on CUDA the measured cost when that is higher)."""
        from pixelrelay.pipeline.tiling import max_forward_pixels, memory_budget

        tiles = tiles or self.tiles
        budget = memory_budget(self.torch_device, tiles.memory_mb, tiles.memory_fraction)
        cost = max(self.pixel_bytes(m, scale), self.meter.get(self._meter_key(m, scale)) or 0.0)
        return max_forward_pixels(budget, cost)

    def _meter_key(self, m: Any, scale: int) -> tuple:
        return self.model_name(m), scale, str(self.dtype)

    def upscale_tensor(
        self, m: Any, x: torch.Tensor, plans: Sequence[Plan], **overrides: int
    ) -> tuple[torch.Tensor, TileSettings]:
        """(B,3,H,W) float [0,1] (CPU), one plan per row -> ((B,3,H*s,W*s) float32 CPU at the
        native scale s, the tile settings that worked). ``overrides``: TileConfig fields."""
        import torch

        from pixelrelay.pipeline.tiling import TilePlan, run_tiled_with_fallback

        tiles = self.tiles.with_(**overrides)
        scale = self.native_scale(m, plans[0])
        key = self._meter_key(m, scale)
        plan = TilePlan(
            scale=scale,
            tile=tiles.tile,
            overlap=tiles.overlap,
            batch_size=tiles.tile_batch,
            min_tile=tiles.min_tile,
            max_pixels=self.forward_pixels(m, scale, tiles),
            align=self.window(m, scale),
            pass_items=True,
            pad_mode=self.pad_mode,
        )

        def fn(crops: torch.Tensor, items: list[int]) -> torch.Tensor:
            return self.meter.run(key, self.torch_device, crops, lambda: self._forward(m, crops, plans, items))

        with torch.inference_mode():
            return run_tiled_with_fallback(fn, x, plan, what=f"{self.kind} {self.model_name(m)} tile")

    def _forward(self, m: Any, x: torch.Tensor, plans: Sequence[Plan], items: Sequence[int]) -> torch.Tensor:
        if self.autocast_dtype is None:
            return self.forward(m, x, plans, items)
        import torch

        with torch.autocast("cpu", dtype=self.autocast_dtype):
            return self.forward(m, x, plans, items).float()

    def _finish(self, image: DecodedImage, plan: Plan, m: Any, y: torch.Tensor, used: TileSettings) -> RestoredImage:
        from pixelrelay.pipeline import tensors

        native = self.native_scale(m, plan)
        notes = list(self.notes(m, plan))
        if native != plan.scale:
            how = "downscaled (antialiased)" if native > plan.scale else "bicubic for the rest"
            notes.append(f"{self.kind}: model x{native} -> plan x{plan.scale}, {how}")
        if used.oom_retries:
            notes.append(f"{self.kind}: out of memory, finished with {used.describe()}")
        y = tensors.resize(y, (image.height * plan.scale, image.width * plan.scale))
        alpha = None if image.alpha is None else tensors.resize_alpha(image.alpha, plan.scale)
        return RestoredImage(rgb=tensors.to_uint8(y), alpha=alpha, notes=tuple(notes))


def _stack(images: Sequence[DecodedImage]) -> torch.Tensor:
    """Same-size images -> (B,3,H,W) float32 in [0,1] on the CPU."""
    import torch

    rgb = np.stack([np.asarray(im.rgb, dtype=np.uint8) for im in images])
    return torch.from_numpy(rgb).permute(0, 3, 1, 2).float().div_(255.0)


def _untouched(image: DecodedImage, note: str) -> RestoredImage:
    alpha = None if image.alpha is None else image.alpha.copy()
    return RestoredImage(rgb=np.ascontiguousarray(image.rgb).copy(), alpha=alpha, notes=(note,))
