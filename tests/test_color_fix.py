import pytest
import torch
import torch.nn.functional as F

from sr_diffusion.color_fix import adain_color_fix, color_fix, wavelet_color_fix, wavelet_decomposition


@pytest.fixture
def hr(photo_tensor):
    return photo_tensor[..., :64, :64].double()


def test_wavelet_decomposition_is_exact_and_low_pass(hr):
    high, low = wavelet_decomposition(hr, levels=5)
    torch.testing.assert_close(high + low, hr)
    # the low band of a constant image is that constant, and it has no high band
    const = torch.full_like(hr, 0.3)
    high_c, low_c = wavelet_decomposition(const)
    torch.testing.assert_close(low_c, const)
    assert high_c.abs().max() < 1e-12
    # low band is smoother than the image: much smaller gradient energy
    grad = lambda t: (t[..., 1:, :] - t[..., :-1, :]).pow(2).mean()  # noqa: E731
    assert grad(low) < 0.1 * grad(hr)


def test_wavelet_fix_removes_a_colour_cast_exactly(hr):
    lr = F.interpolate(hr, scale_factor=0.25, mode="area")
    cast = hr + torch.tensor([0.1, -0.05, 0.02], dtype=hr.dtype).view(1, 3, 1, 1)
    torch.testing.assert_close(wavelet_color_fix(cast, lr), wavelet_color_fix(hr, lr))
    fixed = wavelet_color_fix(cast, lr)
    assert (fixed - hr).mean(dim=(-2, -1)).abs().max() < 0.01  # colour follows the LR
    assert (cast - hr).mean(dim=(-2, -1)).abs().max() > 0.09


def test_adain_matches_reference_statistics_and_ignores_affine_changes(hr):
    ref = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)).double()
    out = adain_color_fix(hr, ref)
    ref_up = F.interpolate(ref, size=hr.shape[-2:], mode="bicubic", align_corners=False)
    torch.testing.assert_close(out.mean(dim=(-2, -1)), ref_up.mean(dim=(-2, -1)))
    torch.testing.assert_close(
        out.std(dim=(-2, -1), unbiased=True), ref_up.std(dim=(-2, -1), unbiased=True), rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(adain_color_fix(2 * hr + 0.3, ref), out, rtol=1e-4, atol=1e-4)


def test_dispatch_and_errors(hr):
    assert color_fix(hr, hr, "none") is hr
    torch.testing.assert_close(color_fix(hr, hr, "wavelet"), hr)
    with pytest.raises(ValueError, match="color_fix must be one of"):
        color_fix(hr, hr, "histogram")
    with pytest.raises(ValueError, match="same batch and channels"):
        color_fix(hr, hr[:, :1], "adain")
    with pytest.raises(ValueError, match="levels"):
        wavelet_decomposition(hr, levels=0)
