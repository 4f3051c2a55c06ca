"""Tiling only where it pays, through the learned decoders: an image that fits the memory
budget runs whole in one forward call; a forced small budget tiles it, within the budget,
with a result equal to the untiled one up to float rounding (where the receptive field
allows); the budget's setting is typed and fails fast. Real networks throughout: the
shipped builtin weights, a tiny Swin2SR of the real class."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.messages import Plan
from pixelrelay.pipeline.settings import ConfigError, Settings
from pixelrelay.pipeline.stages.decoders.builtin import BuiltinDecoder
from pixelrelay.pipeline.stages.decoders.hf_sr import HFSuperResolutionDecoder
from pixelrelay.pipeline.stages.decoders.learned import TileConfig
from pixelrelay.pipeline.tiling import plan_grid
from tests.pipeline.hf_fixtures import make_tiny_swin2sr, tiny_model

torch.set_num_threads(2)


class Counting(torch.nn.Module):
    """Wraps a real network: records the input shape of every forward call."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.config, self.shapes = net, getattr(net, "config", None), []

    def forward(self, x, *args):
        self.shapes.append(tuple(x.shape))
        return self.net(x, *args)


def _scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth structure plus texture: what an upscaler sees, not white noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = 128 + 60 * np.sin(xx / 9.0)[..., None] * np.cos(yy / 13.0)[..., None] * np.array([1.0, 0.6, -0.4])
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def builtin():
    return BuiltinDecoder(model="builtin_upscaler")


def test_images_that_fit_run_whole_in_one_call(builtin):
    dec = BuiltinDecoder(model="builtin_upscaler", tiles=TileConfig(tile_batch=8))  # CPU default budget: 2048 MB
    dec.nets["upscaler"] = counting = Counting(dec.nets["upscaler"])
    images = [DecodedImage(rgb=_scene(300, 280, seed)) for seed in range(2)]  # over the old 256 tile
    out = dec.restore(images, [Plan(scale=2)] * 2)
    assert counting.shapes == [(2, 3, 300, 280)]  # two whole images, one forward call
    assert all(r.rgb.shape == (600, 560, 3) for r in out)


def test_forced_small_budget_tiles_and_equals_untiled(builtin):
    m, plan = "upscaler", Plan(scale=2)
    x = torch.from_numpy(_scene(200, 190)).permute(2, 0, 1)[None].float() / 255
    small = 8  # MB: about 10,700 pixels per call at the upscaler's ~784 B per pixel (x2, fp32)
    budget_pixels = builtin.forward_pixels(m, 2, builtin.tiles.with_(memory_mb=small))
    assert 5_000 < budget_pixels < 200 * 190
    builtin.nets[m] = counting = Counting(builtin.nets[m])
    try:
        whole, w = builtin.upscale_tensor(m, x, [plan])
        tiled, t = builtin.upscale_tensor(m, x, [plan], memory_mb=small)
    finally:
        builtin.nets[m] = counting.net
    assert w.tiles == 1 and counting.shapes[0] == (1, 3, 200, 190)
    tile_calls = counting.shapes[1:]
    assert t.tiles == len(tile_calls) > 1 and all(b * h * ww <= budget_pixels for b, _, h, ww in tile_calls)
    # the upscaler's receptive field reaches a little past the 8 px margins: equal to float
    # rounding in the mean, a level at most after rounding to 8 bits
    diff = (tiled - whole).abs() * 255
    assert float(diff.mean()) < 0.01 and float(diff.max()) < 1.0


def test_more_memory_never_means_more_tiles(builtin):
    counts = []
    for mb in (8, 16, 32, 64, 128):
        pixels = builtin.forward_pixels("upscaler", 2, builtin.tiles.with_(memory_mb=mb))
        counts.append(plan_grid(300, 260, pixels, overlap=32).tiles)
    assert counts == sorted(counts, reverse=True) and counts[0] > 1 and counts[-1] == 1
    # a pixel costs more at x4 than at x2, and more at x2 than at x1 (run pixel-unshuffled)
    assert builtin.pixel_bytes("upscaler", 4) > builtin.pixel_bytes("upscaler", 2) > builtin.pixel_bytes("upscaler", 1)


def test_hf_sr_uses_the_same_policy_with_window_aligned_tiles(tmp_path_factory):
    sr = tiny_model(tmp_path_factory, make_tiny_swin2sr, "swin2SR-classical-sr-x2", upscale=2)
    dec = HFSuperResolutionDecoder(str(sr), tiles=TileConfig(overlap=16, tile_batch=4, min_tile=16))
    m = dec.models[0]
    x = torch.rand(1, 3, 80, 72)
    whole, w = dec.upscale_tensor(m, x, [Plan(scale=2)])
    tiled, t = dec.upscale_tensor(m, x, [Plan(scale=2)], memory_mb=8)
    assert w.tiles == 1 and t.tiles > 1
    assert t.tile_h % m.window == 0 and t.tile_w % m.window == 0
    assert float((tiled - whole).abs().max()) < 1e-4


@pytest.mark.parametrize(
    "name,value",
    [
        ("PIXELRELAY_TILE_MEMORY_MB", "lots"),
        ("PIXELRELAY_TILE_MEMORY_MB", "-1"),
        ("PIXELRELAY_TILE_MEMORY_FRACTION", "1.5"),
        ("PIXELRELAY_TILE_MEMORY_FRACTION", "0"),
        ("PIXELRELAY_BUILTIN_TILE", "8"),
    ],
)
def test_budget_settings_fail_fast_and_name_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        Settings.from_env()


def test_budget_settings_reach_the_decoder(monkeypatch):
    monkeypatch.setenv("PIXELRELAY_TILE_MEMORY_MB", "300")
    monkeypatch.setenv("PIXELRELAY_TILE_MEMORY_FRACTION", "0.5")
    tiles = TileConfig.from_settings(Settings.from_env(), "builtin")
    assert (tiles.memory_mb, tiles.memory_fraction, tiles.tile) == (300, 0.5, 0)
    assert Settings.from_env(tile_memory_mb=0).tile_memory_mb == 0  # 0: the device's default
