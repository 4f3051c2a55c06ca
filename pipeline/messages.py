"""Pydantic message models: everything that crosses a process boundary is one of these.

Messages carry storage keys, ids and text, never pixels, and are JSON only. Wire format
(``ChunkMessage.v``; none is version 1): ``upgrade_message`` reads every version up to
``WIRE_VERSION`` and raises ``WireVersionError`` on a newer one; a message is written in the
oldest version that carries it (``ChunkMessage.wire_version``); a body that claims an older
version yet uses a newer field is refused (``WireFormatError``). ``sig``
(``pixelrelay.pipeline.signing``) is checked and removed before parsing.

Versions: 2 adds ``v``, ``JobOptions.quality`` / ``.lossless`` / ``.overwrite`` and
``ItemRecord.models`` / ``.fingerprint`` / ``.outcome``; 3 ``JobOptions.strip_metadata``; 4
the edit and style tasks, ``Plan.edit`` and any output scale (``JobOptions.scale`` /
``.width`` / ``.height``, ``Plan.target``, ``ItemRecord.native_scale`` / ``.final_scale``).
The rolling-upgrade order: docs/design.md, "Delivery guarantees".
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, TypeGuard

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

WIRE_VERSION = 4  # the newest ChunkMessage format this code reads and writes

Task = Literal["restore", "upscale", "edit", "style"]
EDIT_TASKS: tuple[str, ...] = ("edit", "style")  # tasks whose plan carries an ``Edit``
Scale = Literal[1, 2, 4]  # a plan's native scale (what a decoder runs, see Plan.scale)
NATIVE_SCALES: tuple[int, ...] = (1, 2, 4)  # the values of Scale


def is_scale(value: object) -> TypeGuard[Scale]:
    """Whether ``value`` is a native scale (an int of ``NATIVE_SCALES``)."""
    return isinstance(value, int) and not isinstance(value, bool) and value in NATIVE_SCALES


MAX_SCALE = 8  # the largest output scale a job may ask for
MAX_SIDE = 65535  # the largest output width or height a job may ask for
MAX_NATIVE_SCALE = 32  # bounds a record's native scale (a decoder's model may be x8, x16)
OutputFormat = Literal["png", "jpg", "webp"]
DEFAULT_QUALITY = 92  # JPEG and lossy WebP outputs, when the job names none
OperationName = Literal["deblock", "denoise", "deblur", "sharpen"]
ItemStatus = Literal["done", "failed"]
# How a done item's output came to be: found with the same fingerprint (reused), written
# where there was none (processed), or written over an output of another request or model
# (overwritten). None while in flight, and for failed items.
ItemOutcome = Literal["reused", "processed", "overwritten"]
_SHA256_HEX = r"^[0-9a-f]{64}$"
# A job id: it names a folder (OUTPUT/_jobs/<id>) and Redis keys, so it is checked wherever
# one is read (submit, every message a worker takes, job.json). Anchored at both ends: no
# newline, no "..", no "/".
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MAX_INSTRUCTION_CHARS = 2000  # every queued message carries the instruction


def _scale_factor(value: Any) -> Any:
    """An output scale: a finite number in (0, ``MAX_SCALE``], an integral one as an int (so
    ``2.0`` is written ``2``, as version 3 wrote it). Not a bool, not a string."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"scale: a number in (0, {MAX_SCALE}], not {type(value).__name__}")
    if not math.isfinite(value) or not 0 < value <= MAX_SCALE:
        raise ValueError(f"scale: a number in (0, {MAX_SCALE}], got {value!r}")
    return int(value) if float(value).is_integer() else float(value)


# An output scale factor, e.g. 2, 3, 1.5 or 0.5 (integral ones are ints).
ScaleFactor = Annotated[int | float, BeforeValidator(_scale_factor)]
# An output width or height in pixels (JSON integers only: no 5.0, no "5", no true).
Side = Annotated[int, Field(strict=True, ge=1, le=MAX_SIDE)]


def _one_kind_of_size(scale: Any, width: Any, height: Any) -> None:
    if scale is not None and (width is not None or height is not None):
        raise ValueError("give a scale or a width/height to fit inside, not both")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


def _is_none(value: Any) -> bool:
    return value is None


def _is_false(value: Any) -> bool:
    return value is False


