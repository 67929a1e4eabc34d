"""Batched tensor operations shared by the degradation models: blur, resize, grey conversion, 8-bit rounding.

All images are float ``(B, C, H, W)`` tensors in [0, 1]; everything runs on the tensor's own device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["INTERPOLATION_MODES", "filter2d", "quantize_8bit", "reflect_pad", "resize", "rgb_to_gray"]

#: The interpolation modes Real-ESRGAN and BSRGAN pick from at random (``F.interpolate`` names).
INTERPOLATION_MODES = ("area", "bilinear", "bicubic")


def _reflect_index(n: int, pad: int, device) -> torch.Tensor:
    """Indices ``-pad .. n + pad - 1`` folded into ``[0, n)`` by mirror reflection without repeating the edge."""
    idx = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx < n, idx, period - idx)


def reflect_pad(img: torch.Tensor, pad: int) -> torch.Tensor:
    """Pad ``(B, C, H, W)`` by ``pad`` pixels on every side with mirror reflection (``cv2.BORDER_REFLECT_101``).

    Uses ``F.pad(mode="reflect")`` when it applies and folds indices otherwise, so that a 21x21 kernel can blur
    an image smaller than 11 pixels (which happens after a strong random downscale of a small crop).
    """
    if pad == 0:
        return img
    h, w = img.shape[-2:]
    if pad < h and pad < w:
        return F.pad(img, (pad, pad, pad, pad), mode="reflect")
    rows = _reflect_index(h, pad, img.device)
    cols = _reflect_index(w, pad, img.device)
    return img.index_select(-2, rows).index_select(-1, cols)


def filter2d(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Filter each image with its own kernel (correlation, like ``cv2.filter2D``), reflect-padded to keep the size.

    Args:
        img: ``(B, C, H, W)``.
        kernel: ``(K, K)`` shared by the batch, or ``(B, K, K)`` one per image; ``K`` odd.

    Returns:
        ``(B, C, H, W)``. Implemented as one grouped convolution over the ``B * C`` channels.
    """
    b, c, h, w = img.shape
    k = kernel.shape[-1]
    if kernel.shape[-2] != k or k % 2 != 1:
        raise ValueError(f"kernel must be square with an odd size, got shape {tuple(kernel.shape)}")
    if kernel.ndim == 2:
        kernel = kernel.expand(b, k, k)
    if kernel.ndim != 3 or kernel.shape[0] != b:
        raise ValueError(f"kernel must be (K, K) or (B={b}, K, K), got shape {tuple(kernel.shape)}")
    kernel = kernel.to(device=img.device, dtype=img.dtype)
    padded = reflect_pad(img, k // 2).reshape(1, b * c, h + k - 1, w + k - 1)
    weight = kernel.repeat_interleave(c, dim=0).unsqueeze(1)  # (B * C, 1, K, K)
    return F.conv2d(padded, weight, groups=b * c).reshape(b, c, h, w)


def resize(img: torch.Tensor, size: tuple[int, int], mode: str, antialias: bool = False) -> torch.Tensor:
    """``F.interpolate`` to ``size = (h, w)`` (each at least 1) with ``mode`` in :data:`INTERPOLATION_MODES`.

    Returns ``img`` itself when the size does not change (all three modes are the identity then). No
    antialiasing by default, as in Real-ESRGAN's GPU pipeline.
    """
    if mode not in INTERPOLATION_MODES:
        raise ValueError(f"unknown interpolation mode {mode!r}; expected one of {INTERPOLATION_MODES}")
    size = (max(1, int(size[0])), max(1, int(size[1])))
    if tuple(img.shape[-2:]) == size:
        return img
    if mode == "area":
        return F.interpolate(img, size=size, mode="area")
    return F.interpolate(img, size=size, mode=mode, align_corners=False, antialias=antialias)


def rgb_to_gray(img: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B``: ``(B, 3, H, W) -> (B, 1, H, W)``; 1 channel passes."""
    if img.shape[1] == 1:
        return img
    if img.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {img.shape[1]}")
    weights = torch.tensor([0.299, 0.587, 0.114], device=img.device, dtype=img.dtype).view(1, 3, 1, 1)
    return (img * weights).sum(dim=1, keepdim=True)


def quantize_8bit(img: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to the 256 levels of an 8-bit image: ``clamp(round(x * 255), 0, 255) / 255``."""
    return torch.clamp((img * 255.0).round(), 0, 255) / 255.0
