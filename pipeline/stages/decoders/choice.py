"""Which of several loaded models serves a plan: the one rule of the multi-model decoders
(``hf-sr:A,B``, ``spandrel:A,B``).

``pick``: ``plan.model`` naming a model (exactly, or a unique substring) wins; else by native
scale (equal, else the smallest above, else the largest below); then by the wanted variant
(``wanted_variant``, from the plan's degradations), then ``FALLBACK_ORDER``; ties go to the
model listed first. Each backend finds its own models' variants. No torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from pixelrelay.pipeline.messages import Plan

T = TypeVar("T")

VARIANTS = ("classical", "realworld", "compressed", "lightweight")
FALLBACK_ORDER = ("classical", "realworld", "compressed", "lightweight")
JPEG_COMPRESSED_BELOW = 90.0
NOISY_ABOVE_SIGMA = 5.0


def wanted_variant(plan: Plan) -> str:
    """The variant a plan's degradations call for (see the module docstring)."""
    if plan.model and plan.model.lower() in VARIANTS:
        return plan.model.lower()
    if (plan.jpeg_quality is not None and plan.jpeg_quality < JPEG_COMPRESSED_BELOW) or plan.strength("deblock") > 0:
        return "compressed"
    if plan.noise_sigma > NOISY_ABOVE_SIGMA or plan.strength("denoise") > 0 or plan.strength("deblur") > 0:
        return "realworld"
    return "classical"


def native_for(scales: Sequence[float], target: float) -> float:
    """The native scale that serves ``target``: equal, else the smallest above, else the largest."""
    natives = sorted(set(scales))
    if target in natives:
        return target
    above = [n for n in natives if n > target]
    return above[0] if above else natives[-1]


def _named(models: Sequence[T], plan: Plan, name: Callable[[T], str]) -> T | None:
    if not plan.model:
        return None
    exact = [m for m in models if name(m) == plan.model]
    if exact:
        return exact[0]
    wanted = plan.model.lower()
    hits = [m for m in models if wanted in name(m).lower()]
    return hits[0] if len(hits) == 1 and wanted not in VARIANTS else None


def pick(
    models: Sequence[T],
    plan: Plan,
    *,
    name: Callable[[T], str],
    scale: Callable[[T], float],
    variant: Callable[[T], str],
) -> T:
    """The model that serves ``plan``, by the rule of the module docstring.

    Args:
        models: the loaded models (at least one).
        plan: the item's plan.
        name: a model's name (its spec piece).
        scale: a model's native scale.
        variant: a model's variant.

    Returns:
        The model.
    """
    if not models:
        raise ValueError("no models to choose from")
    named = _named(models, plan, name)
    if named is not None:
        return named
    native = native_for([scale(m) for m in models], plan.scale)
    pool = [m for m in models if scale(m) == native]
    for wanted in (wanted_variant(plan), *FALLBACK_ORDER):
        hits = [m for m in pool if variant(m) == wanted]
        if hits:
            return hits[0]
    return pool[0]