def _omitted_when_none(**kwargs: Any) -> Any:
    """A field that defaults to None and is left out of the JSON while None (so older
    messages stay byte for byte). pydantic's own serializer leaves it out (``exclude_if``):
    a wrap serializer doing the same costs a Python call per model, per record of a chunk."""
    return Field(default=None, exclude_if=_is_none, **kwargs)


class JobOptions(_Model):
    """What the user asked for; the planner turns this plus a Description into a Plan."""

    task: Task = "restore"
    # The output size: a scale factor in (0, 8] (None: 1 for restore, 2 for upscale), or a
    # width and/or height to fit inside, keeping the aspect ratio (not with a scale). Any
    # scale but 1, 2 or 4, a width or a height: wire version 4.
    scale: ScaleFactor | None = None
    width: Side | None = _omitted_when_none()  # absent when unset: older jobs' JSON stays byte for byte
    height: Side | None = _omitted_when_none()
    instruction: str = Field(default="", max_length=MAX_INSTRUCTION_CHARS)
    format: OutputFormat | None = None  # None: keep the input's format where we can write it
    # Encoder settings for the outputs (defaults keep messages without them valid).
    quality: int = Field(default=DEFAULT_QUALITY, ge=1, le=100)  # JPEG, and WebP unless lossless
    lossless: bool = False  # WebP outputs lossless (quality then ignored)
    # Re-process every item even where its output already answers this request. Not part
    # of the request's fingerprint: it changes what is done, not what is asked for.
    overwrite: bool = False
    # Outputs carry no EXIF (GPS included) nor other metadata; an RGB ICC profile is colour,
    # not metadata, and stays (wire version 3).
    strip_metadata: bool = False

    @model_validator(mode="after")
    def _edit_needs_instruction(self) -> JobOptions:
        if self.task in EDIT_TASKS and not self.instruction.strip():
            raise ValueError(f"task {self.task!r} needs an instruction (what to change)")
        _one_kind_of_size(self.scale, self.width, self.height)
        return self

    def effective_scale(self) -> int | float | None:
        """The output scale factor; None for a width/height box (it depends on each image)."""
        if self.scale is not None:
            return self.scale
        if self.width is not None or self.height is not None:
            return None
        return 2 if self.task == "upscale" else 1

    def target(self) -> OutputTarget | None:
        """What a plan's ``target`` is for this job: None where a native scale (1, 2, 4)
        says it all, as before version 4."""
        if self.width is not None or self.height is not None:
            return OutputTarget(width=self.width, height=self.height)
        if self.scale is not None and self.scale not in NATIVE_SCALES:
            return OutputTarget(scale=self.scale)
        return None


class Backends(_Model):
    """Per-job backend specs, ``KIND[:MODEL]``; None means the stage worker's own default."""

    encoder: str | None = None
    planner: str | None = None
    decoder: str | None = None


class JobSpec(_Model):
    job_id: str = Field(pattern=JOB_ID_PATTERN)
    input: str  # folder, s3:// prefix or manifest file, as given
    output: str  # folder or s3:// prefix
    options: JobOptions = Field(default_factory=JobOptions)
    backends: Backends = Field(default_factory=Backends)
    total: int = 0
    chunk_size: int = 16
    created_at: float = 0.0
    # Workers read a folder input's files through symlinks (else: none followed below it).
    # Left out of the JSON while False, so specs stay as older workers read them.
    follow_symlinks: bool = Field(default=False, exclude_if=_is_false)
    # Seconds each item may take in any stage (``pixelrelay.pipeline.limits``); None (a job
    # submitted without it): each worker's own ``item_budget_s``. Left out of the JSON when None.
    item_budget_s: float | None = _omitted_when_none(gt=0, allow_inf_nan=False)
    # The sha256 (hex) of each listing shard's exact bytes, in shard order (4,096 items a
    # shard: about 16 kB per million items). Every reader of the listing checks it
    # (``pixelrelay.jobs.files.read_chunk``); absent in specs written without it (not checked).
    listing_sha256: list[Annotated[str, Field(pattern=_SHA256_HEX)]] | None = _omitted_when_none()


class Item(_Model):
    """One input image of a job. ``index`` is its stable position in the job's listing.
    An item the listing rejected (a path that escapes the output, an output another item
    holds) has ``error`` set and ``output`` "": it enters the chain already failed and is
    never written. Listing shards omit ``error`` when it is None."""

    index: int
    input: str  # URI of the source (local path or s3://bucket/key)
    output: str  # URI the restored image is written to ("" for a rejected item)
    error: str | None = None  # why the listing rejected the item


