"""Tests for sr_diffusion.metrics: BT.601 conversion, BasicSR PSNR/SSIM (numpy and torch), LR consistency,
the gradient-magnitude sharpness measure.

Expected values are derived by hand (constant images, pure colours, closed forms) or come from
scikit-image, whose SSIM with Gaussian weights pads ('same' filtering) but then discards the 5-pixel border
of its map before averaging; that border is exactly what BasicSR's 'valid' filtering never computes, so the
two agree to rounding error on the full image.
"""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from sr_diffusion.metrics import (
    calculate_psnr,
    calculate_ssim,
    gradient_magnitude,
    lr_consistency,
    psnr,
    rgb_to_y,
    rgb_to_ycbcr,
    ssim,
)
from sr_diffusion.resize import imresize, resize

C1 = (0.01 * 255) ** 2
C2 = (0.03 * 255) ** 2


def _random_pair(shape=(40, 37, 3), noise=20, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape).astype(np.uint8)
    b = np.clip(a.astype(np.int64) + rng.integers(-noise, noise + 1, shape), 0, 255).astype(np.uint8)
    return a, b


def _to_torch(img: np.ndarray) -> torch.Tensor:
    """(H, W, C) in [0, 255] -> (1, C, H, W) float64 in [0, 1]."""
    return torch.from_numpy(img.astype(np.float64) / 255.0).permute(2, 0, 1)[None]


def _smooth_image(size=32):
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack(
        [
            0.5 + 0.3 * np.sin(2 * np.pi * x),
            0.5 + 0.3 * np.cos(2 * np.pi * y),
            0.5 + 0.2 * np.sin(2 * np.pi * (x + y)),
        ]
    )
    return torch.from_numpy(img)[None]


# ----------------------------------------------------------------------------------------------------------
# colour
# ----------------------------------------------------------------------------------------------------------

# (R, G, B) in [0, 1] -> (Y, Cb, Cr) in [0, 255] from the BT.601 matrix by hand.
PURE_COLOURS = {
    (1.0, 1.0, 1.0): (235.0, 128.0, 128.0),
    (0.0, 0.0, 0.0): (16.0, 128.0, 128.0),
    (1.0, 0.0, 0.0): (16 + 65.481, 128 - 37.797, 128 + 112.0),
    (0.0, 1.0, 0.0): (16 + 128.553, 128 - 74.203, 128 - 93.786),
    (0.0, 0.0, 1.0): (16 + 24.966, 128 + 112.0, 128 - 18.214),
}


def test_ycbcr_of_pure_colours_numpy_and_torch():
    rgb = np.array(list(PURE_COLOURS), dtype=np.float64)  # (5, 3), channels last
    expected = np.array(list(PURE_COLOURS.values())) / 255.0
    np.testing.assert_allclose(rgb_to_ycbcr(rgb), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(rgb_to_y(rgb), expected[:, :1], rtol=0, atol=1e-12)
    assert rgb_to_y(rgb[None]).shape == (1, 5, 1)

    t = torch.from_numpy(rgb.T.copy()).view(1, 3, 5, 1)  # (N, 3, H, W)
    np.testing.assert_allclose(rgb_to_ycbcr(t)[0, :, :, 0].numpy().T, expected, rtol=0, atol=1e-12)
    y = rgb_to_y(t)
    assert y.shape == (1, 1, 5, 1) and y.dtype == torch.float64
    np.testing.assert_allclose(y.flatten().numpy() * 255, [235, 16, 81.481, 144.553, 40.966], atol=1e-10)
    assert rgb_to_y(t.float()).dtype == torch.float32


def test_ycbcr_uint8_rounds_like_matlab():
    rgb = (np.array(list(PURE_COLOURS)) * 255).astype(np.uint8)
    out = rgb_to_ycbcr(rgb)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.round(np.array(list(PURE_COLOURS.values()))))


# ----------------------------------------------------------------------------------------------------------
# PSNR
# ----------------------------------------------------------------------------------------------------------


