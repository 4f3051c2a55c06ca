"""The null backends (``null`` encoder, planner, decoder): pixelrelay's own cost, measured by
``benchmarks/bench_overhead.py``, with models that do nothing. The shared contract
(``test_contract.py``) covers them too; this checks what makes them null."""

from __future__ import annotations

import numpy as np

from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.messages import Description, JobOptions, Plan
from pixelrelay.pipeline.stages import registry
from pixelrelay.pipeline.stages.encoders.null import NULL_TEXT


def test_null_encoder_describes_every_image_alike():
    enc = registry.create_encoder("null")
    images = [DecodedImage(rgb=np.zeros((3, 5, 3), np.uint8)), DecodedImage(rgb=np.full((7, 2, 3), 200, np.uint8))]
    got = enc.describe(images)
    assert got == [Description(text=NULL_TEXT)] * 2
    assert enc.identity() == "null" and registry.models_for("encoder", "null") == []


def test_null_planner_plans_nothing_but_the_asked_scale():
    planner = registry.create_planner("null")
    options = [
        JobOptions(task="restore"),
        JobOptions(task="upscale"),
        JobOptions(task="upscale", scale=4, format="webp"),
    ]
    plans = planner.plan([Description(text="anything", noise_sigma=40.0)] * 3, options)
    assert [p.scale for p in plans] == [1, 2, 4]
    assert all(p.operations == [] and p.prompt == "" and p.noise_sigma == 0.0 for p in plans)
    assert plans[2].output_format == "webp"


def test_null_decoder_is_the_identity_at_scale_1_and_repeats_pixels_above():
    dec = registry.create_decoder("null")
    rng = np.random.default_rng(0)
    image = DecodedImage(
        rgb=rng.integers(0, 256, (3, 4, 3), dtype=np.uint8), alpha=rng.integers(0, 256, (3, 4), dtype=np.uint8)
    )
    same, double = dec.restore([image, image], [Plan(scale=1), Plan(scale=2)])
    assert same.rgb is image.rgb and same.alpha is image.alpha  # not even copied
    assert double.rgb.shape == (6, 8, 3) and double.alpha.shape == (6, 8)
    assert np.array_equal(double.rgb[::2, ::2], image.rgb) and np.array_equal(double.rgb[1::2, 1::2], image.rgb)
    assert np.array_equal(double.alpha[1::2, ::2], image.alpha)


def test_null_planner_plans_an_output_size_as_a_native_scale_and_its_target():
    """A scale other than 1, 2, 4, or a width, is the plan's target; its scale is native."""
    planner = registry.create_planner("null")
    options = [JobOptions(task="upscale", scale=3), JobOptions(task="upscale", width=800)]
    plans = planner.plan([Description(text="anything")] * 2, options)
    assert [p.scale for p in plans] == [4, 2]
    assert [p.target == o.target() for p, o in zip(plans, options, strict=True)] == [True, True]
    assert all(p.target is not None for p in plans)
