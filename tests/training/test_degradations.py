"""The degradation synthesis module: seeded, shapes, true parameters, metrics."""

import numpy as np
import pytest

from pixelrelay.training import degradations as D


def _image(h=96, w=128, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = 0.5 + 0.25 * np.sin(xx / 7.0) * np.cos(yy / 11.0)
    rgb = np.stack([base, np.roll(base, 5, axis=1), 1 - base], axis=-1)
    rgb += rng.normal(0, 0.01, rgb.shape)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def test_seeded_and_reproducible():
    img = _image()
    a, pa = D.degrade(img, 2, np.random.default_rng(7))
    b, pb = D.degrade(img, 2, np.random.default_rng(7))
    c, _ = D.degrade(img, 2, np.random.default_rng(8))
    assert np.array_equal(a, b) and pa == pb
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("scale", [1, 2, 4])
def test_shapes_and_params(scale):
    img = _image(99, 131)  # not a multiple of the scale: cropped first
    out, p = D.degrade(img, scale, np.random.default_rng(1), force=("blur", "noise", "jpeg"))
    assert out.dtype == np.uint8
    assert out.shape == (99 // scale, 131 // scale, 3)
    assert p.scale == scale and p.downscaled == (scale > 1)
    assert p.noise_sigma > 0 and p.blur_sigma > 0 and p.jpeg_quality is not None
    assert p.order[-1] == "jpeg"
    assert sorted(p.order[:-1]) == sorted(["blur", "noise"] + (["downscale"] if scale > 1 else []))


def test_effective_noise_sigma_matches_added_noise():
    flat = np.full((128, 128, 3), 128, np.uint8)
    cfg = D.DegradationConfig(p_blur=0, p_noise=1, p_jpeg=0, p_poisson=0, noise_sigma=(20, 20))
    out, p = D.degrade(flat, 1, np.random.default_rng(3), cfg)
    assert p.noise_added == pytest.approx(20)
    assert p.noise_sigma == pytest.approx(20, abs=1.0)
    assert np.std(out.astype(float) - 128) == pytest.approx(p.noise_sigma, abs=1.0)


def test_noise_before_downscale_is_weakened():
    flat = np.full((128, 128, 3), 128, np.uint8)
    cfg = D.DegradationConfig(
        p_blur=0, p_noise=1, p_jpeg=0, p_poisson=0, p_gray_noise=0, noise_sigma=(20, 20), resize_modes=("area",)
    )
    for seed in range(20):
        _, p = D.degrade(flat, 4, np.random.default_rng(seed), cfg)
        if p.order == ["noise", "downscale"]:
            assert p.noise_sigma == pytest.approx(5.0, abs=0.7)  # area /4: sigma / 4
            return
    pytest.fail("no seed put noise first")


def test_clean_config_is_identity_at_x1():
    img = _image()
    cfg = D.DegradationConfig(p_blur=0, p_noise=0, p_jpeg=0)
    out, p = D.degrade(img, 1, np.random.default_rng(0), cfg)
    assert np.array_equal(out, img)
    assert p.noise_sigma == 0 and p.blur_sigma == 0 and p.jpeg_quality is None


def test_config_round_trip_and_unknown_key():
    cfg = D.DegradationConfig.from_dict({"p_blur": 0.1, "noise_sigma": [2, 3]})
    assert cfg.p_blur == 0.1 and cfg.noise_sigma == (2, 3)
    assert D.DegradationConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        D.DegradationConfig.from_dict({"bogus": 1})


def test_bicubic_pair_and_metrics():
    img = _image(101, 77)
    hr, lr = D.bicubic_pair(img, 4)
    assert hr.shape == (100, 76, 3) and lr.shape == (25, 19, 3)
    assert D.psnr_y(hr, hr) == float("inf")
    assert D.ssim_y(hr, hr) == pytest.approx(1.0)
    up = D.to_uint8(D.upscale_bicubic(D.to_tensor(lr), 4))
    assert up.shape == hr.shape
    assert 15 < D.psnr_y(up, hr, border=4) < 60
    assert 0 < D.ssim_y(up, hr, border=4) < 1


def test_jpeg_lower_quality_is_worse():
    img = _image()
    assert D.psnr_y(D.jpeg(img, 20), img) < D.psnr_y(D.jpeg(img, 90), img)


def test_early_jpeg_puts_noise_or_blur_on_top_and_reports_noise_without_jpeg():
    """p_jpeg_early: JPEG before the last step (noise or blur), never before a downscale; the
    noise is reported as added (JPEG never counts), and the output is not on a JPEG grid."""
    img = _image(128, 128)
    cfg = D.DegradationConfig(
        p_blur=0,
        p_noise=1,
        p_jpeg=1,
        p_jpeg_early=1,
        p_poisson=0,
        p_gray_noise=0,
        noise_sigma=(10, 10),
        jpeg_quality=(30, 30),
    )
    out, p = D.degrade(img, 1, np.random.default_rng(5), cfg)
    assert p.order == ["jpeg", "noise"] and p.jpeg_quality == 30
    assert p.noise_sigma == pytest.approx(10, abs=0.6)
    assert not np.array_equal(out, D.jpeg(out, 30))  # noise on top of the blocks
    # blur (and a downscale), JPEG, then noise: the same noise figure as the chain with JPEG last
    late = D.DegradationConfig(**{**cfg.to_dict(), "p_blur": 1, "shuffle": False, "p_jpeg_early": 0})
    early = D.DegradationConfig(**{**late.to_dict(), "p_jpeg_early": 1})
    for scale in (1, 2):
        _, pl = D.degrade(img, scale, np.random.default_rng(9), late)
        _, pe = D.degrade(img, scale, np.random.default_rng(9), early)
        assert pl.order[-1] == "jpeg" and pe.order[-2:] == ["jpeg", "noise"]
        assert pe.noise_sigma == pytest.approx(pl.noise_sigma, rel=1e-6)
    # a downscale is never the step after the JPEG
    x4 = D.DegradationConfig(p_blur=0, p_noise=0, p_jpeg=1, p_jpeg_early=1)
    _, p4 = D.degrade(img, 4, np.random.default_rng(2), x4)
    assert p4.order == ["downscale", "jpeg"]
