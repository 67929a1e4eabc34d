import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sr_diffusion.tiling import (
    BLEND_GAUSSIAN,
    ORIGINALS_GAUSSIAN,
    TileAccumulator,
    blend_weights,
    tile_grid,
    tile_regions,
    tile_starts,
    tile_weights,
    tiled_apply,
)

U = 2.0**-24  # float32 unit roundoff


def test_tile_starts_cover_and_end_at_border():
    assert tile_starts(10, 16, 4) == [0]
    starts = tile_starts(100, 32, 8)
    assert starts[0] == 0 and starts[-1] == 100 - 32
    assert all(b - a <= 32 - 8 for a, b in zip(starts, starts[1:]))
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 32, 32)


def test_identity_function_is_reproduced_exactly():
    x = torch.rand(2, 3, 37, 53, generator=torch.Generator().manual_seed(0))
    for blend in ("linear", "gaussian"):
        y = tiled_apply(lambda t: t, x, tile_size=16, tile_overlap=4, blend=blend, tile_batch_size=3)
        torch.testing.assert_close(y, x)


def test_pointwise_upscaler_is_exact():
    x = torch.rand(1, 3, 30, 41, generator=torch.Generator().manual_seed(1))
    fn = lambda t: F.interpolate(t, scale_factor=2, mode="nearest") * 0.5  # noqa: E731
    y = tiled_apply(fn, x, scale=2, tile_size=12, tile_overlap=4)
    torch.testing.assert_close(y, fn(x))


