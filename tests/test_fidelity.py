"""LR-consistency correction (sr_diffusion.fidelity.project_to_lr): the exact minimum-norm projection."""

from __future__ import annotations

import pytest
import torch

from sr_diffusion.fidelity import _min_norm_inverse, project_to_lr
from sr_diffusion.metrics import lr_consistency, psnr
from sr_diffusion.resize import resize
from sr_diffusion.training.data import bicubic_downsample

pytestmark = pytest.mark.usefixtures("one_thread")


def explicit_projection(x0: torch.Tensor, y: torch.Tensor, mode: str) -> torch.Tensor:
    """x0 + Dᵀ (D Dᵀ)⁻¹ (y − D x0) with D built as a dense matrix from the resize of each basis image."""
    c, H, W = x0.shape
    h, w = y.shape[-2:]
    basis = torch.eye(H * W, dtype=torch.float64).view(H * W, 1, H, W)
    D = resize(basis, size=(h, w), mode=mode).reshape(H * W, h * w).T  # (hw, HW), the same for every channel
    flat = x0.reshape(c, H * W).T.to(torch.float64)  # (HW, c)
    r = y.reshape(c, h * w).T.to(torch.float64) - D @ flat
    return (flat + D.T @ torch.linalg.solve(D @ D.T, r)).T.reshape(c, H, W)


@pytest.mark.parametrize("mode", ["matlab_bicubic", "bicubic", "area", "bilinear", "nearest"])
def test_matches_the_closed_form_projection(mode):
    g = torch.Generator().manual_seed(0)
    x0 = 0.3 + 0.4 * torch.rand(3, 12, 9, generator=g, dtype=torch.float64)  # mid-range: no clamping
    y = 0.3 + 0.4 * torch.rand(3, 4, 3, generator=g, dtype=torch.float64)  # not square: two different axes
    x = project_to_lr(x0, y, mode=mode, rounds=1)
    assert torch.allclose(x, explicit_projection(x0, y, mode), atol=1e-9)
    assert torch.allclose(resize(x[None], size=(4, 3), mode=mode)[0], y, atol=1e-9)


def test_antialiased_torch_kernel_and_float32_input():
    g = torch.Generator().manual_seed(3)
    x0 = 0.3 + 0.4 * torch.rand(2, 3, 16, 16, generator=g)
    target = x0.double() + 0.02 * torch.randn(x0.shape, generator=g, dtype=torch.float64)  # needs no clamping
    y = resize(target, size=(4, 4), mode="bilinear", antialias=True).float()
    x = project_to_lr(x0, y, mode="bilinear", antialias=True, rounds=1)
    assert x.dtype == torch.float32
    down = resize(x.double(), size=(4, 4), mode="bilinear", antialias=True)
    assert (down - y).abs().max() < 1e-5


def test_a_rank_deficient_operator_gets_the_least_squares_change():
    # two equal rows: A Aᵀ is singular, and (A Aᵀ)⁻¹ A falls back to pinv(A)ᵀ, whose transpose is still a right
    # inverse on A's range and gives the minimum-norm least-squares solution
    a = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]], dtype=torch.float64)
    p = _min_norm_inverse(a)
    assert torch.allclose(p, torch.linalg.pinv(a).T)
    torch.testing.assert_close(a @ p.T @ a, a)
    full = a[1:]
    torch.testing.assert_close(_min_norm_inverse(full), torch.linalg.solve(full @ full.T, full))


def test_consistent_images_are_left_alone_and_the_change_is_small(photo_tensor):
    hr = photo_tensor[..., :64, :64]
    lr = bicubic_downsample(hr, 4)
    exact = project_to_lr(hr, lr)  # the HR photo explains its own LR up to the 8-bit rounding of lr
    assert psnr(exact, hr).min() > 50
    noisy = (hr + 0.05 * torch.randn(hr.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    fixed = project_to_lr(noisy, lr)
    assert lr_consistency(lr, noisy, 4).max() < 40 <= lr_consistency(lr, fixed, 4).min() - 20
    assert fixed.min() >= 0 and fixed.max() <= 1 and fixed.dtype == noisy.dtype and fixed.shape == noisy.shape
    # the projection only removes the component the LR image contradicts: closer to HR, and close to the input
    assert psnr(fixed, hr).min() > psnr(noisy, hr).max()
    assert psnr(fixed, noisy).min() > 30


def test_unbatched_equals_batched_and_errors():
    g = torch.Generator().manual_seed(2)
    sr, lr = torch.rand(2, 3, 16, 8, generator=g), torch.rand(2, 3, 8, 4, generator=g)
    assert torch.equal(project_to_lr(sr[1], lr[1]), project_to_lr(sr, lr)[1])
    with pytest.raises(ValueError, match="whole upscale"):
        project_to_lr(torch.rand(3, 16, 12), torch.rand(3, 8, 4))
    with pytest.raises(ValueError, match="finite"):
        project_to_lr(torch.full((3, 8, 8), float("nan")), torch.rand(3, 4, 4))
    with pytest.raises(ValueError, match="mode"):
        project_to_lr(sr, lr, mode="lanczos")
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        project_to_lr(sr, lr[0])
