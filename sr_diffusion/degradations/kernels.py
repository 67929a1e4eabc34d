"""Blur kernels of the Real-ESRGAN degradation model (Wang et al., 2021, "Real-ESRGAN: Training Real-World
Blind Super-Resolution with Pure Synthetic Data", Sec. 3.1 "Blur" and Sec. 3.3 "sinc filters").

Pure functions take explicit parameters and return a normalised ``(K, K)`` float64 kernel (it sums to 1);
the ``random_*`` functions draw those parameters from a ``torch.Generator``. Coordinates are centred on the
middle pixel, ``x`` along columns and ``y`` along rows; covariances follow Eq. (2) of the paper,
``Sigma = R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T``.

Kernel types (the ``kernel_list`` names of Real-ESRGAN):

========================  ===============================================================
``iso`` / ``aniso``       Gaussian ``exp(-1/2 x^T Sigma^-1 x)``
``generalized_iso/aniso`` generalised Gaussian ``exp(-1/2 (x^T Sigma^-1 x)^beta)``
``plateau_iso/aniso``     plateau ``1 / (1 + (x^T Sigma^-1 x)^beta)``
sinc (``sinc_prob``)      circular low-pass ``omega_c J1(omega_c r) / (2 pi r)``
========================  ===============================================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._rng import bernoulli, categorical, check_generator, uniform

__all__ = [
    "KERNEL_TYPES",
    "bivariate_gaussian",
    "bivariate_generalized_gaussian",
    "bivariate_plateau",
    "circular_lowpass_kernel",
    "mesh_grid",
    "pad_kernel",
    "pulse_kernel",
    "random_kernel",
    "random_mixed_kernels",
    "random_sinc_kernel",
    "sigma_matrix2",
]

#: Kernel types accepted in ``kernel_list`` (sinc filters are chosen separately, with ``sinc_prob``).
KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")

_DTYPE = torch.float64


# ------------------------------------------------------------------------------------------------------------
# Deterministic kernels
# ------------------------------------------------------------------------------------------------------------


def _check_size(kernel_size: int) -> int:
    if int(kernel_size) != kernel_size or kernel_size < 1 or kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")
    return int(kernel_size)


def mesh_grid(kernel_size: int) -> torch.Tensor:
    """``(K, K, 2)`` grid of ``(x, y)`` offsets from the centre pixel, ``x`` varying along columns."""
    k = _check_size(kernel_size)
    ax = torch.arange(k, dtype=_DTYPE) - (k - 1) / 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return torch.stack([xx, yy], dim=-1)


def sigma_matrix2(sig_x: float, sig_y: float, theta: float) -> torch.Tensor:
    """Rotated covariance ``R(theta) diag(sig_x^2, sig_y^2) R(theta)^T``, ``(2, 2)`` (paper Eq. 2)."""
    c, s = math.cos(theta), math.sin(theta)
    rot = torch.tensor([[c, -s], [s, c]], dtype=_DTYPE)
    diag = torch.diag(torch.tensor([sig_x**2, sig_y**2], dtype=_DTYPE))
    return rot @ diag @ rot.T


def _mahalanobis2(kernel_size: int, sig_x: float, sig_y: float | None, theta: float) -> torch.Tensor:
    """``x^T Sigma^-1 x`` on the kernel grid, ``(K, K)``; isotropic (``Sigma = sig_x^2 I``) when ``sig_y`` is None."""
    if sig_x <= 0 or (sig_y is not None and sig_y <= 0):
        raise ValueError(f"kernel sigmas must be > 0, got sig_x={sig_x}, sig_y={sig_y}")
    grid = mesh_grid(kernel_size)
    x, y = grid[..., 0], grid[..., 1]
    if sig_y is None:
        return (x * x + y * y) / sig_x**2
    (a, b), (_, d) = sigma_matrix2(sig_x, sig_y, theta).tolist()
    det = a * d - b * b  # = sig_x^2 sig_y^2; Sigma^-1 = [[d, -b], [-b, a]] / det
    return (d * x * x - 2 * b * x * y + a * y * y) / det


def _normalize(kernel: torch.Tensor) -> torch.Tensor:
    return kernel / kernel.sum()


def bivariate_gaussian(kernel_size: int, sig_x: float, sig_y: float | None = None, theta: float = 0.0) -> torch.Tensor:
    """Gaussian kernel ``exp(-1/2 x^T Sigma^-1 x)``, normalised; ``(K, K)`` float64.

    Isotropic (``iso``) when ``sig_y`` is None (``theta`` is then ignored), anisotropic (``aniso``) otherwise.
    """
    return _normalize(torch.exp(-0.5 * _mahalanobis2(kernel_size, sig_x, sig_y, theta)))


def bivariate_generalized_gaussian(
    kernel_size: int, sig_x: float, sig_y: float | None = None, theta: float = 0.0, beta: float = 1.0
) -> torch.Tensor:
    """Generalised Gaussian ``exp(-1/2 (x^T Sigma^-1 x)^beta)`` (paper Eq. 3), normalised; ``(K, K)`` float64.

    ``beta = 1`` is the Gaussian; ``beta < 1`` has heavier tails, ``beta > 1`` a flatter top.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return _normalize(torch.exp(-0.5 * _mahalanobis2(kernel_size, sig_x, sig_y, theta).pow(beta)))