class Description(_Model):
    """Encoder output: what is in the image and how it is degraded."""

    text: str
    metrics: dict[str, float] = Field(default_factory=dict)
    caption: str | None = None
    # Degradation estimates (filled by learned encoders; None when unknown).
    noise_sigma: float | None = None  # Gaussian sigma on a 0-255 scale
    blur_sigma: float | None = None
    jpeg_quality: float | None = None  # None: not JPEG-compressed (or unknown)
    downscaled: float | None = None  # probability the image was downscaled


class Operation(_Model):
    name: OperationName
    strength: float = Field(ge=0.0, le=1.0)


# --- edits: grading operations and a generative edit (tasks edit and style) --------------

GradingName = Literal["white_balance", "exposure", "warmth", "contrast", "saturation", "grayscale", "sepia", "vignette"]
# Operations whose strength has a direction (-1 less .. +1 more); the others go 0 .. 1.
SIGNED_GRADING: frozenset[str] = frozenset({"exposure", "warmth", "contrast", "saturation"})
MAX_PROMPT_CHARS = 500
MAX_SEED = 2**32 - 1


class GradingOp(_Model):
    """One global colour/tone operation. ``strength`` is in [-1, 1] for the signed ones
    (``SIGNED_GRADING``: exposure, warmth, contrast, saturation; 0 is no change) and in
    [0, 1] for the others; what a unit of strength does is ``pixelrelay.pipeline.grading``'s."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: GradingName
    strength: float = Field(ge=-1.0, le=1.0)

    @model_validator(mode="after")
    def _bounded(self) -> GradingOp:
        if self.name not in SIGNED_GRADING and self.strength < 0:
            raise ValueError(f"grading {self.name}: strength {self.strength} outside [0, 1]")
        if self.strength == 0:
            raise ValueError(f"grading {self.name}: strength 0 does nothing; leave the operation out")
        return self


class GenerativeEdit(_Model):
    """A text-guided edit for a generative decoder (img2img / InstructPix2Pix): prompts,
    how far the result may move from the source (``strength``), classifier-free guidance,
    denoising steps and the seed that makes it reproducible."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    strength: float = Field(default=0.5, gt=0.0, le=1.0)
    guidance: float = Field(default=7.5, ge=0.0, le=30.0)
    steps: int = Field(default=30, ge=1, le=150)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)


class Edit(_Model):
    """What an edit or style plan changes: grading operations (each name at most once; the
    order they run in is ``pixelrelay.pipeline.grading``'s, not the list's) and optionally a generative
    edit. Never empty: a plan that changes nothing is no edit plan."""

    grading: list[GradingOp] = Field(default_factory=list, max_length=len(SIGNED_GRADING) + 4)
    generative: GenerativeEdit | None = None

    @field_validator("grading")
    @classmethod
    def _unique(cls, grading: list[GradingOp]) -> list[GradingOp]:
        names = [op.name for op in grading]
        if len(set(names)) != len(names):
            raise ValueError(f"grading names an operation twice: {names}")
        return grading

    @model_validator(mode="after")
    def _not_empty(self) -> Edit:
        if not self.grading and self.generative is None:
            raise ValueError("the plan has no edit operations")
        return self

    def strength(self, name: GradingName) -> float:
        return next((op.strength for op in self.grading if op.name == name), 0.0)

    def describe(self) -> str:
        """A short text of the edit, e.g. "warmth +0.35, vignette 0.4; generative edit"."""
        parts = [
            f"{op.name} {op.strength:+g}" if op.name in SIGNED_GRADING else f"{op.name} {op.strength:g}"
            for op in self.grading
        ]
        text = ", ".join(parts)
        if self.generative is not None:
            text = f"{text}; generative edit" if text else "generative edit"
        return text


