"""Any output scale: the one policy for an output's size and how a decoder reaches it.

A plan without ``Plan.target`` is left alone. With one, ``final_size`` gives the exact size
(a scale: halves rounded up, at least 1 pixel; a box: the binding side exact, never over it;
integer arithmetic); ``native_scale`` picks the decoder's scale to run (equal to the factor,
else the smallest above, else the largest); ``restore`` runs the decoder at it and resamples
the result (bicubic, antialiased when shrinking; alpha bilinear), with a note. A plan's own
model runs at its own scale and is resampled once. torch is imported lazily.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pixelrelay.pipeline.messages import NATIVE_SCALES, JobOptions, OutputTarget, Plan, Scale, is_scale

if TYPE_CHECKING:
    from pixelrelay.pipeline.imageio import DecodedImage
    from pixelrelay.pipeline.stages.base import Decoder, RestoredImage

Size = tuple[int, int]  # (width, height)


def _round_ratio(num: int, den: int) -> int:
    """``num / den`` rounded half up, in integers, at least 1."""
    return max(1, (2 * num + den) // (2 * den))


def final_size(target: OutputTarget, width: int, height: int) -> Size:
    """The output (width, height) of a ``width`` x ``height`` source for ``target``."""
    if target.scale is not None:
        s = target.scale
        return max(1, int(width * s + 0.5)), max(1, int(height * s + 0.5))
    bw, bh = target.width, target.height
    if bh is None or (bw is not None and bw * height <= bh * width):  # the width binds
        assert bw is not None
        return bw, _round_ratio(height * bw, width)
    return _round_ratio(width * bh, height), bh


def factor(target: OutputTarget, width: int, height: int) -> float:
    """The scale ``target`` asks of a ``width`` x ``height`` source, before rounding."""
    if target.scale is not None:
        return float(target.scale)
    ratios = [side / src for side, src in ((target.width, width), (target.height, height)) if side is not None]
    return min(ratios)


def plan_size(plan: Plan, width: int, height: int) -> Size:
    """The output size of ``plan`` for a ``width`` x ``height`` source."""
    if plan.target is None:
        return width * plan.scale, height * plan.scale
    return final_size(plan.target, width, height)


def sizer(target: OutputTarget | None, scale: int) -> int | Callable[[int, int], Size]:
    """What ``pixelrelay.pipeline.imageio.decode_image`` checks the output against: the native ``scale`` where
    there is no target (as before), else the target's size as a function of the source's."""
    if target is None:
        return scale
    return lambda width, height: final_size(target, width, height)


def plan_sizer(plan: Plan) -> int | Callable[[int, int], Size]:
    return sizer(plan.target, plan.scale)


def options_sizer(options: JobOptions) -> int | Callable[[int, int], Size]:
    target = options.target()
    if target is None:
        scale = options.effective_scale()
        assert isinstance(scale, int)
        return scale
    return sizer(target, 1)


def native_for(natives: Sequence[int], wanted: float) -> int:
    """The native scale that serves ``wanted``: equal, else the smallest above, else the
    largest (``pixelrelay.pipeline.stages.decoders.choice.native_for``, the model rule)."""
    from pixelrelay.pipeline.stages.decoders.choice import native_for as rule

    return int(rule([int(n) for n in natives], wanted))


def native_scale(natives: Sequence[int], target: OutputTarget, width: int, height: int) -> int:
    """The native scale a decoder runs for an output target: equal to the target's factor, else
    the smallest above it, else the largest. At or above the factor, the rounded size is within
    ``native`` x the source on both sides.

    Args:
        natives: the decoder's native scales.
        target: the output target.
        width: the source's width.
        height: the source's height.
    """
    return native_for(natives, factor(target, width, height))


def planned(options: JobOptions) -> tuple[Scale, OutputTarget | None]:
    """(``Plan.scale``, ``Plan.target``) for a job: the native scale the planner proposes
    and the target, None where the job's scale is native (1, 2, 4)."""
    target = options.target()
    scale: object
    if target is None:
        scale = options.effective_scale()
    elif target.scale is not None:
        scale = native_for(NATIVE_SCALES, target.scale)
    else:
        scale = 2 if options.task == "upscale" else 1
    assert is_scale(scale), scale  # without a target the job's scale is native; native_for picks one
    return scale, target


