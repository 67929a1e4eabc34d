import pytest
import torch
import torch.nn.functional as F

from sr_diffusion.tiling import blend_weights, tile_grid, tile_starts, tiled_apply


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