class OutputTarget(_Model):
    """The output size a job asks for beyond a native scale (wire version 4): a scale factor
    in (0, 8], or a width and/or height to fit inside keeping the aspect ratio. What size it
    gives an image, and which native scale a decoder runs for it, is
    ``pixelrelay.pipeline.outsize``'s."""

    scale: ScaleFactor | None = _omitted_when_none()  # the unset ones are left out of the JSON
    width: Side | None = _omitted_when_none()
    height: Side | None = _omitted_when_none()

    @model_validator(mode="after")
    def _one_kind(self) -> OutputTarget:
        _one_kind_of_size(self.scale, self.width, self.height)
        if self.scale is None and self.width is None and self.height is None:
            raise ValueError("an output target needs a scale, a width or a height")
        return self

    def describe(self) -> str:
        """E.g. "x1.5", "width 800", "fit 800x600"."""
        if self.scale is not None:
            return f"x{self.scale:g}"
        if self.width is not None and self.height is not None:
            return f"fit {self.width}x{self.height}"
        return f"width {self.width}" if self.width is not None else f"height {self.height}"


class Plan(_Model):
    """The contract every planner must meet and every decoder consumes.

    ``scale`` is the native scale: what the decoder runs, output ``scale`` x the input. With
    a ``target`` (wire version 4: a job's scale other than 1, 2, 4, or a width/height) the
    output is the target's size instead: ``scale`` is then the planner's proposal, and the
    decode stage runs the decoder's own native scale for the target and resamples to the
    exact size (``pixelrelay.pipeline.outsize``)."""

    operations: list[Operation] = Field(default_factory=list)
    scale: Scale = 1
    output_format: OutputFormat = "png"
    prompt: str = ""
    negative_prompt: str = ""
    # Degradation estimates passed through for conditional decoders.
    noise_sigma: float = Field(default=0.0, ge=0.0, le=100.0)
    blur_sigma: float = Field(default=0.0, ge=0.0, le=10.0)
    jpeg_quality: float | None = Field(default=None, ge=1.0, le=100.0)
    model: str | None = None  # a decoder variant the planner picked, if any
    rationale: str = ""
    raw: str | None = None  # raw planner text (LLM planners)
    # Tasks edit and style: what to change (wire version 4). Left out of the JSON when None.
    edit: Edit | None = _omitted_when_none()
    # The output size beyond a native scale (wire version 4). Left out of the JSON when None.
    target: OutputTarget | None = _omitted_when_none()

    def strength(self, name: OperationName) -> float:
        return max((op.strength for op in self.operations if op.name == name), default=0.0)


class Fingerprint(_Model):
    """What an output answers (see ``pixelrelay.pipeline.fingerprint``): sha256 hex digests of the
    request (options, backend specs, input, output format) and of the model identity."""

    request: str = Field(pattern=_SHA256_HEX)
    model: str = Field(pattern=_SHA256_HEX)


class ItemRecord(_Model):
    """An item's state as it moves down the chain; the decode stage writes it to the manifest."""

    index: int
    input: str
    output: str
    status: ItemStatus | None = None  # None while still in flight
    error: str | None = None
    notes: list[str] = Field(default_factory=list)
    description: Description | None = None
    plan: Plan | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    backends: dict[str, str] = Field(default_factory=dict)
    output_size: tuple[int, int] | None = None  # (width, height)
    source_size: tuple[int, int] | None = None  # (width, height), upright
    models: dict[str, str] = Field(default_factory=dict)  # backend -> model identity used
    fingerprint: Fingerprint | None = None  # what the output answers (done items)
    outcome: ItemOutcome | None = None
    # Items whose plan has a target (wire version 4; left out of the JSON when None): the
    # scale the decoder ran, and the output's scale before rounding to whole pixels (6
    # significant digits; ``output_size`` is exact). Without a target both are the plan's scale.
    native_scale: int | None = _omitted_when_none(ge=1, le=MAX_NATIVE_SCALE)
    final_scale: float | None = _omitted_when_none(gt=0.0, le=float(MAX_SIDE), allow_inf_nan=False)

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def uses_v4(self) -> bool:
        """Whether this record needs wire version 4 (a plan with an edit or a target, scales)."""
        plan = self.plan
        return (plan is not None and (plan.edit is not None or plan.target is not None)) or any(
            getattr(self, name) is not None for name in _V4_RECORD_FIELDS
        )

    def fail(self, stage: str, reason: str) -> None:
        self.status = "failed"
        self.error = f"{stage}: {reason}"


class WireFormatError(ValueError):
    """A task body that is not a chunk message of any version (not an object, bad ``v``)."""


class WireVersionError(ValueError):
    """A chunk message of a newer wire version than this code reads: a newer release sent it."""

    def __init__(self, version: int) -> None:
        super().__init__(f"wire version {version} is newer than this worker's {WIRE_VERSION}")
        self.version = version