def test_psnr_constant_images_hand_computed():
    a = np.zeros((8, 8, 3))
    b = np.full((8, 8, 3), 10.0)
    expected = 10 * math.log10(255**2 / 100)
    assert expected == pytest.approx(28.130803608679106, abs=1e-12)
    assert calculate_psnr(a, b, crop_border=0) == pytest.approx(expected, abs=1e-12)
    torch_value = psnr(_to_torch(a), _to_torch(b))
    assert torch_value.dtype == torch.float64 and torch_value.shape == (1,)
    assert torch_value.item() == pytest.approx(expected, abs=1e-10)
    # Y channel: grey g maps to 16 + 219 g / 255, so black vs white differ by 219 in Y.
    black, white = np.zeros((8, 8, 3)), np.full((8, 8, 3), 255.0)
    expected_y = 10 * math.log10(255**2 / 219**2)
    assert calculate_psnr(black, white, 0, test_y_channel=True) == pytest.approx(expected_y, abs=1e-10)
    assert psnr(_to_torch(black), _to_torch(white), y_channel=True).item() == pytest.approx(expected_y, abs=1e-10)


def test_psnr_identical_is_inf():
    a, _ = _random_pair()
    assert calculate_psnr(a, a, crop_border=4) == float("inf")
    assert calculate_psnr(a, a.copy(), crop_border=0, test_y_channel=True) == float("inf")
    out = psnr(_to_torch(a).repeat(2, 1, 1, 1), _to_torch(a).repeat(2, 1, 1, 1))
    assert torch.isinf(out).all() and (out > 0).all()


def test_crop_border_removes_exactly_the_border():
    a = np.full((10, 10), 100.0)
    b = a.copy()
    b[:2, :] += 10  # a 2-pixel frame differs by 10
    b[-2:, :] += 10
    b[:, :2] = 110
    b[:, -2:] = 110
    assert calculate_psnr(a, b, crop_border=2) == float("inf")
    # crop 1 keeps 8x8 = 64 pixels, of which the outer ring of 28 differs by 10.
    assert calculate_psnr(a, b, crop_border=1) == pytest.approx(10 * math.log10(255**2 / (28 * 100 / 64)))
    ta, tb = torch.from_numpy(a / 255)[None, None], torch.from_numpy(b / 255)[None, None]
    assert psnr(ta, tb, crop_border=2).item() == float("inf")
    assert psnr(ta, tb, crop_border=1).item() == pytest.approx(calculate_psnr(a, b, crop_border=1), abs=1e-9)


def test_psnr_matches_skimage():
    a, b = _random_pair()
    assert calculate_psnr(a, b, 0) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), abs=1e-10)
    expected = peak_signal_noise_ratio(a[3:-3, 3:-3], b[3:-3, 3:-3], data_range=255)
    assert calculate_psnr(a, b, 3) == pytest.approx(expected, abs=1e-10)


def test_uint8_float_hwc_chw_2d_agree():
    a, b = _random_pair()
    for fn in (calculate_psnr, calculate_ssim):
        ref = fn(a, b, 2)
        assert isinstance(ref, float)
        assert fn(a.astype(np.float32), b.astype(np.float32), 2) == pytest.approx(ref, abs=1e-9)
        assert fn(a.transpose(2, 0, 1), b.transpose(2, 0, 1), 2, input_order="CHW") == pytest.approx(ref)
        assert fn(a[..., 0], b[..., 0], 2) == pytest.approx(fn(a[..., :1], b[..., :1], 2))
        # A 1-channel image is used as is for the Y channel, as in BasicSR.
        assert fn(a[..., :1], b[..., :1], 2, test_y_channel=True) == pytest.approx(fn(a[..., :1], b[..., :1], 2))


