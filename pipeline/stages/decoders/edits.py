"""How edit plans (``Plan.edit``, tasks edit and style) reach a decoder: the one routing policy.

``restore_with_edits(decoder, images, plans)`` is what the decode stage calls instead of
``decoder.restore``. It returns one result per item, in order: a ``RestoredImage`` or, for
an item it cannot serve, the exception (the worker fails that item with its message).

* A plan without an edit goes to ``decoder.restore`` unchanged (through
  ``pipeline.outsize.restore``, which meets a plan's output target, if any, around it):
  restore and upscale jobs see exactly what they saw before edits existed.
* Grading: a decoder whose class sets ``grades`` (``classic``) applies it inside its own
  batch; for any other (``builtin``, ``hf-sr``, plugins...) the decoder restores / upscales
  first, then ``pipeline.grading.grade_images`` grades its output (same-size outputs as one
  tensor). Either way the grading is the one implementation in ``pipeline.grading``, and
  alpha is the decoder's (grading never touches it).
* A generative edit runs only on a decoder whose class sets ``generative`` (``sd-img2img``,
  ``instruct-pix2pix``: ``decoders.generative``); on any other the item fails with
  ``EditUnsupportedError``, before any model runs. The generative decoders do not grade
  themselves: their edited output is graded here like any other decoder's. It is never dropped
  quietly: a job never returns an image that lacks part of its edit.
* Every graded output gets a note naming what was applied (the manifest also holds the plan).
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
        for i, result in zip(todo, restored):
            results[i] = _noted(result, plans[i])
    return filled(results)


def _grade_outputs(decoder: Decoder, restored: list[RestoredImage], plans: Sequence[Plan]) -> list[RestoredImage]:
    from pixelrelay.pipeline.grading import grade_images

    gradings = [plan.edit.grading if plan.edit is not None else [] for plan in plans]
    if not any(gradings):
        return restored
    rgbs = grade_images([r.rgb for r in restored], gradings, getattr(decoder, "torch_device", decoder.device))
    return [dataclasses.replace(r, rgb=rgb) for r, rgb in zip(restored, rgbs)]


def _noted(result: RestoredImage, plan: Plan) -> RestoredImage:
    if plan.edit is None or not plan.edit.grading:
        return result
    return dataclasses.replace(result, notes=(*result.notes, f"graded: {plan.edit.describe()}"))
