"""Tiled inference with seam-free blending, the memory-budget tile policy, and the
out-of-memory fallback. Every learned decoder takes its tiling from here (one policy).

**The policy: tile only where it pays.** A forward call may use ``memory_budget`` bytes of
device memory: on CUDA a fraction (``PIXELRELAY_TILE_MEMORY_FRACTION``, default 0.8) of what
the device has available now (free + cached by torch but unused); on the CPU (and MPS)
``PIXELRELAY_TILE_MEMORY_MB`` (default 2048 MB, fixed so results do not depend on the load
of the machine); a non-zero ``PIXELRELAY_TILE_MEMORY_MB`` also caps the CUDA budget. A
decoder states its cost in bytes per input pixel (``LearnedDecoder.pixel_bytes``), so the
budget is a pixel count per forward call (``max_forward_pixels``). Then ``plan_grid``:

* an image that fits the budget (and the decoder's optional tile cap) runs whole: one tile,
  no overlap, nothing blended; same-size images that fit together share a forward call;
* an image that does not fit is cut into the grid of fewest input pixels whose tiles fit
  (rectangular, each side a multiple of ``align``, none under ``min_tile``), and the tiles
  are *balanced*: as small as the tile count allows, spread evenly (``balanced_tile``), so
  the overlap costs only what it must; a 512 px side at a 256 cap is 3 tiles of 192, not
  256, 256 and 256 (the fixed grid repeated 224 of the 512 pixels on each axis).

**Blending.** ``run_tiled(fn, x, TilePlan(scale, tile, overlap))`` runs an upscaling function ``fn``
(a (B,C,h,w) float tensor -> (B,C,h*scale,w*scale)) over overlapping crops of ``x`` and
blends the results:

* Neighbouring tiles overlap by at least ``overlap`` input pixels. Inside each overlap the
  outer ``margin`` pixels of a tile (default ``overlap // 4``) get weight 0: they only give
  the network context, since a tile's border pixels are the least accurate. Across the
  middle of the overlap the two tiles are cross-faded with complementary linear ramps.
* The weights are separable (row weight x column weight) and normalised per axis to sum to
  exactly 1 at every output pixel (a partition of unity), so no weight map is stored and a
  constant-in, constant-out network stays exact: no seams, no brightness ripple.
* Consequently, when a network's receptive field is at most ``margin`` pixels (and for
  windowed transformers the tile grid is aligned to the window, see ``align``), the tiled
  result equals the untiled one up to float rounding.

Only the current tile batch lives on ``fn``'s device; the input and the accumulator stay
where ``x`` is (keep it on the CPU for big images), so device memory is bounded by the tile
grid, ``scale`` and ``batch_size``, whatever the image size.

**Out of memory.** ``run_tiled_with_fallback`` starts from the budget's grid and batch; on
``torch.OutOfMemoryError`` it halves the batch, then the largest tile side allowed, down to
``min_tile``; only when a single ``min_tile`` tile does not fit is the item given up, with a
``TileOutOfMemoryError`` that says so. On CUDA, ``PixelCostMeter`` measures what forward
calls really cost per pixel, so an estimate that was too low is corrected for the next
image.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar, cast

import torch
import torch.nn.functional as F

from pixelrelay.pipeline.hf import empty_cache, is_oom

log = logging.getLogger("pixelrelay.tiling")

DEFAULT_TILE = 0  # no cap on the tile side: the memory budget decides
DEFAULT_OVERLAP = 32
DEFAULT_MIN_TILE = 32
DEFAULT_TILE_BATCH = 4
DEFAULT_CPU_MEMORY_MB = 2048  # the forward-call budget on CPU/MPS when PIXELRELAY_TILE_MEMORY_MB is 0
DEFAULT_MEMORY_FRACTION = 0.8  # of the CUDA memory available now
MIB = 1 << 20
METER_MIN_PIXELS = 128 * 128  # smaller calls are dominated by fixed costs (workspaces): not measured

T = TypeVar("T")
R = TypeVar("R")

TileFn = Callable[[torch.Tensor], torch.Tensor]
"""A network on a batch of tiles: (n, C, h, w) -> (n, C, h*scale, w*scale)."""
ItemsTileFn = Callable[[torch.Tensor, list[int]], torch.Tensor]
"""A ``TileFn`` also given ``items``, ``items[k]`` the index of tile k's image (``TilePlan.pass_items``)."""


