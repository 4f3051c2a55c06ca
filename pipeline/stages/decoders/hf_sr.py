"""Learned super-resolution decoder (``hf-sr:MODEL[,MODEL...]``): Swin2SR via transformers.

Every listed model loads at start-up, and ``pixelrelay.pipeline.stages.decoders.choice``
picks one per item (a model's variant is read from its id). Tiles are multiples of the
model's window; its own padding is cropped off. The rest is ``LearnedDecoder``'s.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pixelrelay.pipeline import hf
from pixelrelay.pipeline.messages import Plan
from pixelrelay.pipeline.stages.decoders import choice
from pixelrelay.pipeline.stages.decoders.learned import LearnedDecoder, TileConfig

if TYPE_CHECKING:
    import torch

    from pixelrelay.pipeline.settings import Settings

log = logging.getLogger("pixelrelay.decoder.hf_sr")

DEFAULT_MODEL = "caidas/swin2SR-classical-sr-x2-64"
KNOWN_MODELS = (
    "caidas/swin2SR-classical-sr-x2-64",
    "caidas/swin2SR-classical-sr-x4-64",
    "caidas/swin2SR-realworld-sr-x4-64-bsrgan-psnr",
    "caidas/swin2SR-compressed-sr-x4-48",
)


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


class HFSuperResolutionDecoder(LearnedDecoder):
    kind = "hf-sr"
    default_model = DEFAULT_MODEL
    tile_settings = "sr"

    def __init__(
        self,
        model: str | None = None,
        device: str = "cpu",
        settings: Settings | None = None,
        tiles: TileConfig | None = None,
        dtype: Any = None,
    ) -> None:
        """Tile settings: ``tiles``, else PIXELRELAY_SR_TILE / _OVERLAP / _TILE_BATCH / _MIN_TILE
        from ``settings``."""
        super().__init__(model=model, device=device, settings=settings, tiles=tiles, dtype=dtype)
        from transformers import AutoImageProcessor, AutoModelForImageToImage

        self.models: list[_Loaded] = []
        for model_id in self.models_for(model):
            path = hf.load_path(model_id, "decoder", self.kind)
            net = hf.load_pretrained(AutoModelForImageToImage, path, model_id, "decoder", dtype=self.dtype)
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
    def models_for(cls, model: str | None) -> list[str]:
        """MODEL is one checkpoint or a comma-separated list; every one is loaded."""
        return split_models(model)

    @classmethod
    def check_available(cls, model: str | None) -> None:
        for model_id in split_models(model):
            hf.require_model(model_id, "decoder", cls.kind)

    # -- model choice

    def native_scales(self) -> tuple[int, ...]:
        return tuple(sorted({m.upscale for m in self.models}))

    def choose(self, plan: Plan) -> _Loaded:
        return choice.pick(
            self.models, plan, name=lambda m: m.model_id, scale=lambda m: m.upscale, variant=lambda m: m.variant
        )

    # -- LearnedDecoder hooks

    def model_name(self, m: _Loaded) -> str:
        return m.model_id

    def native_scale(self, m: _Loaded, plan: Plan) -> int:
        return m.upscale

    def window(self, m: _Loaded, scale: int) -> int:
        return m.window

    def pixel_bytes(self, m: _Loaded, scale: int) -> float:
        """Swin2SR per input pixel: about 16 maps of ``embed_dim`` (residuals, qkv, MLP),
        the attention scores and their softmax (heads x window^2 each) and the 64-channel
        pixel-shuffle upsampler. Peak RSS measured on CPU (fp32, embed 180, 6 heads, window
        8, 128-192 px): 15-22 KB at x2, 15-16 KB at x4; this gives 18 and 24 KB."""
        config = m.net.config
        heads = max(getattr(config, "num_heads", None) or [6])
        d, w = int(getattr(config, "embed_dim", 180)), m.window
        return self.itemsize * (16 * d + 3 * heads * w * w + 64 * (1 + 2 * scale * scale))

    def notes(self, m: _Loaded, plan: Plan) -> list[str]:
        return [f"hf-sr: {m.model_id} (x{m.upscale}, {m.variant})"]

    def forward(self, m: _Loaded, x: torch.Tensor, plans: Sequence[Plan], items: Sequence[int]) -> torch.Tensor:
        pixels = x * (m.rescale * 255.0) if m.rescale != 1.0 / 255.0 else x  # the processor's rescale
        out = m.net(pixel_values=pixels.to(self.torch_device, self.dtype)).reconstruction
        h, w = x.shape[-2:]
        return out[:, :, : h * m.upscale, : w * m.upscale]
