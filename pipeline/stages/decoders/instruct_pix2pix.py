"""InstructPix2Pix decoder (``instruct-pix2pix[:MODEL]``, the ``diffusers`` extra).

The plan maps so: prompt -> the instruction; ``strength`` s -> ``image_guidance_scale =
2 - s`` (0.5 gives diffusers' default 1.5); guidance -> ``guidance_scale``; every step runs. A
restoration request becomes an instruction from its operations. The rest is
``GenerativeDecoder``'s.
"""

from __future__ import annotations

from typing import Any

from pixelrelay.pipeline.messages import Plan
from pixelrelay.pipeline.stages.decoders.generative import GenerativeDecoder, Request

DEFAULT_MODEL = "timbrooks/instruct-pix2pix"
INSTRUCTIONS = {
    "deblock": "remove the jpeg artifacts",
    "denoise": "remove the noise",
    "deblur": "make it sharp and in focus",
    "sharpen": "make it sharper",
}


def image_guidance(strength: float) -> float:
    """The plan's strength (how far to move) -> InstructPix2Pix's image guidance scale."""
    return round(2.0 - strength, 4)


class InstructPix2PixDecoder(GenerativeDecoder):
    kind = "instruct-pix2pix"
    default_model = DEFAULT_MODEL
    install_hint = "the instruct-pix2pix decoder needs diffusers: pip install 'pixelrelay[diffusers]'"

    def load_pipeline(self, path: str, **kwargs: Any) -> Any:
        from diffusers import StableDiffusionInstructPix2PixPipeline

        return StableDiffusionInstructPix2PixPipeline.from_pretrained(path, local_files_only=True, **kwargs)

    def call_kwargs(self, request: Request) -> dict[str, Any]:
        return dict(
            image_guidance_scale=image_guidance(request.strength),
            guidance_scale=request.guidance,
            num_inference_steps=request.steps,
        )

    def describe_request(self, request: Request) -> str:
        return (
            f"image guidance {image_guidance(request.strength):g} (strength {request.strength:g}), "
            f"guidance {request.guidance:g}, {request.steps} steps, seed {request.seed}"
        )

    def restoration_prompt(self, plan: Plan) -> str:
        ops = sorted(plan.operations, key=lambda op: -op.strength)
        return " and ".join(dict.fromkeys(INSTRUCTIONS[op.name] for op in ops if op.strength > 0))