class TileOutOfMemoryError(RuntimeError):
    """Even the smallest tile, alone, does not fit in device memory."""


@dataclass
class TileSettings:
    """What a tiled run used (``run_tiled_with_fallback`` returns it; ``TilePlan`` is what it took).

    Attributes:
        tile: the largest tile side it allowed (the budget's, the decoder's cap, or what the
            OOM fallback left).
        overlap: the overlap used (0 when the image ran whole).
        batch_size: tiles per forward call.
        oom_retries: out-of-memory retries it took.
        tile_h, tile_w: the tiles it cut.
        tiles: tiles per image (1: the image ran whole).
    """

    tile: int
    overlap: int
    batch_size: int
    oom_retries: int = 0
    tile_h: int = 0
    tile_w: int = 0
    tiles: int = 0

    def describe(self) -> str:
        if self.tiles == 1:
            return f"whole image (tile cap {self.tile}px), batch {self.batch_size}"
        grid = f" ({self.tiles} tiles of {self.tile_h}x{self.tile_w})" if self.tiles else ""
        return f"tile {self.tile}px{grid}, overlap {self.overlap}px, batch {self.batch_size}"


@dataclass(frozen=True, slots=True)
class TilePlan:
    """How to run a network tile by tile: what ``run_tiled`` and ``run_tiled_with_fallback`` take.

    Attributes:
        scale: output pixels per input pixel, per side.
        tile: the largest tile side, or (height, width) of the largest tile; for
            ``run_tiled_with_fallback`` a cap on the budget's tiles (an int; 0: no cap).
        overlap: input pixels neighbouring tiles share (at least).
        batch_size: tiles (from any image of the batch) per forward call.
        margin: outer overlap pixels of a tile given weight 0 (None: ``overlap // 4``).
        align: tile sizes and starts are multiples of it (a transformer's window); the input
            is padded on the bottom/right to a multiple of it and the output cropped.
        min_tile: the out-of-memory fallback's smallest tile side.
        max_pixels: input pixels per forward call the memory budget allows (None: no budget).
        device: where tiles are sent before the network (None: the input's device).
        out_dtype: the accumulator's and output's dtype.
        pad_mode: "reflect" (where the image is big enough, else "replicate") or "replicate".
        pass_items: call ``fn(tiles, items)``, ``items[k]`` the index of tile k's image.
        balance: shrink tiles to the smallest size that needs no more of them (False: the
            fixed grid of full-size tiles, for benchmarks to compare against).
    """

    scale: int
    tile: int | tuple[int, int] = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP
    batch_size: int = DEFAULT_TILE_BATCH
    margin: int | None = None
    align: int = 1
    min_tile: int = DEFAULT_MIN_TILE
    max_pixels: int | None = None
    device: torch.device | str | None = None
    out_dtype: torch.dtype = torch.float32
    pad_mode: str = "reflect"
    pass_items: bool = False
    balance: bool = True


@dataclass(frozen=True)
class TileGrid:
    """A tiling of one (padded) image: ``rows`` x ``cols`` tiles of ``tile_h`` x ``tile_w``."""

    tile_h: int
    tile_w: int
    rows: int
    cols: int

    @property
    def tiles(self) -> int:
        return self.rows * self.cols

    @property
    def tile_pixels(self) -> int:
        return self.tile_h * self.tile_w

    @property
    def pixels(self) -> int:
        """Input pixels the network sees for the whole image (overlaps counted again)."""
        return self.tiles * self.tile_pixels


