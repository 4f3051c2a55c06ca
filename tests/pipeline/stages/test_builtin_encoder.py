"""The builtin encoder's cost controls: JPEG evidence from pixels (never the file format) gates
the table fit, the fit's two passes equal the exhaustive one, crops are chosen
deterministically, the analysis's pixel budget, and batches equal per-item calls."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pixelrelay.pipeline.imageio import DecodedImage, decode_image
from pixelrelay.pipeline.stages.encoders import analysis, builtin
from pixelrelay.pipeline.stages.encoders.builtin import BuiltinEncoder
from tests.images import add_noise, clean_photo, scene

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def encoder():
    return BuiltinEncoder()


@pytest.fixture
def fit_calls(monkeypatch):
    """Counts calls of the real ``jpeg_table_fit`` (and still runs it)."""
    calls = []
    real = builtin.jpeg_table_fit

    def spy(rgb):
        calls.append(rgb.shape)
        return real(rgb)

    monkeypatch.setattr(builtin, "jpeg_table_fit", spy)
    return calls


def _encode(rgb: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **kwargs)
    return buf.getvalue()


def test_jpeg_damage_saved_as_png_is_read_from_the_pixels(encoder, fit_calls):
    img = scene(192)
    damaged = decode_image(_encode(img, "JPEG", quality=40))
    as_png = decode_image(_encode(damaged.rgb, "PNG"))
    assert as_png.source_format == "PNG" and np.array_equal(as_png.rgb, damaged.rgb)
    (d,) = encoder.describe([as_png])
    assert fit_calls == [as_png.rgb.shape]  # the table fit ran, on the pixels' evidence
    assert d.jpeg_quality == pytest.approx(40, abs=2)


def test_clean_and_noisy_images_skip_the_table_fit(encoder, fit_calls):
    img = clean_photo(192, 208)
    png = decode_image(_encode(img, "PNG"))
    described = encoder.describe([png, DecodedImage(rgb=add_noise(img, 12, seed=3))])
    assert fit_calls == []
    assert all(d.jpeg_quality is None for d in described)
    assert encoder.estimate([png])[0]["jpeg_quality"] is None and fit_calls == []  # also without describe
    # The evidence is the pixels': no grid and no blocking means no fit, whatever the format.
    assert not builtin.jpeg_evidence(np.zeros((8, 18)), 1.0)
    assert builtin.jpeg_evidence(np.zeros((8, 18)), builtin.JPEG_EVIDENCE_BLOCKINESS)
    assert builtin.jpeg_evidence(np.full((8, 18), builtin.JPEG_EVIDENCE_GRID), 1.0)


def test_two_pass_fit_equals_the_exhaustive_fit():
    rng = np.random.default_rng(0)
    for quality in (12, 37, 64, 90):
        img = np.asarray(Image.open(io.BytesIO(_encode(np.tile(scene(128), (3, 3, 1)), "JPEG", quality=quality))))
        h, w = img.shape[0] // 8 * 8, img.shape[1] // 8 * 8
        x = img[:h, :w].astype(np.float64)
        y = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2] - 128.0
        blocks = y.reshape(h // 8, 8, w // 8, 8).transpose(0, 2, 1, 3).reshape(-1, 8, 8)
        blocks = blocks[np.linspace(0, len(blocks) - 1, builtin.MAX_FIT_BLOCKS).astype(int)]
        builtin.jpeg_table_fit(img)  # loads the tables
        coef = (builtin._DCT8 @ blocks @ builtin._DCT8.T).reshape(len(blocks), 64)[:, builtin._FIT_FREQS]
        every = builtin._grid_scores(coef.astype(np.float32), builtin._STEPS, builtin.FIT_MIN_COEFFICIENTS)
        assert builtin.jpeg_table_fit(img) == pytest.approx((float(np.argmax(every) + 1), float(every.max())), abs=1e-6)
        assert builtin.jpeg_table_fit(img)[0] == quality
    noise = rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)
    assert builtin.jpeg_table_fit(noise)[1] < builtin.TABLE_FIT_MIN_SCORE


def test_crop_selection_is_deterministic_and_bounded():
    assert builtin.select_crops(16) == [0, 2, 4, 6, 9, 11, 13, 15]
    assert builtin.select_crops(6) == list(range(6))
    yy, xx = np.mgrid[0:512, 0:480]
    coords = np.stack([yy // 8, xx // 8, np.zeros_like(yy)], -1).astype(np.uint8)  # pixels name their place
    crops = builtin.image_crops(coords)
    assert len(crops) == builtin.N_CROPS and np.array_equal(crops, builtin.image_crops(coords.copy()))
    starts = [(int(c[0, 0, 0]) * 8, int(c[0, 0, 1]) * 8) for c in crops]
    assert all(y % 8 == 0 and x % 8 == 0 for y, x in starts) and len(set(starts)) == len(starts)
    other = np.random.default_rng(1).integers(0, 256, coords.shape, dtype=np.uint8)  # content plays no part
    assert np.array_equal(builtin.image_crops(other)[:, 0, 0], np.stack([other[y, x] for y, x in starts]))
    assert builtin.image_crops(np.zeros((20, 30, 3), np.uint8)).shape == (1, 64, 64, 3)


@pytest.mark.slow
def test_batch_equals_per_item(encoder):
    jpeg = np.asarray(Image.open(io.BytesIO(_encode(scene(160), "JPEG", quality=55))))
    big = np.tile(scene(128), (5, 5, 1))[:600, :620]  # over the analysis budget: measured on tiles
    ims = [DecodedImage(rgb=x) for x in (scene(96), jpeg, big, np.zeros((3, 5, 3), np.uint8))]
    batch = encoder.describe(ims)
    for im, b in zip(ims, batch, strict=True):
        (single,) = encoder.describe([im])
        assert b.metrics.keys() == single.metrics.keys() and b.jpeg_quality == single.jpeg_quality
        for key in ("noise_sigma", "blur_sigma", "downscaled"):  # conv batching may move the last bit
            assert getattr(b, key) == pytest.approx(getattr(single, key), abs=0.02)
        assert {k: v for k, v in b.metrics.items() if not k.startswith("est_")} == {
            k: v for k, v in single.metrics.items() if not k.startswith("est_")
        }
    assert batch[1].jpeg_quality == pytest.approx(55, abs=2)


def test_separable_filters_equal_the_3x3_kernels():
    rng = np.random.default_rng(2)
    luma = rng.uniform(0, 255, (37, 41)).astype(np.float32)
    ref_sobel = np.abs(analysis._filter3x3_valid(luma, analysis.SOBEL_X)) + np.abs(
        analysis._filter3x3_valid(luma, analysis.SOBEL_X.T)
    )
    np.testing.assert_allclose(analysis._sobel_abs_sum(luma), ref_sobel, rtol=1e-5, atol=1e-3)
    ref_imm = np.abs(analysis._filter3x3_valid(luma, analysis.IMMERKAER_KERNEL))
    np.testing.assert_allclose(analysis._immerkaer_abs(luma), ref_imm, rtol=1e-5, atol=1e-3)
    ref_lap = analysis._filter3x3_valid(luma, analysis.LAPLACIAN_KERNEL).var(dtype=np.float64)
    assert analysis.laplacian_variance(luma) == pytest.approx(ref_lap, rel=1e-5)


def test_analysis_pixel_budget_samples_large_images_only():
    small = DecodedImage(rgb=scene(128))
    assert analysis.measure(small, 512 * 512) == analysis.measure(small)
    big = np.tile(scene(128), (8, 8, 1))
    noisy = np.clip(big + np.random.default_rng(4).normal(0, 10, big.shape), 0, 255).round().astype(np.uint8)
    regions = analysis.sample_tiles(*noisy.shape[:2], 512 * 512)
    assert sum((r[0].stop - r[0].start) * (r[1].stop - r[1].start) for r in regions) <= 512 * 512
    assert all(r[0].start % 8 == 0 and r[1].start % 8 == 0 for r in regions)
    full, sampled = analysis.measure(DecodedImage(rgb=noisy)), analysis.measure(DecodedImage(rgb=noisy), 512 * 512)
    assert sampled["width"] == 1024 and sampled["noise_sigma"] == pytest.approx(full["noise_sigma"], rel=0.05)
    assert sampled["brightness"] == pytest.approx(full["brightness"], abs=0.01)
    assert sampled["blockiness"] == pytest.approx(full["blockiness"], abs=0.05)


@pytest.mark.slow
def test_bf16_trunk_reads_like_fp32(encoder, monkeypatch):
    """Where the CPU has native bf16 the conv trunk runs in it; the estimates stay put."""
    noisy = DecodedImage(rgb=add_noise(clean_photo(256, 256), 15, seed=5))
    jpeg = DecodedImage(rgb=np.asarray(Image.open(io.BytesIO(_encode(clean_photo(256, 256), "JPEG", quality=30)))))
    monkeypatch.setattr(encoder, "trunk_dtype", torch.bfloat16)
    half = encoder.estimate([noisy, jpeg])
    monkeypatch.setattr(encoder, "trunk_dtype", None)
    full = encoder.estimate([noisy, jpeg])
    for h, f in zip(half, full, strict=True):
        assert h["noise_sigma"] == pytest.approx(f["noise_sigma"], abs=0.5)
        assert h["blur_sigma"] == pytest.approx(f["blur_sigma"], abs=0.1)
        assert h["jpeg_quality"] == f["jpeg_quality"]
    assert full[0]["noise_sigma"] == pytest.approx(15, abs=4) and full[1]["jpeg_quality"] == pytest.approx(30, abs=2)


def test_strong_noise_reads_the_measured_sigma(encoder, monkeypatch):
    """Past NOISE_MEASURED_FROM, with no JPEG, the measured noise (analysis's estimator) takes
    over from the CNN's crop median; ``estimate`` alone measures it as ``describe`` does."""
    photo = clean_photo(384, 384)
    noisy = add_noise(photo, 35.0, seed=3)
    (d,) = encoder.describe([DecodedImage(rgb=noisy)])
    (alone,) = encoder.estimate([DecodedImage(rgb=noisy)])
    assert alone["noise_sigma"] == pytest.approx(d.noise_sigma, abs=0.02)
    assert d.noise_sigma == pytest.approx(d.metrics["noise_sigma"], abs=0.02)  # full weight from 25 on
    assert d.noise_sigma == pytest.approx(35.0, abs=3.0)
    # below the blend (or on a JPEG) the measure is never taken
    calls = []
    real = builtin.sampled_noise_sigma
    monkeypatch.setattr(builtin, "sampled_noise_sigma", lambda *a: calls.append(1) or real(*a))
    (light,) = encoder.estimate([DecodedImage(rgb=add_noise(photo, 3.0, seed=4))])
    assert light["noise_sigma"] < builtin.NOISE_MEASURED_FROM and calls == []
