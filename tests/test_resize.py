"""Tests for sr_diffusion.resize: MATLAB-compatible bicubic imresize and the resize dispatcher.

Reference values come from (a) a slow loop implementation of MATLAB's algorithm written independently
below (0-based pixel centres, explicit mirror folding, no precomputed tables) and (b) numbers derived by
hand from Keys' cubic kernel (a = -0.5), which are exact binary fractions for factors 2 and 1/2.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sr_diffusion import resize as resize_module
from sr_diffusion.resize import RESIZE_MODES, imresize, resize, resize_matrix

# ----------------------------------------------------------------------------------------------------------
# independent reference: MATLAB imresize, one output pixel at a time
# ----------------------------------------------------------------------------------------------------------


def _keys_cubic(t: float) -> float:
    t = abs(t)
    if t <= 1:
        return 1.5 * t**3 - 2.5 * t**2 + 1
    if t <= 2:
        return -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2
    return 0.0


def _fold(j: int, n: int) -> int:
    """Half-sample symmetric extension (edge pixel repeated): ... 1 0 | 0 1 ... n-1 | n-1 n-2 ..."""
    while j < 0 or j >= n:
        j = -j - 1 if j < 0 else 2 * n - 1 - j
    return j


def _reference_1d(signal, out_len: int, scale: float, antialias: bool = True) -> list:
    n = len(signal)
    widen = scale < 1 and antialias
    half_width = 2.0 / scale if widen else 2.0
    out = []
    for i in range(out_len):
        centre = (i + 0.5) / scale - 0.5  # 0-based input coordinate of output pixel i
        acc = norm = 0.0
        for j in range(math.floor(centre - half_width), math.ceil(centre + half_width) + 1):
            d = centre - j
            w = scale * _keys_cubic(scale * d) if widen else _keys_cubic(d)
            acc += w * signal[_fold(j, n)]
            norm += w
        out.append(acc / norm)
    return out


def _reference_imresize(img: np.ndarray, out_h: int, out_w: int, scale_h: float, scale_w: float, aa=True):
    """img (H, W) float64 -> (out_h, out_w): columns first, then rows (separable)."""
    cols = np.array([_reference_1d(img[:, c], out_h, scale_h, aa) for c in range(img.shape[1])]).T
    return np.array([_reference_1d(cols[r], out_w, scale_w, aa) for r in range(out_h)])


# ----------------------------------------------------------------------------------------------------------
# hand-derived values
# ----------------------------------------------------------------------------------------------------------

RAMP = np.array([0.0, 1.0, 2.0, 3.0])
# imresize(0:3, 1/2): kernel 0.5 * cubic(d / 2), taps at d = +-0.5, +-1.5, +-2.5, +-3.5 have weights
# 0.43359375, 0.11328125, -0.03515625, -0.01171875; mirrored input [2 1 0 | 0 1 2 3 | 3 2 1].
RAMP_DOWN_2 = np.array([0.4609375, 2.5390625])
# imresize(0:3, 2): cubic at distances 0.25, 0.75, 1.25, 1.75 = 0.8671875, 0.2265625, -0.0703125, -0.0234375.
RAMP_UP_2 = np.array([-0.09375, 0.1796875, 0.7265625, 1.25, 1.75, 2.2734375, 2.8203125, 3.09375])


def test_hand_derived_ramp_1d():
    # A (4, 1) column: the width-1 axis is left unchanged (its only source pixel gets all the weight).
    down = imresize(RAMP[:, None], size=(2, 1))
    up = imresize(RAMP[:, None], size=(8, 1))
    np.testing.assert_allclose(down[:, 0], RAMP_DOWN_2, rtol=0, atol=1e-12)
    np.testing.assert_allclose(up[:, 0], RAMP_UP_2, rtol=0, atol=1e-12)
    # The independent loop reference agrees with the hand values.
    np.testing.assert_allclose(_reference_1d(RAMP, 2, 0.5), RAMP_DOWN_2, atol=1e-12)
    np.testing.assert_allclose(_reference_1d(RAMP, 8, 2.0), RAMP_UP_2, atol=1e-12)


def test_hand_derived_ramp_4x4():
    img = RAMP[:, None] + 4.0 * RAMP[None, :]  # 4x4 ramp, values 0..15
    expected_down = RAMP_DOWN_2[:, None] + 4.0 * RAMP_DOWN_2[None, :]
    np.testing.assert_allclose(expected_down, [[2.3046875, 10.6171875], [4.3828125, 12.6953125]], rtol=0, atol=0)
    np.testing.assert_allclose(imresize(img, 0.5), expected_down, rtol=0, atol=1e-12)
    np.testing.assert_allclose(imresize(img, 2), RAMP_UP_2[:, None] + 4.0 * RAMP_UP_2[None, :], rtol=0, atol=1e-12)
    # torch (C, H, W) path, float32
    out = imresize(torch.tensor(img, dtype=torch.float32)[None], 0.5)
    np.testing.assert_allclose(out[0].numpy(), expected_down, rtol=0, atol=1e-5)


def test_impulse_response_is_the_widened_kernel():
    # Row 8 of a 16x16 image is 1: downscaling by 2 samples 0.5 * cubic(d / 2) at d = 2k + 0.5 - 8.
    img = torch.zeros(1, 16, 16, dtype=torch.float64)
    img[0, 8, :] = 1.0
    out = imresize(img, 0.5)
    expected = [0, 0, -0.01171875, 0.11328125, 0.43359375, -0.03515625, 0, 0]
    for col in range(8):
        np.testing.assert_allclose(out[0, :, col].numpy(), expected, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# against the loop reference
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.5, 0.25, 1 / 3, 0.7, 1.0, 1.5, 2, 3, 4])
def test_matches_loop_reference(scale):
    rng = np.random.default_rng(0)
    img = rng.random((9, 11))
    out = imresize(img, scale)
    out_h, out_w = math.ceil(9 * scale), math.ceil(11 * scale)
    ref = _reference_imresize(img, out_h, out_w, scale, scale)
    assert out.shape == (out_h, out_w)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)


def test_matches_loop_reference_size_and_options():
    rng = np.random.default_rng(1)
    img = rng.random((10, 7))
    # Different factors per axis: shrink H (antialiased), enlarge W.
    out = imresize(img, size=(4, 12))
    np.testing.assert_allclose(out, _reference_imresize(img, 4, 12, 4 / 10, 12 / 7), atol=1e-12)
    # Without antialiasing the kernel is not widened.
    out = imresize(img, 0.5, antialiasing=False)
    np.testing.assert_allclose(out, _reference_imresize(img, 5, 4, 0.5, 0.5, aa=False), atol=1e-12)


def test_tiny_image_smaller_than_the_kernel():
    # 3 -> 1 pixel at scale 1/4: the 16-pixel-wide kernel folds over the image several times (MATLAB's
    # mirror rule handles this; a single symmetric pad would not).
    img = np.array([[0.0, 1.0, 5.0], [2.0, 3.0, 4.0], [7.0, 1.0, 0.0]])
    out = imresize(img, 0.25)
    assert out.shape == (1, 1)
    np.testing.assert_allclose(out, _reference_imresize(img, 1, 1, 0.25, 0.25), atol=1e-12)


def test_tap_loop_path_equals_dense_path(monkeypatch):
    rng = np.random.default_rng(2)
    img = torch.from_numpy(rng.random((2, 3, 20, 17)))
    dense_down, dense_up = imresize(img, 0.3), imresize(img, 3)
    monkeypatch.setattr(resize_module, "_DENSE_MAX_ENTRIES", 0)
    torch.testing.assert_close(imresize(img, 0.3), dense_down, rtol=0, atol=1e-12)
    torch.testing.assert_close(imresize(img, 3), dense_up, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# properties
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1 / 3, 0.5, 2, 3])
def test_constant_image_stays_constant(scale):
    img = torch.full((2, 3, 7, 11), 0.37, dtype=torch.float64)
    out = imresize(img, scale)
    torch.testing.assert_close(out, torch.full_like(out, 0.37), rtol=0, atol=1e-12)


def test_linear_ramp_upscaled_stays_linear_in_the_interior():
    ramp = np.arange(16, dtype=np.float64)
    out = imresize(np.tile(ramp[:, None], (1, 3)), size=(64, 3))[:, 0]
    centres = (np.arange(64) + 0.5) / 4 - 0.5
    interior = (centres >= 1) & (centres <= 13)  # all four taps inside the image
    assert interior.sum() > 40
    np.testing.assert_allclose(out[interior], centres[interior], rtol=0, atol=1e-12)


def test_scale_one_is_identity():
    img = torch.rand(3, 9, 13)
    torch.testing.assert_close(imresize(img, 1.0), img, rtol=0, atol=0)
    assert imresize(img, 1.0) is not img


@pytest.mark.parametrize(
    ("hw", "scale", "expected"),
    [((5, 7), 0.5, (3, 4)), ((10, 10), 1 / 3, (4, 4)), ((5, 6), 1.5, (8, 9)), ((16, 16), 0.25, (4, 4))],
)
def test_output_size_is_ceil(hw, scale, expected):
    assert imresize(torch.rand(1, *hw), scale).shape == (1, *expected)
    assert imresize(np.random.rand(*hw, 3), scale).shape == (*expected, 3)
    assert resize(torch.rand(1, 1, *hw), scale, mode="bicubic").shape == (1, 1, *expected)


def test_size_argument():
    assert imresize(torch.rand(2, 3, 10, 10), size=(3, 9)).shape == (2, 3, 3, 9)
    assert imresize(np.random.rand(10, 10), size=(5, 20)).shape == (5, 20)


def test_down_then_up_of_a_smooth_image_is_close():
    y, x = np.mgrid[0:64, 0:64] / 64.0
    img = np.stack(
        [
            0.5 + 0.4 * np.sin(2 * np.pi * x) * np.cos(2 * np.pi * y),
            0.5 + 0.3 * np.cos(2 * np.pi * (x + y)),
            x * y,
        ],
        axis=-1,
    )
    for scale, tol in ((2, 1e-3), (4, 5e-3)):
        back = imresize(imresize(img, 1 / scale), scale)
        assert back.shape == img.shape
        assert np.abs(back - img)[8:-8, 8:-8].max() < tol
        assert np.abs(back - img).max() < 0.05


def test_numpy_and_torch_agree_and_batches_are_independent():
    rng = np.random.default_rng(3)
    hwc = rng.random((12, 15, 3)).astype(np.float32)
    chw = torch.from_numpy(hwc).permute(2, 0, 1)
    for scale in (0.5, 3):
        out_np = imresize(hwc, scale)
        out_t = imresize(chw, scale)
        assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float32
        assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
        np.testing.assert_allclose(out_t.permute(1, 2, 0).numpy(), out_np, atol=1e-6)
        batch = torch.stack([chw, 1 - chw])
        out_b = imresize(batch, scale)
        torch.testing.assert_close(out_b[0], out_t)
        torch.testing.assert_close(out_b[1], imresize(1 - chw, scale))


def test_float64_kept_and_agrees_with_float32():
    img = torch.rand(2, 3, 19, 23, dtype=torch.float64)
    for scale in (0.25, 0.5, 2, 4):
        out64 = imresize(img, scale)
        out32 = imresize(img.float(), scale)
        assert out64.dtype == torch.float64 and out32.dtype == torch.float32
        torch.testing.assert_close(out32.double(), out64, rtol=0, atol=1e-5)
    assert imresize(img.numpy()[0, 0], 0.5).dtype == np.float64


def test_other_dtypes():
    img = np.arange(64, dtype=np.uint8).reshape(8, 8)
    out = imresize(img, 0.5)
    assert out.dtype == np.float32  # integer input becomes float32, not rounded back
    np.testing.assert_allclose(out, imresize(img.astype(np.float64), 0.5), atol=1e-4)
    half = torch.rand(1, 3, 8, 8).half()
    assert imresize(half, 2).dtype == torch.float16


def test_differentiable():
    img = torch.rand(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    imresize(img, 0.5).sum().backward()
    # Each output sums weights that add up to 1, so d(sum of outputs)/d(input) sums to the output count.
    assert img.grad is not None
    np.testing.assert_allclose(img.grad.sum().item(), 3 * 4 * 4, rtol=1e-12)


def test_large_image_shape():
    """A 2048x2048 downscale goes through the large-image path; speed is measured in benchmarks/, not here."""
    img = torch.rand(3, 2048, 2048)
    out = imresize(img, 0.25)
    assert out.shape == (3, 512, 512)
    torch.testing.assert_close(out[:, :8, :8], imresize(img[:, :48, :48], 0.25)[:, :8, :8], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# resize dispatcher
# ----------------------------------------------------------------------------------------------------------


def test_resize_matlab_mode_is_imresize():
    img = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(resize(img, 0.25), imresize(img, 0.25))
    torch.testing.assert_close(resize(img, 0.25, antialias=False), imresize(img, 0.25, antialiasing=False))


@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "area", "nearest", "nearest-exact"])
def test_resize_torch_modes_match_interpolate(mode):
    img = torch.rand(2, 3, 16, 12)
    kwargs = {"align_corners": False} if mode in ("bicubic", "bilinear") else {}
    expected = F.interpolate(img, size=(8, 6), mode=mode, **kwargs)
    torch.testing.assert_close(resize(img, 0.5, mode=mode), expected)
    torch.testing.assert_close(resize(img[0], size=(8, 6), mode=mode), expected[0])  # (C, H, W)


def test_resize_antialias_option():
    img = torch.rand(1, 3, 32, 32)
    expected = F.interpolate(img, size=(8, 8), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(resize(img, 0.25, mode="bicubic", antialias=True), expected)
    assert not torch.allclose(resize(img, 0.25, mode="bicubic"), expected)


def test_resize_same_output_size_for_every_mode():
    img = torch.rand(1, 3, 15, 10)
    shapes = {resize(img, 1 / 3, mode=mode).shape for mode in RESIZE_MODES}
    assert shapes == {torch.Size([1, 3, 5, 4])}  # ceil(10 / 3) = 4 for every mode


def test_resize_integer_tensors():
    mask = torch.randint(0, 5, (1, 1, 8, 8), dtype=torch.uint8)
    assert resize(mask, 2, mode="nearest").dtype == torch.uint8
    assert resize(mask, 2, mode="bilinear").dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------


def test_errors():
    img = torch.rand(3, 8, 8)
    with pytest.raises(ValueError, match="exactly one"):
        imresize(img)
    with pytest.raises(ValueError, match="exactly one"):
        imresize(img, scale=2, size=(16, 16))
    for bad in (0, -1, float("nan"), float("inf"), "2", True):
        with pytest.raises(ValueError, match="scale"):
            imresize(img, scale=bad)
    for bad in ((4,), (0, 4), (4.5, 4), "ab", 4):
        with pytest.raises(ValueError, match="size"):
            imresize(img, size=bad)
    with pytest.raises(TypeError):
        imresize([[0.0, 1.0]], 2)
    with pytest.raises(ValueError):
        imresize(torch.rand(8), 2)
    with pytest.raises(ValueError):
        imresize(np.random.rand(2, 8, 8, 3), 2)
    with pytest.raises(ValueError, match="'matlab_bicubic', 'bicubic'"):
        resize(img, 2, mode="lanczos")
    with pytest.raises(ValueError, match="antialias"):
        resize(img, 0.5, mode="nearest", antialias=True)
    with pytest.raises(TypeError):
        resize(np.random.rand(8, 8, 3), 2, mode="bicubic")


@pytest.mark.parametrize(
    "mode,antialias",
    [
        ("matlab_bicubic", None),
        ("matlab_bicubic", False),
        ("bicubic", None),
        ("bicubic", True),
        ("bilinear", True),
        ("area", None),
        ("nearest", None),
        ("nearest-exact", None),
    ],
)
@pytest.mark.parametrize("size", [(5, 3), (26, 21)])  # down on both axes; up on both axes
def test_resize_matrix_is_the_operator_of_resize(mode, antialias, size):
    img = torch.rand(2, 3, 13, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a_h = resize_matrix(13, size[0], mode, antialias=antialias)
    a_w = resize_matrix(7, size[1], mode, antialias=antialias)
    assert a_h.shape == (size[0], 13) and a_w.shape == (size[1], 7) and a_h.dtype == torch.float64
    expected = resize(img, size=size, mode=mode, antialias=antialias)
    torch.testing.assert_close(a_h @ img @ a_w.T, expected, rtol=0, atol=1e-12)


def test_resize_matrix_rows_and_errors():
    a = resize_matrix(16, 4)  # MATLAB bicubic x1/4: every row is a widened kernel summing to 1
    torch.testing.assert_close(a.sum(1), torch.ones(4, dtype=torch.float64))
    assert resize_matrix(16, 4, dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="mode"):
        resize_matrix(16, 4, "lanczos")
    with pytest.raises(ValueError, match=">= 1"):
        resize_matrix(0, 4)


# ----------------------------------------------------------------------------------------------------------
# pil_resize: PIL's 8-bit resize, as the originals' scripts use it
# ----------------------------------------------------------------------------------------------------------


def test_pil_resize_equals_pil_on_an_rgb_uint8_image():
    from PIL import Image

    from sr_diffusion.resize import pil_resize

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(13, 17, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(rgb, "RGB").resize((17 * 4, 13 * 4), Image.BICUBIC))
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    out = pil_resize(x, (13 * 4, 17 * 4))
    assert out.shape == (1, 3, 52, 68)
    # exact: both are PIL's fixed-point bicubic on the same uint8 planes
    assert torch.equal((out[0].permute(1, 2, 0) * 255).round().to(torch.uint8), torch.from_numpy(expected))
    # and it is not torch's float bicubic (the reason this helper exists)
    assert (resize(x, size=(52, 68), mode="bicubic").clamp(0, 1) - out).abs().max() * 255 > 2


def test_pil_resize_keeps_shape_dtype_and_checks_arguments():
    from sr_diffusion.resize import pil_resize

    x = torch.full((2, 1, 4, 5), 0.5, dtype=torch.float64)
    out = pil_resize(x, (8, 10), "bilinear")
    assert out.shape == (2, 1, 8, 10) and out.dtype == torch.float64
    assert torch.allclose(out, torch.full_like(out, 128 / 255))  # round(127.5) = 128, a constant stays constant
    with pytest.raises(ValueError, match="resample"):
        pil_resize(x, (8, 10), "cubic")
    with pytest.raises(TypeError):
        pil_resize(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), (8, 8))
