"""EDSR: Lim et al., "Enhanced Deep Residual Networks for Single Image Super-Resolution", CVPRW 2017.

A trunk of ``num_block`` residual blocks without batch norm (conv-ReLU-conv, residual scaled by
``res_scale``, Sec. 3.1 of the paper), a global skip, and a sub-pixel (pixel-shuffle) upsampler.
EDSR-baseline is 16 blocks × 64 features, ``res_scale=1``; EDSR (full) is 32 blocks × 256 features,
``res_scale=0.1``.

Parameter names follow BasicSR (``conv_first``, ``body.N.conv1/conv2``, ``conv_after_body``,
``upsample.*``, ``conv_last``) plus a ``mean`` buffer (the DIV2K RGB mean). Files from the authors'
EDSR-PyTorch repository are converted by :mod:`sr_diffusion.checkpoints`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .outputs import RegressionModelOutput, check_sample, conv_flops

__all__ = ["EDSR"]

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)


class ResidualBlockNoBN(nn.Module):
    """``x + res_scale · conv2(relu(conv1(x)))``, shapes ``(N, C, H, W) -> (N, C, H, W)``."""

    def __init__(self, num_feat: int, res_scale: float = 1.0):
        super().__init__()
        self.res_scale = res_scale
        self.conv1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x), inplace=True))
        if self.res_scale != 1:
            out = out * self.res_scale
        return x + out


def make_pixelshuffle_upsampler(scale: int, num_feat: int) -> nn.Sequential:
    """Conv(C → r²C) + PixelShuffle(r) stages: log2(scale) stages of r=2, or one of r=3; empty for 1.

    Conv layers sit at even indices (``upsample.0``, ``upsample.2``, ...), as in BasicSR and SwinIR.
    """
    layers: list[nn.Module] = []
    if scale == 3:
        layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
    elif scale >= 1 and scale & (scale - 1) == 0:
        for _ in range(int(math.log2(scale))):
            layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
    else:
        raise ValueError(f"pixel-shuffle upsampling supports scale 1, 3 or a power of 2, got {scale}")
    return nn.Sequential(*layers)


def pixelshuffle_upsampler_flops(scale: int, num_feat: int, height: int, width: int) -> int:
    """FLOPs of :func:`make_pixelshuffle_upsampler` for an ``height × width`` feature map."""
    if scale == 3:
        return conv_flops(num_feat, 9 * num_feat, 3, height, width)
    flops = 0
    for _ in range(int(math.log2(scale))):
        flops += conv_flops(num_feat, 4 * num_feat, 3, height, width)
        height, width = 2 * height, 2 * width
    return flops


class EDSR(ModelMixin, ConfigMixin):
    r"""EDSR super-resolution network (baseline and full size via the config).

    Input ``(N, num_in_ch, h, w)`` in [0, 1]; the model subtracts ``rgb_mean`` and multiplies by
    ``img_range`` (255 for the released models, which were trained on [0, 255] images), and undoes
    both at the end. Output ``(N, num_out_ch, h·upscale, w·upscale)`` in [0, 1], not clamped.

    Args:
        num_in_ch / num_out_ch (`int`): image channels (3).
        num_feat (`int`): trunk width (64 baseline, 256 full).
        num_block (`int`): residual blocks (16 baseline, 32 full).
        upscale (`int`): 1, 2, 3, 4 or 8.
        res_scale (`float`): residual scaling inside each block (1.0 baseline, 0.1 full).
        img_range (`float`): the pixel range the weights were trained for (255.0).
        rgb_mean (`tuple[float]`): per-channel mean subtracted in [0, 1] units (DIV2K mean).
    """

    @register_to_config
    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        num_feat: int = 64,
        num_block: int = 16,
        upscale: int = 4,
        res_scale: float = 1.0,
        img_range: float = 255.0,
        rgb_mean: Sequence[float] = DIV2K_RGB_MEAN,
    ):
        super().__init__()
        if num_in_ch != num_out_ch or len(rgb_mean) != num_in_ch:
            raise ValueError(
                f"EDSR needs num_in_ch == num_out_ch == len(rgb_mean), got {num_in_ch}, {num_out_ch}, "
                f"{len(rgb_mean)}"
            )
        if upscale not in (1, 2, 3, 4, 8):
            raise ValueError(f"EDSR supports upscale 1, 2, 3, 4 or 8, got {upscale}")
        self.register_buffer("mean", torch.tensor(list(rgb_mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[ResidualBlockNoBN(num_feat, res_scale) for _ in range(num_block)])
        self.conv_after_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.upsample = make_pixelshuffle_upsampler(upscale, num_feat)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)

    @property
    def upscale(self) -> int:
        """The native scale factor."""
        return int(self.config.upscale)

    @property
    def input_multiple(self) -> int:
        """H and W of the input must be divisible by this (1: any size)."""
        return 1

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> RegressionModelOutput | tuple:
        """``(N, C, h, w)`` in [0, 1] → ``(N, C, h·upscale, w·upscale)`` in [0, 1]."""
        check_sample(sample, 1, "EDSR")
        img_range = self.config.img_range
        mean = self.mean.to(sample.dtype)
        x = self.conv_first((sample - mean) * img_range)
        res = self.conv_after_body(self.body(x)) + x
        out = self.conv_last(self.upsample(res)) / img_range + mean
        if not return_dict:
            return (out,)
        return RegressionModelOutput(sample=out)

    def flops(self, height: int, width: int) -> int:
        """Convolution FLOPs (2 × multiply-adds) of one forward pass on a ``height × width`` LR image."""
        c = self.config
        flops = conv_flops(c.num_in_ch, c.num_feat, 3, height, width)
        flops += (2 * c.num_block + 1) * conv_flops(c.num_feat, c.num_feat, 3, height, width)
        flops += pixelshuffle_upsampler_flops(c.upscale, c.num_feat, height, width)
        flops += conv_flops(c.num_feat, c.num_out_ch, 3, height * c.upscale, width * c.upscale)
        return flops
