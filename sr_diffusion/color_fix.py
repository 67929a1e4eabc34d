"""Colour correction of a generated image towards its LR input, shared by every pipeline.

Diffusion SR models can drift in colour; StableSR (Wang et al. 2023, Sec. 3.4 and its released
``colorfix``) corrects the output with a reference image, the LR input upsampled to the output size:

* ``"adain"``: adaptive instance normalisation, per image and channel
  ``out = (x - mu(x)) / sigma(x) · sigma(ref) + mu(ref)``.
* ``"wavelet"``: keep the high frequencies of ``x`` and take the low frequencies from ``ref``:
  ``out = H(x) + L(ref)``, where an à-trous wavelet decomposition with ``levels`` levels (a 3x3
  binomial blur with dilation 2^i at level i, replicate padding) splits an image into
  ``L`` (the last blur) and ``H`` (the sum of the level differences), ``image = H + L`` exactly.
* ``"none"``: the output unchanged.

All functions take (N, C, H, W) float tensors; the reference may be smaller (it is resized with
bicubic interpolation to the output size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["COLOR_FIX_METHODS", "adain_color_fix", "color_fix", "wavelet_color_fix", "wavelet_decomposition"]

COLOR_FIX_METHODS = ("none", "adain", "wavelet")


def _match_reference(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    if x.ndim != 4 or reference.ndim != 4:
        raise ValueError(f"colour fix expects (N, C, H, W) tensors, got {tuple(x.shape)} and {tuple(reference.shape)}")
    if x.shape[:2] != reference.shape[:2]:
        raise ValueError(
            f"image and reference must have the same batch and channels, got {tuple(x.shape)} and "
            f"{tuple(reference.shape)}"
        )
    reference = reference.to(device=x.device, dtype=x.dtype)
    if reference.shape[-2:] != x.shape[-2:]:
        reference = F.interpolate(reference, size=x.shape[-2:], mode="bicubic", align_corners=False)
    return reference


def adain_color_fix(x: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Give each channel of ``x`` the mean and standard deviation of the same channel of ``reference``.

    As the originals' ``calc_mean_std`` (StableSR's, PASD's and SeeSR's ``wavelet_color_fix.py``):
    ``sigma = sqrt(var + eps)`` with the unbiased variance (``torch.var``'s default, ``1 / (HW - 1)``)."""
    reference = _match_reference(x, reference)
    mu_x, mu_r = x.mean(dim=(-2, -1), keepdim=True), reference.mean(dim=(-2, -1), keepdim=True)
    sigma_x = x.var(dim=(-2, -1), keepdim=True, unbiased=True).add(eps).sqrt()
    sigma_r = reference.var(dim=(-2, -1), keepdim=True, unbiased=True).add(eps).sqrt()
    return (x - mu_x) / sigma_x * sigma_r + mu_r


def _wavelet_blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    kernel = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    kernel = (kernel[:, None] * kernel[None, :]) / 16.0
    channels = x.shape[1]
    weight = kernel.expand(channels, 1, 3, 3)
    padded = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, weight, groups=channels, dilation=dilation)


def wavelet_decomposition(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``x`` into (high, low) frequencies with ``high + low == x``."""
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    high = torch.zeros_like(x)
    low = x
    for level in range(levels):
        blurred = _wavelet_blur(low, 2**level)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_color_fix(x: torch.Tensor, reference: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """High frequencies of ``x`` plus low frequencies of ``reference``."""
    reference = _match_reference(x, reference)
    high, _ = wavelet_decomposition(x, levels)
    _, low = wavelet_decomposition(reference, levels)
    return high + low


def color_fix(x: torch.Tensor, reference: torch.Tensor, method: str = "wavelet") -> torch.Tensor:
    """Apply the colour fix ``method`` (one of :data:`COLOR_FIX_METHODS`) to ``x`` using ``reference``."""
    if method == "none" or method is None:
        return x
    if method == "adain":
        return adain_color_fix(x, reference)
    if method == "wavelet":
        return wavelet_color_fix(x, reference)
    raise ValueError(f"color_fix must be one of {', '.join(COLOR_FIX_METHODS)}, got {method!r}")