def test_convolution_matches_untiled_to_50db():
    """A deterministic conv net with a small receptive field: tiling must agree with one pass."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 12, 3, padding=1),
        torch.nn.PixelShuffle(2),
    )
    x = torch.rand(1, 3, 64, 80, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = net(x)
        out = tiled_apply(net, x, scale=2, tile_size=32, tile_overlap=12)
    mse = F.mse_loss(out, ref).item()
    peak = (ref.max() - ref.min()).item()
    assert 10 * torch.log10(torch.tensor(peak**2 / mse)) >= 50


def test_weights_positive_and_shaped():
    for mode in ("linear", "gaussian"):
        w = blend_weights(20, 30, 6, mode)
        assert w.shape == (1, 1, 20, 30) and (w > 0).all()
    assert tile_grid(10, 50, 16, 4)[:2] == (10, 16)


def test_bad_function_output_is_reported():
    with pytest.raises(ValueError, match="spatial size"):
        tiled_apply(lambda t: t[..., :-1, :], torch.rand(1, 1, 20, 20), tile_size=8, tile_overlap=2)


@pytest.mark.parametrize("preset", ["blend", "originals"])
@pytest.mark.parametrize("size", [(6, 10), (7, 7), (64, 40)])
def test_gaussian_tile_weights_are_the_formula(preset, size):
    """Per axis of length n: exp(-((i - c) / n)² / (2 var)), c = (n - 1)/2 (+ y_centre_shift on y); the two presets
    are tiled_apply's sigma = n/4 and the originals' var = 0.01 with the y centre at H/2.

    Tolerance: in float32 the exponent a = -((i - c)/n)² / (2 var) carries at most ~4 roundings (subtract, divide,
    square, divide), a relative error ≤ 4u, so exp(a) is off by ≤ 4u·|a| plus ~2u for exp itself; the product of the
    two axes adds u. Hence rtol = 2(4|a|max + 2)u + u."""
    height, width = size
    params = BLEND_GAUSSIAN if preset == "blend" else ORIGINALS_GAUSSIAN
    var, shift = params["var"], params["y_centre_shift"]
    assert (var, shift) == ((1 / 16, 0.0) if preset == "blend" else (0.01, 0.5))

    def axis(n, centre):
        a = -(((np.arange(n) - centre) / n) ** 2) / (2 * var)
        return np.exp(a), np.abs(a).max()

    (wy, ay), (wx, ax) = axis(height, (height - 1) / 2 + shift), axis(width, (width - 1) / 2)
    reference = torch.from_numpy(np.outer(wy, wx))
    got = tile_weights(height, width, "gaussian", **params)
    assert got.shape == (1, 1, height, width) and got.dtype == torch.float32
    rtol = (2 * (4 * max(ay, ax) + 2) + 1) * U
    torch.testing.assert_close(got[0, 0].double(), reference, rtol=rtol, atol=0)
    if preset == "blend":  # centred: symmetric to the bit (i - c and (n - 1 - i) - c differ only in sign)
        assert torch.equal(got, got.flip(-1).flip(-2))
    else:  # the originals' peak row is H/2, half a pixel below the middle
        assert got[0, 0].max(dim=1).values.argmax().item() == height // 2


def test_sigma_quarter_tile_is_the_blend_gaussian_to_the_bit():
    """tiled_apply's Gaussian was written exp(-0.5 · ((i - c) / (n/4))²): the same float32 numbers, because dividing by
    n/4 instead of n and by 1/8 instead of multiplying by 1/2 only scales by powers of two."""
    for n in (1, 2, 5, 16, 37, 320):
        i = torch.arange(n, dtype=torch.float32)
        old = torch.exp(-0.5 * ((i - (n - 1) / 2) / (n / 4.0)) ** 2)
        new = tile_weights(n, 1, "gaussian", **BLEND_GAUSSIAN)[0, 0, :, 0]
        assert torch.equal(new, old)
    assert torch.equal(blend_weights(9, 13, 4, "gaussian"), tile_weights(9, 13, "gaussian"))


def test_linear_and_uniform_tile_weights():
    overlap, n = 8, 20
    w = tile_weights(n, n, "linear", overlap=overlap)[0, 0]
    dist = np.minimum(np.arange(n), n - 1 - np.arange(n))
    ramp = np.clip((dist - overlap / 4 + 0.5) / (overlap / 2), 1e-4, 1.0)
    torch.testing.assert_close(w.double(), torch.from_numpy(np.outer(ramp, ramp)), rtol=4 * U, atol=0)
    assert torch.equal(tile_weights(5, 7, "linear", overlap=0), torch.ones(1, 1, 5, 7))
    assert torch.equal(tile_weights(5, 7, "uniform"), torch.ones(1, 1, 5, 7))
    with pytest.raises(ValueError, match="kind"):
        tile_weights(4, 4, "cosine")
    with pytest.raises(ValueError, match="blend mode"):
        blend_weights(4, 4, 2, "uniform")


def _tiles(shape, tile, overlap, seed):
    """Regions of tile_grid and positive random tiles for them (positive: no cancellation in the sums)."""
    g = torch.Generator().manual_seed(seed)
    tile_h, tile_w, ys, xs = tile_grid(shape[-2], shape[-1], tile, overlap)
    regions = [(slice(None), slice(None), slice(y, y + tile_h), slice(x, x + tile_w)) for y in ys for x in xs]
    return [(r, torch.rand(*shape[:2], tile_h, tile_w, generator=g) + 0.5) for r in regions], (tile_h, tile_w)


@pytest.mark.parametrize("kind", ["gaussian", "linear", "uniform"])
def test_accumulator_is_the_weighted_average(kind):
    """result() = Σ w·v / Σ w per pixel. In float32 each of the k terms covering a pixel is rounded once as a
    product and once as a sum: with positive terms the numerator and the denominator are each off by ≤ (k + 1)u
    relatively and the division adds u, so rtol = (2(k + 1) + 1)u, k the most tiles over one pixel (here 3 × 3:
    the last tile of a row or column is shifted back over its neighbour)."""
    shape = (2, 3, 23, 31)
    tiles, (tile_h, tile_w) = _tiles(shape, 10, 4, seed=0)
    weight = tile_weights(tile_h, tile_w, kind, overlap=4)
    acc = TileAccumulator(shape)
    num, den = torch.zeros(shape, dtype=torch.float64), torch.zeros(1, 1, *shape[-2:], dtype=torch.float64)
    for region, value in tiles:
        acc.add(region, value, weight)
        num[region] += value.double() * weight.double()
        den[region] += weight.double()
    coverage = torch.zeros(shape[-2:])
    for region, _ in tiles:
        coverage[region[2:]] += 1
    k = int(coverage.max())
    assert coverage.min() >= 1 and k == 9
    torch.testing.assert_close(acc.result().double(), num / den, rtol=(2 * (k + 1) + 1) * U, atol=0)


def test_accumulator_adds_as_the_written_out_loop_and_keeps_float32_sums():
    """Bit for bit the loop every tiled path used to write (so moving a path onto it changes no output), float32
    sums for float16 tiles, the result in the requested dtype; a number weight is a uniform average."""
    shape = (1, 2, 17, 25)
    tiles, (tile_h, tile_w) = _tiles(shape, 8, 3, seed=1)
    weight = tile_weights(tile_h, tile_w, "gaussian", **ORIGINALS_GAUSSIAN)
    total, weight_sum = torch.zeros(shape), torch.zeros(1, 1, *shape[-2:])
    acc, half = TileAccumulator(shape), TileAccumulator(shape, dtype=torch.float16)
    for region, value in tiles:
        total[region] += value.float() * weight
        weight_sum[region] += weight
        acc.add(region, value, weight)
        half.add(region, value.half(), weight)
    assert torch.equal(acc.result(), total / weight_sum)
    assert acc.total.dtype == half.total.dtype == torch.float32 and half.result().dtype == torch.float16
    assert torch.equal(half.result(), (half.total / half.weight_sum).half())

    uniform, count = TileAccumulator(shape), torch.zeros(1, 1, *shape[-2:])
    total.zero_()
    for region, value in tiles:
        uniform.add((..., region[2], region[3]), value)
        total[region] += value
        count[region] += 1
    assert torch.equal(uniform.result(), total / count)
    assert torch.equal(uniform.weight_sum, count)


def test_tile_regions_cover_the_grid_row_or_column_major():
    (tile_h, tile_w), rows = tile_regions(20, 30, 12, 4)
    _, _, ys, xs = tile_grid(20, 30, 12, 4)
    assert (tile_h, tile_w) == (12, 12) and (ys, xs) == ([0, 8], [0, 8, 16, 18])
    assert [(r[2].start, r[3].start) for r in rows] == [(y, x) for y in ys for x in xs]
    _, columns = tile_regions(20, 30, 12, 4, column_major=True)
    assert [(r[2].start, r[3].start) for r in columns] == [(y, x) for x in xs for y in ys]
    assert all(r[:2] == (slice(None), slice(None)) and r[2].stop - r[2].start == 12 for r in rows + columns)
