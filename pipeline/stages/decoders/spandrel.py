"""Community restoration models through spandrel (``spandrel:NAME[,NAME...]``), an optional extra.

Invariants: no pickled code runs (the file is read by
``pixelrelay.pipeline.checkpoints.read_state_dict`` and built with
``ModelLoader.load_from_state_dict``, never ``load_from_file``); scale, purpose, tiling advice
and precision come from spandrel's descriptor; inpainting models and layouts other than
RGB->RGB or gray->gray are refused at load; one model per item by
``pixelrelay.pipeline.stages.decoders.choice``, a model's variant read from its file's own
name; tiles align to ``multiple_of`` and the attention window, and models that discourage
tiling start untiled. Gray models run per channel. torch and spandrel are imported lazily.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixelrelay.pipeline import checkpoints
from pixelrelay.pipeline.checkpoints import CheckpointError
from pixelrelay.pipeline.messages import Plan
from pixelrelay.pipeline.stages.base import ModelUnavailableError
from pixelrelay.pipeline.stages.decoders import choice
from pixelrelay.pipeline.stages.decoders.learned import LearnedDecoder, TileConfig

if TYPE_CHECKING:
    import torch

    from pixelrelay.pipeline.settings import Settings
    from pixelrelay.pipeline.tiling import TileSettings

log = logging.getLogger("pixelrelay.decoder.spandrel")

INSTALL_HINT = "the spandrel decoder needs the spandrel package: pip install 'pixelrelay[spandrel]'"
NEEDS_MODEL = "the spandrel decoder needs checkpoints: spandrel:PATH[,PATH...] (files, s3:// URIs or org/repo/file.pth)"
VARIANT_WORDS = (
    ("compressed", ("jpeg", "jpg", "compress", "deblock", "artifact")),
    ("realworld", ("real", "denois", "noise", "deblur", "blur", "bsrgan")),
    ("lightweight", ("lite", "light")),
)


def spandrel_available() -> bool:
    import importlib

    try:
        importlib.import_module("spandrel")
    except ImportError:
        return False
    return True


def split_models(model: str | None) -> list[str]:
    return list(dict.fromkeys(m.strip() for m in (model or "").split(",") if m.strip()))


def variant_for(name: str, architecture: str, purpose: str) -> str:
    """A model's variant for ``pixelrelay.pipeline.stages.decoders.choice.pick``, from the
    file's own name (not its folders): FaceSR -> ``face``; FBCNN or
    jpeg/jpg/compress/deblock/artifact -> ``compressed``; real/realworld/denoise/noise/deblur/
    blur/bsrgan -> ``realworld``; lite/light -> ``lightweight``; else a Restoration model ->
    ``realworld``, an SR model -> ``classical``."""
    if purpose == "FaceSR":
        return "face"
    if architecture == "FBCNN":
        return "compressed"
    base = name.rstrip("/").rsplit("/", 1)[-1].lower()
    for variant, words in VARIANT_WORDS:
        if any(w in base for w in words):
            return variant
    return "realworld" if purpose == "Restoration" else "classical"


def _pull_hint(name: str) -> str:
    return f"fetch it with `pixelrelay models pull spandrel:{name}`"


@dataclass
class _Loaded:
    name: str  # as the spec names it
    descriptor: Any  # spandrel.ImageModelDescriptor
    architecture: str  # spandrel's architecture id, e.g. "ESRGAN"
    scale: int
    purpose: str  # "SR", "FaceSR" or "Restoration"
    variant: str
    channels: int  # 3, or 1 for gray models
    align: int  # tile sizes and starts are multiples of this (_alignment)
    untiled: bool  # starts as one tile (tiling discouraged or internal, or a face model)
    dtype: Any
    params: int
    nbytes: int
    sha256: str

    def summary(self) -> str:
        return f"{self.architecture} x{self.scale} {self.purpose}, {_params(self.params)} params, {_bytes(self.nbytes)}"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _alignment(d: Any) -> int:
    """Tile sizes and starts: multiples of the model's ``multiple_of`` and of its attention
    window (``window_size`` of SwinIR, HAT, Swin2SR, ...), so that a tile's windows are the
    whole image's windows."""
    import math

    window = getattr(d.model, "window_size", 1)
    window = window if isinstance(window, int) and window > 0 else 1
    return math.lcm(int(d.size_requirements.multiple_of), window)


