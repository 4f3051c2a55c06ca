"""ClassicDecoder: real torch filtering on synthetic images, single and batched."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.messages import Operation, Plan
from pixelrelay.pipeline.stages.decoders.classic import ClassicDecoder
from pixelrelay.pipeline.stages.encoders.analysis import AnalysisEncoder
from tests.images import add_noise, clean_photo, smooth_field

ALL_OPS = [Operation(name=n, strength=0.7) for n in ("deblock", "denoise", "deblur", "sharpen")]


def random_image(height: int, width: int, seed: int, alpha: bool = False) -> DecodedImage:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return DecodedImage(rgb=rgb, alpha=rng.integers(0, 256, (height, width), dtype=np.uint8) if alpha else None)


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread():
    """These images are tiny: on a busy machine, waking a thread pool per op costs more than the op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def decoder() -> ClassicDecoder:
    return ClassicDecoder()


def restore_one(decoder, rgb, plan, alpha=None):
    (result,) = decoder.restore([DecodedImage(rgb=rgb, alpha=alpha)], [plan])
    return result


@pytest.mark.parametrize("scale", [1, 2, 4])
@pytest.mark.parametrize("height,width", [(1, 1), (3, 5), (2, 3), (9, 17)])
@pytest.mark.parametrize("ops", [[], ALL_OPS], ids=["no-ops", "all-ops"])
def test_output_is_exactly_scale_times_input(decoder, scale, height, width, ops):
    image = random_image(height, width, seed=height * width, alpha=True)
    plan = Plan(operations=ops, scale=scale, noise_sigma=10.0, blur_sigma=1.0)
    (result,) = decoder.restore([image], [plan])
    assert result.rgb.shape == (height * scale, width * scale, 3) and result.rgb.dtype == np.uint8
    assert result.alpha is not None
    assert result.alpha.shape == (height * scale, width * scale) and result.alpha.dtype == np.uint8


def test_mixed_batch_equals_single_calls():
    sizes = [(1, 1), (2, 3), (13, 17), (40, 29), (24, 64), (9, 8), (33, 33)]
    images = [random_image(h, w, seed=i, alpha=i % 2 == 0) for i, (h, w) in enumerate(sizes)]
    images[4] = DecodedImage(rgb=add_noise(clean_photo(24, 64, period=9.0), 12))
    plans = [
        Plan(operations=ALL_OPS, scale=1, noise_sigma=12.0, blur_sigma=1.5),
        Plan(operations=[Operation(name="denoise", strength=1.0)], scale=2, noise_sigma=25.0),
        Plan(operations=[Operation(name="deblock", strength=1.0), Operation(name="sharpen", strength=0.5)], scale=2),
        Plan(operations=ALL_OPS, scale=2, noise_sigma=5.0, blur_sigma=2.0),
        Plan(operations=[Operation(name="denoise", strength=0.6)], scale=1, noise_sigma=12.0),
        Plan(operations=[Operation(name="deblur", strength=0.9)], scale=4, blur_sigma=2.5),
        Plan(operations=[], scale=2),
    ]
    # batch_size=3 also exercises the sub-batching and the regrouping by scale and size.
    for decoder in (ClassicDecoder(batch_size=8), ClassicDecoder(batch_size=3)):
        batch = decoder.restore(images, plans)
        for image, plan, result in zip(images, plans, batch, strict=True):
            (single,) = decoder.restore([image], [plan])
            assert result.rgb.shape == single.rgb.shape == (image.height * plan.scale, image.width * plan.scale, 3)
            diff = np.abs(result.rgb.astype(np.int16) - single.rgb.astype(np.int16)).max()
            assert diff <= 1, (image.rgb.shape, plan.scale, diff)
            if image.alpha is None:
                assert result.alpha is None
            else:
                assert np.array_equal(result.alpha, single.alpha)


