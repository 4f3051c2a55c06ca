"""Any output scale (``pipeline.outsize``): exact sizes for odd sources, the native scale a
decoder runs, the antialiased resample, notes and native scales recorded, and plans
without a target left exactly as they were. Real decoders (builtin with its shipped
weights, classic, a tiny random spandrel model saved and loaded from a file)."""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pixelrelay.pipeline import outsize
from pixelrelay.pipeline.imageio import DecodedImage, ImageDecodeError, decode_image
from pixelrelay.pipeline.messages import JobOptions, Operation, OutputTarget, Plan
from pixelrelay.pipeline.stages.decoders.edits import restore_with_edits
from pixelrelay.pipeline.stages.registry import create_decoder
from tests.images import encode, photo_like

# A 29x37 source: odd on both sides, so every rounding rule shows.
SIZES = [
    (OutputTarget(scale=1.5), (44, 56)),  # 43.5 -> 44, 55.5 -> 56 (halves up)
    (OutputTarget(scale=3), (87, 111)),
    (OutputTarget(scale=0.5), (15, 19)),  # 14.5 -> 15, 18.5 -> 19
    (OutputTarget(scale=8), (232, 296)),
    (OutputTarget(width=100), (100, 128)),  # 37 * 100 / 29 = 127.59
    (OutputTarget(height=10), (8, 10)),  # 29 * 10 / 37 = 7.84
    (OutputTarget(width=50, height=50), (39, 50)),  # the height binds: 29 * 50 / 37 = 39.19
    (OutputTarget(width=20, height=1000), (20, 26)),  # the width binds: 37 * 20 / 29 = 25.52
    (OutputTarget(width=1), (1, 1)),  # never below one pixel
]


@pytest.mark.parametrize("target, size", SIZES, ids=[t.describe() for t, _ in SIZES])
def test_exact_sizes_for_an_odd_source(target, size):
    assert outsize.final_size(target, 29, 37) == size


def _half_up(x: Fraction) -> int:
    return max(1, int(x + Fraction(1, 2)))


def test_boxes_fit_inside_keep_the_ratio_and_bind_one_side():
    rng = random.Random(7)
    for _ in range(2000):
        w, h = rng.randint(1, 5000), rng.randint(1, 5000)
        bw, bh = rng.choice([None, rng.randint(1, 9000)]), rng.randint(1, 9000)
        out = outsize.final_size(OutputTarget(width=bw, height=bh), w, h)
        f = min(Fraction(bw, w), Fraction(bh, h)) if bw else Fraction(bh, h)  # exact, in rationals
        assert out == (
            bw if bw and Fraction(bw, w) <= Fraction(bh, h) else _half_up(w * f),
            bh if not bw or Fraction(bh, h) < Fraction(bw, w) else _half_up(h * f),
        ), (w, h, bw, bh)
        assert out[1] <= bh and (bw is None or out[0] <= bw)


@pytest.mark.parametrize(
    "natives, wanted, native",
    [
        ((1, 2, 4), 1.5, 2),
        ((1, 2, 4), 3, 4),
        ((1, 2, 4), 0.5, 1),
        ((1, 2, 4), 8, 4),
        ((1, 2, 4), 2, 2),
        ((2,), 3, 2),
        ((4,), 0.5, 4),
        ((2, 4, 8), 5, 8),
        ((1, 3), 2.5, 3),
    ],
)
def test_the_native_scale_at_or_above_else_the_largest(natives, wanted, native):
    assert outsize.native_for(natives, wanted) == native


@pytest.mark.parametrize(
    "options, planned",
    [
        (JobOptions(), (1, None)),
        (JobOptions(task="upscale"), (2, None)),
        (JobOptions(scale=4), (4, None)),
        (JobOptions(scale=2.0), (2, None)),  # integral: native, no target, as before
        (JobOptions(scale=1.5), (2, OutputTarget(scale=1.5))),
        (JobOptions(scale=3), (4, OutputTarget(scale=3))),
        (JobOptions(scale=8), (4, OutputTarget(scale=8))),
        (JobOptions(scale=0.5), (1, OutputTarget(scale=0.5))),
        (JobOptions(width=800), (1, OutputTarget(width=800))),
        (JobOptions(task="upscale", width=800, height=600), (2, OutputTarget(width=800, height=600))),
    ],
)
def test_what_planners_put_in_the_plan(options, planned):
    assert outsize.planned(options) == planned


