"""Tiling for every pipeline: the tile grid, the tile weights and the accumulator that blends tiles.

* :func:`tile_grid` / :func:`tile_starts` / :func:`tile_regions`: overlapping tiles of one size, the last tile in
  each row or column shifted back so it ends at the image border.
* :func:`tile_weights`: the one definition of per-pixel tile weights (below).
* :class:`TileAccumulator`: sums ``weight · tile`` and ``weight`` over the tiles in float32 and returns their ratio.
  Every tiled path accumulates with it: :func:`tiled_apply` (regression, SR3, SRDiff, LDM-SR, ResShift),
  the SD methods' latent tiling (``StableDiffusionSRMixin.blend_latent_tiles``: StableSR, PASD, SeeSR), StableSR's
  tiled VAE and ``match_original`` patches, and ResShift's ``match_original`` tiles.
* :func:`tiled_apply`: tile-and-blend for any image-to-image callable. The input (N, C, H, W) is cut into tiles of
  ``tile_size``, tiles are run through ``fn`` in batches of ``tile_batch_size``, and the outputs of shape
  (B, C', tile·scale, tile·scale) are blended.

Tile weights (:func:`tile_weights`, ``kind``):

* ``"linear"``: 1 in the tile interior; across the overlap, ~0 over its outer quarter and a linear cross-fade over its
  middle half. Close to exact for convolutional models whose padding effects reach less than a quarter of the
  overlap into a tile. :func:`tiled_apply`'s default.
* ``"gaussian"``: a separable Gaussian over the whole tile, per axis of length ``n``
  ``exp(-((i - c) / n)² / (2 · var))``, i.e. ``sigma = sqrt(var) · n``, centred at ``c = (n - 1)/2`` (plus
  ``y_centre_shift`` on the y axis). Two parametrisations are in use, deliberately different:

  - :data:`BLEND_GAUSSIAN` (``var = 1/16``: ``sigma = n/4``, centred): :func:`tiled_apply`'s ``blend="gaussian"``.
  - :data:`ORIGINALS_GAUSSIAN` (``var = 0.01``: ``sigma = 0.1 · n``, y centre ``H/2``, half a pixel below the
    middle): the originals' ``_gaussian_weights`` (Mixture of Diffusers; StableSR, PASD, SeeSR), kept exactly so
    that tiled outputs match theirs. ``sr_diffusion.pipelines.sd_base.gaussian_tile_weights`` is this preset.
* ``"uniform"``: ones, a plain average where tiles overlap (ResShift's reference ``ImageSpliterTh``).

The Gaussian and linear weights are strictly positive everywhere, so pixels at the image border, which only one
tile covers, are normalised correctly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

__all__ = [
    "BLEND_GAUSSIAN",
    "ORIGINALS_GAUSSIAN",
    "TILE_WEIGHT_KINDS",
    "TileAccumulator",
    "blend_weights",
    "tile_grid",
    "tile_regions",
    "tile_starts",
    "tile_weights",
    "tiled_apply",
]

#: the kinds of :func:`tile_weights`
TILE_WEIGHT_KINDS = ("linear", "gaussian", "uniform")
#: :func:`tiled_apply`'s Gaussian blend: ``sigma = n/4`` (``var = 1/16``), centred on the tile
BLEND_GAUSSIAN: dict[str, float] = {"var": 1 / 16, "y_centre_shift": 0.0}
#: the originals' ``_gaussian_weights`` (StableSR, PASD, SeeSR, after Mixture of Diffusers): ``var = 0.01``
#: (``sigma = 0.1 · n``), the y centre at ``H/2`` rather than ``(H - 1)/2`` as they compute it
ORIGINALS_GAUSSIAN: dict[str, float] = {"var": 0.01, "y_centre_shift": 0.5}


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


def tile_regions(
    height: int, width: int, tile_size: int, tile_overlap: int, *, column_major: bool = False
) -> tuple[tuple[int, int], list[tuple[slice, ...]]]:
    """``((tile_h, tile_w), regions)``: the indices ``(:, :, ys, xs)`` of the tiles of :func:`tile_grid` in an
    ``(N, C, height, width)`` tensor, row by row (``column_major``: column by column, as ``ImageSpliterTh``)."""
    tile_h, tile_w, ys, xs = tile_grid(height, width, tile_size, tile_overlap)
    full = slice(None)
    positions = [(y, x) for x in xs for y in ys] if column_major else [(y, x) for y in ys for x in xs]
    return (tile_h, tile_w), [(full, full, slice(y, y + tile_h), slice(x, x + tile_w)) for y, x in positions]


def tile_weights(
    height: int,
    width: int,
    kind: str = "gaussian",
    *,
    overlap: int = 0,
    var: float = BLEND_GAUSSIAN["var"],
    y_centre_shift: float = BLEND_GAUSSIAN["y_centre_shift"],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``(1, 1, height, width)`` float32 weights of one tile (see the module docstring), separable ``w_y ⊗ w_x``.

    Args:
        height, width: the tile's size.
        kind: ``"linear"`` (cross-fade over ``overlap``), ``"gaussian"`` or ``"uniform"`` (ones).
        overlap: ``"linear"`` only: the overlap between neighbouring tiles, in this tile's pixels (0: all ones).
        var: ``"gaussian"`` only: the variance relative to the squared side, ``sigma = sqrt(var) · n`` per axis;
            ``1/16`` (:data:`BLEND_GAUSSIAN`) or the originals' ``0.01`` (:data:`ORIGINALS_GAUSSIAN`).
        y_centre_shift: ``"gaussian"`` only: the y centre is ``(height - 1)/2 + y_centre_shift`` (the x centre is
            always ``(width - 1)/2``); the originals' ``0.5`` puts it at ``height/2``.
        device: where to build the weights.

    The constant factor ``1/sqrt(2π · var)`` of a normal density is left out: it cancels when the blend is
    normalised by the summed weights.
    """
    if kind not in TILE_WEIGHT_KINDS:
        raise ValueError(f"tile weight kind must be one of {TILE_WEIGHT_KINDS}, got {kind!r}")

    def axis(n: int, centre_shift: float) -> torch.Tensor:
        if kind == "uniform" or (kind == "linear" and overlap <= 0):
            return torch.ones(n, device=device)
        i = torch.arange(n, device=device, dtype=torch.float32)
        if kind == "linear":
            dist = torch.minimum(i, n - 1 - i)  # 0 at the tile edge
            # Cross-fade over the middle half of the overlap: the outer quarter, where a network's
            # padding artefacts live, gets (almost) no weight.
            ramp_start, ramp_len = overlap / 4, max(overlap / 2, 1.0)
            return torch.clamp((dist - ramp_start + 0.5) / ramp_len, min=1e-4, max=1.0)
        return torch.exp(-(((i - ((n - 1) / 2 + centre_shift)) / n) ** 2) / (2 * var))

    return (axis(height, y_centre_shift)[:, None] * axis(width, 0.0)[None, :])[None, None]