def bivariate_plateau(
    kernel_size: int, sig_x: float, sig_y: float | None = None, theta: float = 0.0, beta: float = 1.0
) -> torch.Tensor:
    """Plateau-shaped kernel ``1 / (1 + (x^T Sigma^-1 x)^beta)`` (paper Eq. 4), normalised; ``(K, K)`` float64."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return _normalize(1.0 / (1.0 + _mahalanobis2(kernel_size, sig_x, sig_y, theta).pow(beta)))


def circular_lowpass_kernel(cutoff: float, kernel_size: int, pad_to: int = 0) -> torch.Tensor:
    """2-D sinc (ideal circular low-pass) kernel, paper Eq. (5): ``k(r) = omega_c J1(omega_c r) / (2 pi r)``.

    Args:
        cutoff: cut-off frequency ``omega_c`` in radians per pixel (``pi`` is Nyquist).
        kernel_size: odd size ``K``; the centre takes the limit ``omega_c^2 / (4 pi)``.
        pad_to: zero-pad the normalised kernel to this odd size when larger than ``K``.

    Returns:
        ``(K, K)`` (or ``(pad_to, pad_to)``) float64, summing to 1.
    """
    k = _check_size(kernel_size)
    if cutoff <= 0:
        raise ValueError(f"cutoff must be > 0, got {cutoff}")
    r = mesh_grid(k).norm(dim=-1)
    safe_r = torch.where(r > 0, r, torch.ones_like(r))
    kernel = cutoff * torch.special.bessel_j1(cutoff * safe_r) / (2 * math.pi * safe_r)
    kernel = torch.where(r > 0, kernel, torch.full_like(r, cutoff**2 / (4 * math.pi)))
    kernel = _normalize(kernel)
    return pad_kernel(kernel, pad_to) if pad_to > k else kernel


def pulse_kernel(kernel_size: int = 21) -> torch.Tensor:
    """The identity kernel (a single 1 at the centre), ``(K, K)`` float64: filtering with it changes nothing."""
    k = _check_size(kernel_size)
    kernel = torch.zeros(k, k, dtype=_DTYPE)
    kernel[k // 2, k // 2] = 1.0
    return kernel


def pad_kernel(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad a centred ``(k, k)`` kernel to ``(size, size)`` (both odd), so kernels of any size batch together."""
    k = kernel.shape[-1]
    size = _check_size(size)
    if size < k:
        raise ValueError(f"cannot pad a {k}x{k} kernel to the smaller size {size}")
    p = (size - k) // 2
    return torch.nn.functional.pad(kernel, (p, p, p, p))


