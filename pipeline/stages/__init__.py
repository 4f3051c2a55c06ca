"""The three stages (encoder, planner, decoder), their interfaces and backend registry."""

from pixelrelay.pipeline.stages.base import (
    BatchMismatchError,
    Decoder,
    Encoder,
    ModelUnavailableError,
    Planner,
    RestoredImage,
    StageSpec,
)
from pixelrelay.pipeline.stages.registry import create_decoder, create_encoder, create_planner, known_backends

__all__ = [
    "BatchMismatchError",
    "Decoder",
    "Encoder",
    "ModelUnavailableError",
    "Planner",
    "RestoredImage",
    "StageSpec",
    "create_decoder",
    "create_encoder",
    "create_planner",
    "known_backends",
]