# --- the decode path, on real decoders ------------------------------------------------------


def _image(width=29, height=37, seed=0, alpha=True) -> DecodedImage:
    rgb = np.asarray(photo_like(width, height, seed).convert("RGB"))
    ramp = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1)) if alpha else None
    return DecodedImage(rgb=np.ascontiguousarray(rgb), alpha=ramp)


@pytest.fixture(scope="module")
def builtin():
    return create_decoder("builtin")


@pytest.fixture(scope="module")
def classic():
    return create_decoder("classic")


NATIVES = {
    "x1.5": 2,
    "x3": 4,
    "x0.5": 1,
    "x8": 4,
    "width 100": 4,
    "height 10": 1,
    "fit 50x50": 2,
    "fit 20x1000": 1,
    "width 1": 1,
}


@pytest.mark.parametrize("kind", ["builtin", "classic"])
@pytest.mark.slow
def test_every_target_comes_out_at_its_exact_size(kind, request):
    decoder = request.getfixturevalue(kind)
    image = _image()
    plans = [
        Plan(
            scale=outsize.planned(JobOptions(scale=t.scale, width=t.width, height=t.height))[0],
            target=t,
            operations=[Operation(name="denoise", strength=0.4)],
        )
        for t, _ in SIZES
    ]
    results = restore_with_edits(decoder, [image] * len(plans), plans)
    for (target, size), result in zip(SIZES, results, strict=True):
        assert (result.rgb.shape[1], result.rgb.shape[0]) == size and result.rgb.dtype == np.uint8
        assert result.alpha is not None and (result.alpha.shape[1], result.alpha.shape[0]) == size
        assert result.native_scale == NATIVES[target.describe()], target
        resampled = [n for n in result.notes if n.startswith(f"output {target.describe()}: decoder ran")]
        assert resampled == [
            f"output {target.describe()}: decoder ran x{result.native_scale}, resampled "
            f"{29 * result.native_scale}x{37 * result.native_scale} -> {size[0]}x{size[1]} "
            f"({'bicubic' if size[0] > 29 * result.native_scale else 'antialiased'})"
        ]
        beyond = [n for n in result.notes if "no native scale at or above" in n]
        assert beyond == (
            ["output x8: no native scale at or above x8 (decoder's: 1, 2, 4): ran x4 and resized the rest (bicubic)"]
            if target.scale == 8
            else []
        )


def test_the_resample_is_the_native_output_resized(builtin):
    """x3 on builtin is its x4 output, bicubic-antialiased to the exact size; alpha alike."""
    image = _image(31, 23, seed=3)
    got = restore_with_edits(builtin, [image], [Plan(scale=4, target=OutputTarget(scale=3))])[0]
    native = builtin.restore([image], [Plan(scale=4)])[0]
    x = torch.from_numpy(native.rgb).permute(2, 0, 1)[None].float() / 255
    want = F.interpolate(x, size=(69, 93), mode="bicubic", antialias=True, align_corners=False)
    want = (want.clamp(0, 1) * 255 + 0.5).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(got.rgb, want)
    assert got.alpha.shape == (69, 93) and abs(int(got.alpha[:, -1].mean()) - 255) <= 3


def test_shrinking_is_antialiased(classic):
    """A one-pixel checkerboard shrunk to x0.3 comes out flat grey; point sampling it (what an
    unfiltered resize does) keeps full-contrast moire."""
    board = ((np.indices((60, 60)).sum(axis=0) % 2) * 255).astype(np.uint8)
    image = DecodedImage(rgb=np.repeat(board[..., None], 3, axis=2))
    got = restore_with_edits(classic, [image], [Plan(scale=1, target=OutputTarget(scale=0.3))])[0].rgb
    assert got.shape == (18, 18, 3)
    assert got[2:-2, 2:-2].std() < 8 and abs(got.mean() - 127.5) < 8
    x = torch.from_numpy(image.rgb).permute(2, 0, 1)[None].float()
    aliased = F.interpolate(x, size=(18, 18), mode="nearest")
    assert aliased.std() > 100  # the test can tell the two apart


