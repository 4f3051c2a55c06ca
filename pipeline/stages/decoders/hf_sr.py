"""Learned super-resolution decoder (``hf-sr:MODEL[,MODEL...]``): Swin2SR via transformers.

MODEL is one checkpoint or a comma-separated list (hub ids or local folders), e.g.
``hf-sr:caidas/swin2SR-classical-sr-x2-64,caidas/swin2SR-realworld-sr-x4-64-bsrgan-psnr``.
Every listed model is loaded once, at start-up. Per item the plan picks one:

1. ``plan.model`` naming a configured model (its id, or a unique substring of it) wins;
2. else by scale: a model whose native upscale equals the plan's scale; failing that the
   smallest native upscale above it (the result is then downscaled with antialiasing; a
   x1 plan runs the smallest model and downscales back), or the largest below it (the rest
   is done with bicubic, noted);
3. among those, by degradation: ``plan.model`` as a variant name ("classical",
   "realworld", "compressed", as the hf-llm planner writes), else JPEG quality / deblock
   -> "compressed", noise / denoise / deblur -> "realworld", otherwise "classical".

Inference is tiled (``pipeline.tiling``): tiles are multiples of the model's window and
aligned to it, overlap and feathered blending hide the seams, and only one batch of tiles
is ever on the device, so peak device memory depends on ``tile``/``tile_batch`` and not on
the image (a 6000x4000 input runs in the same memory as a 512x512 one). The model's own
padding to the window size is undone by cropping to exactly scale x input. On CUDA the
model runs in bf16 (fp16 where bf16 is unsupported). Out of memory: halve the tile batch,
then the tile, down to ``min_tile``; an item fails only when one ``min_tile`` tile does not
fit. Alpha is upscaled separately (Lanczos; exact for fully opaque/transparent) and
re-attached.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pixelrelay.pipeline import hf
from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.settings import Settings
from pixelrelay.pipeline.messages import Plan
from pixelrelay.pipeline.stages.base import Decoder, RestoredImage

log = logging.getLogger("pixelrelay.decoder.hf_sr")

DEFAULT_MODEL = "caidas/swin2SR-classical-sr-x2-64"
KNOWN_MODELS = (
    "caidas/swin2SR-classical-sr-x2-64",
    "caidas/swin2SR-classical-sr-x4-64",
    "caidas/swin2SR-realworld-sr-x4-64-bsrgan-psnr",
    "caidas/swin2SR-compressed-sr-x4-48",
)
VARIANTS = ("classical", "realworld", "compressed", "lightweight")
JPEG_COMPRESSED_BELOW = 90.0
NOISY_ABOVE_SIGMA = 5.0


def split_models(model: str | None) -> list[str]:
    if not model:
        return [DEFAULT_MODEL]
    return [m.strip() for m in model.split(",") if m.strip()]


def variant_of(model_id: str) -> str:
    name = model_id.lower()
    for variant in ("realworld", "compressed", "lightweight"):
        if variant in name:
            return variant
    return "classical"


@dataclass
class _Loaded:
    model_id: str
    net: Any
    upscale: int
    window: int
    variant: str
    rescale: float


class HFSuperResolutionDecoder(Decoder):
    kind = "hf-sr"

    def __init__(
        self,
        model: str | None = None,
        device: str = "cpu",
        tile: int | None = None,
        overlap: int | None = None,
        tile_batch: int | None = None,
        min_tile: int | None = None,
        dtype: Any = None,
        alpha_mode: str = "lanczos",
    ) -> None:
        """Tile settings default to PIXELRELAY_SR_TILE / _OVERLAP / _TILE_BATCH / _MIN_TILE."""
        super().__init__(model=model, device=device)
        settings = Settings.from_env()
        tile = settings.sr_tile if tile is None else tile
        overlap = settings.sr_overlap if overlap is None else overlap
        tile_batch = settings.sr_tile_batch if tile_batch is None else tile_batch
        min_tile = settings.sr_min_tile if min_tile is None else min_tile
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageToImage

        if alpha_mode not in ("lanczos", "model"):
            raise ValueError(f"alpha_mode must be 'lanczos' or 'model', not {alpha_mode!r}")
        self.tile, self.overlap, self.tile_batch, self.min_tile = tile, overlap, tile_batch, min_tile
        self.alpha_mode = alpha_mode
        self.dtype = dtype or hf.choose_dtype(device)
        self.torch_device = torch.device(device)
        self.models: list[_Loaded] = []
        for model_id in split_models(model):
            path = hf.load_path(model_id, "decoder", self.kind)
            net = AutoModelForImageToImage.from_pretrained(path, dtype=self.dtype, local_files_only=True)
            net.to(self.torch_device).eval()
            rescale = 1.0 / 255.0
            try:
                proc = AutoImageProcessor.from_pretrained(path, local_files_only=True)
                if getattr(proc, "do_rescale", True):
                    rescale = float(getattr(proc, "rescale_factor", rescale))
            except (OSError, ValueError):
                pass  # no preprocessor_config.json: Swin2SR's default is a 1/255 rescale
            cfg = net.config
            self.models.append(
                _Loaded(
                    model_id=model_id,
                    net=net,
                    upscale=int(getattr(cfg, "upscale", 1)),
                    window=int(getattr(cfg, "window_size", 8)),
                    variant=variant_of(model_id),
                    rescale=rescale,
                )
            )

    @classmethod
    def check_available(cls, model: str | None) -> None:
        for model_id in split_models(model):
            hf.require_model(model_id, "decoder", cls.kind)

    # -- model choice

    def choose(self, plan: Plan) -> _Loaded:
        if plan.model:
            exact = [m for m in self.models if m.model_id == plan.model]
            if exact:
                return exact[0]
            named = [m for m in self.models if plan.model.lower() in m.model_id.lower()]
            if len(named) == 1 and plan.model.lower() not in VARIANTS:
                return named[0]
        scale = plan.scale
        natives = sorted({m.upscale for m in self.models})
        if scale in natives:
            native = scale
        elif any(n > scale for n in natives):
            native = min(n for n in natives if n > scale)
        else:
            native = max(natives)
        pool = [m for m in self.models if m.upscale == native]
        wanted = self._wanted_variant(plan)
        for variant in (wanted, "classical", "realworld", "compressed", "lightweight"):
            hits = [m for m in pool if m.variant == variant]
            if hits:
                return hits[0]
        return pool[0]

    @staticmethod
    def _wanted_variant(plan: Plan) -> str:
        if plan.model and plan.model.lower() in VARIANTS:
            return plan.model.lower()
        if (plan.jpeg_quality is not None and plan.jpeg_quality < JPEG_COMPRESSED_BELOW) or plan.strength("deblock") > 0:
            return "compressed"
        if plan.noise_sigma > NOISY_ABOVE_SIGMA or plan.strength("denoise") > 0 or plan.strength("deblur") > 0:
            return "realworld"
        return "classical"

    # -- inference

    def _forward(self, m: _Loaded):
        import torch

        def fn(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                out = m.net(pixel_values=x.to(self.torch_device, self.dtype)).reconstruction
            h, w = x.shape[-2:]
            return out[:, :, : h * m.upscale, : w * m.upscale].float()

        return fn

    def upscale_tensor(self, m: _Loaded, x: Any, **overrides: Any) -> tuple[Any, Any]:
        """(B,3,H,W) float in [0,1] (CPU) -> ((B,3,H*up,W*up) float CPU, TileSettings)."""
        from pixelrelay.pipeline.tiling import run_tiled_with_fallback

        return run_tiled_with_fallback(
            self._forward(m),
            x,
            m.upscale,
            overrides.get("tile", self.tile),
            overrides.get("overlap", self.overlap),
            batch_size=overrides.get("tile_batch", self.tile_batch),
            min_tile=overrides.get("min_tile", self.min_tile),
            align=m.window,
            device=self.torch_device,
            what=f"{m.model_id} tile",
        )

    @staticmethod
    def _resize(x: Any, size: tuple[int, int]) -> Any:
        import torch.nn.functional as F

        if tuple(x.shape[-2:]) == size:
            return x
        down = size[0] < x.shape[-2]
        return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=down)

    def restore(self, images: Sequence[DecodedImage], plans: Sequence[Plan]) -> list[RestoredImage]:
        import torch

        if len(images) != len(plans):
            raise ValueError(f"{len(images)} images but {len(plans)} plans")
        results: list[RestoredImage | None] = [None] * len(images)
        # Same model and same size: one tensor, so their tiles share device batches.
        groups: dict[tuple, list[int]] = {}
        chosen = [self.choose(p) for p in plans]
        for i, (image, m) in enumerate(zip(images, chosen)):
            groups.setdefault((id(m), image.height, image.width), []).append(i)
        for (_, h, w), idx in groups.items():
            m = chosen[idx[0]]
            x = torch.stack(
                [torch.from_numpy(np.ascontiguousarray(images[i].rgb)).permute(2, 0, 1) for i in idx]
            ).float() * m.rescale
            out, settings = self.upscale_tensor(m, x)
            for k, i in enumerate(idx):
                results[i] = self._finish(images[i], plans[i], m, out[k : k + 1], settings)
        return [r for r in results if r is not None]

    def _finish(self, image: DecodedImage, plan: Plan, m: _Loaded, y: Any, settings: Any) -> RestoredImage:
        import torch

        h, w = image.height, image.width
        target = (h * plan.scale, w * plan.scale)
        notes = [f"hf-sr: {m.model_id} (x{m.upscale}, {m.variant})"]
        if m.upscale != plan.scale:
            how = "downscaled (antialiased)" if m.upscale > plan.scale else "bicubic for the rest"
            notes.append(f"hf-sr: model x{m.upscale} -> plan x{plan.scale}, {how}")
        y = self._resize(y, target)
        if settings.oom_retries:
            notes.append(f"hf-sr: out of memory, finished with {settings.describe()}")
        rgb = (y[0].clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
        alpha = None
        if image.alpha is not None:
            alpha = self._upscale_alpha(image.alpha, target, m)
        return RestoredImage(rgb=np.ascontiguousarray(rgb), alpha=alpha, notes=tuple(notes))

    def _upscale_alpha(self, alpha: np.ndarray, target: tuple[int, int], m: _Loaded) -> np.ndarray:
        if alpha.min() == alpha.max():  # fully opaque (or uniform): exact
            return np.full(target, alpha.flat[0], dtype=np.uint8)
        if self.alpha_mode == "model":
            import torch

            x = torch.from_numpy(alpha).float()[None, None].expand(1, 3, *alpha.shape) * m.rescale
            y, _ = self.upscale_tensor(m, x.contiguous())
            y = self._resize(y, target).mean(dim=1)[0]
            return (y.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).numpy()
        from PIL import Image

        img = Image.fromarray(np.ascontiguousarray(alpha, dtype=np.uint8)).resize((target[1], target[0]), Image.Resampling.LANCZOS)
        return np.asarray(img, dtype=np.uint8).copy()
