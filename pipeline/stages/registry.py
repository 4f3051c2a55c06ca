"""Backend registry: ``KIND`` -> the class implementing it, imported lazily.

Lazy imports keep torch/transformers out of processes that only need the names
(the producer, ``pixelrelay models list``).
"""

from __future__ import annotations

import importlib
import os

from pixelrelay.pipeline.stages.base import Decoder, Encoder, Planner, StageSpec

# stage -> kind -> "module:Class"
BACKENDS: dict[str, dict[str, str]] = {
    "encoder": {
        "builtin": "pixelrelay.pipeline.stages.encoders.builtin:BuiltinEncoder",
        "analysis": "pixelrelay.pipeline.stages.encoders.analysis:AnalysisEncoder",
        "hf-caption": "pixelrelay.pipeline.stages.encoders.hf_caption:HFCaptionEncoder",
    },
    "planner": {
        "rules": "pixelrelay.pipeline.stages.planners.rules:RulesPlanner",
        "hf-llm": "pixelrelay.pipeline.stages.planners.hf_llm:HFLLMPlanner",
    },
    "decoder": {
        "builtin": "pixelrelay.pipeline.stages.decoders.builtin:BuiltinDecoder",
        "classic": "pixelrelay.pipeline.stages.decoders.classic:ClassicDecoder",
        "hf-sr": "pixelrelay.pipeline.stages.decoders.hf_sr:HFSuperResolutionDecoder",
        "sd-upscale": "pixelrelay.pipeline.stages.decoders.sd_upscale:SDUpscaleDecoder",
    },
}


PLUGINS_ENV = "PIXELRELAY_PLUGINS"  # comma-separated modules that call register()
_loaded_plugins: set[str] = set()


class UnknownBackendError(ValueError):
    pass


def register(stage: str, kind: str, target: str) -> None:
    """Add a backend (``target`` is "module:Class"); plugin modules call this on import."""
    BACKENDS[stage][kind] = target


def _load_plugins() -> None:
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        if module not in _loaded_plugins:
            importlib.import_module(module)
            _loaded_plugins.add(module)


def known_backends(stage: str) -> list[str]:
    _load_plugins()
    return sorted(BACKENDS[stage])


def backend_class(stage: str, spec: str | StageSpec) -> type:
    _load_plugins()
    parsed = spec if isinstance(spec, StageSpec) else StageSpec.parse(spec)
    try:
        target = BACKENDS[stage][parsed.kind]
    except KeyError:
        raise UnknownBackendError(
            f"unknown {stage} backend {parsed.kind!r}; known: {', '.join(known_backends(stage))}"
        ) from None
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def validate_spec(stage: str, spec: str) -> str:
    """Check a spec names a known backend without importing it; returns the spec."""
    parsed = StageSpec.parse(spec)
    _load_plugins()
    if parsed.kind not in BACKENDS[stage]:
        raise UnknownBackendError(
            f"unknown {stage} backend {parsed.kind!r}; known: {', '.join(known_backends(stage))}"
        )
    return str(parsed)


def _create(stage: str, spec: str, device: str):
    parsed = StageSpec.parse(spec)
    return backend_class(stage, parsed)(model=parsed.model, device=device)


def create_encoder(spec: str, device: str = "cpu") -> Encoder:
    return _create("encoder", spec, device)


def create_planner(spec: str, device: str = "cpu") -> Planner:
    return _create("planner", spec, device)


def create_decoder(spec: str, device: str = "cpu") -> Decoder:
    return _create("decoder", spec, device)
