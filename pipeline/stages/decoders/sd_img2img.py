"""Stable Diffusion img2img decoder (``sd-img2img[:MODEL]``), an optional extra.

Needs diffusers: ``pip install 'pixelrelay[diffusers]'``. MODEL defaults to
stable-diffusion-v1-5/stable-diffusion-v1-5 (a hub id or a local ``save_pretrained`` folder
of a text-to-image or img2img pipeline; diffusers' ``AutoPipelineForImage2Image`` builds the
img2img pipeline from it, so SD 1.x and 2.x repos load as they are).

The plan's fields map one to one: prompt, negative prompt, ``strength`` (how far the result
may move from the source: the share of the noise schedule that is re-run), guidance
(classifier-free guidance scale), steps (the schedule's length; img2img runs
``strength x steps`` of them, so steps are raised where that would be under one) and seed.
Everything else (what runs for which plan, the native size and the way back to full
resolution, out-of-memory, seeds, safety checker) is ``GenerativeDecoder``'s.
"""

from __future__ import annotations

from typing import Any

from pixelrelay.pipeline.messages import Plan
from pixelrelay.pipeline.stages.decoders.generative import GenerativeDecoder, Request
from pixelrelay.pipeline.stages.decoders.sd_upscale import FALLBACK_PROMPT

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def img2img_steps(steps: int, strength: float) -> int:
    """The schedule length that runs at least one denoising step: diffusers runs
    ``int(steps * strength)`` of them and refuses zero."""
    while int(steps * strength) < 1:
        steps += 1
    return steps


class SDImg2ImgDecoder(GenerativeDecoder):
    kind = "sd-img2img"
    default_model = DEFAULT_MODEL
    install_hint = "the sd-img2img decoder needs diffusers: pip install 'pixelrelay[diffusers]'"

    def load_pipeline(self, path: str, **kwargs: Any) -> Any:
        from diffusers import AutoPipelineForImage2Image

        return AutoPipelineForImage2Image.from_pretrained(path, local_files_only=True, **kwargs)

    def call_kwargs(self, request: Request) -> dict[str, Any]:
        return dict(
            strength=request.strength,
            guidance_scale=request.guidance,
            num_inference_steps=img2img_steps(request.steps, request.strength),
        )

    def restoration_prompt(self, plan: Plan) -> str:
        return plan.prompt.strip() or FALLBACK_PROMPT
