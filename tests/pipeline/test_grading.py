"""Grading (``pipeline.grading``) and how edit plans reach decoders (``decoders.edits``):
measurable effects, alpha kept exactly, batched equals single, one implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixelrelay.pipeline import grading
from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.messages import Edit, GenerativeEdit, GradingOp, Plan
from pixelrelay.pipeline.stages.decoders.builtin import BuiltinDecoder
from pixelrelay.pipeline.stages.decoders.classic import ClassicDecoder
from pixelrelay.pipeline.stages.decoders.edits import EditUnsupportedError, restore_with_edits
from pixelrelay.pipeline.stages.planners import edits
from tests.images import photo_like

torch.set_num_threads(2)


def _image(w: int = 48, h: int = 40, seed: int = 1, alpha: bool = True) -> DecodedImage:
    rgb = np.asarray(photo_like(w, h, seed))
    a = np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8) if alpha else None
    return DecodedImage(rgb=rgb, alpha=a)


def _plan(*ops: tuple[str, float], scale: int = 1) -> Plan:
    return Plan(scale=scale, edit=Edit(grading=[GradingOp(name=n, strength=s) for n, s in ops]))


def _f(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return _f(rgb) @ np.array(grading.LUMA)


def _chroma(rgb: np.ndarray) -> float:
    f = _f(rgb)
    return float((f.max(-1) - f.min(-1)).mean())


def _rb(rgb: np.ndarray) -> float:
    return float(_f(rgb)[..., 0].mean() / _f(rgb)[..., 2].mean())


DECODERS = {"classic": ClassicDecoder, "builtin": BuiltinDecoder}
_BUILT: dict = {}


def _decoder(kind: str):
    if kind not in _BUILT:
        _BUILT[kind] = DECODERS[kind]()
    return _BUILT[kind]


def _edit(kind: str, image: DecodedImage, plan: Plan):
    result = restore_with_edits(_decoder(kind), [image], [plan])[0]
    assert not isinstance(result, Exception), result
    return result


@pytest.mark.parametrize("kind", DECODERS)
def test_measurable_effects(kind):
    image = _image()
    src = image.rgb
    warmer = _edit(kind, image, _plan(("warmth", 0.35))).rgb
    assert _rb(warmer) > _rb(src) * 1.08
    assert _rb(_edit(kind, image, _plan(("warmth", -0.35))).rgb) < _rb(src) / 1.08
    bw = _edit(kind, image, _plan(("grayscale", 1.0))).rgb
    assert _chroma(bw) <= 1.0 and _chroma(src) > 50  # saturation ~ 0
    assert _luma(_edit(kind, image, _plan(("exposure", 0.35))).rgb).mean() > _luma(src).mean() + 10
    assert _luma(_edit(kind, image, _plan(("exposure", -0.35))).rgb).mean() < _luma(src).mean() - 10
    assert _luma(_edit(kind, image, _plan(("contrast", 0.35))).rgb).std() > _luma(src).std() * 1.15
    assert _luma(_edit(kind, image, _plan(("contrast", -0.35))).rgb).std() < _luma(src).std() * 0.9
    assert _chroma(_edit(kind, image, _plan(("saturation", 0.35))).rgb) > _chroma(src) * 1.15
    assert _chroma(_edit(kind, image, _plan(("saturation", -0.35))).rgb) < _chroma(src) * 0.8
    sepia = _f(_edit(kind, image, _plan(("sepia", 1.0))).rgb)
    assert (sepia[..., 0] >= sepia[..., 1] - 1).all() and (sepia[..., 1] >= sepia[..., 2] - 1).all()  # brown tones
    ratio = _f(_edit(kind, image, _plan(("vignette", 1.0))).rgb).mean(-1) / np.maximum(_f(src).mean(-1), 1)
    assert ratio[:3, :3].mean() < 0.6 and abs(ratio[17:23, 21:27].mean() - 1) < 0.02  # corners dark, centre kept


def test_white_balance_removes_a_colour_cast():
    cast = _image(alpha=False)
    rgb = _f(cast.rgb) * np.array([1.0, 0.9, 0.6])  # a yellow cast
    image = DecodedImage(rgb=np.clip(rgb, 0, 255).astype(np.uint8))
    out = _edit("classic", image, _plan(("white_balance", 1.0))).rgb
    spread = lambda a: float(np.ptp(_f(a).reshape(-1, 3).mean(0)))  # noqa: E731  channel means apart
    assert spread(out) < spread(image.rgb) / 3


@pytest.mark.parametrize("kind", DECODERS)
@pytest.mark.parametrize("scale", [1, 2])
def test_alpha_is_kept_exactly(kind, scale):
    image = _image()
    plain = _decoder(kind).restore([image], [Plan(scale=scale)])[0]
    graded = _edit(kind, image, _plan(("sepia", 0.8), ("vignette", 0.5), ("exposure", 0.5), scale=scale))
    assert np.array_equal(graded.alpha, plain.alpha)
    if scale == 1:
        assert np.array_equal(graded.alpha, image.alpha)
    assert not np.array_equal(graded.rgb, plain.rgb)


@pytest.mark.parametrize("kind", DECODERS)
def test_batched_equals_single_with_mixed_sizes_and_plans(kind):
    images = [_image(48, 40, 1), _image(48, 40, 2, alpha=False), _image(21, 17, 3), _image(48, 40, 4)]
    plans = [
        _plan(("warmth", 0.5), ("vignette", 0.6)),
        _plan(("white_balance", 1.0), ("contrast", 0.5)),
        _plan(("grayscale", 0.7), ("exposure", -0.4), ("vignette", 1.0)),
        Plan(),
    ]
    batch = restore_with_edits(_decoder(kind), images, plans)
    for image, plan, got in zip(images, plans, batch, strict=True):
        single = restore_with_edits(_decoder(kind), [image], [plan])[0]
        assert np.abs(_f(single.rgb) - _f(got.rgb)).max() <= 1
    assert np.array_equal(batch[3].rgb, _decoder(kind).restore([images[3]], [plans[3]])[0].rgb)  # no edit: as before


def test_grade_images_groups_sizes_and_equals_the_tensor_path():
    rgbs = [_image(30, 20, s, alpha=False).rgb for s in range(3)] + [_image(11, 9, 5, alpha=False).rgb]
    ops = [
        [GradingOp(name="warmth", strength=0.5)],
        [],
        [GradingOp(name="vignette", strength=0.8)],
        [GradingOp(name="saturation", strength=-1.0)],
    ]
    out = grading.grade_images(rgbs, ops, max_batch_pixels=30 * 20)  # one image per tensor
    together = grading.grade_images(rgbs, ops)
    assert out[1] is rgbs[1]  # nothing to do: the same array
    for a, b in zip(out, together, strict=True):
        assert np.abs(_f(a) - _f(b)).max() <= 1
    assert _chroma(out[3]) <= 1.0


def test_padding_never_leaks_into_an_item():
    small = torch.rand(1, 3, 9, 13)
    padded = torch.nn.functional.pad(small, (0, 7, 0, 5), value=1.0)  # white padding
    ops = [
        [
            GradingOp(name="white_balance", strength=1.0),
            GradingOp(name="contrast", strength=0.8),
            GradingOp(name="vignette", strength=1.0),
        ]
    ]
    alone = grading.grade(small, ops)
    inside = grading.grade(padded, ops, sizes=[(9, 13)])[..., :9, :13]
    assert torch.allclose(alone, inside, atol=1e-5)


def test_one_order_and_no_op_is_identity():
    assert grading.ORDER == edits.ORDER
    x = torch.rand(2, 3, 5, 6)
    assert grading.grade(x, [[], []]) is x


def test_generative_edit_fails_the_item_on_a_decoder_without_one():
    generative = Plan(edit=Edit(generative=GenerativeEdit(prompt="a watercolour painting")))
    images = [_image(), _image(seed=2)]
    results = restore_with_edits(_decoder("classic"), images, [generative, _plan(("warmth", 0.3))])
    assert isinstance(results[0], EditUnsupportedError) and "generative edit" in str(results[0])
    assert results[1].rgb.shape == images[1].rgb.shape and "graded: warmth +0.3" in results[1].notes
