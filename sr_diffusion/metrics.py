"""Image-quality metrics with the definitions of the SR literature: PSNR, SSIM and LR consistency; and a
sharpness measure, the mean luminance gradient magnitude (:func:`gradient_magnitude`).

Definitions follow BasicSR (``basicsr/metrics/psnr_ssim.py``), which reproduces the numbers of published
SR papers: PSNR and SSIM computed in float64, optionally on the BT.601 Y channel (MATLAB ``rgb2ycbcr``) after
cropping ``crop_border`` pixels (usually the scale factor) from every edge; SSIM as in Wang et al. 2004
("Image quality assessment: from error visibility to structural similarity") with an 11x11 Gaussian
window (sigma 1.5), 'valid' filtering, ``C1 = (0.01 * 255)^2``, ``C2 = (0.03 * 255)^2``, averaged over
pixels and channels.

Two APIs:

* numpy, one image, values in [0, 255] (uint8 or float): :func:`calculate_psnr`, :func:`calculate_ssim`,
  with BasicSR's signatures. **Our images are RGB**: ``test_y_channel=True`` converts RGB to Y, whereas
  BasicSR's numpy functions assume BGR (OpenCV) input.
* torch, batches ``(N, C, H, W)`` in [0, 1]: :func:`psnr`, :func:`ssim`, :func:`lr_consistency`, returning
  a float64 tensor ``(N,)``. Like BasicSR's ``*_pt`` functions they do **not** round to 8 bits and do not
  clamp; quantise (``(x * 255).round() / 255``) before calling them to reproduce numbers measured on saved
  PNG files. Unlike BasicSR's ``calculate_psnr_pt`` (which adds 1e-8 to the MSE) identical images give
  ``inf``.

Both APIs give the same numbers for the same images (up to float64 rounding).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F

from .resize import resize

__all__ = [
    "calculate_psnr",
    "calculate_ssim",
    "gradient_magnitude",
    "grid_score",
    "lr_consistency",
    "psnr",
    "rgb_to_y",
    "rgb_to_ycbcr",
    "ssim",
]

# ----------------------------------------------------------------------------------------------------------
# BT.601 colour conversion (MATLAB rgb2ycbcr)
# ----------------------------------------------------------------------------------------------------------

# Rows: Y, Cb, Cr; columns: R, G, B in [0, 1]; result in [0, 255] before the offset (ITU-R BT.601,
# "studio swing": Y in [16, 235], Cb/Cr in [16, 240]).
_YCBCR_MATRIX = (
    (65.481, 128.553, 24.966),
    (-37.797, -74.203, 112.0),
    (112.0, -93.786, -18.214),
)
_YCBCR_OFFSET = (16.0, 128.0, 128.0)


def rgb_to_ycbcr(img: torch.Tensor | np.ndarray, y_only: bool = False) -> torch.Tensor | np.ndarray:
    """RGB to YCbCr, ITU-R BT.601 studio swing, the same numbers as MATLAB's ``rgb2ycbcr``.

    ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` for R, G, B in [0, 1], and likewise for Cb, Cr with offset
    128; the result is divided by 255, so Y lies in [16/255, 235/255]. (OpenCV's ``COLOR_RGB2YCrCb`` is
    the full-range JPEG conversion, which is not what SR papers use.)

    Args:
        img: torch tensor ``(..., 3, H, W)``, floating, in [0, 1]; or numpy array ``(..., 3)`` (channel
            last), float in [0, 1] or uint8 in [0, 255].
        y_only: return only the Y channel.

    Returns:
        Same kind and layout with 3 channels, or 1 channel when ``y_only`` (the channel axis is kept:
        ``(..., 1, H, W)`` or ``(..., 1)``). Floats keep their dtype and the [0, 1] range (float16/bfloat16
        tensors are computed in float32); uint8 input gives uint8 output in [0, 255], rounded as MATLAB.
    """
    rows = 1 if y_only else 3
    if isinstance(img, torch.Tensor):
        if not img.is_floating_point():
            raise TypeError(f"rgb_to_ycbcr expects a floating tensor in [0, 1], got dtype {img.dtype}.")
        if img.ndim < 3 or img.shape[-3] != 3:
            raise ValueError(f"Expected an RGB tensor (..., 3, H, W), got shape {tuple(img.shape)}.")
        work = img if img.dtype in (torch.float32, torch.float64) else img.float()
        matrix = torch.tensor(_YCBCR_MATRIX[:rows], dtype=work.dtype, device=work.device)
        offset = torch.tensor(_YCBCR_OFFSET[:rows], dtype=work.dtype, device=work.device).view(rows, 1, 1)
        out = (torch.einsum("oc,...chw->...ohw", matrix, work) + offset) / 255.0
        return out.to(img.dtype)

    if not isinstance(img, np.ndarray):
        raise TypeError(f"rgb_to_ycbcr expects a torch.Tensor or numpy.ndarray, got {type(img).__name__}.")
    if img.ndim < 1 or img.shape[-1] != 3:
        raise ValueError(f"Expected an RGB array (..., 3) with channels last, got shape {img.shape}.")
    if img.dtype == np.uint8:
        x = img.astype(np.float64) / 255.0
    elif np.issubdtype(img.dtype, np.floating):
        x = img.astype(np.float64, copy=False)
    else:
        raise TypeError(f"rgb_to_ycbcr expects float in [0, 1] or uint8 in [0, 255], got dtype {img.dtype}.")
    matrix = np.asarray(_YCBCR_MATRIX[:rows], dtype=np.float64)
    out = x @ matrix.T + np.asarray(_YCBCR_OFFSET[:rows], dtype=np.float64)  # in [0, 255]
    if img.dtype == np.uint8:
        return np.clip(np.round(out), 0, 255).astype(np.uint8)
    return (out / 255.0).astype(img.dtype, copy=False)


def rgb_to_y(img: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """BT.601 luma (MATLAB ``rgb2ycbcr`` Y channel); ``rgb_to_ycbcr(img, y_only=True)``."""
    return rgb_to_ycbcr(img, y_only=True)


# ----------------------------------------------------------------------------------------------------------
# shared checks and the SSIM window
# ----------------------------------------------------------------------------------------------------------

_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_SSIM_C1 = (0.01 * 255.0) ** 2
_SSIM_C2 = (0.03 * 255.0) ** 2


def _gaussian_1d() -> np.ndarray:
    """Normalised 1-D Gaussian, size 11, sigma 1.5 (OpenCV ``getGaussianKernel(11, 1.5)``), float64."""
    x = np.arange(_SSIM_WINDOW, dtype=np.float64) - (_SSIM_WINDOW - 1) / 2.0
    g = np.exp(-(x**2) / (2.0 * _SSIM_SIGMA**2))
    return g / g.sum()


def _check_crop_border(crop_border, height: int, width: int, min_size: int = 1) -> int:
    if isinstance(crop_border, bool) or not isinstance(crop_border, (int, np.integer)) or crop_border < 0:
        raise ValueError(f"crop_border must be a non-negative integer, got {crop_border!r}.")
    crop_border = int(crop_border)
    if height - 2 * crop_border < min_size or width - 2 * crop_border < min_size:
        raise ValueError(
            f"crop_border={crop_border} is too large for a {height}x{width} image: "
            f"{min_size}x{min_size} pixels or more must remain after cropping."
        )
    return crop_border


def _min_size(kind: str) -> int:
    """Smallest image side a metric can measure: SSIM's 'valid' window needs 11 pixels."""
    return _SSIM_WINDOW if kind == "ssim" else 1


# ----------------------------------------------------------------------------------------------------------
# numpy API: one image in [0, 255] (BasicSR calculate_psnr / calculate_ssim)
# ----------------------------------------------------------------------------------------------------------


def _prepare_numpy(img, img2, crop_border, input_order, test_y_channel, kind):
    """Validate, reorder to HWC float64, crop, and optionally convert to Y (in [0, 255])."""
    for name, arr in (("img", img), ("img2", img2)):
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray, got {type(arr).__name__}.")
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise TypeError(f"{name} must hold real numbers in [0, 255], got dtype {arr.dtype}.")
    if img.shape != img2.shape:
        raise ValueError(f"Image shapes are different: {img.shape}, {img2.shape}.")
    if input_order not in ("HWC", "CHW"):
        raise ValueError(f"Wrong input_order {input_order!r}. Supported input_orders are 'HWC' and 'CHW'.")
    if img.ndim not in (2, 3):
        raise ValueError(f"Images must be (H, W), (H, W, C) or (C, H, W), got shape {img.shape}.")

    def reorder(arr: np.ndarray) -> np.ndarray:
        if arr.ndim == 2:
            return arr[..., None]
        return arr.transpose(1, 2, 0) if input_order == "CHW" else arr

    img, img2 = reorder(img), reorder(img2)
    if not (np.isfinite(img).all() and np.isfinite(img2).all()):
        raise ValueError("Images contain non-finite values (nan or inf).")
    height, width, channels = img.shape
    if channels not in (1, 3):
        raise ValueError(f"Images must have 1 or 3 channels, got {channels}.")
    crop = _check_crop_border(crop_border, height, width, _min_size(kind))
    if crop:
        img = img[crop:-crop, crop:-crop]
        img2 = img2[crop:-crop, crop:-crop]
    img = img.astype(np.float64)
    img2 = img2.astype(np.float64)
    if test_y_channel and channels == 3:  # a 1-channel image is used as is, as in BasicSR
        img = rgb_to_y(img / 255.0) * 255.0
        img2 = rgb_to_y(img2 / 255.0) * 255.0
    return img, img2


def calculate_psnr(
    img: np.ndarray,
    img2: np.ndarray,
    crop_border: int,
    input_order: str = "HWC",
    test_y_channel: bool = False,
) -> float:
    """PSNR in dB of two images in [0, 255], as BasicSR's ``calculate_psnr`` (but RGB input for the Y channel).

    ``PSNR = 10 log10(255^2 / MSE)`` in float64 over all remaining pixels and channels; ``inf`` when the
    images are identical.

    Args:
        img, img2: ``(H, W, C)`` (or ``(C, H, W)`` with ``input_order="CHW"``) or ``(H, W)``, uint8 or
            float, range [0, 255], C = 1 or 3, RGB order.
        crop_border: pixels removed from each edge before measuring (use the SR scale factor).
        input_order: ``"HWC"`` or ``"CHW"``.
        test_y_channel: measure on the BT.601 Y channel (:func:`rgb_to_y`); 1-channel images are used as is.

    Returns:
        The PSNR as a Python float.
    """
    img, img2 = _prepare_numpy(img, img2, crop_border, input_order, test_y_channel, "psnr")
    mse = np.mean((img - img2) ** 2)
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(255.0 * 255.0 / mse))


def _filter_valid_numpy(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of ``x`` (H, W, C) with ``outer(g, g)``: (H - 10, W - 10, C)."""
    k = g.shape[0]
    x = np.lib.stride_tricks.sliding_window_view(x, k, axis=0) @ g  # (H - 10, W, C)
    return np.lib.stride_tricks.sliding_window_view(x, k, axis=1) @ g


def _ssim_map_numpy(img: np.ndarray, img2: np.ndarray) -> np.ndarray:
    """SSIM map (Wang et al. 2004, eq. 13) of (H, W, C) float64 images in [0, 255]: (H - 10, W - 10, C)."""
    g = _gaussian_1d()
    mu1, mu2 = _filter_valid_numpy(img, g), _filter_valid_numpy(img2, g)
    mu1_sq, mu2_sq, mu1_mu2 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma1_sq = _filter_valid_numpy(img * img, g) - mu1_sq
    sigma2_sq = _filter_valid_numpy(img2 * img2, g) - mu2_sq
    sigma12 = _filter_valid_numpy(img * img2, g) - mu1_mu2
    numerator = (2.0 * mu1_mu2 + _SSIM_C1) * (2.0 * sigma12 + _SSIM_C2)
    denominator = (mu1_sq + mu2_sq + _SSIM_C1) * (sigma1_sq + sigma2_sq + _SSIM_C2)
    return numerator / denominator


def calculate_ssim(
    img: np.ndarray,
    img2: np.ndarray,
    crop_border: int,
    input_order: str = "HWC",
    test_y_channel: bool = False,
) -> float:
    """SSIM of two images in [0, 255], as BasicSR's ``calculate_ssim`` (but RGB input for the Y channel).

    Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), 'valid' filtering (no padding: the map is
    10 pixels smaller in each dimension), ``C1 = (0.01 * 255)^2``, ``C2 = (0.03 * 255)^2``, computed per
    channel in float64 and averaged. This matches the authors' MATLAB ``ssim_index`` and equals
    ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=255)``, which pads but then discards the same border.

    Args:
        img, img2: as :func:`calculate_psnr`; at least 11x11 pixels must remain after cropping.
        crop_border, input_order, test_y_channel: as :func:`calculate_psnr`.

    Returns:
        The mean SSIM as a Python float (1.0 for identical images).
    """
    img, img2 = _prepare_numpy(img, img2, crop_border, input_order, test_y_channel, "ssim")
    return float(_ssim_map_numpy(img, img2).mean())


# ----------------------------------------------------------------------------------------------------------
# torch API: batches (N, C, H, W) in [0, 1]
# ----------------------------------------------------------------------------------------------------------


def _prepare_torch(sr, hr, crop_border, y_channel, kind):
    """Validate, make (N, C, H, W) float64, crop, and optionally convert to Y (in [0, 1])."""
    for name, t in (("sr", sr), ("hr", hr)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor in [0, 1], got dtype {t.dtype}.")
    if sr.shape != hr.shape:
        raise ValueError(f"Image shapes are different: {tuple(sr.shape)}, {tuple(hr.shape)}.")
    if sr.ndim == 3:
        sr, hr = sr.unsqueeze(0), hr.unsqueeze(0)
    if sr.ndim != 4:
        raise ValueError(f"Images must be (N, C, H, W) or (C, H, W), got shape {tuple(sr.shape)}.")
    if not bool(torch.isfinite(sr).all() & torch.isfinite(hr).all()):
        raise ValueError("Images contain non-finite values (nan or inf).")
    crop = _check_crop_border(crop_border, sr.shape[-2], sr.shape[-1], _min_size(kind))
    if crop:
        sr = sr[..., crop:-crop, crop:-crop]
        hr = hr[..., crop:-crop, crop:-crop]
    sr, hr = sr.to(torch.float64), hr.to(torch.float64)
    if y_channel:
        if sr.shape[1] == 3:
            sr, hr = rgb_to_y(sr), rgb_to_y(hr)
        elif sr.shape[1] != 1:  # a 1-channel image is used as is, as in BasicSR
            raise ValueError(f"y_channel=True needs 1- or 3-channel (RGB) images, got {sr.shape[1]} channels.")
    return sr, hr


def psnr(sr: torch.Tensor, hr: torch.Tensor, crop_border: int = 0, y_channel: bool = False) -> torch.Tensor:
    """Per-image PSNR in dB of batches in [0, 1]: ``10 log10(1 / MSE)``, float64, ``inf`` when identical.

    Same definition as :func:`calculate_psnr` on ``img * 255`` (BasicSR ``calculate_psnr_pt`` without its
    ``1e-8`` MSE floor). No rounding to 8 bits, no clamping; differentiable.

    Args:
        sr, hr: ``(N, C, H, W)`` or ``(C, H, W)`` floating tensors in [0, 1], RGB when ``y_channel``.
        crop_border: pixels removed from each edge (use the SR scale factor).
        y_channel: measure on the BT.601 Y channel (:func:`rgb_to_y`).

    Returns:
        Float64 tensor ``(N,)`` on the inputs' device.
    """
    sr, hr = _prepare_torch(sr, hr, crop_border, y_channel, "psnr")
    mse = ((sr - hr) ** 2).mean(dim=(1, 2, 3))
    return torch.where(mse == 0, torch.full_like(mse, math.inf), 10.0 * torch.log10(1.0 / mse))


def _ssim_torch(img: torch.Tensor, img2: torch.Tensor) -> torch.Tensor:
    """Mean SSIM per image of (N, C, H, W) float64 tensors in [0, 255]; same maths as ``_ssim_map_numpy``."""
    channels = img.shape[1]
    g = torch.from_numpy(_gaussian_1d()).to(device=img.device, dtype=img.dtype)
    # Filter the five statistics in one depthwise pass: separable 'valid' correlation, first H then W.
    stacked = torch.cat([img, img2, img * img, img2 * img2, img * img2], dim=1)
    groups = stacked.shape[1]
    stacked = F.conv2d(stacked, g.view(1, 1, -1, 1).expand(groups, 1, -1, 1), groups=groups)
    stacked = F.conv2d(stacked, g.view(1, 1, 1, -1).expand(groups, 1, 1, -1), groups=groups)
    mu1, mu2, e11, e22, e12 = stacked.split(channels, dim=1)
    mu1_sq, mu2_sq, mu1_mu2 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma1_sq, sigma2_sq, sigma12 = e11 - mu1_sq, e22 - mu2_sq, e12 - mu1_mu2
    numerator = (2.0 * mu1_mu2 + _SSIM_C1) * (2.0 * sigma12 + _SSIM_C2)
    denominator = (mu1_sq + mu2_sq + _SSIM_C1) * (sigma1_sq + sigma2_sq + _SSIM_C2)
    return (numerator / denominator).mean(dim=(1, 2, 3))


def ssim(sr: torch.Tensor, hr: torch.Tensor, crop_border: int = 0, y_channel: bool = False) -> torch.Tensor:
    """Per-image SSIM of batches in [0, 1], float64; the definition of :func:`calculate_ssim`.

    The images are scaled to [0, 255] so the constants ``C1``, ``C2`` are BasicSR's (``calculate_ssim_pt``).
    No rounding to 8 bits, no clamping; differentiable.

    Args:
        sr, hr: ``(N, C, H, W)`` or ``(C, H, W)`` floating tensors in [0, 1]; at least 11x11 pixels must
            remain after cropping.
        crop_border, y_channel: as :func:`psnr`.

    Returns:
        Float64 tensor ``(N,)`` on the inputs' device (1.0 for identical images).
    """
    sr, hr = _prepare_torch(sr, hr, crop_border, y_channel, "ssim")
    return _ssim_torch(sr * 255.0, hr * 255.0)


# ----------------------------------------------------------------------------------------------------------
# LR consistency
# ----------------------------------------------------------------------------------------------------------


def lr_consistency(
    lr: torch.Tensor,
    sr: torch.Tensor,
    scale: float,
    mode: str = "matlab_bicubic",
    crop_border: int = 0,
    *,
    antialias: bool | None = None,
) -> torch.Tensor:
    """How well the SR output explains its input: PSNR(lr, downsample(sr, 1 / scale)) in dB.

    The SR output is brought back to the LR grid with the same kernel that made the LR image
    (:func:`sr_diffusion.resize.resize` with ``mode`` and ``antialias``) and compared to the LR input by
    :func:`psnr` on RGB in float64: the "LR-PSNR" of SRFlow and of the NTIRE 2021 Learning the
    Super-Resolution Space challenge. A bicubic-upscaled image scores high, since bicubic up then
    down is close to the identity on smooth content.

    Args:
        lr: ``(N, C, h, w)`` or ``(C, h, w)`` in [0, 1].
        sr: ``(N, C, h * scale, w * scale)`` (or unbatched) in [0, 1].
        scale: the SR factor.
        mode: resize kernel, one of :data:`sr_diffusion.resize.RESIZE_MODES`.
        crop_border: pixels removed from each edge of the LR-sized images before measuring.
        antialias: passed to :func:`~sr_diffusion.resize.resize` (``None``: the mode's default).

    Returns:
        Float64 tensor ``(N,)``; ``inf`` where the downsampled SR equals the LR input.
    """
    for name, t in (("lr", lr), ("sr", sr)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.ndim not in (3, 4):
            raise ValueError(f"{name} must be (N, C, H, W) or (C, H, W), got shape {tuple(t.shape)}.")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}.")
    if lr.ndim != sr.ndim or lr.shape[:-2] != sr.shape[:-2]:
        raise ValueError(
            f"lr and sr must have the same batch and channel sizes, got {tuple(lr.shape)} and {tuple(sr.shape)}."
        )
    h, w = lr.shape[-2:]
    if abs(sr.shape[-2] - h * scale) > 1e-6 or abs(sr.shape[-1] - w * scale) > 1e-6:
        raise ValueError(
            f"sr is {sr.shape[-2]}x{sr.shape[-1]} but scale={scale} times the {h}x{w} lr image is "
            f"{h * scale:g}x{w * scale:g}."
        )
    down = resize(sr, size=(h, w), mode=mode, antialias=antialias)
    return psnr(down, lr, crop_border=crop_border)


# ----------------------------------------------------------------------------------------------------------
# sharpness
# ----------------------------------------------------------------------------------------------------------

# Sobel derivative along x, normalised so that a unit ramp (I(x, y) = x) has derivative 1.
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def gradient_magnitude(img: torch.Tensor, crop_border: int = 0, reduction: str = "mean") -> torch.Tensor:
    """Mean luminance gradient magnitude of a batch in [0, 1], a measure of sharpness (detail) independent of any
    reference: ``mean sqrt(G_x^2 + G_y^2)`` over the BT.601 Y channel (in [0, 1], as :func:`rgb_to_y`), with
    ``G_x``, ``G_y`` the Sobel derivatives (kernel ``[[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]] / 8``, so a unit ramp
    has gradient 1), over the pixels whose 3x3 window lies in the image after removing ``crop_border`` pixels at
    every edge.

    The ratio ``gradient_magnitude(sr) / gradient_magnitude(hr)`` says how much of the photo's detail an upscaler
    restores: a blurry upscale stays well below 1 (MATLAB bicubic x4 gives about 0.55 on the held-out photos),
    noise or hallucinated texture pushes it up.

    Args:
        img: ``(N, C, H, W)`` or ``(C, H, W)`` floating, C = 3 (RGB) or 1 (luminance, used as is).
        crop_border: pixels removed from each edge first.
        reduction: ``"mean"``, or ``"none"`` for the map ``sqrt(G_x^2 + G_y^2)`` itself, whose entry ``(i, j)``
            belongs to the pixel ``(i + 1, j + 1)`` of the cropped image.

    Returns:
        Float64 tensor ``(N,)``, or ``(N, H - 2 crop_border - 2, W - 2 crop_border - 2)`` for ``reduction="none"``.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}.")
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"img must be a torch.Tensor, got {type(img).__name__}.")
    if not img.is_floating_point():
        raise TypeError(f"img must be a floating tensor in [0, 1], got dtype {img.dtype}.")
    if img.ndim == 3:
        img = img.unsqueeze(0)
    if img.ndim != 4 or img.shape[1] not in (1, 3):
        raise ValueError(f"img must be (N, 3 or 1, H, W) or (3 or 1, H, W), got shape {tuple(img.shape)}.")
    if not bool(torch.isfinite(img).all()):
        raise ValueError("Image contains non-finite values (nan or inf).")
    crop = _check_crop_border(crop_border, img.shape[-2], img.shape[-1], 3)
    if crop:
        img = img[..., crop:-crop, crop:-crop]
    y = img.to(torch.float64)
    if y.shape[1] == 3:
        y = rgb_to_y(y)
    kx = torch.tensor(_SOBEL_X, dtype=torch.float64, device=y.device) / 8.0
    kernels = torch.stack([kx, kx.T]).unsqueeze(1)  # (2, 1, 3, 3): d/dx, d/dy
    magnitude = F.conv2d(y, kernels).square().sum(dim=1).sqrt()
    return magnitude if reduction == "none" else magnitude.mean(dim=(-2, -1))


# ----------------------------------------------------------------------------------------------------------
# periodic grid artefacts
# ----------------------------------------------------------------------------------------------------------

_GRID_RADIUS = 4  # the spectral neighbourhood of a grid bin: (2r+1)^2 bins less the central 3x3
_GRID_MIN_SIDE = 32  # so that no other grid frequency lies within r bins of a grid bin


def grid_score(img: torch.Tensor) -> dict[str, float]:
    """How strongly an image shows the x4 sub-pixel grid: spectral peaks at its frequencies over their surroundings.

    An x4 network that works on a 4x4 pixel-(un)shuffled grid can treat the 16 output phases ``(y mod 4, x mod 4)``
    differently, a faint mesh that PSNR barely sees. Its energy sits at the frequencies ``(a/4, b/4)`` cycles per
    pixel. Definition, on the BT.601 Y channel ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` (0..255, as
    :func:`rgb_to_y` times 255) of an ``H x W`` image:

    1. ``Y - mean(Y)``, times the 2-D Hann window ``w(y) w(x)`` with ``w(n) = sin^2(pi n / N)`` (periodic), so
       that the image border (the jump where the FFT wraps around) does not leak into the spectrum;
    2. ``P = |FFT2|^2``, bin ``(k, l)`` at frequency ``(k / H, l / W)``;
    3. the **period-4 bins** are ``(a/4, b/4)`` with ``a`` or ``b`` odd (``a, b`` in 0..3, modulo 1: ``(1/4, 0)``,
       ``(0, 1/4)``, ``(1/4, 1/4)``, ``(1/4, -1/4)``, ``(1/4, 1/2)``, ..., 12 bins, pairwise conjugate), the
       **period-2 bins** ``(a/2, b/2)`` other than ``(0, 0)`` (3 bins);
    4. each bin's ratio is ``P(bin)`` over the median of ``P`` on its ``9 x 9`` neighbourhood (radius 4, the
       spectrum wrapping around) less the central ``3 x 3`` (the Hann window spreads a pure peak over +-1 bin);
    5. ``period4`` and ``period2`` are the largest ratio among their bins.

    A clean photo and a bicubic upsampling (whose kernel interpolates, so puts no energy on the LR sampling
    frequencies) score in the single digits: the largest of a few ratios of noise-like spectral power to its median.
    A 4-periodic pattern of amplitude 1 level (of 255) on a smooth image scores in the thousands. A constant offset
    does not change the score.

    Args:
        img: one image, ``(1, 3, H, W)`` or ``(3, H, W)`` RGB, or ``(1, 1, H, W)`` / ``(1, H, W)`` luminance (Y in
            [0, 1], used as is), floating, in [0, 1]; ``H`` and ``W`` multiples of 4, at least 32.

    Returns:
        ``{"period4": float, "period2": float}``; ``inf`` where a neighbourhood is all zero and the bin is not.
    """
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"img must be a torch.Tensor, got {type(img).__name__}.")
    if not img.is_floating_point():
        raise TypeError(f"img must be a floating tensor in [0, 1], got dtype {img.dtype}.")
    if img.ndim == 4:
        if img.shape[0] != 1:
            raise ValueError(f"grid_score measures one image, got a batch of {img.shape[0]}.")
        img = img[0]
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"img must be (1, 3 or 1, H, W) or (3 or 1, H, W), got shape {tuple(img.shape)}.")
    h, w = img.shape[-2:]
    if h % 4 or w % 4 or min(h, w) < _GRID_MIN_SIDE:
        raise ValueError(f"grid_score needs sides that are multiples of 4 and at least {_GRID_MIN_SIDE}, got {h}x{w}.")
    if not bool(torch.isfinite(img).all()):
        raise ValueError("Image contains non-finite values (nan or inf).")
    y = img.to(torch.float64)
    y = (rgb_to_y(y) if y.shape[0] == 3 else y)[0] * 255.0
    window = torch.outer(
        torch.hann_window(h, periodic=True, dtype=torch.float64, device=y.device),
        torch.hann_window(w, periodic=True, dtype=torch.float64, device=y.device),
    )
    power = torch.fft.fft2((y - y.mean()) * window).abs().square()
    r = _GRID_RADIUS
    offsets = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if max(abs(dy), abs(dx)) > 1]
    rows = torch.tensor([dy for dy, _ in offsets], device=y.device)
    cols = torch.tensor([dx for _, dx in offsets], device=y.device)

    def ratio(a: int, b: int) -> float:
        ky, kx = a * h // 4, b * w // 4
        peak = power[ky, kx]
        median = power[(ky + rows) % h, (kx + cols) % w].quantile(0.5)  # the mean of the middle two of 72
        if median == 0:
            return 0.0 if peak == 0 else math.inf
        return float(peak / median)

    quarters = [(a, b) for a in range(4) for b in range(4)]
    return {
        "period4": max(ratio(a, b) for a, b in quarters if a % 2 or b % 2),
        "period2": max(ratio(a, b) for a, b in quarters if (a, b) != (0, 0) and a % 2 == 0 and b % 2 == 0),
    }
