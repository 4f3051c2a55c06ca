"""The registry: plugins through the ``pixelrelay.backends`` entry-point group (a real
distribution's metadata on sys.path) and PIXELRELAY_PLUGINS; backends describe themselves;
settings reach backends only through their constructors."""

from __future__ import annotations

import copy
import textwrap

import pytest
import torch

from pixelrelay.pipeline import hf
from pixelrelay.pipeline.settings import Settings
from pixelrelay.pipeline.stages import registry
from pixelrelay.pipeline.stages.decoders.classic import ClassicDecoder

PLUGIN = """
from pixelrelay.pipeline.stages.decoders.classic import ClassicDecoder


class EchoDecoder(ClassicDecoder):
    kind = "echo"
    default_model = "acme/echo-x2"
    extra = "acme_echo_runtime"

    @classmethod
    def models_for(cls, model):
        return (model or cls.default_model).split("+")
"""


@pytest.fixture
def isolated_registry(monkeypatch):
    """Registry changes made by a test are undone afterwards."""
    monkeypatch.setattr(registry, "BACKENDS", copy.deepcopy(registry.BACKENDS))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry, "_loaded_plugins", set())
    monkeypatch.delenv(registry.PLUGINS_ENV, raising=False)


def install_distribution(root, name: str, entry_points: dict[str, str], module: str = "", source: str = "") -> None:
    """Lay out an installed distribution (``NAME.dist-info`` with ``entry_points.txt``) under ``root``."""
    info = root / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = "\n".join(f"{key} = {value}" for key, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n{lines}\n")
    if module:
        (root / f"{module}.py").write_text(textwrap.dedent(source))


def test_entry_point_plugin_registers_lazily_and_builds(tmp_path, monkeypatch, isolated_registry):
    import sys

    install_distribution(
        tmp_path,
        "acme_echo",
        {"decoder.echo": "acme_echo_plugin:EchoDecoder"},
        module="acme_echo_plugin",
        source=PLUGIN,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "echo" in registry.known_backends("decoder")
    assert "acme_echo_plugin" not in sys.modules  # registered by name, imported on first use
    assert registry.validate_spec("decoder", "echo:acme/a") == "echo:acme/a"
    settings = Settings.defaults().model_copy(update={"sr_tile": 48})
    dec = registry.create_decoder("echo:acme/a+acme/b", settings=settings)
    assert type(dec).__name__ == "EchoDecoder" and isinstance(dec, ClassicDecoder)
    assert dec.settings is settings and dec.model == "acme/a+acme/b"
    assert registry.models_for("decoder", "echo:acme/a+acme/b") == ["acme/a", "acme/b"]
    assert registry.stage_of("echo") == "decoder"


def test_malformed_entry_point_is_refused(tmp_path, monkeypatch, isolated_registry):
    install_distribution(tmp_path, "acme_bad", {"echo": "acme_echo_plugin:EchoDecoder"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(registry.PluginError, match="STAGE.KIND"):
        registry.known_backends("decoder")
    with pytest.raises(registry.PluginError, match="unknown stage"):
        registry.register("painter", "x", "a:B")


def test_plugins_env_module_registers(tmp_path, monkeypatch, isolated_registry):
    (tmp_path / "acme_env_plugin.py").write_text(
        "from pixelrelay.pipeline.stages.registry import register\n"
        "register('planner', 'acme-rules', 'pixelrelay.pipeline.stages.planners.rules:RulesPlanner')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(registry.PLUGINS_ENV, "acme_env_plugin")
    assert "acme-rules" in registry.known_backends("planner")
    assert registry.create_planner("acme-rules").kind == "rules"


def test_backends_describe_themselves():
    hf_sr = registry.backend_class("decoder", "hf-sr")
    assert hf_sr.default_model == "caidas/swin2SR-classical-sr-x2-64"
    assert registry.models_for("decoder", "hf-sr:a/x2, b/x4") == ["a/x2", "b/x4"]
    assert registry.backend_class("decoder", "sd-upscale").extra == "diffusers"
    assert registry.models_for("planner", "hf-llm") == ["Qwen/Qwen2.5-0.5B-Instruct"]
    assert registry.models_for("encoder", "hf-caption:/models/blip") == ["/models/blip"]
    for stage, kind in (("decoder", "builtin"), ("decoder", "classic"), ("encoder", "analysis"), ("planner", "rules")):
        assert registry.models_for(stage, f"{kind}:anything") == []  # ships with pixelrelay or has no weights


def test_backends_never_read_the_environment(monkeypatch):
    monkeypatch.setenv("PIXELRELAY_BUILTIN_TILE", "64")
    monkeypatch.setenv("PIXELRELAY_DTYPE", "fp32")
    assert (
        registry.create_decoder("builtin").tiles.tile == Settings.defaults().builtin_tile == 0
    )  # defaults, not the env
    assert registry.create_decoder("builtin", settings=Settings.from_env()).tiles.tile == 64
    # dtype: only what the caller passes
    assert hf.choose_dtype("cuda", "fp16") is torch.float16
    assert hf.choose_dtype("cuda", "bf16") is torch.bfloat16
    assert hf.choose_dtype("cpu", "fp16") is torch.float32


def test_runtime_passes_its_settings_to_backends():
    from pixelrelay.workers.runtime import Runtime

    settings = Settings.defaults().model_copy(update={"builtin_tile": 96})
    runtime = Runtime(settings)
    decoder = runtime.stage("decode", "builtin")
    assert decoder.settings is settings and decoder.tiles.tile == 96
    assert runtime.stage("decode", "builtin") is decoder  # built once
