"""A model that isn't what it claims never runs, as whoever supplies the model would try it:
a Hugging Face folder whose weights don't fit its config (renamed tensors, a config that asks
for more layers, or for wider ones, an extra tensor), and a spandrel state dict with a tensor
too many or too few. Each is refused at load with one line naming the model; nothing is built
half randomly initialised. Tiny real models, built locally."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pixelrelay.pipeline.checkpoints import CheckpointError
from pixelrelay.pipeline.hf import ModelMismatchError
from pixelrelay.pipeline.stages.decoders.hf_sr import HFSuperResolutionDecoder
from pixelrelay.pipeline.stages.decoders.spandrel import SpandrelDecoder
from pixelrelay.pipeline.stages.encoders.hf_caption import HFCaptionEncoder
from pixelrelay.pipeline.stages.planners.hf_llm import HFLLMPlanner
from tests.pipeline import spandrel_fixtures as sf
from tests.pipeline.hf_fixtures import make_tiny_blip, make_tiny_qwen2, make_tiny_swin2sr, tiny_model


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_weights(folder: Path, edit) -> Path:
    (weights,) = folder.glob("*.safetensors")
    tensors = load_file(weights)
    save_file(edit(tensors), weights, metadata={"format": "pt"})
    return folder


def _edit_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def swin2sr(tmp_path_factory):
    return tiny_model(tmp_path_factory, make_tiny_swin2sr, "swin2sr-mismatch", upscale=2)


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and len(text) < 400, text
    return text


def test_a_swin2sr_folder_with_renamed_weights_is_refused(swin2sr, tmp_path):
    bad = _edit_weights(_copy(swin2sr, tmp_path / "renamed"), lambda t: {"x." + k: v for k, v in t.items()})
    with pytest.raises(ModelMismatchError) as info:
        HFSuperResolutionDecoder(str(bad))
    text = _one_line(info.value)
    assert str(bad) in text and "missing" in text and "unexpected" in text and "refused" in text


@pytest.mark.parametrize(
    ("changes", "says"),
    [({"depths": [2, 2], "num_heads": [2, 2]}, "missing"), ({"embed_dim": 16}, "of the wrong shape")],
    ids=["more-layers", "wider-layers"],
)
def test_a_swin2sr_config_the_weights_do_not_fit_is_refused(swin2sr, tmp_path, changes, says):
    bad = _edit_config(_copy(swin2sr, tmp_path / "bad"), **changes)
    with pytest.raises(ModelMismatchError, match=says) as info:
        HFSuperResolutionDecoder(str(bad))
    _one_line(info.value)


def test_the_genuine_folder_still_loads(swin2sr):
    assert HFSuperResolutionDecoder(str(swin2sr)).models


def test_an_llm_planner_with_a_layer_too_few_is_refused(tmp_path):
    good = make_tiny_qwen2(tmp_path / "qwen")
    bad = _edit_weights(
        _copy(good, tmp_path / "bad"), lambda t: {k: v for k, v in t.items() if not k.startswith("model.layers.1.")}
    )
    with pytest.raises(ModelMismatchError, match="missing") as info:
        HFLLMPlanner(str(bad))
    assert "model.layers.1." in _one_line(info.value)


def test_a_caption_model_with_a_tensor_it_does_not_have_is_refused(tmp_path):
    good = make_tiny_blip(tmp_path / "blip")
    bad = _edit_weights(_copy(good, tmp_path / "bad"), lambda t: {**t, "backdoor.weight": torch.zeros(4)})
    with pytest.raises(ModelMismatchError, match="1 unexpected") as info:
        HFCaptionEncoder(str(bad))
    assert "backdoor" not in _one_line(info.value)  # the checkpoint's own names are not quoted


@pytest.mark.parametrize("arch", sf.ARCHITECTURES)
@pytest.mark.parametrize("change", ["extra", "fewer"])
def test_a_spandrel_state_dict_must_match_its_architecture_exactly(tmp_path, arch, change):
    state = {k: v.contiguous() for k, v in sf.build(arch).state_dict().items()}
    if change == "extra":
        state["backdoor.weight"] = torch.zeros(3)
    else:
        del state[sorted(state)[-1]]
    path = tmp_path / f"{arch}-{change}.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="spandrel") as info:
        SpandrelDecoder(str(path))
    _one_line(info.value)