def describe(options: JobOptions) -> str:
    """The output size a job asks for, e.g. "x2", "x1.5", "width 800", "fit 800x600"."""
    target = options.target()
    return target.describe() if target is not None else f"x{options.effective_scale()}"


# --- the decode path ----------------------------------------------------------------------


def restore(decoder: Decoder, images: Sequence[DecodedImage], plans: Sequence[Plan]) -> list[RestoredImage]:
    """``decoder.restore`` with every plan's target met (see the module docstring). Plans
    without a target reach the decoder as they are, and their results come back untouched."""
    natives = tuple(decoder.native_scales())
    runs: list[Plan] = []
    sizes: list[Size | None] = []
    named: list[str | None] = []  # the plan's model, where it picked a scale other than the target's
    for image, plan in zip(images, plans, strict=True):
        named.append(None)
        if plan.target is None:
            runs.append(plan)
            sizes.append(None)
            continue
        final = final_size(plan.target, image.width, image.height)
        native = native_scale(natives, plan.target, image.width, image.height)
        run = plan.model_copy(update={"scale": native, "target": None})
        picked = decoder.runs_at(run)  # a plan.model naming a model of another scale
        if picked != native and picked in NATIVE_SCALES:
            run = run.model_copy(update={"scale": picked})  # its own scale: one resample, to the target
            named[-1] = plan.model
        runs.append(run)
        sizes.append(final)
    results = decoder.restore(images, runs)
    device = getattr(decoder, "torch_device", None) or "cpu"
    return [
        result if size is None else _resampled(result, image, plan.target, run.scale, size, natives, device, model)
        for result, image, plan, run, size, model in zip(results, images, plans, runs, sizes, named, strict=True)
    ]


def _resampled(
    result: RestoredImage,
    image: DecodedImage,
    target: OutputTarget,
    native: int,
    size: Size,
    natives: Sequence[int],
    device,
    model: str | None = None,
) -> RestoredImage:
    """``result`` resampled to ``size``, with its notes.

    Args:
        result: the decoder's output at its native scale.
        image: the source.
        target: the plan's output target.
        native: the scale the decoder ran.
        size: the exact output size.
        natives: the decoder's native scales (for the note).
        device: where the resample runs.
        model: the plan's model where it ran at a scale of its own, else None.
    """
    from pixelrelay.pipeline import tensors

    got = (result.rgb.shape[1], result.rgb.shape[0])
    if got != (image.width * native, image.height * native):
        raise RuntimeError(
            f"decoder returned {got[0]}x{got[1]} at x{native}, expected {image.width * native}x{image.height * native}"
        )
    notes = list(result.notes)
    wanted = factor(target, image.width, image.height)
    if model is not None:  # the plan named a model of another scale
        notes.append(f"output {target.describe()}: the plan's model {model} runs x{native}")
    elif native < wanted:  # no native scale reaches it: the largest ran
        listed = ", ".join(str(n) for n in sorted(set(natives)))
        notes.append(
            f"output {target.describe()}: no native scale at or above x{wanted:g} (decoder's: {listed}): "
            f"ran x{native} and resized the rest (bicubic)"
        )
    if got != size:
        how = "antialiased" if size[0] < got[0] or size[1] < got[1] else "bicubic"
        notes.append(
            f"output {target.describe()}: decoder ran x{native}, resampled {got[0]}x{got[1]} -> "
            f"{size[0]}x{size[1]} ({how})"
        )
        rgb = tensors.to_uint8(tensors.resize(tensors.to_tensor(result.rgb).to(device), (size[1], size[0])).cpu())
        alpha = None if result.alpha is None else tensors.resize_alpha_to(result.alpha, (size[1], size[0]), device)
    else:
        rgb, alpha = result.rgb, result.alpha
    return dataclasses.replace(result, rgb=rgb, alpha=alpha, notes=tuple(notes), native_scale=native)
