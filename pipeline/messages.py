"""Pydantic message models: everything that crosses a process boundary is one of these.

Messages carry storage keys, ids and text, never pixels. They serialise to JSON only.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Task = Literal["restore", "upscale"]
Scale = Literal[1, 2, 4]
OutputFormat = Literal["png", "jpg", "webp"]
DEFAULT_QUALITY = 92  # JPEG and lossy WebP outputs, when the job names none
OperationName = Literal["deblock", "denoise", "deblur", "sharpen"]
ItemStatus = Literal["done", "failed"]
# How a done item's output came to be: found with the same fingerprint (reused), written
# where there was none (processed), or written over an output of another request or model
# (overwritten). None while in flight, and for failed items.
ItemOutcome = Literal["reused", "processed", "overwritten"]
_SHA256_HEX = r"^[0-9a-f]{64}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class JobOptions(_Model):
    """What the user asked for; the planner turns this plus a Description into a Plan."""

    task: Task = "restore"
    scale: Scale | None = None  # None: 1 for restore, 2 for upscale
    instruction: str = ""
    format: OutputFormat | None = None  # None: keep the input's format where we can write it
    # Encoder settings for the outputs (defaults keep messages without them valid).
    quality: int = Field(default=DEFAULT_QUALITY, ge=1, le=100)  # JPEG, and WebP unless lossless
    lossless: bool = False  # WebP outputs lossless (quality then ignored)
    # Re-process every item even where its output already answers this request. Not part
    # of the request's fingerprint: it changes what is done, not what is asked for.
    overwrite: bool = False

    def effective_scale(self) -> int:
        if self.scale is not None:
            return self.scale
        return 2 if self.task == "upscale" else 1


class Backends(_Model):
    """Per-job backend specs, ``KIND[:MODEL]``; None means the stage worker's own default."""

    encoder: str | None = None
    planner: str | None = None
    decoder: str | None = None


class JobSpec(_Model):
    job_id: str
    input: str  # folder, s3:// prefix or manifest file, as given
    output: str  # folder or s3:// prefix
    options: JobOptions = Field(default_factory=JobOptions)
    backends: Backends = Field(default_factory=Backends)
    total: int = 0
    chunk_size: int = 16
    created_at: float = 0.0


class Item(_Model):
    """One input image of a job. ``index`` is its stable position in the job's listing."""

    index: int
    input: str  # URI of the source (local path or s3://bucket/key)
    output: str  # URI the restored image is written to


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


class Plan(_Model):
    """The contract every planner must meet and every decoder consumes."""

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

    def strength(self, name: OperationName) -> float:
        return max((op.strength for op in self.operations if op.name == name), default=0.0)


class Fingerprint(_Model):
    """What an output answers (see ``pipeline.fingerprint``): sha256 hex digests of the
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

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def fail(self, stage: str, reason: str) -> None:
        self.status = "failed"
        self.error = f"{stage}: {reason}"


class ChunkMessage(_Model):
    """The body of every stage task: one chunk of a job, passed down the chain."""

    job_id: str
    seq: int  # submission number; a resubmission bumps it
    chunk: int
    output: str  # job output root
    options: JobOptions
    backends: Backends
    records: list[ItemRecord]
    feeds: bool = True  # whether finishing this chain enqueues the job's next chunk
    part: str = ""  # distinguishes the parts of a chunk split after repeated worker deaths
