"""Edit and style instructions -> grading operations: the rules planner's phrasebook.

``map_instruction`` returns the ``GradingOp``s an instruction asks for, or raises
``UnmappableInstructionError`` quoting the part it cannot map; ``submit`` and the rules
planner both call it (the broker is not trusted). One linear pass: the longest phrase of
``PHRASES`` at each word, clauses cut at ``SEPARATORS``; intensity, direction and negation
words act on the phrases of their clause; contributions add up and are clamped. A clause it
cannot read, or one naming a region ("the sky"), is refused: nothing asked for is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pixelrelay.pipeline.grading import ORDER  # torch-free: grading imports torch lazily
from pixelrelay.pipeline.messages import SIGNED_GRADING, GradingName, GradingOp

MAX_PHRASE = 4
GENTLE, STRONG, EXTREME, FULL = 0.5, 2.0, 2.5, 3.0
BASE = 0.35  # the strength of a plain "warmer", "brighter", "more contrast"...
MIN_STRENGTH = 0.005  # a sum smaller than this is no operation


@dataclass(frozen=True)
class Effect:
    """What a phrase does: signed default strengths per operation."""

    ops: tuple[tuple[GradingName, float], ...]
    noun: bool = False  # names a quantity ("contrast"): raised unless a direction word lowers it
    needs_direction: bool = False  # a quantity only with a direction word ("more colour")
    directionless: bool = False  # direction words do not turn it ("remove the colour cast")
    style: bool = False


def _e(*ops: tuple[GradingName, float], **kw: bool) -> Effect:
    return Effect(tuple(ops), **kw)


EXPOSURE_UP, EXPOSURE_DOWN = _e(("exposure", BASE)), _e(("exposure", -BASE))
WARMER, COOLER = _e(("warmth", BASE)), _e(("warmth", -BASE))
MORE_SATURATED, LESS_SATURATED = _e(("saturation", BASE)), _e(("saturation", -BASE))
CONTRAST_UP, CONTRAST_DOWN = _e(("contrast", BASE)), _e(("contrast", -BASE))
GRAYSCALE, SEPIA, VIGNETTE = _e(("grayscale", 1.0)), _e(("sepia", 0.8)), _e(("vignette", 0.4))
WHITE_BALANCE = _e(("white_balance", 1.0), directionless=True)
VINTAGE = _e(("sepia", 0.5), ("contrast", -0.25), ("saturation", -0.2), ("vignette", 0.35), style=True)
FILM = _e(("contrast", 0.15), ("saturation", -0.15), ("warmth", 0.1), ("vignette", 0.2), style=True)
NOIR = _e(("grayscale", 1.0), ("contrast", 0.5), ("vignette", 0.45), style=True)
FADED = _e(("contrast", -0.35), ("saturation", -0.35), ("exposure", 0.1), style=True)
SUNSET = _e(("warmth", 0.6), ("saturation", 0.2), ("contrast", 0.1), style=True)
CINEMATIC = _e(("contrast", 0.25), ("saturation", -0.15), ("vignette", 0.3), style=True)
MOODY = _e(("exposure", -0.2), ("contrast", 0.2), ("saturation", -0.25), ("vignette", 0.3), style=True)
DRAMATIC = _e(("contrast", 0.45), ("vignette", 0.3), style=True)
AIRY = _e(("exposure", 0.25), ("contrast", -0.15), style=True)
WINTRY = _e(("warmth", -0.5), ("saturation", -0.1), style=True)
PUNCHY = _e(("contrast", 0.35), ("saturation", 0.2), style=True)


def _words(*phrases: str) -> list[tuple[str, ...]]:
    return [tuple(p.split()) for p in phrases]


# phrase (a tuple of words) -> effect. docs/editing.md's phrasebook table is written from this one.
PHRASES: dict[tuple[str, ...], Effect] = {}
_phrases: tuple[str, ...]  # each table below is built from (phrases, value) rows of any length
for _phrases, _effect in (
    (("brighter", "brighten", "brightened", "bright", "lighter", "lighten", "lightened"), EXPOSURE_UP),
    (("darker", "darken", "darkened", "dark", "dimmer", "dim"), EXPOSURE_DOWN),
    (("warmer", "warm", "warm up", "golden"), WARMER),
    (("cooler", "cool", "cool down", "colder", "cold"), COOLER),
    (("vivid", "vibrant", "saturated", "saturate", "colorful", "colourful", "more colorful"), MORE_SATURATED),
    (("muted", "desaturated", "desaturate", "dull", "duller"), LESS_SATURATED),
    (("contrasty", "crisp contrast"), CONTRAST_UP),
    (("flat", "flatter"), CONTRAST_DOWN),
    (
        (
            "black and white",
            "black white",
            "b and w",
            "b w",
            "bw",
            "monochrome",
            "monochromatic",
            "mono",
            "grayscale",
            "greyscale",
            "gray scale",
            "grey scale",
            "colorless",
            "colourless",
        ),
        GRAYSCALE,
    ),
    (("sepia",), SEPIA),
    (
        (
            "vignette",
            "vignetting",
            "vignetted",
            "dark corners",
            "darker corners",
            "darken the corners",
            "darken corners",
            "darker edges",
            "darken the edges",
            "darken edges",
        ),
        VIGNETTE,
    ),
    (
        (
            "white balance",
            "neutral white balance",
            "neutral colors",
            "neutral colours",
            "neutral color",
            "neutral colour",
            "neutral tones",
            "color cast",
            "colour cast",
            "neutralize",
            "neutralise",
            "gray world",
            "grey world",
        ),
        WHITE_BALANCE,
    ),
    (("vintage", "retro", "antique", "old photo", "old fashioned"), VINTAGE),
    (("film", "analog", "analogue", "film look"), FILM),
    (("noir", "film noir"), NOIR),
    (("faded", "fade", "washed out"), FADED),
    (("sunset", "warm sunset", "golden hour"), SUNSET),
    (("cinematic",), CINEMATIC),
    (("moody",), MOODY),
    (("dramatic",), DRAMATIC),
    (("airy",), AIRY),
    (("wintry", "wintery", "icy"), WINTRY),
    (("punchy", "punchier"), PUNCHY),
):
    for _words_ in _words(*_phrases):
        PHRASES[_words_] = _effect
_NOUNS: tuple[tuple[str, GradingName], ...] = (
    ("contrast", "contrast"),
    ("saturation", "saturation"),
    ("vibrance", "saturation"),
    ("colorfulness", "saturation"),
    ("brightness", "exposure"),
    ("exposure", "exposure"),
    ("lightness", "exposure"),
    ("warmth", "warmth"),
)
for _noun, _name in _NOUNS:
    PHRASES[(_noun,)] = _e((_name, BASE), noun=True)
for _noun in ("color", "colour", "colors", "colours"):
    PHRASES[(_noun,)] = _e(("saturation", BASE), noun=True, needs_direction=True)

INTENSITY: dict[tuple[str, ...], float] = {}
for _phrases, _factor in (
    (
        (
            "slightly",
            "slight",
            "a bit",
            "a little",
            "a touch",
            "a tad",
            "bit",
            "little",
            "touch",
            "tad",
            "somewhat",
            "subtly",
            "subtle",
            "gently",
            "gentle",
            "lightly",
            "light",
            "mild",
            "mildly",
            "barely",
            "softly",
        ),
        GENTLE,
    ),
    (
        (
            "much",
            "a lot",
            "lot",
            "lots",
            "very",
            "really",
            "way",
            "significantly",
            "strongly",
            "strong",
            "heavily",
            "heavy",
            "considerably",
            "far",
            "dramatically",
            "noticeably",
            "clearly",
        ),
        STRONG,
    ),
    (("extremely", "super", "hugely", "massively", "intensely"), EXTREME),
    (("fully", "completely", "entirely", "totally"), FULL),
):
    for _words_ in _words(*_phrases):
        INTENSITY[_words_] = _factor

DIRECTION: dict[tuple[str, ...], int] = {}
for _phrases, _sign in (
    (
        (
            "more",
            "increase",
            "increased",
            "boost",
            "boosted",
            "raise",
            "raised",
            "higher",
            "high",
            "add",
            "added",
            "enhance",
            "enhanced",
            "stronger",
            "up",
            "extra",
            "lift",
            "turn up",
            "bump up",
            "crank up",
        ),
        1,
    ),
    (
        (
            "less",
            "reduce",
            "reduced",
            "decrease",
            "decreased",
            "lower",
            "lowered",
            "low",
            "lessen",
            "weaker",
            "down",
            "remove",
            "fewer",
            "drop",
            "cut",
            "too",
            "tone down",
            "turn down",
        ),
        -1,
    ),
):
    for _words_ in _words(*_phrases):
        DIRECTION[_words_] = _sign

NEGATION = frozenset({"no", "not", "don't", "dont", "without", "never", "avoid", "skip", "nor"})
SEPARATORS = frozenset({",", ";", ":", ".", "!", "?", "and", "but", "then", "plus", "also", "with", "while", "yet"})
# Words that name a part of the image: global grading cannot honour them.
REGIONS = frozenset(
    {
        "background",
        "backgrounds",
        "foreground",
        "sky",
        "skies",
        "face",
        "faces",
        "skin",
        "eyes",
        "eye",
        "hair",
        "teeth",
        "person",
        "people",
        "subject",
        "shadows",
        "shadow",
        "highlights",
        "highlight",
        "midtones",
        "object",
        "objects",
        "logo",
        "text",
        "watermark",
        "left",
        "right",
        "top",
        "bottom",
        "centre",
        "center",
        "water",
        "grass",
        "trees",
        "clouds",
    }
)
FILLERS = frozenset(
    """
