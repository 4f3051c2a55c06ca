"""Deterministic rule-based planner: Description + job options -> Plan, with a rationale.

No model, no randomness; the thresholds give a clean image no operation at all. Edit and
style instructions go through ``pixelrelay.pipeline.stages.planners.edits.map_instruction``;
restoration runs only where the instruction asks for it, and an instruction it cannot map
fails the item (``UnmappableInstructionError``).
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Sequence

from pixelrelay.pipeline import outsize
from pixelrelay.pipeline.messages import EDIT_TASKS, Description, Edit, JobOptions, Operation, OperationName, Plan
from pixelrelay.pipeline.stages.base import Planner, check_batch
from pixelrelay.pipeline.stages.planners.edits import PlanningError

# Noise sigma (0-255, per channel) from which we denoise; clean images read ~0-2.
DENOISE_MIN_SIGMA = 4.0
# Blocking ratio (boundary/inside differences) from which we deblock; PNGs read ~1.0,
# JPEG q75 ~1.6, q30 ~2.5, q10 ~10.
DEBLOCK_MIN_BLOCKINESS = 1.8
DEBLOCK_MAX_QUALITY = 85.0  # when the encoder knows the JPEG quality
# Gaussian blur sigma (pixels) from which we sharpen (soft) or deblur (blurry).
SHARPEN_MIN_BLUR = 1.0
DEBLUR_MIN_BLUR = 1.5
# Sharpening amplifies noise: above this sigma we skip it unless the user asks for it.
SHARPEN_MAX_NOISE = 8.0
FORCED_STRENGTH = 0.5  # strength of an op the instruction asks for but the image doesn't need
OPERATION_ORDER: tuple[OperationName, ...] = ("deblock", "denoise", "deblur", "sharpen")

# Instruction phrases, matched on whole words in lower-case text.
OPERATION_PHRASES: dict[OperationName, tuple[str, ...]] = {
    "denoise": (
        r"denois\w*",
        r"de-nois\w*",
        r"(?:remove|reduce|clean up|suppress|get rid of)(?: the)? (?:noise|grain)",
        r"noise reduction",
        r"less (?:noise|grain)",
    ),
    "sharpen": (r"sharpen\w*", r"sharper", r"crisper"),
    "deblur": (
        r"deblur\w*",
        r"de-blur\w*",
        r"unblur\w*",
        r"(?:remove|reduce|fix)(?: the)? blur",
        r"less blur\w*",
    ),
    "deblock": (
        r"deblock\w*",
        r"de-block\w*",
        r"(?:remove|reduce|fix)(?: the)? (?:jpeg|compression|block\w*)(?: artifacts| artefacts)?",
    ),
}
# A negation up to two words before a phrase, in the same clause, turns "sharpen" into
# "don't sharpen" ("no sharpening", "do not over-sharpen", "without any denoising").
# The rule, as a regex on the text before the phrase (the reference definition; it is not
# run, being quadratic over many phrases: ``_Negations`` applies it in linear time):
NEGATION = re.compile(r"\b(?:no|not|don't|dont|without|skip|avoid|never|stop)\b(?:\s+[\w'-]+){0,2}\s*$")
NEGATION_WORDS = ("no", "not", "don't", "dont", "without", "skip", "avoid", "never", "stop")
_WORD_CHAR = re.compile(r"\w")
_NOT_IN_WORD = re.compile(r"[^\w'-]")  # a character a ``[\w'-]+`` word cannot hold
GENTLE_WORDS = re.compile(r"\b(?:gentle|gently|light|lightly|subtle|subtly|mild|mildly|slight|slightly)\b")
STRONG_WORDS = re.compile(r"\b(?:strong|strongly|aggressive|aggressively|heavy|heavily)\b")

PROMPT_TEMPLATE = "a clean, sharp, high-resolution photo{subject}, natural detail, realistic texture"
NEGATIVE_BASE = ["blur", "oversharpened", "halos", "painting", "cartoon", "lowres", "watermark"]


def _clamp(value: float, low: float = 0.0, high: float = 1.0) -> float:
    return min(high, max(low, value))


def _known(value: float | None, fallback: float | None) -> float | None:
    """The learned estimate when there is one, else the measured metric."""
    if value is not None and math.isfinite(value):
        return float(value)
    if fallback is not None and math.isfinite(fallback):
        return float(fallback)
    return None


class _Negations:
    """Answers "is the phrase at ``start`` negated?" (``NEGATION`` on ``text[:start]``) in
    O(log n) per phrase after one O(n) pass, so parsing stays linear in the instruction's
    length however many phrases it holds. ``text`` is whitespace-normalised (single spaces).

    ``NEGATION`` reads, from the end of the text before the phrase: spaces, then up to two
    whitespace-delimited words made only of ``[\\w'-]`` (the last may be the part of the
    phrase's own token before it, as "over-" in "over-sharpen"), then a token that ends with
    a negation word starting at a word boundary."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.starts: list[int] = []  # start offset of every space-delimited token
        offset = 0
        for token in text.split(" "):
            self.starts.append(offset)
            offset += len(token) + 1
        self.bad = [m.start() for m in _NOT_IN_WORD.finditer(text)]  # sorted

    def _all_word(self, a: int, b: int) -> bool:
        """Whether ``text[a:b]`` is a non-empty ``[\\w'-]+`` run."""
        return a < b and bisect.bisect_left(self.bad, a) == bisect.bisect_left(self.bad, b)

    def _ends_with_negation(self, a: int, b: int) -> bool:
        text = self.text
        for word in NEGATION_WORDS:
            at = b - len(word)
            if at >= a and text.startswith(word, at) and (at == 0 or not _WORD_CHAR.match(text[at - 1])):
                return True
        return False

    def negated(self, start: int) -> bool:
        i = bisect.bisect_right(self.starts, start) - 1
        # Units before the phrase, nearest first: (begin, end) offsets.
        units: list[tuple[int, int]] = []
        if start > self.starts[i]:
            units.append((self.starts[i], start))
        j = i - 1
        while len(units) < 3 and j >= 0:
            units.append((self.starts[j], self.starts[j + 1] - 1))
            j -= 1
        for a, b in units:  # up to two plain words, then the negation's own token
            if self._ends_with_negation(a, b):
                return True
            if not self._all_word(a, b):
                return False
        return False


def instruction_requests(instruction: str) -> tuple[dict[OperationName, bool], float, list[str]]:
    """Parse the user's instruction.

    Returns ({op: True to force it, False to forbid it}, strength multiplier, notes).
    """
    text = " ".join(instruction.lower().replace("\u2019", "'").split())
    requests: dict[OperationName, bool] = {}
    notes: list[str] = []
    negations = _Negations(text)
    for name in OPERATION_ORDER:
        for phrase in OPERATION_PHRASES[name]:
            for match in re.finditer(rf"\b{phrase}\b", text):
                wanted = not negations.negated(match.start())
                # A "no" anywhere wins over a "yes": forbidding is the safer reading.
                requests[name] = requests.get(name, True) and wanted
    # "No sharpening" covers deblur as well: both are unsharp masks on the output.
    if requests.get("sharpen") is False and "deblur" not in requests:
        requests["deblur"] = False
    for name, wanted in requests.items():
        notes.append(f"instruction {'asks for' if wanted else 'forbids'} {name}")

    multiplier = 1.0
    if GENTLE_WORDS.search(text):
        multiplier *= 0.5
        notes.append("instruction asks for a gentle touch (strengths x0.5)")
    if STRONG_WORDS.search(text):
        multiplier *= 1.5
        notes.append("instruction asks for a strong touch (strengths x1.5)")
    return requests, multiplier, notes


class RulesPlanner(Planner):
    """Maps measured degradations and job options to a Plan by fixed, documented rules."""

    kind = "rules"

    def plan(self, descriptions: Sequence[Description], options: Sequence[JobOptions]) -> list[Plan | PlanningError]:
        check_batch(descriptions, options, "descriptions/option sets")
        out: list[Plan | PlanningError] = []
        for description, option in zip(descriptions, options, strict=True):
            try:
                out.append(self.plan_one(description, option))
            except PlanningError as exc:  # this item fails alone, with the reason
                out.append(exc)
        return out

    def plan_one(self, description: Description, options: JobOptions, map_edit: bool = True) -> Plan:
        """One item's plan. ``map_edit`` False: an edit/style plan without its ``edit`` (the
        restoration part only; the hf-llm planner's prior), which never raises."""
        metrics = description.metrics
        noise = _known(description.noise_sigma, metrics.get("noise_sigma")) or 0.0
        blur = _known(description.blur_sigma, metrics.get("blur_sigma"))
        quality = _known(description.jpeg_quality, None)
        blocks = _known(None, metrics.get("blockiness")) or 1.0

        strengths: dict[OperationName, float] = {}
        reasons: list[str] = []

        # Deblock: from the learned JPEG quality when known, else the blocking ratio.
        if quality is not None and quality < DEBLOCK_MAX_QUALITY:
            strengths["deblock"] = _clamp((DEBLOCK_MAX_QUALITY - quality) / 65.0 + 0.2)
            reasons.append(f"deblock: JPEG quality~{quality:.0f} < {DEBLOCK_MAX_QUALITY:.0f}")
        elif quality is None and blocks >= DEBLOCK_MIN_BLOCKINESS:
            strengths["deblock"] = _clamp(0.3 + 0.5 * math.log2(blocks / DEBLOCK_MIN_BLOCKINESS))
            reasons.append(f"deblock: blockiness {blocks:.2f} >= {DEBLOCK_MIN_BLOCKINESS}")

        # Denoise: strength rises with sigma, 0.3 at the threshold, 1 from sigma 18.
        if noise >= DENOISE_MIN_SIGMA:
            strengths["denoise"] = _clamp(0.3 + (noise - DENOISE_MIN_SIGMA) / 20.0)
            reasons.append(f"denoise: noise sigma~{noise:.1f} >= {DENOISE_MIN_SIGMA}")
        else:
            reasons.append(f"no denoise: noise sigma~{noise:.1f} < {DENOISE_MIN_SIGMA}")

        # Deblur / sharpen: only when edges are measurably soft, and not on a noisy image.
        if blur is None or blur < SHARPEN_MIN_BLUR:
            reasons.append("no sharpen: edges are sharp" if blur is not None else "no sharpen: blur unknown")
        elif noise > SHARPEN_MAX_NOISE:
            reasons.append(f"no sharpen/deblur: blur sigma~{blur:.1f} but too noisy (sigma~{noise:.1f})")
        elif blur >= DEBLUR_MIN_BLUR:
            strengths["deblur"] = _clamp(0.25 + (blur - DEBLUR_MIN_BLUR) / 2.0)
            reasons.append(f"deblur: blur sigma~{blur:.1f} >= {DEBLUR_MIN_BLUR}")
        else:
            strengths["sharpen"] = _clamp(0.3 + (blur - SHARPEN_MIN_BLUR))
            reasons.append(f"sharpen: slightly soft (blur sigma~{blur:.1f})")

        # The user's instruction overrides the measurements.
        requests, multiplier, notes = instruction_requests(options.instruction)
        edit = None
        if options.task in EDIT_TASKS:  # restore only what the instruction asks for
            edit = self._edit(options, reasons) if map_edit else None
            strengths = {name: s for name, s in strengths.items() if requests.get(name)}
            reasons.append(f"{options.task}: restoration only where the instruction asks for it")
        for name, wanted in requests.items():
            if not wanted:
                strengths.pop(name, None)
            elif name not in strengths:
                strengths[name] = FORCED_STRENGTH
        reasons.extend(notes)

        operations = [
            Operation(name=name, strength=round(_clamp(strengths[name] * multiplier), 3))
            for name in OPERATION_ORDER
            if name in strengths
        ]
        operations = [op for op in operations if op.strength > 0.0]

        scale, target = outsize.planned(options)
        if target is None:
            reasons.append(f"scale x{scale} ({options.task}{', as asked' if options.scale is not None else ''})")
        else:
            reasons.append(
                f"output {target.describe()} (as asked): the decoder runs its native scale for it "
                f"(x{scale} on 1, 2, 4) and resamples"
            )
        return Plan(
            operations=operations,
            scale=scale,
            target=target,
            output_format=options.format or "png",
            prompt=self._prompt(description),
            negative_prompt=self._negative_prompt(strengths),
            noise_sigma=round(_clamp(noise, 0.0, 100.0), 3),
            blur_sigma=round(_clamp(blur or 0.0, 0.0, 10.0), 3),
            jpeg_quality=None if quality is None else _clamp(quality, 1.0, 100.0),
            rationale="; ".join(reasons),
            edit=edit,
        )

    @staticmethod
    def _edit(options: JobOptions, reasons: list[str]) -> Edit:
        """The instruction's grading (raises ``UnmappableInstructionError``)."""
        from pixelrelay.pipeline.stages.planners.edits import map_instruction

        mapping = map_instruction(options.instruction, options.task)
        edit = Edit(grading=mapping.grading)
        reasons.append(f"{options.task}: {edit.describe()} (from the instruction)")
        reasons.extend(mapping.notes)
        return edit

    @staticmethod
    def _prompt(description: Description) -> str:
        subject = (description.caption or "").strip().rstrip(".")
        return PROMPT_TEMPLATE.format(subject=f" of {subject}" if subject else "")

    @staticmethod
    def _negative_prompt(strengths: dict[OperationName, float]) -> str:
        # Lead with what this image actually suffers from.
        terms: list[str] = []
        if "denoise" in strengths:
            terms += ["noise", "grain"]
        if "deblock" in strengths:
            terms += ["jpeg artifacts", "compression blocks"]
        for term in ["noise", "grain", "jpeg artifacts", *NEGATIVE_BASE]:
            if term not in terms:
                terms.append(term)
        return ", ".join(terms)
