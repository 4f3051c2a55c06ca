"""The base of the generative decoders (``sd-img2img``, ``instruct-pix2pix``): diffusers
pipelines that edit an image as the plan's generative edit says.

``request`` decides what runs: the plan's generative edit; else, for restoration operations,
a gentle SDEdit pass (strength 0.15 + 0.25 x the strongest operation, at most 0.4); else
nothing (the image is resized, with a note). Images are edited whole (no tiles) at the
model's native pixel count (``working_size``), and the edit's change is added to the
full-resolution source as a low-frequency delta:

    out = resize(source) + resize(edit - resize(source, working size))

Out of memory halves the batch, then the working size. Each item's noise comes from its own
CPU ``torch.Generator`` (the plan's seed), so a batch equals its singles. An output the
safety checker flags fails its item.
"""

from __future__ import annotations

import logging
import math
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from pixelrelay.pipeline import hf
from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.messages import Plan
from pixelrelay.pipeline.stages.base import Decoder, ModelUnavailableError, RestoredImage, check_batch, filled
from pixelrelay.pipeline.stages.decoders.sd_upscale import FALLBACK_NEGATIVE, _dtype_kwarg, diffusers_available

if TYPE_CHECKING:
    import torch

    from pixelrelay.pipeline.settings import Settings

log = logging.getLogger("pixelrelay.decoder.generative")

ALIGN = 8  # working sides are multiples of this (SD's VAE downsamples by 8)
MAX_SIDE_FACTOR = 2  # a working side is at most this x the native side (very long images)
RESTORE_BASE, RESTORE_SPAN = 0.15, 0.25  # restoration strength: base + span x strongest operation
COMPOSITION = "lowfreq-delta-v1"  # names the full-resolution rule in the identity
# Restoration operations -> negative prompt terms (and instructions, for InstructPix2Pix).
RESTORATION_NEGATIVES = {
    "deblock": "jpeg artifacts, blocky",
    "denoise": "noise, grain",
    "deblur": "blur, out of focus",
    "sharpen": "soft, blurry",
}


class SafetyCheckerError(RuntimeError):
    """The model's safety checker flagged an output: nothing is written for that item."""


@dataclass(frozen=True)
class Request:
    """One item's generation: what the pipeline is called with (``what``: "edit" or
    "restoration"). Items share a pipeline call when everything but the seed is equal."""

    what: str
    prompt: str
    negative: str
    strength: float
    guidance: float
    steps: int
    seed: int

    def key(self) -> tuple:
        return (self.what, self.prompt, self.negative, self.strength, self.guidance, self.steps)


def _join(*parts: str) -> str:
    return ", ".join(p.strip() for p in parts if p and p.strip())