def test_y_channel_uses_rgb_order():
    a, b = _random_pair()
    ya = rgb_to_y(a.astype(np.float64) / 255) * 255
    yb = rgb_to_y(b.astype(np.float64) / 255) * 255
    assert calculate_psnr(a, b, 2, test_y_channel=True) == pytest.approx(calculate_psnr(ya, yb, 2), abs=1e-10)
    # Swapping R and B (what BasicSR's BGR assumption would do to an RGB image) changes the result.
    assert calculate_psnr(a[..., ::-1], b[..., ::-1], 2, test_y_channel=True) != pytest.approx(
        calculate_psnr(a, b, 2, test_y_channel=True), abs=1e-6
    )


# ----------------------------------------------------------------------------------------------------------
# SSIM
# ----------------------------------------------------------------------------------------------------------


def test_ssim_identical_is_one():
    a, _ = _random_pair()
    assert calculate_ssim(a, a, 0) == pytest.approx(1.0, abs=1e-12)
    assert ssim(_to_torch(a), _to_torch(a)).item() == pytest.approx(1.0, abs=1e-12)


def test_ssim_constant_shift_closed_form():
    # Constant images c and c + d: all variances vanish, so SSIM is the luminance term
    # (2 c (c + d) + C1) / (c^2 + (c + d)^2 + C1).
    c, d = 100.0, 10.0
    expected = (2 * c * (c + d) + C1) / (c**2 + (c + d) ** 2 + C1)
    a, b = np.full((16, 16, 3), c), np.full((16, 16, 3), c + d)
    assert calculate_ssim(a, b, 0) == pytest.approx(expected, abs=1e-12)
    assert ssim(_to_torch(a), _to_torch(b)).item() == pytest.approx(expected, abs=1e-12)


def test_ssim_shifted_image_is_the_mean_luminance_term():
    # img2 = img + d leaves variances and covariance unchanged, so the contrast-structure term is 1 and
    # SSIM is the mean of (2 mu (mu + d) + C1) / (mu^2 + (mu + d)^2 + C1) over the 'valid' window positions.
    rng = np.random.default_rng(5)
    img = rng.uniform(50, 200, (30, 26))
    d = 20.0
    x = np.arange(11) - 5.0
    window = np.exp(-(x**2) / (2 * 1.5**2))
    window = np.outer(window, window) / np.outer(window, window).sum()
    mu = ndimage.correlate(img, window, mode="constant")[5:-5, 5:-5]  # interior only: padding unused
    expected = np.mean((2 * mu * (mu + d) + C1) / (mu**2 + (mu + d) ** 2 + C1))
    assert calculate_ssim(img, img + d, 0) == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("crop_border", [0, 4])
def test_ssim_matches_skimage(crop_border):
    a, b = _random_pair(noise=40)
    k = crop_border
    a_c, b_c = (a[k:-k, k:-k], b[k:-k, k:-k]) if k else (a, b)
    expected = structural_similarity(
        a_c.astype(np.float64),
        b_c.astype(np.float64),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
        channel_axis=-1,
    )
    assert calculate_ssim(a, b, crop_border) == pytest.approx(expected, abs=1e-10)
    assert ssim(_to_torch(a), _to_torch(b), crop_border).item() == pytest.approx(expected, abs=1e-10)


# ----------------------------------------------------------------------------------------------------------
# numpy and torch APIs agree
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("y_channel", [False, True])
def test_numpy_and_torch_apis_agree(y_channel):
    pairs = [_random_pair(seed=s) for s in (1, 2)]
    sr = torch.cat([_to_torch(a) for a, _ in pairs])
    hr = torch.cat([_to_torch(b) for _, b in pairs])
    psnr_t = psnr(sr, hr, crop_border=3, y_channel=y_channel)
    ssim_t = ssim(sr, hr, crop_border=3, y_channel=y_channel)
    assert psnr_t.shape == ssim_t.shape == (2,)
    assert psnr_t.dtype == ssim_t.dtype == torch.float64
    for i, (a, b) in enumerate(pairs):
        assert psnr_t[i].item() == pytest.approx(calculate_psnr(a, b, 3, test_y_channel=y_channel), abs=1e-9)
        assert ssim_t[i].item() == pytest.approx(calculate_ssim(a, b, 3, test_y_channel=y_channel), abs=1e-10)
    # float32 input is measured in float64; (C, H, W) is a batch of one.
    assert psnr(sr.float(), hr.float(), 3, y_channel).dtype == torch.float64
    torch.testing.assert_close(ssim(sr[0], hr[0], 3, y_channel), ssim_t[:1])


