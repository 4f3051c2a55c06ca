"""Stage interfaces.

Each backend is constructed once per worker process (it may load a model) and then called
with batches. ``device`` is a torch device string; defaults are conservative (CPU, fp32).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np

from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.messages import Description, JobOptions, Plan


@dataclass(frozen=True)
class StageSpec:
    """A parsed ``KIND[:MODEL]`` backend spec."""

    kind: str
    model: str | None = None

    @classmethod
    def parse(cls, spec: str) -> "StageSpec":
        kind, _, model = spec.strip().partition(":")
        if not kind:
            raise ValueError(f"empty backend spec {spec!r}")
        return cls(kind=kind, model=model or None)

    def __str__(self) -> str:
        return self.kind if self.model is None else f"{self.kind}:{self.model}"


class ModelUnavailableError(RuntimeError):
    """A backend's weights are missing; the message names the model and how to get it."""


class _Stage(ABC):
    kind: ClassVar[str]

    def __init__(self, model: str | None = None, device: str = "cpu") -> None:
        self.model = model
        self.device = device

    @classmethod
    def check_available(cls, model: str | None) -> None:
        """Cheap start-up check (no model load, no CUDA): raise ModelUnavailableError when the
        weights are not present locally. Workers call it before taking any task."""

    @property
    def spec(self) -> str:
        return str(StageSpec(self.kind, self.model))


class Encoder(_Stage):
    """image -> text description."""

    @abstractmethod
    def describe(self, images: Sequence[DecodedImage]) -> list[Description]:
        """Describe a batch; returns one Description per image, in order."""


class Planner(_Stage):
    """description + job options -> Plan."""

    @abstractmethod
    def plan(self, descriptions: Sequence[Description], options: Sequence[JobOptions]) -> list[Plan]:
        """Plan a batch; always returns schema-valid Plans, one per input, in order."""


@dataclass
class RestoredImage:
    rgb: np.ndarray  # HxWx3 uint8
    alpha: np.ndarray | None = None  # HxW uint8
    notes: tuple[str, ...] = ()


class Decoder(_Stage):
    """source image + plan -> restored image."""

    @abstractmethod
    def restore(self, images: Sequence[DecodedImage], plans: Sequence[Plan]) -> list[RestoredImage]:
        """Restore a batch; output i is exactly plans[i].scale x the size of images[i]."""