def _build(path: Path, name: str, max_bytes: int) -> Any:
    """The spandrel descriptor of the checkpoint at ``path``, on the CPU in fp32."""
    import spandrel

    raw = checkpoints.read_state_dict(path, name, max_bytes)
    state_dict = checkpoints.require_tensors(raw, name, unwrap=spandrel.canonicalize_state_dict)
    try:
        descriptor = spandrel.ModelLoader(device="cpu").load_from_state_dict(state_dict)
    except spandrel.UnsupportedModelError:
        raise CheckpointError(f"checkpoint {name!r}: spandrel recognises no supported architecture in it") from None
    except Exception as exc:  # keys of a known architecture with wrong shapes, ...
        first = next((line for line in str(exc).splitlines() if line.strip()), "")
        raise CheckpointError(
            f"checkpoint {name!r}: spandrel cannot build it ({type(exc).__name__}: {first[:160]})"
        ) from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise CheckpointError(
            f"checkpoint {name!r} is a {descriptor.purpose} model ({descriptor.architecture.id}), not image-to-image"
        )
    ins, outs = descriptor.input_channels, descriptor.output_channels
    if (ins, outs) not in ((3, 3), (1, 1)):
        raise CheckpointError(
            f"checkpoint {name!r}: {ins} input and {outs} output channels (want RGB->RGB or gray->gray)"
        )
    return descriptor


