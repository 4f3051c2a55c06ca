"""Stable Diffusion x4 upscaler decoder (``sd-upscale:MODEL``, the ``diffusers`` extra).

The plan's prompts guide it and its noise estimate raises ``noise_level``. Natively x4.
Tiles are capped at 128 px (``PIXELRELAY_SD_TILE``, the model's training crop); items share
a call only with the same prompts and noise level; each tile's noise is seeded from its own
pixels, so results do not depend on batching.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pixelrelay.pipeline import hf
from pixelrelay.pipeline.messages import Plan
from pixelrelay.pipeline.stages.base import ModelUnavailableError
from pixelrelay.pipeline.stages.decoders.learned import LearnedDecoder, TileConfig

if TYPE_CHECKING:
    import torch

    from pixelrelay.pipeline.settings import Settings

log = logging.getLogger("pixelrelay.decoder.sd_upscale")

DEFAULT_MODEL = "stabilityai/stable-diffusion-x4-upscaler"
NATIVE_SCALE = 4
ALIGN = 8
BASE_NOISE_LEVEL = 20
MAX_NOISE_LEVEL = 100
SD_PIXEL_ELEMENTS = 12_000  # memory per input pixel, in elements of the model's dtype
FALLBACK_PROMPT = "a clean, sharp, high-resolution photo, natural detail, realistic texture"
FALLBACK_NEGATIVE = "blur, noise, jpeg artifacts, oversharpened, halos, painting, cartoon, lowres"
INSTALL_HINT = "the sd-upscale decoder needs diffusers: pip install 'pixelrelay[diffusers]'"


def diffusers_available() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


def _dtype_kwarg() -> str:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (the old name warns from 0.36 on)."""
    import diffusers

    try:
        major, minor = (int(p) for p in diffusers.__version__.split(".")[:2])
    except ValueError:
        return "dtype"
    return "dtype" if (major, minor) >= (0, 36) else "torch_dtype"


