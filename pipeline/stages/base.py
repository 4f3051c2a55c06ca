"""Stage interfaces.

A backend is built once per worker process as ``Class(model=, device=, settings=)`` and never
reads the environment. It describes itself through class attributes read without building
it (``default_model``, ``extra``, ``models_for``), and importing its module must not import
torch. Every stage refuses a batch whose inputs differ in length (``BatchMismatchError``).
``identity()`` names the weights a backend runs (part of every output's fingerprint) and must
change whenever its outputs may.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeVar

import numpy as np

from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.messages import NATIVE_SCALES, Description, JobOptions, Plan

if TYPE_CHECKING:
    from pixelrelay.pipeline.settings import Settings


@dataclass(frozen=True)
class StageSpec:
    """A parsed ``KIND[:MODEL]`` backend spec."""

    kind: str
    model: str | None = None

    @classmethod
    def parse(cls, spec: str) -> StageSpec:
        kind, _, model = spec.strip().partition(":")
        if not kind:
            raise ValueError(f"empty backend spec {spec!r}")
        return cls(kind=kind, model=model or None)

    def __str__(self) -> str:
        return self.kind if self.model is None else f"{self.kind}:{self.model}"


class ModelUnavailableError(RuntimeError):
    """A backend's weights are missing; the message names the model and how to get it."""


T = TypeVar("T")


class BatchMismatchError(ValueError):
    """A batch's parallel inputs (images and plans, descriptions and options) differ in length."""


def check_batch(first: Sequence, second: Sequence, names: str = "images/plans") -> None:
    """Raise BatchMismatchError unless ``first`` and ``second`` pair up one to one."""
    if len(first) != len(second):
        a, b = names.split("/")
        raise BatchMismatchError(f"{len(first)} {a} but {len(second)} {b}")


def filled(results: Sequence[T | None]) -> list[T]:
    """A batch's per-item results, filled slot by slot from ``None`` placeholders, once every
    slot is set (one left ``None`` is a bug of the stage: raises)."""
    out = [r for r in results if r is not None]
    if len(out) != len(results):
        missing = [i for i, r in enumerate(results) if r is None]
        raise RuntimeError(f"no result for items {missing} of the batch")
    return out


class _Stage(ABC):
    kind: ClassVar[str]
    default_model: ClassVar[str | None] = None  # hub id loaded when the spec names none
    extra: ClassVar[str | None] = None  # optional package (and pip extra) the backend needs

    def __init__(self, model: str | None = None, device: str = "cpu", settings: Settings | None = None) -> None:
        from pixelrelay.pipeline.settings import Settings

        self.model = model
        self.device = device
        self.settings = settings if settings is not None else Settings.defaults()

    @classmethod
    def models_for(cls, model: str | None) -> list[str]:
        """The hub models (or local folders) this backend loads for ``KIND:model``. Empty for
        a backend without a ``default_model``: its weights ship with pixelrelay, or it has none."""
        if cls.default_model is None:
            return []
        return [model or cls.default_model]

    @classmethod
    def check_available(cls, model: str | None) -> None:
        """Cheap start-up check (no model load, no CUDA): raise ModelUnavailableError when the
        weights are not present locally. Workers call it before taking any task. The default
        checks nothing (weights that ship with pixelrelay, or none)."""
        return None

    @property
    def spec(self) -> str:
        return str(StageSpec(self.kind, self.model))

    def identity(self) -> str:
        """The model identity of this backend, computed once (see the module docstring)."""
        cached = self.__dict__.get("_identity")
        if cached is None:
            cached = self.__dict__["_identity"] = self.compute_identity()
        return cached

    def compute_identity(self) -> str:
        """Override for backends whose weights are not what ``models_for`` names."""
        if self.default_model is None:
            return self.kind
        from pixelrelay.pipeline import hf

        return ",".join(hf.snapshot_identity(m) for m in self.models_for(self.model))


class Encoder(_Stage):
    """image -> text description."""

    @abstractmethod
    def describe(self, images: Sequence[DecodedImage]) -> list[Description]:
        """Describe a batch; returns one Description per image, in order."""


class Planner(_Stage):
    """description + job options -> Plan."""

    @abstractmethod
    def plan(self, descriptions: Sequence[Description], options: Sequence[JobOptions]) -> Sequence[Plan | Exception]:
        """Plan a batch; returns schema-valid Plans, one per input, in order. An item it
        cannot plan (an edit instruction that maps to nothing) gets the exception instead
        of a Plan in its slot (``pixelrelay.pipeline.stages.planners.edits.PlanningError``): the plan worker fails
        that item with its message, and its neighbours go on."""


@dataclass
class RestoredImage:
    rgb: np.ndarray  # HxWx3 uint8
    alpha: np.ndarray | None = None  # HxW uint8
    notes: tuple[str, ...] = ()
    native_scale: int | None = None  # set by pipeline.outsize when it met a plan's target


class Decoder(_Stage):
    """source image + plan -> restored image.

    Edits (``Plan.edit``, tasks edit and style) reach a decoder through
    ``pixelrelay.pipeline.stages.decoders.edits.restore_with_edits``: a decoder with ``grades`` applies the plan's
    grading itself (inside its own batch); for any other the grading is applied to its
    output. Only a decoder with ``generative`` runs a generative edit; elsewhere the item
    fails with the reason."""

    grades: ClassVar[bool] = False  # restore() applies Plan.edit.grading itself
    generative: ClassVar[bool] = False  # restore() runs Plan.edit.generative

    def native_scales(self) -> tuple[int, ...]:
        """The scales ``restore`` runs without resampling of its own: ``pixelrelay.pipeline.outsize``
        runs the one at or above a plan's target (default: a Plan's native scales)."""
        return NATIVE_SCALES

    def runs_at(self, plan: Plan) -> int:
        """The scale ``restore`` runs natively for ``plan`` (default: the plan's own). A
        decoder whose model is picked per plan says the picked model's, which differs where
        ``plan.model`` names a model of another scale: ``pixelrelay.pipeline.outsize`` then asks for that
        scale, so the output is resampled once, to the target, not twice."""
        return plan.scale

    @abstractmethod
    def restore(self, images: Sequence[DecodedImage], plans: Sequence[Plan]) -> list[RestoredImage]:
        """Restore a batch; output i is exactly plans[i].scale x the size of images[i]
        (the decode stage meets a plan's target around it: ``pixelrelay.pipeline.outsize``)."""
