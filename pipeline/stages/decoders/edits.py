"""How edit plans (``Plan.edit``, tasks edit and style) reach a decoder: the one routing policy.

``restore_with_edits`` is what the decode stage calls instead of ``decoder.restore``: one
``RestoredImage`` or exception per item. A plan without an edit reaches the decoder
unchanged (through ``pixelrelay.pipeline.outsize.restore``). Grading runs inside a decoder
that sets ``grades``, else on its output (``pixelrelay.pipeline.grading``). A generative
edit on a decoder without ``generative`` fails with ``EditUnsupportedError`` before any model
runs: an edit is never dropped quietly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from pixelrelay.pipeline import outsize
from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.messages import Plan
from pixelrelay.pipeline.stages.base import Decoder, RestoredImage, check_batch, filled


class EditUnsupportedError(ValueError):
    """A plan asks for an edit this decoder cannot make."""


def restore_with_edits(
    decoder: Decoder, images: Sequence[DecodedImage], plans: Sequence[Plan]
) -> list[RestoredImage | Exception]:
    check_batch(images, plans)
    results: list[RestoredImage | Exception | None] = [None] * len(images)
    todo: list[int] = []
    for i, plan in enumerate(plans):
        if plan.edit is not None and plan.edit.generative is not None and not decoder.generative:
            results[i] = EditUnsupportedError(
                f"the plan asks for a generative edit, which decoder {decoder.spec} cannot make: "
                "run it with a generative decoder (sd-img2img, instruct-pix2pix), or ask for grading only"
            )
        else:
            todo.append(i)
    if todo:
        restored = outsize.restore(decoder, [images[i] for i in todo], [plans[i] for i in todo])
        if not decoder.grades:
            restored = _grade_outputs(decoder, restored, [plans[i] for i in todo])
        for i, result in zip(todo, restored, strict=True):
            results[i] = _noted(result, plans[i])
    return filled(results)


def _grade_outputs(decoder: Decoder, restored: list[RestoredImage], plans: Sequence[Plan]) -> list[RestoredImage]:
    from pixelrelay.pipeline.grading import grade_images

    gradings = [plan.edit.grading if plan.edit is not None else [] for plan in plans]
    if not any(gradings):
        return restored
    rgbs = grade_images([r.rgb for r in restored], gradings, getattr(decoder, "torch_device", decoder.device))
    return [dataclasses.replace(r, rgb=rgb) for r, rgb in zip(restored, rgbs, strict=True)]


def _noted(result: RestoredImage, plan: Plan) -> RestoredImage:
    if plan.edit is None or not plan.edit.grading:
        return result
    return dataclasses.replace(result, notes=(*result.notes, f"graded: {plan.edit.describe()}"))