def test_torch_metrics_are_differentiable():
    a, b = _random_pair(shape=(16, 16, 3))
    sr = _to_torch(a).requires_grad_(True)
    (psnr(sr, _to_torch(b)) + ssim(sr, _to_torch(b))).sum().backward()
    assert sr.grad is not None and torch.isfinite(sr.grad).all()


# ----------------------------------------------------------------------------------------------------------
# LR consistency
# ----------------------------------------------------------------------------------------------------------


def test_lr_consistency_of_bicubic_upscaling_is_high():
    lr = _smooth_image().repeat(2, 1, 1, 1)
    for scale in (2, 4):
        value = lr_consistency(lr, imresize(lr, scale), scale)
        assert value.shape == (2,) and value.dtype == torch.float64
        assert (value > 40).all(), value
    # Torch bicubic made the image: check with the same kernel.
    sr = resize(lr, 4, mode="bicubic")
    assert (lr_consistency(lr, sr, 4, mode="bicubic") > 40).all()
    # A random image is not explained by its blurry upscale as well as a smooth one.
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert lr_consistency(noise, imresize(noise, 4), 4).item() < 40


def test_lr_consistency_identity_and_equivalence():
    lr = _smooth_image()
    assert torch.isinf(lr_consistency(lr, lr.clone(), 1)).all()
    sr = imresize(lr, 2) + 0.01
    expected = psnr(imresize(sr, 0.5), lr, crop_border=2)
    torch.testing.assert_close(lr_consistency(lr, sr, 2, crop_border=2), expected)


def test_lr_consistency_errors():
    lr = _smooth_image()
    with pytest.raises(ValueError, match="scale=4"):
        lr_consistency(lr, imresize(lr, 2), 4)
    with pytest.raises(ValueError, match="scale=2"):
        lr_consistency(lr, torch.rand(1, 3, 64, 63), 2)
    with pytest.raises(ValueError, match="batch and channel"):
        lr_consistency(lr, torch.rand(2, 3, 64, 64), 2)
    with pytest.raises(ValueError, match="scale"):
        lr_consistency(lr, imresize(lr, 2), 0)
    with pytest.raises(ValueError, match="valid modes"):
        lr_consistency(lr, imresize(lr, 2), 2, mode="lanczos")


# ----------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------


def test_numpy_errors():
    a = np.ones((16, 16, 3))
    with pytest.raises(ValueError, match="shapes are different"):
        calculate_psnr(a, np.ones((10, 10, 3)), 0)
    with pytest.raises(ValueError, match="input_order"):
        calculate_psnr(a, a, 1, input_order="WRONG")
    with pytest.raises(ValueError, match="too large"):
        calculate_psnr(a, a, 8)
    calculate_psnr(a, a, 7)  # 2x2 pixels remain
    with pytest.raises(ValueError, match="11x11"):
        calculate_ssim(a, a, 3)  # 10x10 remain, SSIM needs 11x11
    with pytest.raises(ValueError, match="crop_border"):
        calculate_psnr(a, a, -1)
    with pytest.raises(ValueError, match="crop_border"):
        calculate_psnr(a, a, 1.5)
    bad = a.copy()
    bad[0, 0, 0] = np.nan
    for fn in (calculate_psnr, calculate_ssim):
        with pytest.raises(ValueError, match="non-finite"):
            fn(bad, a, 0)
        with pytest.raises(ValueError, match="non-finite"):
            fn(a, np.where(np.isnan(bad), np.inf, a), 0)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        calculate_psnr(np.ones((16, 16, 2)), np.ones((16, 16, 2)), 0)
    with pytest.raises(TypeError):
        calculate_psnr(a.tolist(), a, 0)


