"""Synthetic degradations for training blind super-resolution: Real-ESRGAN's second-order model (Wang et al.,
2021, Sec. 3) and BSRGAN's shuffled model (Zhang et al., 2021), plus their building blocks (blur kernels,
Gaussian / Poisson noise, real JPEG).

Images are float ``(B, C, H, W)`` RGB tensors in [0, 1]; every random draw comes from a ``torch.Generator``
passed by the caller, so one seed always gives the same LR image. Importing this package loads only torch,
numpy, Pillow (and PyYAML when a config file is read).

Example::

    from sr_diffusion.degradations import RealESRGANDegradation

    degradation = RealESRGANDegradation()  # Real-ESRGAN x4plus defaults
    # in a Dataset.__getitem__ (CPU worker):
    kernels = degradation.sample_kernels(worker_generator)
    # on the training device, after default_collate:
    lr = degradation.apply(hr, kernels, generator=device_generator)  # (B, 3, H/4, W/4)
"""

from .bsrgan import BSRGANDegradation
from .config import BSRGANDegradationConfig, RealESRGANDegradationConfig
from .jpeg import jpeg_compress, random_jpeg_compress, sample_jpeg_quality
from .kernels import (
    KERNEL_TYPES,
    bivariate_gaussian,
    bivariate_generalized_gaussian,
    bivariate_plateau,
    circular_lowpass_kernel,
    mesh_grid,
    pad_kernel,
    pulse_kernel,
    random_kernel,
    random_mixed_kernels,
    random_sinc_kernel,
    sigma_matrix2,
)
from .noise import (
    add_gaussian_noise,
    add_poisson_noise,
    gaussian_noise,
    poisson_noise,
    random_add_gaussian_noise,
    random_add_poisson_noise,
)
from .ops import INTERPOLATION_MODES, filter2d, quantize_8bit, reflect_pad, resize, rgb_to_gray
from .realesrgan import KERNEL_KEYS, PARAM_KEYS, RealESRGANDegradation, collate_kernels

__all__ = [
    "INTERPOLATION_MODES",
    "KERNEL_KEYS",
    "KERNEL_TYPES",
    "PARAM_KEYS",
    "BSRGANDegradation",
    "BSRGANDegradationConfig",
    "RealESRGANDegradation",
    "RealESRGANDegradationConfig",
    "add_gaussian_noise",
    "add_poisson_noise",
    "bivariate_gaussian",
    "bivariate_generalized_gaussian",
    "bivariate_plateau",
    "circular_lowpass_kernel",
    "collate_kernels",
    "filter2d",
    "gaussian_noise",
    "jpeg_compress",
    "mesh_grid",
    "pad_kernel",
    "poisson_noise",
    "pulse_kernel",
    "quantize_8bit",
    "random_add_gaussian_noise",
    "random_add_poisson_noise",
    "random_jpeg_compress",
    "random_kernel",
    "random_mixed_kernels",
    "random_sinc_kernel",
    "reflect_pad",
    "resize",
    "rgb_to_gray",
    "sample_jpeg_quality",
    "sigma_matrix2",
]
