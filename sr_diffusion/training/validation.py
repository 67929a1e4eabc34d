"""Validation during training: PSNR / SSIM on held-out images against MATLAB-bicubic upsampling.

Protocol (BasicSR, the published SR tables): SR and bicubic outputs are clamped and rounded to 8 bits
(as saved images), then scored on the BT.601 Y channel with ``crop_border = scale``. The bicubic
baseline is MATLAB ``imresize`` (antialiased) of the LR image, which is itself MATLAB-bicubic
downsampled from HR unless the validation set is paired.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .data import ValidationImage, quantize

__all__ = ["validate", "make_grid_image"]


def make_grid_image(bicubic: torch.Tensor, sr: torch.Tensor, hr: torch.Tensor) -> np.ndarray:
    """``bicubic | SR | HR`` side by side: (1, 3, H, W) tensors in [0, 1] → uint8 (H, 3W, 3) array."""
    row = torch.cat([bicubic, sr, hr], dim=-1)[0].clamp(0, 1)
    return (row.permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)


@torch.no_grad()
def validate(
    predict: Callable[[torch.Tensor], torch.Tensor],
    images: Sequence[ValidationImage],
    scale: int,
    device: torch.device | str = "cpu",
    num_log_images: int = 4,
) -> tuple[dict[str, float], list[tuple[str, np.ndarray]]]:
    """Score ``predict`` (LR (1, 3, h, w) → SR (1, 3, h·s, w·s), on ``device``) on ``images``.

    Returns the mean metrics ``{"psnr", "ssim", "psnr_bicubic", "ssim_bicubic"}`` (dB / unitless) and up
    to ``num_log_images`` ``(name, bicubic|SR|HR uint8 grid)`` pairs for the trackers.
    """
    from sr_diffusion.metrics import psnr, ssim
    from sr_diffusion.resize import imresize

    totals = {"psnr": 0.0, "ssim": 0.0, "psnr_bicubic": 0.0, "ssim_bicubic": 0.0}
    grids: list[tuple[str, np.ndarray]] = []
    if not images:
        return {}, grids
    for i, item in enumerate(images):
        lr, hr = item.lr.to(device), item.hr.to(device)
        sr = quantize(predict(lr).float())
        if sr.shape != hr.shape:
            raise ValueError(f"{item.name}: the model returned {tuple(sr.shape)} for HR {tuple(hr.shape)}")
        bicubic = quantize(imresize(lr, size=hr.shape[-2:]))
        for key, out in (("", sr), ("_bicubic", bicubic)):
            totals[f"psnr{key}"] += float(psnr(out, hr, crop_border=scale, y_channel=True)[0])
            totals[f"ssim{key}"] += float(ssim(out, hr, crop_border=scale, y_channel=True)[0])
        if i < num_log_images:
            grids.append((item.name, make_grid_image(bicubic, sr, hr)))
    return {key: value / len(images) for key, value in totals.items()}, grids
