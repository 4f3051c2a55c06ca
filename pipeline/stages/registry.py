"""Backend registry: ``STAGE`` -> ``KIND`` -> "module:Class", imported lazily.

Third-party backends join through entry points (group ``ENTRY_POINT_GROUP``, named
``STAGE.KIND``) or modules in ``PIXELRELAY_PLUGINS`` that call ``register``: trusted
configuration, as docs/backends.md ("Third-party backends") says. Specs arrive in messages and are not trusted:
``spec_allowed`` checks one against an allowlist and ``names_local_path`` finds local paths;
neither loads a model or lists a folder.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from typing import TYPE_CHECKING

from pixelrelay.pipeline.stages.base import Decoder, Encoder, Planner, StageSpec

if TYPE_CHECKING:
    from pixelrelay.pipeline.settings import Settings

# stage -> kind -> "module:Class"
BACKENDS: dict[str, dict[str, str]] = {
    "encoder": {
        "builtin": "pixelrelay.pipeline.stages.encoders.builtin:BuiltinEncoder",
        "analysis": "pixelrelay.pipeline.stages.encoders.analysis:AnalysisEncoder",
        "hf-caption": "pixelrelay.pipeline.stages.encoders.hf_caption:HFCaptionEncoder",
        "null": "pixelrelay.pipeline.stages.encoders.null:NullEncoder",
    },
    "planner": {
        "rules": "pixelrelay.pipeline.stages.planners.rules:RulesPlanner",
        "hf-llm": "pixelrelay.pipeline.stages.planners.hf_llm:HFLLMPlanner",
        "null": "pixelrelay.pipeline.stages.planners.null:NullPlanner",
    },
    "decoder": {
        "builtin": "pixelrelay.pipeline.stages.decoders.builtin:BuiltinDecoder",
        "classic": "pixelrelay.pipeline.stages.decoders.classic:ClassicDecoder",
        "hf-sr": "pixelrelay.pipeline.stages.decoders.hf_sr:HFSuperResolutionDecoder",
        "sd-upscale": "pixelrelay.pipeline.stages.decoders.sd_upscale:SDUpscaleDecoder",
        "spandrel": "pixelrelay.pipeline.stages.decoders.spandrel:SpandrelDecoder",
        "sd-img2img": "pixelrelay.pipeline.stages.decoders.sd_img2img:SDImg2ImgDecoder",
        "instruct-pix2pix": "pixelrelay.pipeline.stages.decoders.instruct_pix2pix:InstructPix2PixDecoder",
        "null": "pixelrelay.pipeline.stages.decoders.null:NullDecoder",
    },
}
STAGES = tuple(BACKENDS)

PLUGINS_ENV = "PIXELRELAY_PLUGINS"  # comma-separated modules that call register()
ENTRY_POINT_GROUP = "pixelrelay.backends"  # entries "STAGE.KIND" = "module:Class"
_loaded_plugins: set[str] = set()
_entry_points_loaded = False


class UnknownBackendError(ValueError):
    pass


class PluginError(ValueError):
    """A plugin entry point or registration that cannot be understood."""


def register(stage: str, kind: str, target: str) -> None:
    """Add (or replace) a backend; ``target`` is "module:Class". Plugin modules call this."""
    if stage not in BACKENDS:
        raise PluginError(f"cannot register {kind!r}: unknown stage {stage!r} (one of {', '.join(STAGES)})")
    module, _, cls = target.partition(":")
    if not kind or not module or not cls:
        raise PluginError(f"cannot register {stage} backend {kind!r} -> {target!r}: want KIND and 'module:Class'")
    BACKENDS[stage][kind] = target


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        stage, dot, kind = ep.name.partition(".")
        if not dot:
            raise PluginError(f"entry point {ep.name!r} in {ENTRY_POINT_GROUP}: the name must be STAGE.KIND")
        register(stage, kind, ep.value)


def _load_plugins() -> None:
    _load_entry_points()
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        if module not in _loaded_plugins:
            importlib.import_module(module)
            _loaded_plugins.add(module)


def reload_plugins() -> None:
    """Read the entry points again (after installing a plugin into a running process)."""
    global _entry_points_loaded
    _entry_points_loaded = False
    _load_plugins()


def known_backends(stage: str) -> list[str]:
    _load_plugins()
    return sorted(BACKENDS[stage])


def _unknown(stage: str, kind: str) -> UnknownBackendError:
    return UnknownBackendError(f"unknown {stage} backend {kind!r}; known: {', '.join(known_backends(stage))}")


def backend_class(stage: str, spec: str | StageSpec) -> type[Encoder | Planner | Decoder]:
    """The class behind a spec (imports its module; built-in modules do not import torch)."""
    _load_plugins()
    parsed = spec if isinstance(spec, StageSpec) else StageSpec.parse(spec)
    try:
        target = BACKENDS[stage][parsed.kind]
    except KeyError:
        raise _unknown(stage, parsed.kind) from None
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def stage_of(kind: str) -> str | None:
    """The stage that has a backend ``kind`` (the first, in encoder/planner/decoder order)."""
    _load_plugins()
    return next((stage for stage in STAGES if kind in BACKENDS[stage]), None)


def models_for(stage: str, spec: str | StageSpec) -> list[str]:
    """The hub models (or folders) a spec loads, as its backend class says."""
    parsed = spec if isinstance(spec, StageSpec) else StageSpec.parse(spec)
    return backend_class(stage, parsed).models_for(parsed.model)


def validate_spec(stage: str, spec: str) -> str:
    """Check a spec names a known backend without importing it; returns the spec."""
    parsed = StageSpec.parse(spec)
    _load_plugins()
    if parsed.kind not in BACKENDS[stage]:
        raise _unknown(stage, parsed.kind)
    return str(parsed)


def _create(stage: str, spec: str, device: str, settings: Settings | None):
    parsed = StageSpec.parse(spec)
    return backend_class(stage, parsed)(model=parsed.model, device=device, settings=settings)


def create_encoder(spec: str, device: str = "cpu", settings: Settings | None = None) -> Encoder:
    return _create("encoder", spec, device, settings)


def create_planner(spec: str, device: str = "cpu", settings: Settings | None = None) -> Planner:
    return _create("planner", spec, device, settings)


def create_decoder(spec: str, device: str = "cpu", settings: Settings | None = None) -> Decoder:
    return _create("decoder", spec, device, settings)


# --- which specs a process may build (PIXELRELAY_ALLOWED_BACKENDS) ---------------------------

ALLOW_ANY = "*"


class BackendNotAllowedError(ValueError):
    """A spec outside a worker's allowlist: it is refused before anything is loaded."""

    def __init__(self, spec: str) -> None:
        super().__init__(f"backend {spec} is not allowed on this worker (PIXELRELAY_ALLOWED_BACKENDS)")
        self.spec = spec


