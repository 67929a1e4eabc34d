"""Additive noise of the Real-ESRGAN degradation model (Wang et al., 2021, Sec. 3.1 "Noise"), batched.

Each function takes a float ``(B, C, H, W)`` image in [0, 1] and per-image parameters (a Python number shared
by the batch, or a ``(B,)`` tensor). Noise tensors are drawn on ``generator.device`` and moved to the image's
device, so pass a generator that lives on the image's device to avoid a copy.

* Gaussian: ``n ~ N(0, (sigma / 255)^2)``, i.i.d. per channel ("colour") or one map shared by the channels
  ("gray").
* Poisson (shot) noise: ``n = scale * (Poisson(v * L) / L - v)`` where ``v`` is the image rounded to 8 bits
  and ``L = 2^ceil(log2(#distinct values of v))`` per image, computed on the BT.601 luma for grey noise, so
  ``Var[n] = scale^2 * v / L``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._rng import check_generator
from .ops import quantize_8bit, rgb_to_gray

__all__ = [
    "add_gaussian_noise",
    "add_poisson_noise",
    "gaussian_noise",
    "poisson_noise",
    "random_add_gaussian_noise",
    "random_add_poisson_noise",
]


def _per_image(value, batch: int, like: torch.Tensor) -> torch.Tensor:
    """A number or ``(B,)`` tensor as a ``(B, 1, 1, 1)`` tensor on ``like``'s device and dtype."""
    value = torch.as_tensor(value, dtype=like.dtype).to(like.device)
    if value.ndim == 0:
        value = value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"expected a number or a ({batch},) tensor, got shape {tuple(value.shape)}")
    return value.view(batch, 1, 1, 1)


def _per_image_flag(value, batch: int, device) -> torch.Tensor:
    value = torch.as_tensor(value).to(device=device, dtype=torch.bool)
    if value.ndim == 0:
        value = value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"expected a bool or a ({batch},) tensor, got shape {tuple(value.shape)}")
    return value


def _randn(shape, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype)
    return noise.to(like.device)


def _finish(out: torch.Tensor, clip: bool, rounds: bool) -> torch.Tensor:
    if clip and rounds:
        return quantize_8bit(out)
    if clip:
        return out.clamp(0, 1)
    if rounds:
        return (out * 255.0).round() / 255.0
    return out


def gaussian_noise(
    img: torch.Tensor,
    sigma: float | torch.Tensor,
    gray: bool | torch.Tensor = False,
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """Gaussian noise with standard deviation ``sigma / 255`` (``sigma`` on the 0..255 scale).

    Args:
        img: ``(B, C, H, W)``; only its shape, dtype and device are used.
        sigma: number or ``(B,)``.
        gray: bool or ``(B,)`` bool; grey images get one ``(H, W)`` noise map repeated over the channels.
        generator: source of the noise.

    Returns:
        ``(B, C, H, W)`` noise. A colour map is always drawn first, then a grey map if any image needs one.
    """
    check_generator(generator)
    b, c, h, w = img.shape
    sigma = _per_image(sigma, b, img) / 255.0
    gray = _per_image_flag(gray, b, img.device)
    noise = _randn((b, c, h, w), img, generator)
    if bool(gray.any()):
        gray_noise = _randn((b, 1, h, w), img, generator).expand(b, c, h, w)
        noise = torch.where(gray.view(b, 1, 1, 1), gray_noise, noise)
    return noise * sigma


def _poisson_residual(img: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``Poisson(v * L) / L - v`` with ``v`` the 8-bit-rounded image and ``L`` its per-image number of levels."""
    img = quantize_8bit(img)
    levels = [2.0 ** math.ceil(math.log2(torch.unique(x).numel())) for x in img]
    levels = torch.tensor(levels, dtype=img.dtype, device=img.device).view(-1, 1, 1, 1)
    rates = (img * levels).to(generator.device)
    counts = torch.poisson(rates, generator=generator).to(img.device)
    return counts / levels - img


def poisson_noise(
    img: torch.Tensor,
    scale: float | torch.Tensor = 1.0,
    gray: bool | torch.Tensor = False,
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """Poisson (shot) noise of the image's own intensities, times ``scale``.

    Args:
        img: ``(B, C, H, W)`` in [0, 1]; ``C = 3`` (RGB) or 1.
        scale: number or ``(B,)``; ``Var[noise] = scale^2 * v / L`` (see module docstring).
        gray: bool or ``(B,)`` bool; grey images get the luma's shot noise repeated over the channels.
        generator: source of the noise.

    Returns:
        ``(B, C, H, W)`` noise; colour images are drawn first, then grey ones.
    """
    check_generator(generator)
    b, c, h, w = img.shape
    scale = _per_image(scale, b, img)
    gray = _per_image_flag(gray, b, img.device)
    noise = torch.zeros_like(img)
    color_idx = (~gray).nonzero(as_tuple=True)[0]
    gray_idx = gray.nonzero(as_tuple=True)[0]
    if color_idx.numel():
        noise[color_idx] = _poisson_residual(img[color_idx], generator)
    if gray_idx.numel():
        noise[gray_idx] = _poisson_residual(rgb_to_gray(img[gray_idx]), generator).expand(-1, c, h, w)
    return noise * scale


def add_gaussian_noise(
    img: torch.Tensor,
    sigma: float | torch.Tensor,
    gray: bool | torch.Tensor = False,
    clip: bool = True,
    rounds: bool = False,
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """``img + gaussian_noise(...)``, clamped to [0, 1] if ``clip`` and rounded to 8-bit levels if ``rounds``."""
    return _finish(img + gaussian_noise(img, sigma, gray, generator=generator), clip, rounds)


def add_poisson_noise(
    img: torch.Tensor,
    scale: float | torch.Tensor = 1.0,
    gray: bool | torch.Tensor = False,
    clip: bool = True,
    rounds: bool = False,
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """``img + poisson_noise(...)``, clamped to [0, 1] if ``clip`` and rounded to 8-bit levels if ``rounds``."""
    return _finish(img + poisson_noise(img, scale, gray, generator=generator), clip, rounds)


def _draw_per_image(batch: int, value_range: Sequence[float], like: torch.Tensor, generator) -> torch.Tensor:
    u = torch.rand(batch, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)
    return value_range[0] + (value_range[1] - value_range[0]) * u


def random_add_gaussian_noise(
    img: torch.Tensor,
    sigma_range: Sequence[float] = (0.0, 1.0),
    gray_prob: float = 0.0,
    clip: bool = True,
    rounds: bool = False,
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """Gaussian noise with per-image ``sigma ~ U(sigma_range)`` and grey with probability ``gray_prob``."""
    check_generator(generator)
    b = img.shape[0]
    sigma = _draw_per_image(b, sigma_range, img, generator)
    gray = _draw_per_image(b, (0.0, 1.0), img, generator) < gray_prob
    return add_gaussian_noise(img, sigma, gray, clip, rounds, generator=generator)


def random_add_poisson_noise(
    img: torch.Tensor,
    scale_range: Sequence[float] = (0.0, 1.0),
    gray_prob: float = 0.0,
    clip: bool = True,
    rounds: bool = False,
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """Poisson noise with per-image ``scale ~ U(scale_range)`` and grey with probability ``gray_prob``."""
    check_generator(generator)
    b = img.shape[0]
    scale = _draw_per_image(b, scale_range, img, generator)
    gray = _draw_per_image(b, (0.0, 1.0), img, generator) < gray_prob
    return add_poisson_noise(img, scale, gray, clip, rounds, generator=generator)