class SDUpscaleDecoder(LearnedDecoder):
    kind = "sd-upscale"
    default_model = DEFAULT_MODEL
    extra = "diffusers"
    tile_settings = "sd"

    @classmethod
    def pull_model(cls, model: str) -> str:
        """Fetch the pipeline's folders (``pixelrelay.pipeline.hf.pull_diffusers``), not the whole repository: the
        x4 upscaler's repo also holds fp16 copies and a single-file checkpoint."""
        return hf.pull_diffusers(model, cls.kind)

    def __init__(
        self,
        model: str | None = None,
        device: str = "cpu",
        settings: Settings | None = None,
        tiles: TileConfig | None = None,
        dtype: Any = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        attention_slicing: bool = True,
        vae_tiling: bool = True,
        seed: int = 0,
    ) -> None:
        """Load the pipeline (from a local folder or the Hugging Face cache only).

        Args:
            model: a hub id or a local folder; None: ``DEFAULT_MODEL``.
            device: a torch device string.
            settings: defaults for the rest (``PIXELRELAY_SD_*``).
            tiles: tiling; None: ``PIXELRELAY_SD_TILE`` / ``_OVERLAP`` / ``_TILE_BATCH`` / ``_MIN_TILE``.
            dtype: None: ``LearnedDecoder``'s choice.
            steps: diffusion steps; None: ``PIXELRELAY_SD_STEPS``.
            guidance_scale: None: ``PIXELRELAY_SD_GUIDANCE``.
            attention_slicing: slice attention (less memory).
            vae_tiling: decode the VAE in tiles (less memory).
            seed: mixed into each tile's seed, which is derived from its pixels.

        Raises:
            ModelUnavailableError: diffusers is not installed, or the model is not present.
        """
        if not diffusers_available():
            raise ModelUnavailableError(INSTALL_HINT)
        super().__init__(model=model, device=device, settings=settings, tiles=tiles, dtype=dtype)
        from diffusers import StableDiffusionUpscalePipeline

        self.model_id = model or DEFAULT_MODEL
        path = hf.load_path(self.model_id, "decoder", self.kind)
        self.steps = self.settings.sd_steps if steps is None else steps
        self.guidance_scale = self.settings.sd_guidance if guidance_scale is None else guidance_scale
        self.seed = seed
        pipe = StableDiffusionUpscalePipeline.from_pretrained(
            path, local_files_only=True, **{_dtype_kwarg(): self.dtype}
        )
        pipe = pipe.to(self.torch_device)
        pipe.set_progress_bar_config(disable=True)
        if attention_slicing:
            pipe.enable_attention_slicing()
        if vae_tiling:
            vae = pipe.vae
            if hasattr(vae, "enable_tiling"):
                vae.enable_tiling()
        self.pipe = pipe
        self.max_noise_level = int(getattr(pipe.config, "max_noise_level", 350) or 350)

    def compute_identity(self) -> str:
        # Sampling steps and guidance change every output as much as the weights do.
        return f"{super().compute_identity()};steps={self.steps};guidance={self.guidance_scale}"

    @classmethod
    def check_available(cls, model: str | None) -> None:
        if not diffusers_available():
            raise ModelUnavailableError(INSTALL_HINT)
        hf.require_model(model or DEFAULT_MODEL, "decoder", cls.kind)

    def noise_level(self, plan: Plan) -> int:
        level = BASE_NOISE_LEVEL + 2.0 * plan.noise_sigma + 40.0 * plan.strength("denoise")
        return int(min(MAX_NOISE_LEVEL, self.max_noise_level, round(level)))

    # -- LearnedDecoder hooks

    def native_scales(self) -> tuple[int, ...]:
        return (NATIVE_SCALE,)

    def choose(self, plan: Plan) -> str:
        return self.model_id  # one pipeline

    def model_name(self, m: str) -> str:
        return m

    def native_scale(self, m: str, plan: Plan) -> int:
        return NATIVE_SCALE

    def window(self, m: str, scale: int) -> int:
        return ALIGN

    def pixel_bytes(self, m: str, scale: int) -> float:
        """A rough 12,000 elements per input pixel (the UNet's skips and working maps, twice
        for classifier-free guidance, and the tiled VAE decoder at 4x); on CUDA the measured
        cost of the first big call corrects it upwards."""
        return self.itemsize * SD_PIXEL_ELEMENTS

    def batch_key(self, plan: Plan) -> tuple:
        """One pipeline call takes one prompt pair and one noise level."""
        return self._prompts(plan) + (self.noise_level(plan),)

    def notes(self, m: str, plan: Plan) -> list[str]:
        return [f"sd-upscale: {self.model_id}, {self.steps} steps, noise level {self.noise_level(plan)}"]

    @staticmethod
    def _prompts(plan: Plan) -> tuple[str, str]:
        return plan.prompt.strip() or FALLBACK_PROMPT, plan.negative_prompt.strip() or FALLBACK_NEGATIVE

    def forward(self, m: str, x: torch.Tensor, plans: Sequence[Plan], items: Sequence[int]) -> torch.Tensor:
        import torch

        prompt, negative = self._prompts(plans[items[0]])
        # Noise is drawn on the CPU from per-tile generators seeded by the tile's pixels, then
        # moved: same noise on every device and for every batch composition.
        generators = [torch.Generator(device="cpu").manual_seed(self._tile_seed(t)) for t in x]
        return self.pipe(
            prompt=[prompt] * x.shape[0],
            negative_prompt=[negative] * x.shape[0],
            image=x.to(self.torch_device, self.dtype),
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            noise_level=self.noise_level(plans[items[0]]),
            generator=generators,
            latents=self._latents(x, generators),
            output_type="pt",
        ).images

    def _tile_seed(self, tile: torch.Tensor) -> int:
        import torch

        data = (tile.clamp(0, 1) * 255).round().to("cpu", dtype=torch.uint8).numpy().tobytes()
        return zlib.crc32(data, self.seed) & 0x7FFFFFFF

    def _latents(self, x: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        import torch

        channels = self.pipe.vae.config.latent_channels
        h, w = x.shape[-2:]
        noise = torch.stack([torch.randn((channels, h, w), generator=g) for g in generators])
        return noise.to(self.torch_device, self.dtype)