class SpandrelDecoder(LearnedDecoder):
    kind = "spandrel"
    default_model = None  # nothing to load by default: a spec names its checkpoints
    extra = "spandrel"
    tile_settings = "sr"

    def __init__(
        self,
        model: str | None = None,
        device: str = "cpu",
        settings: Settings | None = None,
        tiles: TileConfig | None = None,
        dtype: Any = None,
    ) -> None:
        """Tile settings: ``tiles``, else PIXELRELAY_SR_TILE / _OVERLAP / _TILE_BATCH /
        _MIN_TILE from ``settings``; checkpoints over PIXELRELAY_CHECKPOINT_MAX_BYTES are refused."""
        if not spandrel_available():
            raise ModelUnavailableError(INSTALL_HINT)
        if not split_models(model):
            raise ModelUnavailableError(NEEDS_MODEL)
        super().__init__(model=model, device=device, settings=settings, tiles=tiles, dtype=dtype)
        self.models = [self._load(name) for name in split_models(model)]
        for m in self.models:
            log.info("spandrel %s: %s (%s, %s)", m.name, m.summary(), m.variant, str(m.dtype).replace("torch.", ""))

    # -- self-description (registry, `pixelrelay models`)

    @classmethod
    def models_for(cls, model: str | None) -> list[str]:
        return split_models(model)

    @classmethod
    def check_available(cls, model: str | None) -> None:
        if not spandrel_available():
            raise ModelUnavailableError(INSTALL_HINT)
        names = split_models(model)
        if not names:
            raise ModelUnavailableError(NEEDS_MODEL)
        for name in names:
            source = checkpoints.source_of(name)
            if source.kind != "s3":  # S3 objects are fetched (and checked) at load
                checkpoints.require_file(source, _pull_hint(name))

    @classmethod
    def model_status(cls, name: str, max_bytes: int = 2 << 30) -> str:
        """What ``pixelrelay models list`` shows for one checkpoint: present with its
        architecture, scale, purpose and size; missing; or refused with the reason."""
        try:
            source = checkpoints.source_of(name)
            path = checkpoints.local_file(source)
        except (ModelUnavailableError, CheckpointError) as exc:
            return f"refused: {exc}"
        if path is None:
            return "missing (the worker fetches it at start)" if source.kind == "s3" else "missing"
        if not spandrel_available():
            return f"present, {_bytes(path.stat().st_size)}"
        try:
            d = _build(path, name, max_bytes)
        except CheckpointError as exc:
            return f"refused: {exc}"
        params = sum(p.numel() for p in d.model.parameters())
        cached = " (cached copy)" if source.kind == "s3" else ""
        size = _bytes(path.stat().st_size)
        return f"present: {d.architecture.id} x{d.scale} {d.purpose}, {_params(params)} params, {size}{cached}"

    @classmethod
    def pull_model(cls, name: str) -> str:
        """Fetch a hub file into the hub cache, an S3 object into the checkpoint cache (the
        environment's settings: endpoint, size bound); a local file is only looked up."""
        from pixelrelay.pipeline.settings import Settings
        from pixelrelay.pipeline.storage import open_storage

        settings = Settings.from_env()
        storage_for = lambda uri: open_storage(uri, settings.s3_endpoint_url, settings)  # noqa: E731
        return str(checkpoints.pull(name, storage_for, settings.checkpoint_max_bytes))

    def compute_identity(self) -> str:
        return "spandrel:" + ",".join(f"{m.name}=sha256:{m.sha256}" for m in self.models)

    # -- loading

    def _file(self, name: str) -> Path:
        source = checkpoints.source_of(name)
        if source.kind == "s3":
            from pixelrelay.pipeline.storage import open_storage

            storage = open_storage(name, self.settings.s3_endpoint_url, self.settings)
            return checkpoints.fetch_s3(name, storage, self.settings.checkpoint_max_bytes)
        return checkpoints.require_file(source, _pull_hint(name))

    def _load(self, name: str) -> _Loaded:
        from pixelrelay.pipeline.fingerprint import file_sha256

        path = self._file(name)
        d = _build(path, name, self.settings.checkpoint_max_bytes)
        dtype = self._dtype_for(d)
        d.to(self.torch_device, dtype).eval()
        tiling = getattr(d.tiling, "name", "SUPPORTED")
        return _Loaded(
            name=name,
            descriptor=d,
            architecture=str(d.architecture.id),
            scale=int(d.scale),
            purpose=str(d.purpose),
            variant=variant_for(name, str(d.architecture.id), str(d.purpose)),
            channels=int(d.input_channels),
            align=_alignment(d),
            untiled=tiling != "SUPPORTED" or d.purpose == "FaceSR",
            dtype=dtype,
            params=sum(p.numel() for p in d.model.parameters()),
            nbytes=path.stat().st_size,
            sha256=file_sha256(path),
        )

    def _dtype_for(self, d: Any) -> Any:
        import torch

        supported = {torch.float16: d.supports_half, torch.bfloat16: d.supports_bfloat16}
        if self.dtype == torch.float32 or supported.get(self.dtype):
            return self.dtype
        other = torch.float16 if self.dtype == torch.bfloat16 else torch.bfloat16
        if self.torch_device.type == "cuda" and supported.get(other):
            if other == torch.float16 or torch.cuda.is_bf16_supported():
                return other
        return torch.float32

    # -- model choice (decoders.choice) and the LearnedDecoder hooks

    def native_scales(self) -> tuple[int, ...]:
        return tuple(sorted({m.scale for m in self.models}))

    def choose(self, plan: Plan) -> _Loaded:
        return choice.pick(
            self.models, plan, name=lambda m: m.name, scale=lambda m: m.scale, variant=lambda m: m.variant
        )

    def model_name(self, m: _Loaded) -> str:
        return m.name

    def native_scale(self, m: _Loaded, plan: Plan) -> int:
        return m.scale

    def window(self, m: _Loaded, scale: int) -> int:
        return m.align

    def notes(self, m: _Loaded, plan: Plan) -> list[str]:
        precision = "" if m.dtype == self.dtype else f", {str(m.dtype).replace('torch.', '')}"
        return [f"spandrel: {m.name} ({m.architecture} x{m.scale}, {m.purpose}, {m.variant}{precision})"]

    def upscale_tensor(
        self, m: _Loaded, x: torch.Tensor, plans: Sequence[Plan], **overrides: int
    ) -> tuple[torch.Tensor, TileSettings]:
        if m.untiled and "tile" not in overrides:
            overrides["tile"] = max(self.tiles.tile, *x.shape[-2:]) + m.align  # one tile, even once aligned
        return super().upscale_tensor(m, x, plans, **overrides)

    def forward(self, m: _Loaded, x: torch.Tensor, plans: Sequence[Plan], items: Sequence[int]) -> torch.Tensor:
        b, c, h, w = x.shape
        t = x.to(self.torch_device, m.dtype)
        if m.channels == 1:  # each RGB channel as its own gray image
            return m.descriptor(t.reshape(b * c, 1, h, w)).reshape(b, c, h * m.scale, w * m.scale)
        return m.descriptor(t)
