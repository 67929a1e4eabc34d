"""The BSRGAN shuffled degradation model (Zhang et al., 2021, "Designing a Practical Degradation Model for Deep
Blind Image Super-Resolution", Sec. 3, Fig. 2).

Per image: an optional first half-size step (``scale == 4`` only), then seven operations in a random order:
blur, blur, an intermediate down-sample, the final down-sample (always after the intermediate one), Gaussian
noise, JPEG and (with a user-supplied model) camera-sensor noise; finally a JPEG compression. The intermediate
image sizes differ per image, so a batch is processed one image at a time, on the input's device.

Departures from BSRGAN's code: resizes use ``F.interpolate`` (bilinear / bicubic / area stand in for OpenCV's
linear / cubic / area; antialiased bicubic for MATLAB's ``imresize``), blur uses reflect padding, the
sub-pixel shift of the down-sampling Gaussian is analytic rather than interpolated, and the camera ISP model, if
any, sees only the LR image (BSRGAN's also re-renders the HR target).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch

from ._rng import bernoulli, check_generator, permutation, randint, uniform
from .config import BSRGANDegradationConfig
from .jpeg import jpeg_compress
from .kernels import bivariate_gaussian, mesh_grid
from .ops import INTERPOLATION_MODES, filter2d, quantize_8bit, resize

__all__ = ["BSRGANDegradation"]

_MIN_SIGMA = 1e-3  # a zero width would give a singular covariance; this small one gives the identity kernel
_DOWNSAMPLE_KERNEL_SIZE = 25

#: An ISP (camera-sensor noise) model: ``(img (1, 3, h, w) in [0, 1], generator) -> img (1, 3, h, w)``.
ISPModel = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _random_mode(generator: torch.Generator) -> str:
    return INTERPOLATION_MODES[randint(generator, 0, len(INTERPOLATION_MODES) - 1)]


def _rand(shape, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64).cpu()


class BSRGANDegradation:
    """Synthesises LR images from HR ones with BSRGAN's shuffled degradation model.

    Args:
        config: every parameter; defaults to BSRGAN's (``BSRGANDegradationConfig()``).
        isp_model: optional camera-sensor noise model (see :data:`ISPModel`), applied with ``config.isp_prob``.

    Example::

        degradation = BSRGANDegradation()
        lr = degradation(hr, generator=torch.Generator().manual_seed(0))  # (B, 3, H, W) -> (B, 3, H//4, W//4)
    """

    def __init__(self, config: BSRGANDegradationConfig | None = None, isp_model: ISPModel | None = None):
        if config is None:
            config = BSRGANDegradationConfig()
        if not isinstance(config, BSRGANDegradationConfig):
            raise TypeError(f"config must be a BSRGANDegradationConfig, got {type(config).__name__}")
        self.config = config
        self.isp_model = isp_model

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, isp_model: ISPModel | None = None) -> BSRGANDegradation:
        return cls(BSRGANDegradationConfig.from_yaml(path), isp_model=isp_model)

    @property
    def scale(self) -> int:
        return self.config.scale

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r}, isp_model={self.isp_model!r})"

    # --------------------------------------------------------------------------------------------------------
    # Operations on one (1, 3, h, w) image
    # --------------------------------------------------------------------------------------------------------

    def _kernel_size(self, generator: torch.Generator) -> int:
        low, high = self.config.blur_kernel_size_range
        return low + 2 * randint(generator, 0, (high - low) // 2)

    def _blur(self, img: torch.Tensor, sf: int, generator: torch.Generator) -> torch.Tensor:
        """Anisotropic Gaussian (eigenvalues ``U(0, 4 + sf)``, angle ``U(0, pi)``) or isotropic Gaussian (sigma
        ``U(0, 2 + 0.2 sf)``), with reflect padding."""
        if bernoulli(generator, self.config.aniso_blur_prob):
            var_max = 4.0 + sf
            var_x, var_y = var_max * uniform(generator), var_max * uniform(generator)
            size = self._kernel_size(generator)
            theta = math.pi * uniform(generator)
            sig_x, sig_y = max(math.sqrt(var_x), _MIN_SIGMA), max(math.sqrt(var_y), _MIN_SIGMA)
            kernel = bivariate_gaussian(size, sig_x, sig_y, theta)
        else:
            size = self._kernel_size(generator)
            kernel = bivariate_gaussian(size, max((2.0 + 0.2 * sf) * uniform(generator), _MIN_SIGMA))
        return filter2d(img, kernel)

    def _downsample2(self, img: torch.Tensor, sf: int, generator: torch.Generator) -> torch.Tensor:
        """Resize by ``1 / U(1, 2 sf)``, or blur with a Gaussian (sigma ``U(0.1, 0.6 sf)``) shifted by
        ``(sf - 1) / 2`` pixels and keep every ``sf``-th pixel, so each kept pixel is centred on its HR block."""
        h, w = img.shape[-2:]
        if bernoulli(generator, self.config.downsample2_resize_prob):
            factor = uniform(generator, 1.0, 2.0 * sf)
            img = resize(img, (int(h / factor), int(w / factor)), _random_mode(generator))
        else:
            sigma = uniform(generator, 0.1, 0.6 * sf)
            shift = (sf - 1) / 2
            offsets = mesh_grid(_DOWNSAMPLE_KERNEL_SIZE) - shift  # filter2d correlates: peak at +shift
            kernel = torch.exp(-(offsets**2).sum(-1) / (2 * sigma**2))
            img = filter2d(img, kernel / kernel.sum())[..., ::sf, ::sf]
        return img.clamp(0, 1)

    def _gaussian_noise(self, img: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise level ``randint(noise_range)`` / 255: colour (i.i.d. channels), grey (one map), or
        channel-correlated with covariance ``|L^2 U^T D U|`` (``L = noise_range[1] / 255``, random diagonal
        ``D`` and orthogonal ``U``)."""
        cfg = self.config
        level = randint(generator, *cfg.noise_range) / 255.0
        r = uniform(generator)
        _, c, h, w = img.shape
        if r < cfg.gray_noise_prob:
            noise = torch.randn((1, 1, h, w), generator=generator, device=generator.device).expand(1, c, h, w) * level
        elif r >= 1.0 - cfg.color_noise_prob:
            noise = torch.randn((1, c, h, w), generator=generator, device=generator.device) * level
        else:
            diag = torch.diag(_rand(3, generator))
            orth = torch.linalg.svd(_rand((3, 3), generator)).U  # orthonormal basis of a random matrix's range
            cov = ((cfg.noise_range[1] / 255.0) ** 2 * orth.T @ diag @ orth).abs()
            eigvals, eigvecs = torch.linalg.eigh(cov)  # |.| may break positive semi-definiteness: clip
            factor = (eigvecs * eigvals.clamp(min=0).sqrt()).to(torch.float32)
            z = torch.randn((1, 3, h, w), generator=generator, device=generator.device)
            noise = torch.einsum("ck,bkhw->bchw", factor.to(z.device), z)
        return (img + noise.to(device=img.device, dtype=img.dtype)).clamp(0, 1)

    def _jpeg(self, img: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return jpeg_compress(img, randint(generator, *self.config.jpeg_range))

    def _degrade_one(self, img: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        cfg = self.config
        sf = cfg.scale
        h, w = img.shape[-2:]
        img = img[..., : h - h % sf, : w - w % sf]  # mod crop

        # 1. Optional first half-size step
        if sf == 4 and bernoulli(generator, cfg.scale2_prob):
            half = (img.shape[-2] // 2, img.shape[-1] // 2)
            if bernoulli(generator, 0.5):
                img = resize(img, half, _random_mode(generator))
            else:
                img = resize(img, half, "bicubic", antialias=True)  # MATLAB imresize
            img = img.clamp(0, 1)
            sf = 2

        # 2. Seven operations in a random order, the final down-sample (3) after the intermediate one (2)
        order = permutation(generator, 7)
        i2, i3 = order.index(2), order.index(3)
        if i2 > i3:
            order[i2], order[i3] = order[i3], order[i2]
        size_before_downsample = img.shape[-2:]
        for op in order:
            if op in (0, 1):
                img = self._blur(img, sf, generator)
            elif op == 2:
                size_before_downsample = img.shape[-2:]
                img = self._downsample2(img, sf, generator)
            elif op == 3:
                hh, ww = size_before_downsample
                img = resize(img, (hh // sf, ww // sf), _random_mode(generator)).clamp(0, 1)
            elif op == 4:
                img = self._gaussian_noise(img, generator)
            elif op == 5:
                if bernoulli(generator, cfg.jpeg_prob):
                    img = self._jpeg(img, generator)
            elif bernoulli(generator, cfg.isp_prob) and self.isp_model is not None:
                img = self.isp_model(img, generator).clamp(0, 1)

        # 3. Final JPEG compression
        return self._jpeg(img, generator)

    # --------------------------------------------------------------------------------------------------------
    # Public entry point
    # --------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def degrade(self, hr: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Degrade each image of the batch independently (its own shuffled order and parameters).

        Args:
            hr: ``(B, 3, H, W)`` float RGB in [0, 1], on any device.
            generator: source of every draw; noise is drawn on ``generator.device``.

        Returns:
            ``(B, 3, H // scale, W // scale)`` on ``hr``'s device and dtype, on the 8-bit grid.
        """
        check_generator(generator)
        if not isinstance(hr, torch.Tensor) or hr.ndim != 4 or not hr.is_floating_point():
            raise ValueError("hr must be a float (B, 3, H, W) tensor in [0, 1]")
        b, c, h, w = hr.shape
        if c != 3:
            raise ValueError(f"BSRGAN degrades RGB images; hr has {c} channels")
        scale = self.config.scale
        if h < scale or w < scale:
            raise ValueError(f"hr of size {h}x{w} is smaller than the scale factor {scale}")
        lr = torch.cat([self._degrade_one(hr[i : i + 1], generator) for i in range(b)])
        assert lr.shape[-2:] == (h // scale, w // scale), lr.shape  # guaranteed by the mod crop
        return quantize_8bit(lr)

    __call__ = degrade
