"""SRVGGNetCompact: the compact VGG-style network of Real-ESRGAN (Wang et al., ICCV-W 2021).

``num_conv + 2`` plain 3×3 convs with activations, all at LR resolution, a final pixel-shuffle, and
the nearest-upsampled input added so that the network learns the residual. Released models:
``realesr-general-x4v3`` (64 features, 32 convs, PReLU) and ``realesr-animevideov3`` (64
features, 16 convs, PReLU).

Parameter names follow BasicSR/Real-ESRGAN: ``body.N`` where even N are convs and odd N the
activations (only PReLU has parameters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .outputs import RegressionModelOutput, check_sample, conv_flops

__all__ = ["SRVGGNetCompact"]

ACT_TYPES = ("prelu", "relu", "leakyrelu")


def _activation(act_type: str, num_feat: int) -> nn.Module:
    if act_type == "prelu":
        return nn.PReLU(num_parameters=num_feat)
    if act_type == "relu":
        return nn.ReLU(inplace=True)
    return nn.LeakyReLU(negative_slope=0.1, inplace=True)


class SRVGGNetCompact(ModelMixin, ConfigMixin):
    r"""Compact VGG-style SR network.

    Input ``(N, num_in_ch, h, w)`` in [0, 1]; output ``(N, num_out_ch, h·upscale, w·upscale)`` in
    [0, 1], not clamped.

    Args:
        num_in_ch / num_out_ch (`int`): image channels (3).
        num_feat (`int`): width (64).
        num_conv (`int`): convs between the first and the last one (16 or 32 in the released models).
        upscale (`int`): scale factor of the final pixel-shuffle (4).
        act_type (`str`): ``"prelu"`` (per channel), ``"relu"`` or ``"leakyrelu"`` (slope 0.1).
    """

    @register_to_config
    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        num_feat: int = 64,
        num_conv: int = 16,
        upscale: int = 4,
        act_type: str = "prelu",
    ):
        super().__init__()
        if act_type not in ACT_TYPES:
            raise ValueError(f"act_type must be one of {ACT_TYPES}, got {act_type!r}")
        if upscale < 1:
            raise ValueError(f"upscale must be a positive integer, got {upscale}")
        if num_in_ch != num_out_ch:
            raise ValueError("SRVGGNetCompact adds the upsampled input to its output: num_in_ch must equal num_out_ch")
        layers: list[nn.Module] = [nn.Conv2d(num_in_ch, num_feat, 3, 1, 1), _activation(act_type, num_feat)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), _activation(act_type, num_feat)]
        layers.append(nn.Conv2d(num_feat, num_out_ch * upscale * upscale, 3, 1, 1))
        self.body = nn.Sequential(*layers)

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
        check_sample(sample, 1, "SRVGGNetCompact")
        scale = self.config.upscale
        out = F.pixel_shuffle(self.body(sample), scale)
        out = out + F.interpolate(sample, scale_factor=scale, mode="nearest")
        if not return_dict:
            return (out,)
        return RegressionModelOutput(sample=out)

    def flops(self, height: int, width: int) -> int:
        """Convolution FLOPs (2 × multiply-adds) of one forward pass on a ``height × width`` LR image."""
        c = self.config
        flops = conv_flops(c.num_in_ch, c.num_feat, 3, height, width)
        flops += c.num_conv * conv_flops(c.num_feat, c.num_feat, 3, height, width)
        flops += conv_flops(c.num_feat, c.num_out_ch * c.upscale**2, 3, height, width)
        return flops
