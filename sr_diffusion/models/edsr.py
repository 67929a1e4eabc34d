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

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .outputs import RegressionModelOutput, check_sample, conv_flops
from .upsamplers import (
    INTERPOLATION_MODES,
    UPSAMPLERS,
    NearestConvUpsampler,
    icnr_pixelshuffle_upsampler_,
    make_pixelshuffle_upsampler,
    pixelshuffle_upsampler_flops,
)

__all__ = ["EDSR", "make_pixelshuffle_upsampler", "pixelshuffle_upsampler_flops"]

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
        upsampler (`str`): ``"pixelshuffle"`` (the paper's and every released model's: conv to ``r²·C`` +
            ``PixelShuffle``) or ``"nearest_conv"`` (nearest-neighbour ×2 + conv + LeakyReLU per stage, ESRGAN's;
            every output pixel gets the same kernel, so no sub-pixel mesh) or ``"bilinear_conv"`` (the same with
            bilinear ×2, which also damps the grid frequencies; same weights): :mod:`~sr_diffusion.models.upsamplers`.
        upsample_init (`str`): ``"default"`` (PyTorch's) or ``"icnr"`` (pixel-shuffle convs start as
            conv + nearest upsampling; :func:`~sr_diffusion.models.upsamplers.icnr_`).
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
        upsampler: str = "pixelshuffle",
        upsample_init: str = "default",
    ):
        super().__init__()
        if num_in_ch != num_out_ch or len(rgb_mean) != num_in_ch:
            raise ValueError(
                f"EDSR needs num_in_ch == num_out_ch == len(rgb_mean), got {num_in_ch}, {num_out_ch}, {len(rgb_mean)}"
            )
        if upscale not in (1, 2, 3, 4, 8):
            raise ValueError(f"EDSR supports upscale 1, 2, 3, 4 or 8, got {upscale}")
        if upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler must be one of {UPSAMPLERS}, got {upsampler!r}")
        if upsample_init not in ("default", "icnr") or (upsample_init == "icnr" and upsampler != "pixelshuffle"):
            raise ValueError(
                f"upsample_init must be 'default', or 'icnr' with the pixelshuffle upsampler, got {upsample_init!r}"
            )
        self.register_buffer("mean", torch.tensor(list(rgb_mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[ResidualBlockNoBN(num_feat, res_scale) for _ in range(num_block)])
        self.conv_after_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        if upsampler == "pixelshuffle":
            self.upsample = make_pixelshuffle_upsampler(upscale, num_feat)
            if upsample_init == "icnr":
                icnr_pixelshuffle_upsampler_(self.upsample)
        else:
            self.upsample = NearestConvUpsampler(upscale, num_feat, mode=INTERPOLATION_MODES[upsampler])
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
        if c.upsampler == "pixelshuffle":
            flops += pixelshuffle_upsampler_flops(c.upscale, c.num_feat, height, width)
        else:
            flops += self.upsample.flops(height, width)
        flops += conv_flops(c.num_feat, c.num_out_ch, 3, height * c.upscale, width * c.upscale)
        return flops
