"""The builtin encoder and decoder: shipped weights load and restore."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.messages import Description, JobOptions, Operation, Plan
from pixelrelay.pipeline.stages.base import ModelUnavailableError
from pixelrelay.pipeline.stages.decoders.builtin import BuiltinDecoder, plan_condition, route, weights_paths
from pixelrelay.pipeline.stages.encoders.builtin import BuiltinEncoder
from pixelrelay.training import degradations as D
from tests.images import scene

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def encoder():
    return BuiltinEncoder()


@pytest.fixture(scope="module")
def decoder():
    return BuiltinDecoder()


def test_weights_ship_and_load(encoder, decoder):
    BuiltinEncoder.check_available(None)
    BuiltinDecoder.check_available(None)
    assert encoder.meta["kind"] == "encoder" and decoder.meta["kind"] == "decoder"
    assert decoder.nets["upscaler"] is not decoder.nets["restorer"]
    assert "context_channels" in decoder.nets["restorer"].config  # the restorer's multi-scale branch
    with pytest.raises(ModelUnavailableError):
        BuiltinDecoder.check_available("/nonexistent/weights.safetensors")
    with pytest.raises(ModelUnavailableError):
        BuiltinEncoder("no_such_model")


def test_x2_beats_bicubic(decoder):
    hr, lr = D.bicubic_pair(scene(), 2)
    out = decoder.restore([DecodedImage(rgb=lr)], [Plan(scale=2)])[0].rgb
    bic = D.to_uint8(D.upscale_bicubic(D.to_tensor(lr), 2))
    assert out.shape == hr.shape
    assert D.psnr_y(out, hr, border=2) > D.psnr_y(bic, hr, border=2) + 0.3


def test_whole_pipeline_beats_bicubic_on_noisy_jpeg(encoder, decoder):
    from pixelrelay.pipeline.stages.planners.rules import RulesPlanner

    hr = scene()
    cfg = D.DegradationConfig(
        p_blur=0,
        p_noise=1,
        p_jpeg=1,
        p_poisson=0,
        noise_sigma=(15, 15),
        jpeg_quality=(50, 50),
        shuffle=False,
        resize_modes=("bicubic",),
    )
    lr, _ = D.degrade(hr, 2, np.random.default_rng(0), cfg)
    im = DecodedImage(rgb=lr)
    plan = RulesPlanner().plan(encoder.describe([im]), [JobOptions(task="upscale", scale=2)])[0]
    assert plan.strength("denoise") > 0
    out = decoder.restore([im], [plan])[0].rgb
    bic = D.to_uint8(D.upscale_bicubic(D.to_tensor(lr), 2))
    assert D.psnr_y(out, hr, border=2) > D.psnr_y(bic, hr, border=2) + 1.0


def test_encoder_estimates_noise(encoder):
    img = scene(192)
    rng = np.random.default_rng(1)
    noisy = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).round().astype(np.uint8)
    clean, noisy_d = encoder.describe([DecodedImage(rgb=img), DecodedImage(rgb=noisy)])
    assert abs(noisy_d.noise_sigma - 20) < 5
    assert clean.noise_sigma < 4
    assert "estimated noise sigma" in noisy_d.text
    assert "noise_sigma" in noisy_d.metrics  # the analysis measurements ride along
    assert 0 <= noisy_d.downscaled <= 1


def test_encoder_estimates_jpeg_quality(encoder):
    img = scene(192)
    d = encoder.describe([DecodedImage(rgb=D.jpeg(img, 30)), DecodedImage(rgb=img)])
    assert d[0].jpeg_quality is not None and abs(d[0].jpeg_quality - 30) <= 15
    assert d[1].jpeg_quality is None


def test_encoder_batch_equals_singles(encoder):
    ims = [DecodedImage(rgb=scene(s)) for s in (64, 96, 128)]
    ims.append(DecodedImage(rgb=np.zeros((3, 5, 3), np.uint8)))
    batch = encoder.estimate(ims)
    singles = [encoder.estimate([im])[0] for im in ims]
    for b, s in zip(batch, singles, strict=True):
        assert b["noise_sigma"] == pytest.approx(s["noise_sigma"], abs=0.02)
        assert b["p_jpeg"] == pytest.approx(s["p_jpeg"], abs=0.002)


def test_decoder_batch_equals_singles(decoder):
    rng = np.random.default_rng(0)
    a, b = scene(64), scene(64)[::-1].copy()
    c = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    ims = [DecodedImage(rgb=x) for x in (a, b, c)]
    plans = [
        Plan(scale=2),
        Plan(scale=2, noise_sigma=10, operations=[Operation(name="denoise", strength=0.5)]),
        Plan(scale=2),
    ]
    batch = decoder.restore(ims, plans)
    for im, plan, out in zip(ims, plans, batch, strict=True):
        single = decoder.restore([im], [plan])[0]
        assert np.abs(single.rgb.astype(int) - out.rgb.astype(int)).max() <= 1


@pytest.mark.parametrize("scale", [1, 2, 4])
@pytest.mark.slow
def test_decoder_sizes_alpha_and_tiny_images(decoder, scale):
    sizes = [(1, 1), (3, 5), (17, 9), (40, 300)]
    ims = []
    for h, w in sizes:
        im = DecodedImage(rgb=np.random.default_rng(h).integers(0, 256, (h, w, 3), dtype=np.uint8))
        if w == 5:
            im.alpha = np.full((h, w), 200, np.uint8)
        ims.append(im)
    plans = [Plan(scale=scale, noise_sigma=12, operations=[Operation(name="denoise", strength=0.6)])] * len(ims)
    outs = decoder.restore(ims, plans)
    for (h, w), im, out in zip(sizes, ims, outs, strict=True):
        assert out.rgb.shape == (h * scale, w * scale, 3) and out.rgb.dtype == np.uint8
        if im.alpha is None:
            assert out.alpha is None
        else:
            assert out.alpha.shape == (h * scale, w * scale) and (out.alpha == 200).all()


@pytest.mark.parametrize(
    "plan",
    [Plan(scale=2), Plan(scale=2, noise_sigma=8, operations=[Operation(name="denoise", strength=0.4)])],
    ids=["upscaler", "restorer"],
)
def test_decoder_tiles_large_images(decoder, plan):
    img = np.tile(scene(128), (3, 3, 1))[:300, :290]  # bigger than one tile
    out = decoder.restore([DecodedImage(rgb=img)], [plan])[0].rgb
    assert out.shape == (600, 580, 3)
    bic = D.to_uint8(D.upscale_bicubic(D.to_tensor(img), 2))
    assert np.abs(out.astype(int) - bic.astype(int)).mean() < 10  # restores, no tile garbage


def test_clean_plan_changes_nothing_at_x1(decoder):
    img = scene(64)
    out = decoder.restore([DecodedImage(rgb=img)], [Plan(scale=1)])[0]
    assert np.array_equal(out.rgb, img)


def test_plan_condition_gates_on_operations():
    # Estimates alone (a clean image's small readings) do not switch anything on.
    assert plan_condition(Plan(scale=2, noise_sigma=3.0, blur_sigma=0.6, jpeg_quality=92)) == [0, 0, 0, 0]
    c = plan_condition(
        Plan(
            scale=2,
            noise_sigma=20,
            jpeg_quality=40,
            blur_sigma=1.6,
            operations=[
                Operation(name="denoise", strength=1.0),
                Operation(name="deblock", strength=0.9),
                Operation(name="deblur", strength=0.3),
            ],
        )
    )
    assert c == pytest.approx([20 / 50, 1.6 / 3, 1.0, 0.6])
    # A JPEG with mild noise: the sub-threshold noise estimate is passed on too.
    c = plan_condition(
        Plan(
            scale=2,
            noise_sigma=3.0,
            blur_sigma=0.5,
            jpeg_quality=40,
            operations=[Operation(name="deblock", strength=0.9)],
        )
    )
    assert c == pytest.approx([3 / 50, 0.5 / 3, 1.0, 0.6])
    # Turned down on purpose (e.g. "no denoising"): noise past the threshold without denoise.
    c = plan_condition(
        Plan(scale=2, noise_sigma=20, jpeg_quality=40, operations=[Operation(name="deblock", strength=0.9)])
    )
    assert c[0] == 0 and c[2] == 1.0


def test_described_noise_flows_into_plan(encoder):
    from pixelrelay.pipeline.stages.planners.rules import RulesPlanner

    d = Description(text="x", noise_sigma=20.0, blur_sigma=0.2, jpeg_quality=None)
    plan = RulesPlanner().plan([d], [JobOptions(task="upscale")])[0]
    assert plan.noise_sigma == 20.0 and plan_condition(plan)[0] == pytest.approx(0.4)


def test_model_names_one_file_or_a_pair(tmp_path):
    assert weights_paths(None)["upscaler"].name == "builtin_upscaler.safetensors"
    one = weights_paths("/w/a.safetensors")
    assert one["upscaler"] == one["restorer"] == Path("/w/a.safetensors")
    pair = weights_paths("builtin_upscaler,/w/b.safetensors")
    assert pair["upscaler"].name == "builtin_upscaler.safetensors" and pair["restorer"] == Path("/w/b.safetensors")
    with pytest.raises(ModelUnavailableError):
        weights_paths("a,b,c")
    with pytest.raises(ModelUnavailableError):  # the restorer of the pair is missing
        BuiltinDecoder.check_available(f"builtin_upscaler,{tmp_path / 'missing.safetensors'}")


@pytest.mark.slow
def test_plan_routes_clean_to_upscaler_and_degraded_to_restorer(decoder):
    clean = Plan(scale=2)
    noisy = Plan(scale=2, noise_sigma=15, operations=[Operation(name="denoise", strength=0.6)])
    assert route(plan_condition(clean)) == "upscaler" and route(plan_condition(noisy)) == "restorer"
    up_only, restorer_only = BuiltinDecoder(model="builtin_upscaler"), BuiltinDecoder(model="builtin_restorer")
    im = DecodedImage(rgb=scene(64))
    both = decoder.restore([im, im], [clean, noisy])  # one call, two networks
    assert np.array_equal(both[0].rgb, up_only.restore([im], [clean])[0].rgb)
    assert np.array_equal(both[1].rgb, restorer_only.restore([im], [noisy])[0].rgb)
    assert not np.array_equal(both[1].rgb, up_only.restore([im], [noisy])[0].rgb)


@pytest.mark.slow
def test_decoder_tiled_equals_untiled(decoder):
    """The upscaler's receptive field fits in the tile margins: tiled equals untiled to float
    rounding. The restorer's context branch sees further, so tiles differ a little."""
    x = torch.from_numpy(np.tile(scene(128), (2, 2, 1))[:200, :190]).permute(2, 0, 1)[None].float() / 255
    for plan, mean_levels in (
        (Plan(scale=2), 0.01),
        (Plan(scale=2, noise_sigma=8, operations=[Operation(name="denoise", strength=0.4)]), 1.0),
    ):
        m = decoder.choose(plan)
        untiled, whole = decoder.upscale_tensor(m, x, [plan])
        tiled, tiles = decoder.upscale_tensor(m, x, [plan], tile=96, overlap=32)
        assert whole.tile >= 200 and tiles.tile == 96 and tiled.shape == untiled.shape == (1, 3, 400, 380)
        assert float((tiled - untiled).abs().mean()) * 255 < mean_levels, m