class ChunkMessage(_Model):
    """The body of every stage task: one chunk of a job, passed down the chain.

    Read bodies with ``upgrade_message``; ``model_dump`` writes the oldest wire version that
    carries the message (see the module docstring). In memory ``v`` is always
    ``WIRE_VERSION``: older bodies are upgraded as they are read.
    """

    v: int = Field(default=WIRE_VERSION, ge=1, le=WIRE_VERSION)
    job_id: str = Field(pattern=JOB_ID_PATTERN)
    seq: int  # submission number; a resubmission bumps it
    chunk: int
    output: str  # job output root
    options: JobOptions
    backends: Backends
    records: list[ItemRecord]
    feeds: bool = True  # whether finishing this chain enqueues the job's next chunk
    part: str = ""  # distinguishes the parts of a chunk split after repeated worker deaths

    def wire_version(self) -> int:
        """The oldest wire version that carries this message."""
        options = self.options
        if options.task in EDIT_TASKS or options.target() is not None or any(r.uses_v4() for r in self.records):
            return 4
        if options.strip_metadata:
            return 3
        if options.quality != DEFAULT_QUALITY or options.lossless or options.overwrite:
            return 2
        if any(r.models or r.fingerprint is not None or r.outcome is not None for r in self.records):
            return 2
        return 1

    @model_serializer(mode="wrap")
    def _write_wire(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        version = self.wire_version()
        if version == 1:
            data.pop("v", None)
            options = data.get("options")
            if isinstance(options, dict):
                for name in (*_V2_OPTIONS, *_V3_OPTIONS):
                    options.pop(name, None)
            for record in data.get("records") or ():
                if isinstance(record, dict):
                    for name in _V2_RECORD_FIELDS:
                        record.pop(name, None)
        elif "v" in data:
            data["v"] = version
            options = data.get("options")
            if version < 3 and isinstance(options, dict):
                for name in _V3_OPTIONS:
                    options.pop(name, None)
        return data


_V2_OPTIONS = ("quality", "lossless", "overwrite")  # JobOptions fields that version 1 lacks
_V2_RECORD_FIELDS = ("models", "fingerprint", "outcome")  # ItemRecord fields that version 1 lacks
_V3_OPTIONS = ("strip_metadata",)  # JobOptions fields that version 2 lacks
_V4_OPTIONS = ("width", "height")  # JobOptions fields that version 3 lacks (and scale's new values)
_V4_RECORD_FIELDS = ("native_scale", "final_scale")  # ItemRecord fields that version 3 lacks


def _v1_to_v2(body: dict[str, Any]) -> dict[str, Any]:
    # Version 2 only added fields whose defaults keep version-1 behaviour.
    return {**body, "v": 2}


def _v2_to_v3(body: dict[str, Any]) -> dict[str, Any]:
    # Version 3 only added strip_metadata, whose default keeps version-2 behaviour.
    return {**body, "v": 3}


def _v3_to_v4(body: dict[str, Any]) -> dict[str, Any]:
    # Version 4 only added the edit/style tasks, Plan.edit (absent: no edit), any output
    # scale, width/height, Plan.target and the record's scales (absent: a native scale).
    return {**body, "v": 4}


_UPGRADES = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4}  # version N body -> version N + 1 body


def upgrade_message(body: Any) -> ChunkMessage:
    """Validate a stage task's body of any wire version this code reads, as a ChunkMessage.

    Raises ``WireVersionError`` for a version newer than ``WIRE_VERSION``, ``WireFormatError``
    for a body that is not an object or has a bad ``v``, and pydantic's ``ValidationError``
    for bad fields.
    """
    if not isinstance(body, dict):
        raise WireFormatError(f"a chunk message is a JSON object, not {type(body).__name__}")
    version = body.get("v", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise WireFormatError(f"bad wire version {version!r}: a positive integer, or no 'v' for version 1")
    if version > WIRE_VERSION:
        raise WireVersionError(version)
    for step in range(version, WIRE_VERSION):
        body = _UPGRADES[step](body)
    msg = ChunkMessage.model_validate(body)
    if version < 4 <= msg.wire_version():
        raise WireFormatError(
            f"a version {version} body carries version 4 fields (an edit task or plan, "
            "an output scale other than 1, 2 or 4, a width/height or output scales)"
        )
    return msg
