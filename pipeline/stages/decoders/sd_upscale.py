"""Stable Diffusion x4 upscaler decoder (``sd-upscale:MODEL``), an optional extra.

Needs diffusers: ``pip install 'pixelrelay[diffusers]'``. MODEL defaults to
stabilityai/stable-diffusion-x4-upscaler (a hub id or a local ``save_pretrained`` folder).

The plan drives it: ``plan.prompt`` / ``plan.negative_prompt`` guide the diffusion (the
caption-based rules prompt when the plan has none), and the plan's noise estimate raises the
pipeline's ``noise_level`` (how much it is allowed to re-imagine). The model is natively
x4: a x2 plan is downscaled with antialiasing, a x1 plan back to the input size.

Like every learned decoder: tiled inference (tiles are multiples of 8, feathered blending
hides the seams between independently diffused tiles), fp16/bf16 on GPU, attention slicing
and VAE tiling on by default, alpha upscaled separately and re-attached, and the OOM policy
of ``pipeline.tiling`` (halve the tile batch, then the tile; fail the item only when a
single ``min_tile`` tile does not fit). The diffusion noise of each tile is seeded from the
tile's own pixels, so results do not depend on batching or on neighbouring items.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any, Sequence

import numpy as np

from pixelrelay.pipeline import hf
from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.messages import Plan
from pixelrelay.pipeline.settings import Settings
from pixelrelay.pipeline.stages.base import Decoder, ModelUnavailableError, RestoredImage

log = logging.getLogger("pixelrelay.decoder.sd_upscale")

DEFAULT_MODEL = "stabilityai/stable-diffusion-x4-upscaler"
NATIVE_SCALE = 4
ALIGN = 8
BASE_NOISE_LEVEL = 20
MAX_NOISE_LEVEL = 100
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


class SDUpscaleDecoder(Decoder):
    kind = "sd-upscale"

    def __init__(
        self,
        model: str | None = None,
        device: str = "cpu",
        tile: int | None = None,
        overlap: int | None = None,
        tile_batch: int | None = None,
        min_tile: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        dtype: Any = None,
        attention_slicing: bool = True,
        vae_tiling: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(model=model, device=device)
        settings = Settings.from_env()  # defaults: PIXELRELAY_SD_TILE, _OVERLAP, _STEPS, ...
        tile = settings.sd_tile if tile is None else tile
        overlap = settings.sd_overlap if overlap is None else overlap
        tile_batch = settings.sd_tile_batch if tile_batch is None else tile_batch
        min_tile = settings.sd_min_tile if min_tile is None else min_tile
        steps = settings.sd_steps if steps is None else steps
        guidance_scale = settings.sd_guidance if guidance_scale is None else guidance_scale
        if not diffusers_available():
            raise ModelUnavailableError(INSTALL_HINT)
        import torch
        from diffusers import StableDiffusionUpscalePipeline

        self.model_id = model or DEFAULT_MODEL
        path = hf.load_path(self.model_id, "decoder", self.kind)
        self.tile, self.overlap, self.tile_batch, self.min_tile = tile, overlap, tile_batch, min_tile
        self.steps, self.guidance_scale, self.seed = steps, guidance_scale, seed
        self.dtype = dtype or hf.choose_dtype(device)
        self.torch_device = torch.device(device)
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

    @classmethod
    def check_available(cls, model: str | None) -> None:
        if not diffusers_available():
            raise ModelUnavailableError(INSTALL_HINT)
        hf.require_model(model or DEFAULT_MODEL, "decoder", cls.kind)

    # -- inference

    def noise_level(self, plan: Plan) -> int:
        level = BASE_NOISE_LEVEL + 2.0 * plan.noise_sigma + 40.0 * plan.strength("denoise")
        return int(min(MAX_NOISE_LEVEL, self.max_noise_level, round(level)))

    def _tile_seed(self, tile: Any) -> int:
        import torch

        data = (tile.clamp(0, 1) * 255).round().to("cpu", dtype=torch.uint8).numpy().tobytes()
        return zlib.crc32(data, self.seed) & 0x7FFFFFFF

    def _forward(self, prompt: str, negative: str, noise_level: int):
        import torch

        def fn(x: torch.Tensor) -> torch.Tensor:
            generators = [torch.Generator(device="cpu").manual_seed(self._tile_seed(t)) for t in x]
            # Noise is drawn on the CPU from per-tile generators, then moved: same noise on
            # every device and for every batch composition.
            latents = self._latents(x, generators)
            with torch.inference_mode():
                out = self.pipe(
                    prompt=[prompt] * x.shape[0],
                    negative_prompt=[negative] * x.shape[0],
                    image=x.to(self.torch_device, self.dtype),
                    num_inference_steps=self.steps,
                    guidance_scale=self.guidance_scale,
                    noise_level=noise_level,
                    generator=generators,
                    latents=latents,
                    output_type="pt",
                ).images
            return out.float().to(x.device)

        return fn

    def _latents(self, x: Any, generators: Sequence[Any]) -> Any:
        import torch

        channels = self.pipe.vae.config.latent_channels
        h, w = x.shape[-2:]
        noise = torch.stack([torch.randn((channels, h, w), generator=g) for g in generators])
        return noise.to(self.torch_device, self.dtype)

    @staticmethod
    def _resize(x: Any, size: tuple[int, int]) -> Any:
        import torch.nn.functional as F

        if tuple(x.shape[-2:]) == size:
            return x
        return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=size[0] < x.shape[-2])

    def upscale_tensor(self, x: Any, plan: Plan, **overrides: Any) -> tuple[Any, Any]:
        from pixelrelay.pipeline.tiling import run_tiled_with_fallback

        prompt = plan.prompt.strip() or FALLBACK_PROMPT
        negative = plan.negative_prompt.strip() or FALLBACK_NEGATIVE
        return run_tiled_with_fallback(
            self._forward(prompt, negative, self.noise_level(plan)),
            x,
            NATIVE_SCALE,
            overrides.get("tile", self.tile),
            overrides.get("overlap", self.overlap),
            batch_size=overrides.get("tile_batch", self.tile_batch),
            min_tile=overrides.get("min_tile", self.min_tile),
            align=ALIGN,
            device="cpu",  # the pipeline moves each tile batch to the GPU itself
            what=f"{self.model_id} tile",
        )

    def restore(self, images: Sequence[DecodedImage], plans: Sequence[Plan]) -> list[RestoredImage]:
        import torch

        if len(images) != len(plans):
            raise ValueError(f"{len(images)} images but {len(plans)} plans")
        results: list[RestoredImage | None] = [None] * len(images)
        groups: dict[tuple, list[int]] = {}
        for i, (image, plan) in enumerate(zip(images, plans)):
            key = (image.height, image.width, plan.prompt, plan.negative_prompt, self.noise_level(plan))
            groups.setdefault(key, []).append(i)
        for idx in groups.values():
            x = torch.stack(
                [torch.from_numpy(np.ascontiguousarray(images[i].rgb)).permute(2, 0, 1) for i in idx]
            ).float() / 255.0
            out, settings = self.upscale_tensor(x, plans[idx[0]])
            for k, i in enumerate(idx):
                results[i] = self._finish(images[i], plans[i], out[k : k + 1], settings)
        return [r for r in results if r is not None]

    def _finish(self, image: DecodedImage, plan: Plan, y: Any, settings: Any) -> RestoredImage:
        import torch
        from PIL import Image

        target = (image.height * plan.scale, image.width * plan.scale)
        notes = [f"sd-upscale: {self.model_id}, {self.steps} steps, noise level {self.noise_level(plan)}"]
        if plan.scale != NATIVE_SCALE:
            notes.append(f"sd-upscale: model x{NATIVE_SCALE} -> plan x{plan.scale}, downscaled (antialiased)")
        if settings.oom_retries:
            notes.append(f"sd-upscale: out of memory, finished with {settings.describe()}")
        y = self._resize(y, target)
        rgb = (y[0].clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
        alpha = None
        if image.alpha is not None:
            if image.alpha.min() == image.alpha.max():
                alpha = np.full(target, image.alpha.flat[0], dtype=np.uint8)
            else:
                img = Image.fromarray(np.ascontiguousarray(image.alpha, dtype=np.uint8))
                alpha = np.asarray(img.resize((target[1], target[0]), Image.Resampling.LANCZOS)).copy()
        return RestoredImage(rgb=np.ascontiguousarray(rgb), alpha=alpha, notes=tuple(notes))
