"""The output type of the regression SR models, and the small helpers their ``forward`` shares.

Every regression model maps an RGB batch ``(N, 3, h, w)`` in ``[0, 1]`` to ``(N, 3, h·s, w·s)`` in
(approximately, it is not clamped) ``[0, 1]``, where ``s`` is the model's ``upscale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput

__all__ = ["RegressionModelOutput", "check_sample", "conv_flops"]


@dataclass
class RegressionModelOutput(BaseOutput):
    """Output of a regression SR model.

    Args:
        sample (`torch.Tensor` of shape `(N, C, h·upscale, w·upscale)`):
            The super-resolved image, float, in the ``[0, 1]`` range (not clamped).
    """

    sample: torch.Tensor


def check_sample(sample: torch.Tensor, multiple: int, model_name: str) -> None:
    """Raise a ``ValueError`` unless ``sample`` is a floating NCHW batch whose H and W divide by ``multiple``."""
    if not isinstance(sample, torch.Tensor) or sample.ndim != 4:
        shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
        raise ValueError(f"{model_name} expects a (N, C, H, W) tensor, got {shape}")
    if not sample.is_floating_point():
        raise ValueError(f"{model_name} expects a floating-point tensor in [0, 1], got dtype {sample.dtype}")
    height, width = sample.shape[-2:]
    if height % multiple or width % multiple:
        raise ValueError(
            f"{model_name} needs H and W divisible by {multiple} (its input_multiple), got {height}x{width}; "
            "pad the input first (the pipelines do this for you)"
        )


def conv_flops(in_channels: int, out_channels: int, kernel_size: int, height: int, width: int) -> int:
    """FLOPs of a stride-1 'same' convolution: 2 · C_in · C_out · k² · H · W (bias not counted)."""
    return 2 * in_channels * out_channels * kernel_size * kernel_size * height * width
