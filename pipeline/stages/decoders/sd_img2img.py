"""Stable Diffusion img2img decoder (``sd-img2img[:MODEL]``, the ``diffusers`` extra).

Loads any SD 1.x/2.x repo or folder through ``AutoPipelineForImage2Image``. The plan's
prompt, negative prompt, strength, guidance, steps (raised so that ``strength x steps`` is at
least one) and seed map one to one; the rest is ``GenerativeDecoder``'s.
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