a an the this that these those it its it's them their my our your me us i we you all every each whole entire
photo photos photograph photographs image images picture pictures pic pics shot shots frame frames product
products catalogue catalog item items please make makes making made look looks looking feel feeling give
giving get to of in on into for as by so just only some overall style styled styles like effect effects filter
filters tone tones toned toning tint grade grading graded correct corrected correction fix fixed adjust
adjusted adjustment balance balanced auto automatic natural set turn apply applied use using want need would
could should can be is are was were do does be been have has keep version result vibe aesthetic treatment
mood kind sort type one ones same thanks thank little bit lot lots way much very quite rather bit's
""".split()
)
_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)*|[,;:.!?]")


class PlanningError(ValueError):
    """An item the planner cannot plan; a planner returns it in the item's slot (the plan
    worker fails that item with this message) rather than guess."""


class UnmappableInstructionError(PlanningError):
    """An edit or style instruction (or a part of one) the rules planner cannot map."""


class EmptyEditPlanError(PlanningError):
    """An edit or style plan that changes nothing: the job never returns an unchanged image."""


@dataclass
class EditMapping:
    """What an instruction asks for: grading operations (canonical order) and notes."""

    grading: list[GradingOp] = field(default_factory=list)
    forbidden: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    restoration_clauses: list[str] = field(default_factory=list)


def tokens(text: str) -> list[str]:
    text = text.lower().replace("\u2019", "'").replace("&", " and ").replace("-", " ").replace("/", " ")
    return _TOKEN.findall(text)


def _longest(words: list[str], i: int, table: Mapping[tuple[str, ...], object]) -> int:
    """The length of the longest phrase of ``table`` at ``words[i]`` (0: none)."""
    for size in range(min(MAX_PHRASE, len(words) - i), 0, -1):
        if tuple(words[i : i + size]) in table:
            return size
    return 0


@dataclass
class _Clause:
    words: list[str] = field(default_factory=list)
    mapped: bool = False  # named an operation
    unknown: list[str] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)
    intensity: float | None = None
    direction: int | None = None
    negated: bool = False
    noun: int | None = None  # the contribution of a noun this clause raised by default

    def text(self) -> str:
        return " ".join(self.words)

    def quoted(self, limit: int = 80) -> str:
        text = self.text()
        return repr(text if len(text) <= limit else text[: limit - 3] + "...")


class _Reader:
    """One pass over the words: clauses, contributions and forbidden operations."""

    def __init__(self) -> None:
        self.contributions: list[list[tuple[GradingName, float]]] = []  # per phrase occurrence
        self.forbidden: set[str] = set()
        self.clauses: list[_Clause] = [_Clause()]
        self.notes: list[str] = []

    def read(self, words: list[str]) -> None:
        i = 0
        while i < len(words):
            i += self._step(words, i)
        self._end_clause()

    def _step(self, words: list[str], i: int) -> int:
        clause, word = self.clauses[-1], words[i]
        sizes = {
            name: _longest(words, i, table)
            for name, table in (("phrase", PHRASES), ("intensity", INTENSITY), ("direction", DIRECTION))
        }
        kind = max(sizes, key=lambda k: (sizes[k], k == "phrase"))  # longest; a phrase wins ties
        size = sizes[kind]
        if size == 0:
            return self._plain(clause, word)
        clause.words.extend(words[i : i + size])
        key = tuple(words[i : i + size])
        if kind == "intensity":
            clause.intensity = (clause.intensity or 1.0) * INTENSITY[key]
        elif kind == "direction":
            clause.direction = (clause.direction or 1) * DIRECTION[key]
        else:
            self._phrase(clause, PHRASES[key], " ".join(key))
        return size

    def _plain(self, clause: _Clause, word: str) -> int:
        if word in SEPARATORS:
            self._end_clause()
            self.clauses.append(_Clause())
            return 1
        clause.words.append(word)
        if word in NEGATION:
            clause.negated = True
        elif word in REGIONS:
            clause.regions.append(word)
        elif word not in FILLERS:
            clause.unknown.append(word)
        return 1

    def _phrase(self, clause: _Clause, effect: Effect, text: str) -> None:
        if effect.needs_direction and clause.direction is None:
            return  # "warm colours": "colours" is a filler here
        clause.mapped = True
        if clause.negated:
            self.forbidden.update(name for name, _ in effect.ops)
            self.notes.append(f"instruction forbids {text}")
            clause.negated = False
            clause.direction = clause.intensity = None
            return
        direction = 1 if effect.directionless else (clause.direction or 1)
        self.contributions.append([(name, value * (clause.intensity or 1.0) * direction) for name, value in effect.ops])
        clause.noun = len(self.contributions) - 1 if effect.noun and clause.direction is None else None
        clause.direction = clause.intensity = None

    def _end_clause(self) -> None:
        clause = self.clauses[-1]
        if clause.direction is not None and clause.noun is not None:  # "turn the saturation down"
            k = clause.noun
            self.contributions[k] = [(name, value * clause.direction) for name, value in self.contributions[k]]
        if clause.intensity is not None and not clause.mapped and self.contributions:
            last = self.contributions[-1]  # "brighter, but only slightly"
            self.contributions[-1] = [(name, value * clause.intensity) for name, value in last]
            clause.intensity = None


def _sum(contributions: Iterable[list[tuple[GradingName, float]]], forbidden: set[str]) -> list[GradingOp]:
    totals: dict[str, float] = {}
    for contribution in contributions:
        for name, value in contribution:
            totals[name] = totals.get(name, 0.0) + value
    ops = []
    for name in ORDER:
        if name in forbidden or name not in totals:
            continue
        low = -1.0 if name in SIGNED_GRADING else 0.0
        value = round(min(1.0, max(low, totals[name])), 3)
        if abs(value) >= MIN_STRENGTH:
            ops.append(GradingOp(name=name, strength=value))
    return ops


def map_instruction(instruction: str, task: str = "edit") -> EditMapping:
    """The grading operations an edit/style instruction asks for (see the module docstring).

    Raises ``UnmappableInstructionError`` for a clause it cannot map, or when nothing maps.
    Restoration phrasings ("remove the noise") are recognised
    (``pixelrelay.pipeline.stages.planners.rules.instruction_requests``) so their clauses are
    not refused; the rules planner plans them as for ``restore``."""
    from pixelrelay.pipeline.stages.planners.rules import instruction_requests

    reader = _Reader()
    reader.read(tokens(instruction))
    mapping = EditMapping(forbidden=reader.forbidden, notes=reader.notes)
    for clause in reader.clauses:
        if clause.regions:
            raise UnmappableInstructionError(
                f"{clause.quoted()} asks for a local edit ({', '.join(clause.regions)}): the rules planner only "
                f"grades the whole image{_HINT}"
            )
        if clause.mapped or not clause.unknown:
            continue
        if instruction_requests(clause.text())[0]:
            mapping.restoration_clauses.append(clause.text())
            continue
        what = "a style it knows" if task == "style" else "a grading operation"
        raise UnmappableInstructionError(
            f"cannot map {clause.quoted()} to {what} (it knows: {known_words(task)}){_HINT}"
        )
    mapping.grading = _sum(reader.contributions, reader.forbidden)
    if not mapping.grading:
        if mapping.restoration_clauses and not reader.forbidden:
            raise UnmappableInstructionError(
                f"the instruction asks only for restoration ({'; '.join(mapping.restoration_clauses)}): "
                "use --task restore"
            )
        why = "it forbids every operation it names" if reader.forbidden else "it names no operation"
        raise UnmappableInstructionError(f"the instruction maps to no grading operation ({why}){_HINT}")
    return mapping


_HINT = "; rephrase it, or use --planner hf-llm"


def known_words(task: str = "edit") -> str:
    """A short list of the words the rules planner maps, for messages and help."""
    if task == "style":
        names = sorted({" ".join(k) for k, v in PHRASES.items() if v.style} | {"sepia", "black and white"})
    else:
        names = [
            "warmer",
            "cooler",
            "brighter",
            "darker",
            "more/less contrast",
            "more/less saturated",
            "vivid",
            "muted",
            "black and white",
            "sepia",
            "vintage",
            "vignette",
            "neutral white balance",
        ]
    return ", ".join(names)