def blend_weights(height: int, width: int, overlap: int, mode: str = "linear", device=None) -> torch.Tensor:
    """:func:`tiled_apply`'s weights for ``blend=mode``: :func:`tile_weights` with ``overlap`` and, for
    ``"gaussian"``, :data:`BLEND_GAUSSIAN` (``sigma = n/4``)."""
    if mode not in ("linear", "gaussian"):
        raise ValueError(f"blend mode must be 'linear' or 'gaussian', got {mode!r}")
    return tile_weights(height, width, mode, overlap=overlap, **BLEND_GAUSSIAN, device=device)


class TileAccumulator:
    """Blends overlapping tiles: ``add`` sums ``weight · value`` and ``weight`` per pixel in float32, ``result``
    returns their ratio cast to ``dtype``.

    Args:
        shape: the blended output's shape ``(N, C, H, W)``; the weights' sum is ``(1, 1, H, W)`` (one weight per
            pixel, shared by every sample and channel).
        dtype: the dtype :meth:`result` returns.
        device: where the sums live (values are moved there).

    The sums are float32 whatever the tiles' dtype, and each pixel's terms are added in the order of the ``add``
    calls, so the result is what a loop writing ``total[region] += value.float() * weight`` and
    ``weight_sum[region] += weight`` gives, bit for bit.
    """

    def __init__(
        self, shape: Sequence[int], dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ):
        self.dtype = dtype
        self.total = torch.zeros(tuple(shape), dtype=torch.float32, device=device)
        self.weight_sum = torch.zeros(1, 1, *tuple(shape)[-2:], dtype=torch.float32, device=device)

    def add(self, region: tuple[Any, ...], value: torch.Tensor, weight: torch.Tensor | float = 1.0) -> None:
        """Accumulate ``value`` (the tile, shaped as ``total[region]``) with ``weight`` (``(1, 1, h, w)`` from
        :func:`tile_weights`, or a number: ``1.0`` is the uniform average) over ``region``, an index of the output
        such as ``(:, :, ys, xs)`` or ``(..., ys, xs)``."""
        self.total[region] += value.to(device=self.total.device, dtype=torch.float32) * weight
        self.weight_sum[region] += weight

    def result(self) -> torch.Tensor:
        """The weighted average ``Σ weight · value / Σ weight`` as ``dtype`` (every pixel must have been covered)."""
        return (self.total / self.weight_sum).to(self.dtype)


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
    positions = [(y, x0) for y in ys for x0 in xs]
    for batch in _batched(positions, tile_batch_size):
        tiles = torch.cat([x[:, :, y : y + tile_h, x0 : x0 + tile_w] for y, x0 in batch])
        result = fn(tiles)
        expected = (out_tile_h, out_tile_w)
        if tuple(result.shape[-2:]) != expected:
            raise ValueError(f"tile function returned spatial size {tuple(result.shape[-2:])}, expected {expected}")
        if output is None:
            shape = (n, result.shape[1], round(h * scale), round(w * scale))
            output = TileAccumulator(shape, dtype=result.dtype, device=x.device)
        result = result.float().to(x.device)
        for i, (y, x0) in enumerate(batch):
            oy, ox = round(y * scale), round(x0 * scale)
            region = (slice(None), slice(None), slice(oy, oy + out_tile_h), slice(ox, ox + out_tile_w))
            output.add(region, result[i * n : (i + 1) * n], weight)
        if progress is not None:
            progress(len(batch))
    return output.result()