def canonical_spec(spec: str | StageSpec) -> str:
    """The one spelling of a spec (``StageSpec.parse``): surrounding blanks go."""
    return str(spec if isinstance(spec, StageSpec) else StageSpec.parse(spec))


def _is_kind(name: str) -> bool:
    _load_plugins()
    return any(name in kinds for kinds in BACKENDS.values())


def parse_allowlist(text: str) -> list[StageSpec] | None:
    """``PIXELRELAY_ALLOWED_BACKENDS`` as specs; None for ``*`` (anything).

    Entries are separated by blanks or commas. As multi-model specs hold commas themselves
    (``hf-sr:a,b``), a comma-separated piece without ``:`` that names no backend kind is one
    more model of the entry before it: ``hf-sr:a,b classic`` is ``hf-sr:a,b`` and ``classic``.
    """
    entries: list[list[str]] = []  # [kind, model pieces...]
    for token in text.replace(",", " , ").split():
        if token == ALLOW_ANY:
            return None
        if token == ",":
            continue
        kind, colon, model = token.partition(":")
        if not colon and entries and len(entries[-1]) > 1 and not _is_kind(token):
            entries[-1].append(token)
        else:
            entries.append([kind, *([model] if model else [])])
    return [StageSpec(e[0], ",".join(e[1:]) or None) for e in entries if e[0]]


def _models(stage: str, spec: StageSpec) -> set[str] | None:
    """The models a spec loads, as a set; None for a backend whose weights ship with
    pixelrelay or that has none (its MODEL, if any, is a path the backend reads as given)."""
    cls = backend_class(stage, spec)
    if getattr(cls, "default_model", None) is None:
        return None
    return {m.strip() for m in cls.models_for(spec.model) if m and m.strip()}


def spec_allowed(stage: str, spec: str | StageSpec, allowed: list[StageSpec] | None) -> bool:
    """Whether ``spec`` (of ``stage``: encoder, planner or decoder) is covered by ``allowed``.

    ``allowed`` None allows anything. Otherwise a spec is allowed when:

    * it is the bare kind of a backend with no model to name (weights shipped or none:
      ``builtin``, ``analysis``, ``rules``, ``classic``, ``null``): it reads no path it is given;
    * for such a backend with a MODEL (``builtin:FILE``): the very spec is listed;
    * for a backend that loads models (``hf-sr``, ``hf-llm``, ...): every model it would
      load (``models_for``; the bare kind loads the default model) is a model of a listed
      spec of that kind, so any subset of ``hf-sr:a,b`` is allowed where ``hf-sr:a,b`` is.

    Raises ``UnknownBackendError`` for a kind ``stage`` does not have.
    """
    wanted = spec if isinstance(spec, StageSpec) else StageSpec.parse(spec)
    if allowed is None:
        backend_class(stage, wanted)  # an unknown kind is still an error
        return True
    models = _models(stage, wanted)
    same_kind = [entry for entry in allowed if entry.kind == wanted.kind]
    if models is None:
        return wanted.model is None or str(wanted) in {str(e) for e in same_kind}
    covered: set[str] = set()
    for entry in same_kind:
        covered |= _models(stage, entry) or set()
    return bool(models) and models <= covered


def names_local_path(spec: str | StageSpec) -> bool:
    """Whether a spec's MODEL names a local path: absolute, ``~``, ``./`` or ``..`` in it, or
    a file or folder that exists relative to the current folder. Hub ids (``org/name``) and
    ``s3://`` URIs are not local paths. Each piece of a multi-model spec is checked."""
    parsed = spec if isinstance(spec, StageSpec) else StageSpec.parse(spec)
    if parsed.model is None:
        return False
    pieces = [parsed.model, *(p.strip() for p in parsed.model.split(","))]
    return any(is_local_path(p) for p in pieces if p)


def is_local_path(name: str) -> bool:
    """One piece of a spec's MODEL names a local path (see ``names_local_path``); backends
    that read files by name (``pixelrelay.pipeline.checkpoints``) use this same test."""
    if name.startswith("s3://"):
        return False
    if os.path.isabs(name) or name.startswith(("~", "./", ".\\")):
        return True
    if ".." in name.replace("\\", "/").split("/"):
        return True
    return os.path.lexists(name)