def test_plans_without_a_target_are_untouched(builtin, classic):
    image = _image(20, 16, seed=5)
    plans = [Plan(scale=2, operations=[Operation(name="sharpen", strength=0.5)]), Plan(scale=4), Plan(scale=1)]
    for decoder in (builtin, classic):
        direct = decoder.restore([image] * 3, plans)
        routed = restore_with_edits(decoder, [image] * 3, plans)
        for d, r, plan in zip(direct, routed, plans, strict=True):
            assert np.array_equal(d.rgb, r.rgb) and np.array_equal(d.alpha, r.alpha) and d.notes == r.notes
            assert r.native_scale is None and r.rgb.shape[:2] == (16 * plan.scale, 20 * plan.scale)


def test_a_multi_model_decoder_runs_its_own_scales(tmp_path_factory):
    """spandrel with one x2 model: x1.5 runs it exactly and shrinks; x3 has no native scale
    at or above it: the x2 model runs and the rest is resized, with the note."""
    from tests.pipeline.spandrel_fixtures import checkpoint

    decoder = create_decoder(f"spandrel:{checkpoint(tmp_path_factory, 'compact', 'x2.safetensors', scale=2)}")
    assert decoder.native_scales() == (2,)
    image = _image(17, 13, seed=2)
    plans = [
        Plan(scale=2, target=OutputTarget(scale=1.5)),
        Plan(scale=4, target=OutputTarget(scale=3)),
        Plan(scale=1, target=OutputTarget(height=40)),
    ]
    small, large, tall = restore_with_edits(decoder, [image] * 3, plans)
    assert small.rgb.shape[:2] == (20, 26) and small.native_scale == 2  # 19.5 -> 20, 25.5 -> 26
    assert large.rgb.shape[:2] == (39, 51) and large.native_scale == 2
    assert any("no native scale at or above x3 (decoder's: 2): ran x2" in n for n in large.notes)
    assert tall.rgb.shape[:2] == (40, 52) and tall.native_scale == 2  # 17 * 40 / 13 = 52.3


# --- the output-pixel guard uses the real final size -----------------------------------------


@pytest.mark.parametrize(
    "options, fits",
    [
        (JobOptions(), True),
        (JobOptions(scale=1.5), False),
        (JobOptions(scale=0.5), True),
        (JobOptions(width=100), True),
        (JobOptions(width=101), False),
        (JobOptions(height=100), True),
        (JobOptions(width=101, height=100), True),  # fits inside: 100x100
        (JobOptions(task="upscale"), False),
    ],
)
def test_the_output_pixel_guard_checks_the_final_size(options, fits):
    data = encode(photo_like(100, 100, 1), "PNG")
    limit = 100 * 100  # exactly the source's pixels
    for sizer in (
        outsize.options_sizer(options),
        outsize.plan_sizer(Plan(scale=outsize.planned(options)[0], target=options.target())),
    ):
        if fits:
            decode_image(data, scale=sizer, max_output_pixels=limit)
        else:
            with pytest.raises(ImageDecodeError, match="output too large: 100x100"):
                decode_image(data, scale=sizer, max_output_pixels=limit)


def test_a_plan_naming_a_model_of_another_scale_is_resampled_once(tmp_path_factory):
    """spandrel with an x2 and an x4 model, a target of x3: the x4 model runs. A plan whose
    ``model`` names the x2 model runs it at its own scale and is resampled once, x2 -> x3:
    not resized to x4 inside the decoder and then shrunk to x3. The same output as the x2
    model asked for directly, resized to the target."""
    from pixelrelay.pipeline import tensors
    from tests.pipeline.spandrel_fixtures import checkpoint

    x2 = checkpoint(tmp_path_factory, "compact", "two.safetensors", scale=2)
    x4 = checkpoint(tmp_path_factory, "compact", "four.safetensors", scale=4)
    decoder = create_decoder(f"spandrel:{x2},{x4}")
    assert decoder.native_scales() == (2, 4)
    image = _image(17, 13, seed=3)
    target = OutputTarget(scale=3)
    default, named = restore_with_edits(
        decoder, [image] * 2, [Plan(scale=4, target=target), Plan(scale=4, target=target, model="two")]
    )
    assert default.rgb.shape[:2] == named.rgb.shape[:2] == (39, 51)
    assert default.native_scale == 4 and named.native_scale == 2
    assert any("the plan's model two runs x2" in n for n in named.notes)
    assert not any("-> plan x4" in n for n in named.notes)  # no resample inside the decoder
    (direct,) = decoder.restore([image], [Plan(scale=2, model="two")])
    once = tensors.to_uint8(tensors.resize(tensors.to_tensor(direct.rgb), (39, 51)))
    assert np.array_equal(named.rgb, once)