@pytest.mark.slow
def test_tile_settings_and_dtype_come_from_settings():
    from pixelrelay.pipeline.settings import Settings

    settings = Settings.defaults().model_copy(update={"builtin_tile": 64, "builtin_tile_batch": 2, "dtype": "fp16"})
    dec = BuiltinDecoder(settings=settings)
    assert (dec.tiles.tile, dec.tiles.tile_batch) == (64, 2)
    assert dec.dtype == torch.float32  # fp16 is for GPUs; the CPU always runs fp32
    img = np.tile(scene(64), (2, 2, 1))[:100, :90]
    assert dec.restore([DecodedImage(rgb=img)], [Plan(scale=2)])[0].rgb.shape == (200, 180, 3)


@pytest.mark.slow
def test_cpu_bf16_autocast_follows_the_setting_and_keeps_the_outputs(monkeypatch):
    """On a CPU with native bf16 the builtin decoder's forward runs under bf16 autocast
    (``hf.cpu_autocast_dtype``) unless ``Settings.dtype`` asks for fp32; it is never used on
    other devices. Forced on here (emulated where the CPU lacks bf16), the outputs of both
    networks stay within 2 levels of fp32 and come back as fp32 tensors."""
    from pixelrelay.pipeline import hf
    from pixelrelay.pipeline.settings import Settings

    monkeypatch.setattr(hf, "native_cpu_bf16", lambda: True)
    assert hf.cpu_autocast_dtype("cpu") == torch.bfloat16 and hf.cpu_autocast_dtype("cpu", "bf16") == torch.bfloat16
    assert hf.cpu_autocast_dtype("cpu", "fp32") is None and hf.cpu_autocast_dtype("cuda") is None
    fp32 = BuiltinDecoder(settings=Settings.defaults().model_copy(update={"dtype": "fp32"}))
    auto = BuiltinDecoder()
    assert fp32.autocast_dtype is None and auto.autocast_dtype == torch.bfloat16
    monkeypatch.setattr(hf, "native_cpu_bf16", lambda: False)
    assert BuiltinDecoder().autocast_dtype is None and hf.cpu_autocast_dtype("cpu") is None
    img = scene(96)
    plans = [Plan(scale=2), Plan(scale=2, noise_sigma=12, operations=[Operation(name="denoise", strength=0.6)])]
    for plan in plans:
        a = fp32.restore([DecodedImage(rgb=img)], [plan])[0].rgb.astype(int)
        b = auto.restore([DecodedImage(rgb=img)], [plan])[0].rgb.astype(int)
        assert a.shape == b.shape and np.abs(a - b).max() <= 2 and np.abs(a - b).mean() < 0.1