def working_size(height: int, width: int, side: int) -> tuple[int, int]:
    """(h, w) with about ``side``^2 pixels, the aspect of ``height`` x ``width``, each a
    multiple of ``ALIGN`` in [ALIGN, MAX_SIDE_FACTOR x side]."""
    factor = side / math.sqrt(max(1, height * width))
    limit = max(ALIGN, MAX_SIDE_FACTOR * side // ALIGN * ALIGN)

    def snap(n: float) -> int:
        return int(min(limit, max(ALIGN, round(n / ALIGN) * ALIGN)))

    return snap(height * factor), snap(width * factor)


class GenerativeDecoder(Decoder):
    """A diffusers image-to-image pipeline driven by the plan; see the module docstring."""

    generative = True  # runs Plan.edit.generative (decoders.edits routes such plans here)
    extra = "diffusers"
    install_hint: ClassVar[str]
    default_model: ClassVar[str]  # each pipeline names the hub model it loads by default

    def __init__(
        self,
        model: str | None = None,
        device: str = "cpu",
        settings: Settings | None = None,
        dtype: Any = None,
        attention_slicing: bool = True,
        vae_tiling: bool = True,
    ) -> None:
        """Load the pipeline (from a local folder or the Hugging Face cache only).

        Args:
            model: a hub id or a local folder; None: the class's ``default_model``.
            device: a torch device string.
            settings: ``PIXELRELAY_SD_TILE_BATCH`` (items per call), ``_SD_MIN_TILE`` (the smallest
                working side on out-of-memory, at least native / 4), ``_SD_STEPS`` / ``_SD_GUIDANCE``
                (restoration), ``PIXELRELAY_DTYPE`` (auto: fp16 on CUDA).
            dtype: overrides the settings' dtype.
            attention_slicing: slice attention (less memory).
            vae_tiling: decode the VAE in tiles (less memory).

        Raises:
            ModelUnavailableError: diffusers is not installed, or the model is not present.
        """
        if not diffusers_available():
            raise ModelUnavailableError(self.install_hint)
        super().__init__(model=model, device=device, settings=settings)
        import torch

        self.model_id = model or self.default_model
        self.torch_device = torch.device(device)
        prefer = "fp16" if self.settings.dtype == "auto" else self.settings.dtype
        self.dtype = dtype or hf.choose_dtype(device, prefer)
        path = hf.load_path(self.model_id, "decoder", self.kind)
        pipe = self.load_pipeline(path, **{_dtype_kwarg(): self.dtype})
        pipe = pipe.to(self.torch_device)
        pipe.set_progress_bar_config(disable=True)
        if attention_slicing:
            pipe.enable_attention_slicing()
        if vae_tiling and hasattr(pipe.vae, "enable_tiling"):
            pipe.vae.enable_tiling()
        self.pipe = pipe
        self.native = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        self.batch = self.settings.sd_tile_batch
        self.min_side = max(self.settings.sd_min_tile, self.native // 4)

    # -- what a subclass supplies

    @abstractmethod
    def load_pipeline(self, path: str, **kwargs: Any) -> Any:
        """The diffusers pipeline from a local folder (``local_files_only``)."""

    @abstractmethod
    def call_kwargs(self, request: Request) -> dict[str, Any]:
        """The pipeline arguments that differ between the decoders (strength, steps...)."""

    @abstractmethod
    def restoration_prompt(self, plan: Plan) -> str:
        """The positive prompt of a restoration request."""

    def describe_request(self, request: Request) -> str:
        return (
            f"strength {request.strength:g}, guidance {request.guidance:g}, {request.steps} steps, seed {request.seed}"
        )

    # -- models

    @classmethod
    def check_available(cls, model: str | None) -> None:
        if not diffusers_available():
            raise ModelUnavailableError(cls.install_hint)
        hf.require_model(model or cls.default_model, "decoder", cls.kind)

    @classmethod
    def pull_model(cls, model: str) -> str:
        """Fetch the pipeline's folders into the hub cache (``pixelrelay.pipeline.hf.pull_diffusers``)."""
        return hf.pull_diffusers(model, cls.kind)

    def compute_identity(self) -> str:
        s = self.settings
        return (
            f"{super().compute_identity()};native={self.native};{COMPOSITION};"
            f"restore=steps{s.sd_steps},guidance{s.sd_guidance}"
        )

    # -- what runs for a plan

    def request(self, plan: Plan) -> Request | None:
        """The generation ``plan`` asks for, or None (pass through); see the module docstring."""
        terms = _join(*(RESTORATION_NEGATIVES[op.name] for op in plan.operations if op.strength > 0))
        gen = plan.edit.generative if plan.edit is not None else None
        if gen is not None:
            return Request(
                "edit", gen.prompt, _join(gen.negative_prompt, terms), gen.strength, gen.guidance, gen.steps, gen.seed
            )
        strongest = max((op.strength for op in plan.operations), default=0.0)
        if strongest <= 0:
            return None
        strength = round(RESTORE_BASE + RESTORE_SPAN * strongest, 3)
        negative = _join(plan.negative_prompt or FALLBACK_NEGATIVE, terms)
        return Request(
            "restoration",
            self.restoration_prompt(plan),
            negative,
            strength,
            self.settings.sd_guidance,
            self.settings.sd_steps,
            0,
        )

    def native_scales(self) -> tuple[int, ...]:
        return (1,)  # it edits, it does not upscale: any other output size is a resample (pipeline.outsize)

    def restore(self, images: Sequence[DecodedImage], plans: Sequence[Plan]) -> list[RestoredImage]:
        check_batch(images, plans)
        results: list[RestoredImage | None] = [None] * len(images)
        groups: dict[tuple, list[int]] = {}
        requests: dict[int, Request] = {}
        for i, (image, plan) in enumerate(zip(images, plans, strict=True)):
            req = self.request(plan)
            if req is None:
                results[i] = self._pass_through(image, plan)
                continue
            requests[i] = req
            groups.setdefault((image.height, image.width, req.key()), []).append(i)
        for idx in groups.values():
            outs = self._edit_group([images[i] for i in idx], [plans[i] for i in idx], [requests[i] for i in idx])
            for i, out in zip(idx, outs, strict=True):
                results[i] = out
        return filled(results)

    # -- the shared machinery

    def _edit_group(
        self, images: Sequence[DecodedImage], plans: Sequence[Plan], requests: Sequence[Request]
    ) -> list[RestoredImage]:
        """Same-size images with one request key: edit at the working size (OOM policy),
        then bring each edit back to full resolution."""
        import torch

        from pixelrelay.pipeline import tensors
        from pixelrelay.pipeline.tiling import with_oom_fallback

        x = _stack(images)
        height, width = x.shape[-2:]

        def run(batch: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
            # clamped: bicubic overshoots, and diffusers reads a tensor below 0 as [-1, 1]
            small = tensors.resize(x, working_size(height, width, side)).clamp(0, 1)
            edits = [self._call(small[k : k + batch], requests[k : k + batch]) for k in range(0, len(images), batch)]
            return torch.cat(edits), small

        with torch.inference_mode():
            (edit, small), batch, side, retries = with_oom_fallback(
                run,
                batch_size=min(self.batch, len(images)),
                tile=self.native,
                min_tile=self.min_side,
                align=ALIGN,
                what=f"{self.kind} {self.model_id} edit",
            )
        oom = [f"{self.kind}: out of memory, finished with batch {batch}, working side {side}px"] if retries else []
        where = f"at {small.shape[-1]}x{small.shape[-2]} (native {self.native}x{self.native})"
        return [
            self._finish(
                image,
                plan,
                x[k : k + 1],
                small[k : k + 1],
                edit[k : k + 1],
                request,
                [f"{self.kind}: {self.model_id}, {request.what} {where}, {self.describe_request(request)}", *oom],
            )
            for k, (image, plan, request) in enumerate(zip(images, plans, requests, strict=True))
        ]

    def _call(self, x: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """One pipeline call: (B,3,h,w) float [0,1] CPU -> (B,3,h,w) float32 [0,1] CPU."""
        import torch

        req = requests[0]
        out = self.pipe(
            prompt=[req.prompt] * x.shape[0],
            negative_prompt=[req.negative] * x.shape[0] if req.negative else None,
            image=x.to(self.torch_device, self.dtype),
            generator=[torch.Generator(device="cpu").manual_seed(r.seed) for r in requests],
            output_type="pt",
            **self.call_kwargs(req),
        )
        flagged = getattr(out, "nsfw_content_detected", None) or []
        if any(flagged):
            raise SafetyCheckerError(
                f"{sum(map(bool, flagged))} of {len(flagged)} outputs flagged by the model's safety checker; "
                "nothing is written for a flagged item"
            )
        return out.images.to("cpu", torch.float32).clamp(0, 1)

    def _finish(
        self,
        image: DecodedImage,
        plan: Plan,
        source: torch.Tensor,
        small: torch.Tensor,
        edit: torch.Tensor,
        request: Request,
        notes: list[str],
    ) -> RestoredImage:
        from pixelrelay.pipeline import tensors

        size = (image.height * plan.scale, image.width * plan.scale)
        out = tensors.resize(source, size) + tensors.resize(edit - small, size)
        if request.what == "edit" and plan.operations:
            notes.append(f"{self.kind}: restoration operations folded into the negative prompt: {request.negative}")
        if plan.scale > 1:
            notes.append(f"{self.kind}: x{plan.scale} by bicubic resampling (the model edits, it does not upscale)")
        alpha = None if image.alpha is None else tensors.resize_alpha(image.alpha, plan.scale)
        return RestoredImage(rgb=tensors.to_uint8(out), alpha=alpha, notes=tuple(notes))

    def _pass_through(self, image: DecodedImage, plan: Plan) -> RestoredImage:
        from pixelrelay.pipeline import tensors

        note = f"{self.kind}: no generative edit and no restoration in the plan: the image passes through"
        if plan.scale > 1:
            note += f" (x{plan.scale} bicubic)"
        size = (image.height * plan.scale, image.width * plan.scale)
        rgb = tensors.to_uint8(tensors.resize(_stack([image]), size))
        alpha = None if image.alpha is None else tensors.resize_alpha(image.alpha, plan.scale)
        return RestoredImage(rgb=rgb, alpha=alpha, notes=(note,))


def _stack(images: Sequence[DecodedImage]) -> torch.Tensor:
    """Same-size images -> (B,3,H,W) float32 in [0,1] on the CPU."""
    import torch

    rgb = np.stack([np.asarray(im.rgb, dtype=np.uint8) for im in images])
    return torch.from_numpy(rgb).permute(0, 3, 1, 2).float().div_(255.0)
