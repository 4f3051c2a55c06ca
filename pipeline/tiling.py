"""Tiled inference with seam-free blending, and the out-of-memory fallback.

``run_tiled(fn, x, scale, tile, overlap)`` runs an upscaling function ``fn`` (a (B,C,h,w)
float tensor -> (B,C,h*scale,w*scale)) over overlapping ``tile`` x ``tile`` crops of ``x``
and blends the results:

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
where ``x`` is (keep it on the CPU for big images), so device memory is bounded by
``tile``, ``scale`` and ``batch_size``, whatever the image size.

``run_tiled_with_fallback`` adds the out-of-memory policy every learned decoder uses: on
``torch.OutOfMemoryError`` halve the tile batch, then halve the tile, down to
``min_tile``; only when a single ``min_tile`` tile does not fit is the item given up, with a
``TileOutOfMemoryError`` that says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch
import torch.nn.functional as F

from pixelrelay.pipeline.hf import empty_cache, is_oom

log = logging.getLogger("pixelrelay.tiling")

DEFAULT_TILE = 256
DEFAULT_OVERLAP = 32
DEFAULT_MIN_TILE = 32
DEFAULT_TILE_BATCH = 4

T = TypeVar("T")
R = TypeVar("R")


class TileOutOfMemoryError(RuntimeError):
    """Even the smallest tile, alone, does not fit in device memory."""


@dataclass
class TileSettings:
    tile: int
    overlap: int
    batch_size: int
    oom_retries: int = 0

    def describe(self) -> str:
        return f"tile {self.tile}px, overlap {self.overlap}px, batch {self.batch_size}"


def _align_down(value: int, align: int) -> int:
    return max(align, (value // align) * align)


def _align_up(value: int, align: int) -> int:
    return -(-value // align) * align


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)``.

    Consecutive tiles overlap by at least ``overlap``; starts are multiples of ``align``
    when ``length`` and ``tile`` are; the last tile ends exactly at ``length``.
    """
    if tile >= length:
        return [0]
    step = _align_down(tile - overlap, align) if tile - overlap >= align else align
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return sorted(set(starts))


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
    """Per-tile 1-D weights in output pixels, normalised so they sum to 1 everywhere."""
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
    return [w / total[s * scale : s * scale + size] for s, w in zip(starts, weights)]


def run_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    scale: int,
    tile: int,
    overlap: int,
    *,
    batch_size: int = DEFAULT_TILE_BATCH,
    margin: int | None = None,
    align: int = 1,
    device: torch.device | str | None = None,
    out_dtype: torch.dtype = torch.float32,
    pass_items: bool = False,
    pad_mode: str = "reflect",
) -> torch.Tensor:
    """Apply ``fn`` tile by tile and blend; returns (B, C, H*scale, W*scale) on x's device.

    ``batch_size`` tiles (from any of the B images) go through ``fn`` per call.
    ``align``: tile sizes and starts are multiples of it (e.g. a transformer's window); the
    input is padded on the bottom/right to a multiple of it (``pad_mode``: "reflect" where
    the image is big enough, else "replicate"; or always "replicate") and the output cropped.
    ``device``: where tiles are sent before ``fn`` (default: x's device); results come back.
    ``pass_items``: call ``fn(tiles, items)``, ``items[k]`` being the index in ``x`` of the
    image tile k was cut from (for per-image conditioning).
    OOM errors propagate; see ``run_tiled_with_fallback``.
    """
    if x.dim() != 4:
        raise ValueError(f"run_tiled wants a (B,C,H,W) tensor, got shape {tuple(x.shape)}")
    if tile < 1 or overlap < 0 or batch_size < 1 or scale < 1:
        raise ValueError(f"bad tiling parameters tile={tile} overlap={overlap} batch={batch_size}")
    b, c, h, w = x.shape
    device = torch.device(device) if device is not None else x.device
    ph, pw = _align_up(h, align) - h, _align_up(w, align) - w
    if ph or pw:
        mode = "reflect" if pad_mode == "reflect" and ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    H, W = h + ph, w + pw
    tile = _align_down(min(tile, max(H, W)), align)
    overlap = min(overlap, max(tile - align, 0))
    margin = overlap // 4 if margin is None else max(0, min(margin, overlap // 2))
    th, tw = min(tile, H), min(tile, W)
    ys, xs = tile_starts(H, th, overlap, align), tile_starts(W, tw, overlap, align)
    wy = axis_weights(H, ys, th, overlap, margin, scale)
    wx = axis_weights(W, xs, tw, overlap, margin, scale)

    out = torch.zeros((b, c, H * scale, W * scale), dtype=out_dtype, device=x.device)
    jobs = [(bi, i, j) for bi in range(b) for i in range(len(ys)) for j in range(len(xs))]
    single = len(ys) == 1 and len(xs) == 1
    for k in range(0, len(jobs), batch_size):
        group = jobs[k : k + batch_size]
        crops = torch.stack([x[bi, :, ys[i] : ys[i] + th, xs[j] : xs[j] + tw] for bi, i, j in group])
        crops = crops.to(device)
        result = fn(crops, [bi for bi, _, _ in group]) if pass_items else fn(crops)
        expected = (len(group), c, th * scale, tw * scale)
        if tuple(result.shape) != expected:
            raise RuntimeError(f"tile function returned {tuple(result.shape)}, expected {expected}")
        result = result.to(device=x.device, dtype=out_dtype)
        for n, (bi, i, j) in enumerate(group):
            y0, x0 = ys[i] * scale, xs[j] * scale
            if single:
                out[bi] = result[n]
                continue
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
    Raises TileOutOfMemoryError when ``run(1, min_tile)`` itself runs out of memory."""
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
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    scale: int,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    *,
    batch_size: int = DEFAULT_TILE_BATCH,
    min_tile: int = DEFAULT_MIN_TILE,
    margin: int | None = None,
    align: int = 1,
    device: torch.device | str | None = None,
    out_dtype: torch.dtype = torch.float32,
    what: str = "image",
    pass_items: bool = False,
    pad_mode: str = "reflect",
) -> tuple[torch.Tensor, TileSettings]:
    """``run_tiled`` under the OOM policy. Returns the output and the settings that worked
    (callers may keep them for the next image)."""
    # A tile bigger than the image is the image: start halving from the image size.
    tile = min(tile, _align_up(max(x.shape[-2:]), align))

    first_tile = tile

    def run(bs: int, t: int) -> torch.Tensor:
        ov = overlap if t >= first_tile else min(overlap, t // 2)
        mg = None if margin is None else min(margin, ov // 2)
        return run_tiled(fn, x, scale, t, ov, batch_size=bs, margin=mg, align=align,
                         device=device, out_dtype=out_dtype, pass_items=pass_items, pad_mode=pad_mode)

    out, bs, t, retries = with_oom_fallback(
        run, batch_size=batch_size, tile=tile, min_tile=min(min_tile, tile), align=align, what=what
    )
    ov = overlap if t >= first_tile else min(overlap, t // 2)
    return out, TileSettings(tile=t, overlap=ov, batch_size=bs, oom_retries=retries)


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