def test_torch_errors():
    x = torch.rand(2, 3, 16, 16)
    for fn in (psnr, ssim):
        with pytest.raises(ValueError, match="shapes are different"):
            fn(x, x[:1])
        with pytest.raises(ValueError, match="too large"):
            fn(x, x, crop_border=8)
        bad = x.clone()
        bad[1, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="non-finite"):
            fn(bad, x)
        with pytest.raises(ValueError, match="channels"):
            fn(x[:, :2], x[:, :2], y_channel=True)
        with pytest.raises(TypeError):
            fn((x * 255).to(torch.uint8), (x * 255).to(torch.uint8))
        with pytest.raises(ValueError):
            fn(x[0, 0], x[0, 0])
    with pytest.raises(ValueError, match="11x11"):
        ssim(x, x, crop_border=3)
    with pytest.raises(ValueError):
        rgb_to_ycbcr(x[:, :2])
    with pytest.raises(ValueError):
        rgb_to_ycbcr(np.ones((4, 4, 4)))


# ----------------------------------------------------------------------------------------------------------
# gradient magnitude
# ----------------------------------------------------------------------------------------------------------


def test_gradient_magnitude_of_ramps_constants_and_an_edge():
    h, w = 12, 16
    x = torch.arange(w, dtype=torch.float64).expand(h, w)
    y = torch.arange(h, dtype=torch.float64)[:, None].expand(h, w)
    ramp = (0.01 * x)[None, None]  # luminance given directly: d/dx = 0.01 everywhere
    assert gradient_magnitude(ramp).item() == pytest.approx(0.01)
    diagonal = (0.03 * x + 0.04 * y)[None, None]
    assert gradient_magnitude(diagonal).item() == pytest.approx(0.05)  # sqrt(0.03^2 + 0.04^2)
    assert gradient_magnitude(torch.full((2, 3, 8, 8), 0.3)).tolist() == [0.0, 0.0]
    # a vertical step 0 -> 1 between columns 7 and 8: the Sobel x-derivative is 1/2 on the two columns beside it
    step = (x >= 8).double()[None, None]
    assert gradient_magnitude(step).item() == pytest.approx(2 * 0.5 / (w - 2))
    assert gradient_magnitude(step, crop_border=3).item() == pytest.approx(2 * 0.5 / (w - 8))


def test_gradient_magnitude_of_rgb_is_that_of_its_luma():
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(2, 3, 10, 9, generator=g)
    expected = gradient_magnitude(rgb_to_y(rgb.double()))
    torch.testing.assert_close(gradient_magnitude(rgb), expected)
    # a gray ramp: Y = (16 + 219 v) / 255, so the gradient is scaled by 219 / 255
    gray = (0.02 * torch.arange(9.0)).expand(3, 10, 9)
    assert gradient_magnitude(gray).item() == pytest.approx(0.02 * 219 / 255)
    # unbatched input, float32: same number
    assert gradient_magnitude(rgb[0]).item() == pytest.approx(expected[0].item())


def test_gradient_magnitude_orders_blur_below_the_original():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 3, 32, 32, generator=g)
    blurred = resize(resize(img, size=(8, 8), mode="bicubic", antialias=True), size=(32, 32), mode="bicubic")
    assert gradient_magnitude(blurred) < 0.5 * gradient_magnitude(img)


@pytest.mark.parametrize(
    "img, kwargs, error",
    [
        ("not a tensor", {}, TypeError),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), {}, TypeError),
        (torch.zeros(1, 2, 8, 8), {}, ValueError),
        (torch.zeros(8, 8), {}, ValueError),
        (torch.full((1, 3, 8, 8), float("nan")), {}, ValueError),
        (torch.zeros(1, 3, 8, 8), {"crop_border": 3}, ValueError),  # 2x2 left: no 3x3 window
        (torch.zeros(1, 3, 8, 8), {"crop_border": -1}, ValueError),
    ],
)
def test_gradient_magnitude_errors(img, kwargs, error):
    with pytest.raises(error):
        gradient_magnitude(img, **kwargs)
