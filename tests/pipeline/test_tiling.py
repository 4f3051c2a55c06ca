"""Tiled inference: coverage, exactness against untiled runs, seam-free blending, the
memory-budget grid (whole when it fits, balanced tiles when not), and the out-of-memory
fallback under a simulated device-memory limit."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelrelay.pipeline.tiling import (
    DEFAULT_CPU_MEMORY_MB,
    MIB,
    TileGrid,
    TileOutOfMemoryError,
    TilePlan,
    axis_weights,
    balanced_tile,
    map_batches_with_oom,
    max_forward_pixels,
    memory_budget,
    plan_grid,
    run_tiled,
    run_tiled_with_fallback,
    tile_starts,
)


class SmallSR(nn.Module):
    """Two 3x3 convs + pixel shuffle: a x2 upscaler with a receptive field of 2 px."""

    def __init__(self, scale: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, padding_mode="replicate")
        self.c2 = nn.Conv2d(8, 3 * scale * scale, 3, padding=1, padding_mode="replicate")
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.shuffle(self.c2(torch.tanh(self.c1(x))))


class MemoryLimited:
    """Wraps a tile function; raises torch.OutOfMemoryError when the batch of tiles it is
    given exceeds ``limit`` input pixels (a simulated device-memory limit)."""

    def __init__(self, fn, limit: int) -> None:
        self.fn, self.limit = fn, limit
        self.calls: list[tuple[int, int, int]] = []
        self.failures = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        self.calls.append((b, h, w))
        if b * h * w > self.limit:
            self.failures += 1
            raise torch.OutOfMemoryError(f"simulated: {b}x{h}x{w} tile batch over the limit")
        return self.fn(x)


@pytest.mark.parametrize(
    "length,tile,overlap,align", [(100, 32, 8, 1), (64, 32, 16, 4), (31, 64, 8, 1), (96, 32, 8, 8)]
)
def test_tile_starts_cover_and_align(length, tile, overlap, align):
    starts = tile_starts(length, min(tile, length), overlap, align)
    t = min(tile, length)
    assert starts[0] == 0 and starts[-1] + t == length
    for a, b in zip(starts, starts[1:], strict=False):
        assert a + t - b >= overlap  # consecutive tiles overlap at least `overlap`
        assert b % align == 0


def test_weights_are_a_partition_of_unity():
    starts = tile_starts(100, 32, 12)
    ws = axis_weights(100, starts, 32, 12, 3, 2)
    total = torch.zeros(200, dtype=torch.float64)
    for s, w in zip(starts, ws, strict=True):
        assert (w >= 0).all()
        total[s * 2 : s * 2 + 64] += w
    assert torch.allclose(total, torch.ones_like(total))
    # the outer margin of each inner edge gets no weight at all
    assert float(ws[1][: 3 * 2].abs().max()) == 0.0


@pytest.mark.parametrize("size", [(70, 53), (64, 64), (33, 90)])
def test_tiled_equals_untiled_for_bounded_receptive_field(size):
    net = SmallSR()
    x = torch.rand(2, 3, *size)
    full = net(x)
    tiled = run_tiled(net, x, TilePlan(2, tile=24, overlap=12, batch_size=3))  # margin 3 >= RF 2
    assert tiled.shape == full.shape == (2, 3, size[0] * 2, size[1] * 2)
    assert float((tiled - full).abs().max()) < 1e-5


def test_tiled_with_alignment_pads_and_crops():
    net = SmallSR()
    x = torch.rand(1, 3, 45, 37)
    tiled = run_tiled(net, x, TilePlan(2, tile=20, overlap=12, align=4))
    padded = F.pad(x, (0, 3, 0, 3), mode="reflect")  # what align=4 does to the input
    full = net(padded)[:, :, :90, :74]
    assert tiled.shape == (1, 3, 90, 74)
    assert float((tiled - full).abs().max()) < 1e-5


def test_blending_is_seam_free_when_tiles_disagree():
    """Each tile call adds its own offset (tiles that disagree, as a diffusion model's
    would). Feathered blending spreads the step over the overlap: no hard seam."""
    offsets = iter(torch.linspace(0.0, 0.4, 200).tolist())

    def inconsistent(t):
        up = F.interpolate(t, scale_factor=2, mode="nearest")
        return up + torch.tensor([next(offsets) for _ in range(t.shape[0])]).view(-1, 1, 1, 1)

    x = torch.full((1, 3, 64, 64), 0.25)
    out = run_tiled(inconsistent, x, TilePlan(2, tile=32, overlap=16, batch_size=1))
    jumps_x = (out[..., 1:] - out[..., :-1]).abs().max()
    jumps_y = (out[..., 1:, :] - out[..., :-1, :]).abs().max()
    # tile offsets differ by up to ~0.01; a ramp over 16 output px leaves steps < 0.01/16*2
    assert float(max(jumps_x, jumps_y)) < 0.002
    # hard stitching (no blending) would show the full offset difference as a step
    assert 0.25 <= float(out.min()) and float(out.max()) <= 0.25 + 0.41


@pytest.mark.slow
def test_oom_fallback_halves_batch_then_tile():
    net = SmallSR()
    x = torch.rand(1, 3, 72, 56)
    limited = MemoryLimited(net, limit=32 * 32)  # one 32x32 tile fits, nothing bigger
    out, settings = run_tiled_with_fallback(limited, x, TilePlan(2, tile=128, overlap=16, batch_size=8, min_tile=16))
    assert limited.failures > 0
    assert settings.batch_size == 1 and settings.tile <= 32 and settings.oom_retries == limited.failures
    # every call that succeeded respected the limit
    ok_calls = [c for c in limited.calls if c[0] * c[1] * c[2] <= limited.limit]
    assert ok_calls and all(b == 1 for b, _, _ in ok_calls)
    # the result is a proper tiled result (margin >= RF): equals the untiled output
    assert float((out - net(x)).abs().max()) < 1e-5


def test_oom_fallback_keeps_batch_when_only_batch_is_too_big():
    net = SmallSR()
    x = torch.rand(1, 3, 64, 64)
    limited = MemoryLimited(net, limit=2 * 32 * 32)
    out, settings = run_tiled_with_fallback(limited, x, TilePlan(2, tile=32, overlap=8, batch_size=8, min_tile=16))
    assert settings.tile == 32 and settings.batch_size == 2
    assert out.shape == (1, 3, 128, 128)


@pytest.mark.slow
def test_oom_when_min_tile_alone_does_not_fit():
    net = SmallSR()
    x = torch.rand(1, 3, 64, 64)
    limited = MemoryLimited(net, limit=15 * 15)
    with pytest.raises(TileOutOfMemoryError, match="minimum"):
        run_tiled_with_fallback(limited, x, TilePlan(2, tile=64, overlap=8, batch_size=4, min_tile=16))
    assert limited.calls[-1][0] == 1 and limited.calls[-1][1] == 16  # it did try 1 x min tile


def test_non_oom_errors_propagate_unchanged():
    def broken(t):
        raise ValueError("not memory")

    with pytest.raises(ValueError, match="not memory"):
        run_tiled_with_fallback(broken, torch.rand(1, 3, 16, 16), TilePlan(2, tile=16, overlap=4))


@pytest.mark.slow
def test_map_batches_with_oom_halves_and_keeps_order():
    seen = []

    def fn(items):
        seen.append(len(items))
        if len(items) > 3:
            raise torch.cuda.OutOfMemoryError("simulated")
        return [i * 10 for i in items]

    assert map_batches_with_oom(fn, list(range(10)), 8) == [i * 10 for i in range(10)]
    assert seen == [8, 4, 2, 2, 2, 2, 2]  # 8 and 4 fail, then batches of 2 succeed

    def never(items):
        raise torch.OutOfMemoryError("simulated")

    with pytest.raises(TileOutOfMemoryError):
        map_batches_with_oom(never, [1, 2], 2)


# --- the memory-budget policy (plan_grid & co) ------------------------------------------------


def _widths(grid: TileGrid, height: int, width: int, overlap: int, align: int) -> None:
    """The grid covers the image with tiles of the stated count, aligned, overlapping."""
    H, W = -(-height // align) * align, -(-width // align) * align
    assert grid.tile_h % align == 0 and grid.tile_w % align == 0
    assert len(tile_starts(H, grid.tile_h, overlap, align)) == grid.rows
    assert len(tile_starts(W, grid.tile_w, overlap, align)) == grid.cols


@pytest.mark.parametrize("size", [(64, 64), (200, 130), (1024, 1024)])
def test_an_image_that_fits_is_one_tile(size):
    assert plan_grid(*size, size[0] * size[1]) == TileGrid(size[0], size[1], 1, 1)
    assert plan_grid(*size, None) == TileGrid(size[0], size[1], 1, 1)  # no budget: whole
    assert plan_grid(*size, size[0] * size[1] - 1).tiles > 1


@pytest.mark.parametrize("align", [1, 8])
def test_grid_fits_the_budget_and_is_monotone(align):
    size, overlap = (1000, 700), 32
    previous = None
    for budget in (120**2, 160**2, 200**2, 256**2, 300**2, 400**2, 512**2, 700**2, 1000 * 704):  # 704: padded
        g = plan_grid(*size, budget, overlap=overlap, align=align, min_tile=32)
        _widths(g, *size, overlap, align)
        assert g.tile_pixels <= budget
        if previous is not None:  # more memory never means more tiles or smaller ones
            assert g.tiles <= previous.tiles and g.pixels <= previous.pixels
            assert g.tile_pixels >= previous.tile_pixels
        previous = g
    assert previous.tiles == 1


def test_grid_respects_the_cap_alignment_and_min_tile():
    g = plan_grid(300, 300, None, max_tile=100, overlap=16, align=8)
    assert max(g.tile_h, g.tile_w) <= 100 and g.tile_h % 8 == 0 and g.tiles > 1
    tiny = plan_grid(300, 300, 10, overlap=16, min_tile=24)  # a budget under one min tile
    assert tiny.tile_h == tiny.tile_w == 24  # the min tile; the OOM fallback has the last word


def test_balanced_grid_costs_far_less_than_the_fixed_grid():
    """512 at a 256 cap: 3 tiles of 192 a side (the fixed grid ran 3 of 256: 2.25x the pixels)."""
    assert balanced_tile(512, 256, 32) == 192
    assert len(tile_starts(512, 192, 32)) == len(tile_starts(512, 256, 32)) == 3
    g = plan_grid(1024, 1024, 256 * 256, overlap=32)
    assert g.pixels <= 1.3 * 1024 * 1024  # under 30 % more pixels than untiled


def test_memory_budget_per_device():
    assert memory_budget("cpu") == DEFAULT_CPU_MEMORY_MB * MIB
    assert memory_budget("cpu", memory_mb=300) == 300 * MIB
    available = lambda device: 10_000 * MIB  # noqa: E731 - what a CUDA device would report
    assert memory_budget("cuda:0", fraction=0.5, available=available) == 5_000 * MIB
    assert memory_budget("cuda:0", memory_mb=1000, fraction=0.5, available=available) == 1000 * MIB  # a cap
    assert max_forward_pixels(1000 * MIB, 1000.0) == 1000 * MIB // 1000
    with pytest.raises(ValueError):
        memory_budget("cpu", fraction=0.0)
    with pytest.raises(ValueError):
        max_forward_pixels(MIB, 0.0)


def test_small_budget_tiles_and_equals_untiled():
    net = SmallSR()
    x = torch.rand(2, 3, 90, 70)
    calls = []

    def fn(t):
        calls.append(tuple(t.shape))
        return net(t)

    whole, used = run_tiled_with_fallback(fn, x, TilePlan(2, overlap=12, batch_size=4, max_pixels=90 * 70 * 2))
    assert calls == [(2, 3, 90, 70)] and used.tiles == 1  # both images, whole, in one call
    calls.clear()
    tiled, used = run_tiled_with_fallback(fn, x, TilePlan(2, overlap=12, batch_size=4, max_pixels=40 * 40))
    assert used.tiles > 1 and all(b * h * w <= 40 * 40 for b, _, h, w in calls)
    assert float((tiled - whole).abs().max()) < 1e-5  # margin 3 >= the net's receptive field


@pytest.mark.slow
def test_oom_fallback_starts_from_the_budget_grid():
    net = SmallSR()
    x = torch.rand(1, 3, 96, 96)
    limited = MemoryLimited(net, limit=30 * 30)  # the budget says 48x48 tiles; 30x30 fit
    out, used = run_tiled_with_fallback(
        limited, x, TilePlan(2, overlap=8, batch_size=4, max_pixels=50 * 50, min_tile=16)
    )
    b, h, w = limited.calls[0]
    assert b == 1 and 30 * 30 < h * w <= 50 * 50  # the budget's grid and batch first, refused
    assert used.oom_retries > 0 and used.tile < 50 and used.tile_h * used.tile_w <= 30 * 30
    assert float((out - net(x)).abs().max()) < 1e-5