def test_denoise_reduces_error(decoder):
    clean = clean_photo(64, 80, period=9.0)
    noisy = add_noise(clean, 15)
    plan = Plan(operations=[Operation(name="denoise", strength=1.0)], noise_sigma=15.0)
    restored = restore_one(decoder, noisy, plan).rgb
    assert mse(restored, clean) < 0.5 * mse(noisy, clean)
    # Strength blends: half strength lands in between.
    half = restore_one(decoder, noisy, Plan(operations=[Operation(name="denoise", strength=0.5)], noise_sigma=15.0)).rgb
    assert mse(restored, clean) < mse(half, clean) < mse(noisy, clean)


def test_deblock_reduces_jpeg_blocking(decoder):
    buffer = io.BytesIO()
    Image.fromarray(smooth_field(96, 96, period=9.0)).save(buffer, "JPEG", quality=10)
    blocky = np.asarray(Image.open(buffer).convert("RGB"))
    restored = restore_one(decoder, blocky, Plan(operations=[Operation(name="deblock", strength=1.0)])).rgb
    encoder = AnalysisEncoder()
    before, after = (encoder.describe([DecodedImage(rgb=im)])[0].metrics["blockiness"] for im in (blocky, restored))
    assert after < 0.5 * before
    assert mse(restored, smooth_field(96, 96, period=9.0)) < mse(blocky, smooth_field(96, 96, period=9.0))


def test_deblur_reduces_error_on_blurred_image(decoder):
    sharp = clean_photo(64, 80, period=9.0)
    blurred = np.asarray(Image.fromarray(sharp).filter(ImageFilter.GaussianBlur(2)))
    plan = Plan(operations=[Operation(name="deblur", strength=0.8)], blur_sigma=2.0)
    assert mse(restore_one(decoder, blurred, plan).rgb, sharp) < mse(blurred, sharp)


def test_upscale_beats_nearest_neighbour(decoder):
    original = smooth_field(64, 80, period=9.0)
    small = np.asarray(Image.fromarray(original).resize((40, 32), Image.Resampling.BOX))
    upscaled = restore_one(decoder, small, Plan(scale=2)).rgb
    nearest = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)
    assert upscaled.shape == original.shape
    assert mse(upscaled, original) < mse(nearest, original)


def test_alpha_is_kept_and_resized(decoder):
    rgb = clean_photo(20, 30, period=9.0)
    alpha = np.zeros((20, 30), np.uint8)
    alpha[:, 15:] = 255
    alpha[5, 3] = 77
    kept = restore_one(decoder, rgb, Plan(operations=ALL_OPS, noise_sigma=8.0), alpha=alpha)
    assert np.array_equal(kept.alpha, alpha)  # ops never touch alpha
    assert kept.alpha is not alpha  # and the caller's array is not handed back

    up = restore_one(decoder, rgb, Plan(scale=2), alpha=alpha).alpha
    assert up.shape == (40, 60)
    assert (up[:, :28] == 0).sum() > 0.9 * 40 * 28 - 4 and (up[:, 32:] == 255).all()
    assert restore_one(decoder, rgb, Plan(scale=4)).alpha is None


@pytest.mark.parametrize("height,width", [(1, 1), (2, 3), (64, 80)])
def test_op_free_plan_at_scale_one_is_identity(decoder, height, width):
    image = random_image(height, width, seed=7)
    result = restore_one(decoder, image.rgb, Plan())
    assert np.abs(result.rgb.astype(np.int16) - image.rgb).max() <= 1
    assert result.alpha is None


def test_zero_strength_ops_are_identity(decoder):
    rgb = clean_photo(64, 80, period=9.0)
    plan = Plan(operations=[Operation(name=op.name, strength=0.0) for op in ALL_OPS], noise_sigma=20.0)
    assert np.array_equal(restore_one(decoder, rgb, plan).rgb, rgb)


def test_read_only_input_and_mismatched_batch(decoder):
    rgb = clean_photo(16, 16, period=9.0)
    rgb.setflags(write=False)
    assert restore_one(decoder, rgb, Plan(scale=2)).rgb.shape == (32, 32, 3)
    with pytest.raises(ValueError):
        decoder.restore([DecodedImage(rgb=rgb)], [])
    with pytest.raises(ValueError):
        ClassicDecoder(batch_size=0)
