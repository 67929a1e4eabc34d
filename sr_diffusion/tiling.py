"""Tile-and-blend for any image-to-image callable: the one tiling mechanism every pipeline uses.

The input (N, C, H, W) is cut into overlapping tiles of ``tile_size`` (the last tile in each row or
column is shifted back so it ends at the image border, so all tiles have the same size), tiles are
run through ``fn`` in batches of ``tile_batch_size``, and the outputs of shape
(B, C', tile·scale, tile·scale) are blended with per-pixel weights and normalised by the sum of
weights. Weights:

* ``"linear"``: 1 in the tile interior; across the overlap, ~0 over its outer quarter and a linear
  cross-fade over its middle half. Close to exact for convolutional models whose padding effects
  reach less than a quarter of the overlap into a tile.
* ``"gaussian"``: a separable Gaussian over the whole tile (sigma = tile/4 by default), as in
  StableSR's and MultiDiffusion's latent aggregation.

Weights are strictly positive everywhere so pixels at the image border, which only one tile covers,
are normalised correctly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

__all__ = ["tile_starts", "tile_grid", "blend_weights", "tiled_apply"]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` with at least ``overlap`` overlap."""
    if tile <= 0:
        raise ValueError(f"tile size must be positive, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile size), got overlap={overlap}, tile={tile}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    starts = [min(i * stride, length - tile) for i in range(count)]
    return sorted(set(starts))


def tile_grid(height: int, width: int, tile_size: int, tile_overlap: int) -> tuple[int, int, list[int], list[int]]:
    """Tile height/width and the row/column start offsets for an image of ``height`` × ``width``.

    A side shorter than ``tile_size`` gets one tile of that side; the overlap is capped below it.
    """
    tile_h, tile_w = min(tile_size, height), min(tile_size, width)
    ys = tile_starts(height, tile_h, min(tile_overlap, tile_h - 1))
    xs = tile_starts(width, tile_w, min(tile_overlap, tile_w - 1))
    return tile_h, tile_w, ys, xs


def blend_weights(height: int, width: int, overlap: int, mode: str = "linear", device=None) -> torch.Tensor:
    """(1, 1, height, width) positive blending weights for one output tile."""

    def ramp(n: int) -> torch.Tensor:
        if mode == "linear":
            if overlap <= 0:
                return torch.ones(n, device=device)
            i = torch.arange(n, device=device, dtype=torch.float32)
            dist = torch.minimum(i, n - 1 - i)  # 0 at the tile edge
            # Cross-fade over the middle half of the overlap: the outer quarter, where a network's
            # padding artefacts live, gets (almost) no weight.
            ramp_start, ramp_len = overlap / 4, max(overlap / 2, 1.0)
            return torch.clamp((dist - ramp_start + 0.5) / ramp_len, min=1e-4, max=1.0)
        if mode == "gaussian":
            i = torch.arange(n, device=device, dtype=torch.float32)
            sigma = n / 4.0
            return torch.exp(-0.5 * ((i - (n - 1) / 2) / sigma) ** 2)
        raise ValueError(f"blend mode must be 'linear' or 'gaussian', got {mode!r}")

    return (ramp(height)[:, None] * ramp(width)[None, :])[None, None]


def _batched(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    scale: float = 1,
    tile_size: int,
    tile_overlap: int = 32,
    blend: str = "linear",
    tile_batch_size: int = 1,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Apply ``fn`` to ``x`` (N, C, H, W) tile by tile and blend the results.

    Args:
        fn: maps (B, C, t, t) to (B, C', t·scale, t·scale). Called with B ≤ ``tile_batch_size`` × N.
        x: the input batch.
        scale: output/input size ratio of ``fn`` (t·scale must be an integer).
        tile_size: input tile side t; an image side smaller than t gives a tile of that side.
        tile_overlap: overlap between neighbouring input tiles, in input pixels.
        blend: ``"linear"`` or ``"gaussian"`` weights (see module docstring).
        tile_batch_size: how many tile positions to run through ``fn`` at once.
        progress: called with the number of tile positions finished after each batch.

    Returns:
        (N, C', H·scale, W·scale), accumulated in float32 on ``x``'s device, cast to ``fn``'s dtype.
    """
    if tile_batch_size < 1:
        raise ValueError(f"tile_batch_size must be >= 1, got {tile_batch_size}")
    n, _, h, w = x.shape
    tile_h, tile_w, ys, xs = tile_grid(h, w, tile_size, tile_overlap)
    out_tile_h, out_tile_w = round(tile_h * scale), round(tile_w * scale)
    if not math.isclose(out_tile_h, tile_h * scale) or not math.isclose(out_tile_w, tile_w * scale):
        raise ValueError(f"tile size {tile_h}x{tile_w} times scale {scale} is not a whole number of pixels")
    weight = blend_weights(out_tile_h, out_tile_w, round(tile_overlap * scale), blend, device=x.device)

    output = None
    weight_sum = torch.zeros(1, 1, round(h * scale), round(w * scale), device=x.device)
    positions = [(y, x0) for y in ys for x0 in xs]
    for batch in _batched(positions, tile_batch_size):
        tiles = torch.cat([x[:, :, y : y + tile_h, x0 : x0 + tile_w] for y, x0 in batch])
        result = fn(tiles)
        expected = (out_tile_h, out_tile_w)
        if tuple(result.shape[-2:]) != expected:
            raise ValueError(f"tile function returned spatial size {tuple(result.shape[-2:])}, expected {expected}")
        if output is None:
            output = torch.zeros(n, result.shape[1], *weight_sum.shape[-2:], device=x.device)
            out_dtype = result.dtype
        result = result.float().to(x.device)
        for i, (y, x0) in enumerate(batch):
            oy, ox = round(y * scale), round(x0 * scale)
            region = (slice(None), slice(None), slice(oy, oy + out_tile_h), slice(ox, ox + out_tile_w))
            output[region] += result[i * n : (i + 1) * n] * weight
            weight_sum[region] += weight
        if progress is not None:
            progress(len(batch))
    return (output / weight_sum).to(out_dtype)