# ------------------------------------------------------------------------------------------------------------
# Random kernels
# ------------------------------------------------------------------------------------------------------------


def _sample_beta(generator: torch.Generator, beta_range: Sequence[float]) -> float:
    """Shape ``beta``: as in Real-ESRGAN, half the draws from ``[low, 1]`` and half from ``[1, high]`` when the
    range contains 1 (so a default ``betap_range = [1, 2]`` gives ``beta = 1`` half the time), else uniform."""
    low, high = beta_range
    if low <= 1.0 <= high:
        return uniform(generator, low, 1.0) if bernoulli(generator, 0.5) else uniform(generator, 1.0, high)
    return uniform(generator, low, high)


def random_kernel(
    kernel_type: str,
    kernel_size: int,
    sigma_x_range: Sequence[float],
    sigma_y_range: Sequence[float] | None = None,
    rotation_range: Sequence[float] = (-math.pi, math.pi),
    betag_range: Sequence[float] = (0.5, 4.0),
    betap_range: Sequence[float] = (1.0, 2.0),
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """Draw one kernel of ``kernel_type`` (see :data:`KERNEL_TYPES`); ``(K, K)`` float64 summing to 1.

    ``sigma_x`` is uniform in ``sigma_x_range``; anisotropic types also draw ``sigma_y`` (from
    ``sigma_y_range``, default ``sigma_x_range``) and the angle ``theta`` from ``rotation_range``. Generalised
    and plateau types draw ``beta`` from ``betag_range`` / ``betap_range``.
    """
    check_generator(generator)
    if kernel_type not in KERNEL_TYPES:
        raise ValueError(f"unknown kernel type {kernel_type!r}; expected one of {KERNEL_TYPES}")
    sigma_y_range = sigma_x_range if sigma_y_range is None else sigma_y_range
    sig_x = uniform(generator, *sigma_x_range)
    sig_y, theta = None, 0.0
    if kernel_type.endswith("aniso"):
        sig_y = uniform(generator, *sigma_y_range)
        theta = uniform(generator, *rotation_range)
    if kernel_type in ("iso", "aniso"):
        return bivariate_gaussian(kernel_size, sig_x, sig_y, theta)
    if kernel_type.startswith("generalized"):
        return bivariate_generalized_gaussian(kernel_size, sig_x, sig_y, theta, _sample_beta(generator, betag_range))
    return bivariate_plateau(kernel_size, sig_x, sig_y, theta, _sample_beta(generator, betap_range))


def random_mixed_kernels(
    kernel_list: Sequence[str],
    kernel_prob: Sequence[float],
    kernel_size: int = 21,
    sigma_x_range: Sequence[float] = (0.6, 5.0),
    sigma_y_range: Sequence[float] | None = None,
    rotation_range: Sequence[float] = (-math.pi, math.pi),
    betag_range: Sequence[float] = (0.5, 8.0),
    betap_range: Sequence[float] = (0.5, 8.0),
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """Pick a type from ``kernel_list`` with probabilities ``kernel_prob``, then draw it (:func:`random_kernel`)."""
    check_generator(generator)
    if len(kernel_list) != len(kernel_prob):
        raise ValueError(f"kernel_list has {len(kernel_list)} entries but kernel_prob has {len(kernel_prob)}")
    kernel_type = kernel_list[categorical(generator, kernel_prob)]
    return random_kernel(
        kernel_type,
        kernel_size,
        sigma_x_range,
        sigma_y_range,
        rotation_range,
        betag_range,
        betap_range,
        generator=generator,
    )


def random_sinc_kernel(
    kernel_size: int, cutoff_range: Sequence[float], pad_to: int = 0, *, generator: torch.Generator
) -> torch.Tensor:
    """Circular low-pass kernel with ``omega_c`` uniform in ``cutoff_range`` (radians); see
    :func:`circular_lowpass_kernel`."""
    check_generator(generator)
    return circular_lowpass_kernel(uniform(generator, *cutoff_range), kernel_size, pad_to=pad_to)