def _align_down(value: int, align: int) -> int:
    return max(align, (value // align) * align)


def _align_up(value: int, align: int) -> int:
    return -(-value // align) * align


# --- the memory budget --------------------------------------------------------------------


def available_cuda_bytes(device: torch.device | str) -> int:
    """Device memory a forward call can get now: free on the device plus what torch's
    caching allocator holds but does not use."""
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + max(0, cached))


def memory_budget(
    device: torch.device | str,
    memory_mb: int = 0,
    fraction: float = DEFAULT_MEMORY_FRACTION,
    available: Callable[[torch.device], int] = available_cuda_bytes,
) -> int:
    """Bytes one forward call may use. CUDA: ``fraction`` of what is ``available`` now,
    capped by ``memory_mb`` when that is non-zero. Elsewhere: ``memory_mb``, or
    ``DEFAULT_CPU_MEMORY_MB`` when it is 0."""
    if memory_mb < 0 or not 0.0 < fraction <= 1.0:
        raise ValueError(f"bad memory budget: {memory_mb} MB, fraction {fraction}")
    device = torch.device(device)
    if device.type == "cuda":
        budget = int(available(device) * fraction)
        return min(budget, memory_mb * MIB) if memory_mb else budget
    return (memory_mb or DEFAULT_CPU_MEMORY_MB) * MIB


def max_forward_pixels(budget_bytes: int, pixel_bytes: float) -> int:
    """Input pixels (batch x height x width) one forward call may take under the budget."""
    if pixel_bytes <= 0:
        raise ValueError(f"a forward's cost per pixel must be positive, got {pixel_bytes}")
    return max(1, int(budget_bytes // pixel_bytes))


def conv_pixel_bytes(width: int, scale: int, itemsize: int, maps: int = 12, out_maps: int = 3) -> int:
    """A generic estimate of a conv upscaler's forward cost per input pixel: ``maps``
    feature maps of ``width`` channels live at the input resolution, ``out_maps`` at the
    output resolution (``scale`` x scale the pixels), ``itemsize`` bytes an element."""
    return itemsize * (maps * width + out_maps * width * scale * scale)


class PixelCostMeter:
    """Measured device bytes per input pixel of forward calls, per key (a model and scale):
    the peak the allocator saw over what was allocated before the call, divided by the
    call's input pixels; the largest seen is kept. CUDA only (elsewhere nothing is
    measured), and only calls of at least ``METER_MIN_PIXELS`` count."""

    def __init__(self) -> None:
        self.costs: dict[object, float] = {}

    def get(self, key: object) -> float | None:
        return self.costs.get(key)

    def run(self, key: object, device: torch.device, x: torch.Tensor, fn: Callable[[], R]) -> R:
        pixels = x.shape[0] * x.shape[-2] * x.shape[-1]
        if device.type != "cuda" or pixels < METER_MIN_PIXELS:
            return fn()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        cost = (torch.cuda.max_memory_allocated(device) - before) / pixels
        if cost > self.costs.get(key, 0.0):
            self.costs[key] = cost
        return out


# --- the tile grid ------------------------------------------------------------------------


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)``.

    Consecutive tiles overlap by at least ``overlap``; starts are multiples of ``align``
    when ``length`` and ``tile`` are; the last tile ends exactly at ``length``. The count
    never grows as ``tile`` grows.
    """
    if tile >= length:
        return [0]
    step = _align_down(tile - overlap, align) if tile - overlap >= align else align
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return sorted(set(starts))


def _tile_for_count(length: int, count: int, overlap: int, align: int) -> int:
    """The smallest tile (a multiple of ``align``) that covers ``length`` in ``count`` tiles."""
    if count <= 1:
        return length
    t = min(length, max(align, _align_up(-(-(length + (count - 1) * overlap) // count), align)))
    while t < length and len(tile_starts(length, t, overlap, align)) > count:
        t += align
    return t


def balanced_tile(length: int, tile: int, overlap: int, align: int = 1) -> int:
    """The smallest tile that covers ``length`` in as few tiles as ``tile`` does: the same
    grid, with the slack spread evenly instead of piled onto the last overlap."""
    tile = min(tile, length)
    return min(tile, _tile_for_count(length, len(tile_starts(length, tile, overlap, align)), overlap, align))


def _grid(height: int, width: int, th: int, tw: int, overlap: int, align: int) -> TileGrid:
    """The balanced grid of tiles at most ``th`` x ``tw`` over the input.

    Args:
        height, width: the (padded) input's size.
        th, tw: the largest tile height and width.
        overlap: input pixels neighbouring tiles share.
        align: tile sides and starts are multiples of it.
    """
    th, tw = balanced_tile(height, th, overlap, align), balanced_tile(width, tw, overlap, align)
    return TileGrid(th, tw, len(tile_starts(height, th, overlap, align)), len(tile_starts(width, tw, overlap, align)))


def plan_grid(
    height: int,
    width: int,
    max_pixels: int | None = None,
    *,
    max_tile: int = 0,
    overlap: int = DEFAULT_OVERLAP,
    align: int = 1,
    min_tile: int = DEFAULT_MIN_TILE,
) -> TileGrid:
    """The tile grid for an image: whole when it fits ``max_pixels`` (None: no budget) and
    ``max_tile`` (0: no cap); else the balanced grid of fewest input pixels (ties: fewest
    tiles) whose tiles fit both, sides multiples of ``align``. Tiles stay at least
    ``max(min_tile, 2 * overlap + align)`` on a side while that fits the budget; under a
    budget smaller than that, square tiles of the budget's side (at least ``min_tile``):
    the out-of-memory fallback has the last word. Sizes are of the input padded to
    ``align``, as ``run_tiled`` pads it.

    Args:
        height, width: the input's size.
        max_pixels: input pixels per forward call (None: no budget).
        max_tile: the largest tile side allowed (0: no cap).
        overlap: input pixels neighbouring tiles share.
        align: tile sides are multiples of it.
        min_tile: the smallest tile side wanted.
    """
    H, W = _align_up(height, align), _align_up(width, align)
    cap = _align_down(max_tile, align) if max_tile else max(H, W)
    budget = max_pixels if max_pixels is not None else H * W
    if cap >= max(H, W) and H * W <= budget:
        return TileGrid(H, W, 1, 1)
    floor = max(align, _align_up(min_tile, align))
    smallest = max(floor, _align_up(2 * overlap + align, align))
    best: tuple[tuple[int, int], TileGrid] | None = None
    for rows in range(1, H + 1):
        th = _tile_for_count(H, rows, overlap, align)
        if th < min(smallest, H, cap) or (rows > 1 and th >= H):  # too small, or no smaller
            break
        if th > cap:
            continue
        tw = min(cap, W, (budget // th) // align * align)
        if tw < min(smallest, W, cap):
            continue
        g = _grid(H, W, th, tw, overlap, align)
        if best is None or (g.pixels, g.tiles) < best[0]:
            best = ((g.pixels, g.tiles), g)
    if best is not None:
        return best[1]
    side = max(floor, _align_down(min(cap, math.isqrt(budget)), align))
    return _grid(H, W, side, side, overlap, align)


def fit_batch(grid: TileGrid, max_pixels: int | None, batch_size: int) -> int:
    """Tiles per forward call: ``batch_size``, fewer when the budget says so (at least 1)."""
    if max_pixels is None:
        return batch_size
    return max(1, min(batch_size, max_pixels // grid.tile_pixels))


# --- blending -----------------------------------------------------------------------------


def _ramp(n: int, fade: int, margin: int) -> torch.Tensor:
    """Rising edge weight over ``n`` samples: 0 for the first ``margin`` samples, then a
    linear ramp to 1 over ``fade - 2*margin`` samples (a step at fade/2 if that is <= 0)."""
    d = torch.arange(n, dtype=torch.float64) + 0.5
    width = fade - 2 * margin
    if width <= 0:
        return (d >= fade / 2).to(torch.float64)
    return ((d - margin) / width).clamp(0.0, 1.0)


def axis_weights(
    length: int, starts: Sequence[int], tile: int, overlap: int, margin: int, scale: int
) -> list[torch.Tensor]:
    """Per-tile 1-D weights in output pixels, normalised so they sum to 1 everywhere.

    Args:
        length: the axis' input length.
        starts: each tile's first input pixel on the axis.
        tile: the tiles' input length on the axis.
        overlap: input pixels neighbouring tiles share.
        margin: outer overlap pixels given weight 0.
        scale: output pixels per input pixel.
    """
    size = tile * scale
    fade, m = overlap * scale, margin * scale
    total = torch.zeros(length * scale, dtype=torch.float64)
    weights = []
    for s in starts:
        w = torch.ones(size, dtype=torch.float64)
        if s > 0:  # a tile on our left/top: fade in
            w = w * _ramp(size, fade, m)
        if s + tile < length:  # a tile on our right/bottom: fade out
            w = w * _ramp(size, fade, m).flip(0)
        weights.append(w)
        total[s * scale : s * scale + size] += w
    if bool((total <= 0).any()):  # cannot happen for overlap >= 2*margin; guard anyway
        raise ValueError(f"tiling leaves gaps: tile={tile} overlap={overlap} margin={margin}")
    return [w / total[s * scale : s * scale + size] for s, w in zip(starts, weights, strict=True)]


def _call_tile_fn(fn: TileFn | ItemsTileFn, tiles: torch.Tensor, items: list[int], pass_items: bool) -> torch.Tensor:
    """``fn`` on a batch of tiles: an ``ItemsTileFn`` where the plan says ``pass_items``, else a ``TileFn``."""
    if pass_items:
        return cast(ItemsTileFn, fn)(tiles, items)
    return cast(TileFn, fn)(tiles)


def run_tiled(fn: TileFn | ItemsTileFn, x: torch.Tensor, plan: TilePlan) -> torch.Tensor:
    """Apply ``fn`` tile by tile and blend; returns (B, C, H*scale, W*scale) on x's device.
    ``fn`` is an ``ItemsTileFn`` where ``plan.pass_items``, else a ``TileFn``.

    ``plan.tile`` is used as given (``max_pixels`` and ``min_tile`` are the fallback's); the
    overlap shrinks to fit tiles smaller than twice it. Results come back to x's device.
    OOM errors propagate; see ``run_tiled_with_fallback``.
    """
    if x.dim() != 4:
        raise ValueError(f"run_tiled wants a (B,C,H,W) tensor, got shape {tuple(x.shape)}")
    scale, overlap, batch_size, align, out_dtype = plan.scale, plan.overlap, plan.batch_size, plan.align, plan.out_dtype
    th, tw = (plan.tile, plan.tile) if isinstance(plan.tile, int) else plan.tile
    if min(th, tw) < 1 or overlap < 0 or batch_size < 1 or scale < 1:
        raise ValueError(f"bad tiling parameters tile={plan.tile} overlap={overlap} batch={batch_size}")
    b, c, h, w = x.shape
    device = torch.device(plan.device) if plan.device is not None else x.device
    ph, pw = _align_up(h, align) - h, _align_up(w, align) - w
    if ph or pw:
        mode = "reflect" if plan.pad_mode == "reflect" and ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    H, W = h + ph, w + pw
    th, tw = min(_align_down(th, align), H), min(_align_down(tw, align), W)
    tiled = [t for t, length in ((th, H), (tw, W)) if t < length]
    overlap = min(overlap, max(min(tiled) - align, 0)) if tiled else 0
    margin = overlap // 4 if plan.margin is None else max(0, min(plan.margin, overlap // 2))
    if plan.balance:
        th, tw = balanced_tile(H, th, overlap, align), balanced_tile(W, tw, overlap, align)
    ys, xs = tile_starts(H, th, overlap, align), tile_starts(W, tw, overlap, align)
    wy = axis_weights(H, ys, th, overlap, margin, scale)
    wx = axis_weights(W, xs, tw, overlap, margin, scale)

    out = torch.zeros((b, c, H * scale, W * scale), dtype=out_dtype, device=x.device)
    jobs = [(bi, i, j) for bi in range(b) for i in range(len(ys)) for j in range(len(xs))]
    single = len(ys) == 1 and len(xs) == 1
    for k in range(0, len(jobs), batch_size):
        group = jobs[k : k + batch_size]
        if single:  # whole images: no crops, no weights
            crops = x[group[0][0] : group[-1][0] + 1]
        else:
            crops = torch.stack([x[bi, :, ys[i] : ys[i] + th, xs[j] : xs[j] + tw] for bi, i, j in group])
        crops = crops.to(device)
        result = _call_tile_fn(fn, crops, [bi for bi, _, _ in group], plan.pass_items)
        expected = (len(group), c, th * scale, tw * scale)
        if tuple(result.shape) != expected:
            raise RuntimeError(f"tile function returned {tuple(result.shape)}, expected {expected}")
        result = result.to(device=x.device, dtype=out_dtype)
        if single:
            out[group[0][0] : group[-1][0] + 1] = result
            del result, crops
            continue
        for n, (bi, i, j) in enumerate(group):
            y0, x0 = ys[i] * scale, xs[j] * scale
            weight = (wy[i][:, None] * wx[j][None, :]).to(dtype=out_dtype, device=x.device)
            out[bi, :, y0 : y0 + th * scale, x0 : x0 + tw * scale] += result[n] * weight
        del result, crops
    if ph or pw:
        out = out[:, :, : h * scale, : w * scale]
    return out


def with_oom_fallback(
    run: Callable[[int, int], R],
    *,
    batch_size: int,
    tile: int,
    min_tile: int,
    align: int = 1,
    what: str = "item",
) -> tuple[R, int, int, int]:
    """Call ``run(batch_size, tile)``; on out-of-memory halve the batch, then the tile
    (never below ``min_tile``), and retry. Returns (result, batch_size, tile, retries).
    Raises TileOutOfMemoryError when ``run(1, min_tile)`` itself runs out of memory.

    Args:
        run: the work, given a batch size and a tile side.
        batch_size: the first batch size tried.
        tile: the first tile side tried.
        min_tile: the smallest tile side tried (rounded up to ``align``).
        align: tile sides stay multiples of it.
        what: names the work in logs and errors.
    """
    retries = 0
    min_tile = max(align, _align_up(min_tile, align))
    while True:
        try:
            return run(batch_size, tile), batch_size, tile, retries
        except Exception as exc:
            if not is_oom(exc):
                raise
            empty_cache()
            retries += 1
            if batch_size > 1:
                batch_size //= 2
                log.warning("out of memory on %s: retrying with batch %d", what, batch_size)
            elif tile > min_tile:
                tile = max(min_tile, _align_down(tile // 2, align))
                log.warning("out of memory on %s: retrying with tile %dpx", what, tile)
            else:
                raise TileOutOfMemoryError(
                    f"out of device memory on {what} even with a single {tile}x{tile} tile "
                    f"(the minimum); use a smaller min_tile or a device with more memory"
                ) from exc


def run_tiled_with_fallback(
    fn: TileFn | ItemsTileFn, x: torch.Tensor, plan: TilePlan, *, what: str = "image"
) -> tuple[torch.Tensor, TileSettings]:
    """``run_tiled`` on the grid ``plan_grid`` picks for ``plan.max_pixels`` input pixels per
    forward call (None: no budget) and the tile cap ``plan.tile`` (0: none), under the OOM
    policy: the fallback starts from that grid's largest side and from the batch the budget
    allows. ``what`` names the work in logs and errors. Returns the output and the settings
    that worked (callers may keep them)."""
    if not isinstance(plan.tile, int):
        raise ValueError(f"run_tiled_with_fallback takes a tile cap (an int), got {plan.tile!r}")
    H, W = x.shape[-2:]
    align, max_pixels, min_tile, overlap = plan.align, plan.max_pixels, plan.min_tile, plan.overlap
    budget_grid = plan_grid(H, W, max_pixels, overlap=overlap, align=align, min_tile=min_tile)
    first_tile = max(budget_grid.tile_h, budget_grid.tile_w)
    if plan.tile:  # the caller's cap, where it is tighter than the budget
        first_tile = min(first_tile, max(align, _align_down(plan.tile, align)))
    grids: dict[int, tuple[TileGrid, int]] = {}

    def grid_for(t: int) -> tuple[TileGrid, int]:
        if t not in grids:
            ov = overlap if t >= first_tile else min(overlap, t // 2)
            grids[t] = (plan_grid(H, W, max_pixels, max_tile=t, overlap=ov, align=align, min_tile=min(min_tile, t)), ov)
        return grids[t]

    def run(bs: int, t: int) -> torch.Tensor:
        g, ov = grid_for(t)
        margin = None if plan.margin is None else min(plan.margin, ov // 2)
        tiles = replace(
            plan, tile=(g.tile_h, g.tile_w), overlap=ov, batch_size=min(bs, fit_batch(g, max_pixels, bs)), margin=margin
        )
        return run_tiled(fn, x, tiles)

    first_batch = fit_batch(grid_for(first_tile)[0], max_pixels, plan.batch_size)
    out, bs, t, retries = with_oom_fallback(
        run, batch_size=first_batch, tile=first_tile, min_tile=min(min_tile, first_tile), align=align, what=what
    )
    g, ov = grid_for(t)
    return out, TileSettings(
        tile=t,
        overlap=ov if g.tiles > 1 else 0,
        batch_size=min(bs, fit_batch(g, max_pixels, bs)),
        oom_retries=retries,
        tile_h=g.tile_h,
        tile_w=g.tile_w,
        tiles=g.tiles,
    )


def map_batches_with_oom(
    fn: Callable[[Sequence[T]], list[R]], items: Sequence[T], batch_size: int, what: str = "batch"
) -> list[R]:
    """Run ``fn`` over ``items`` in batches; on out-of-memory halve the batch and retry.
    A single item that does not fit raises TileOutOfMemoryError (its neighbours are done)."""
    out: list[R] = []
    i = 0
    size = max(1, batch_size)
    while i < len(items):
        chunk = items[i : i + size]
        try:
            res = fn(chunk)
        except Exception as exc:
            if not is_oom(exc):
                raise
            empty_cache()
            if size == 1:
                raise TileOutOfMemoryError(f"out of device memory on a single {what} item") from exc
            size //= 2
            log.warning("out of memory on %s: retrying with batch %d", what, size)
            continue
        out.extend(res)
        i += len(chunk)
    return out
