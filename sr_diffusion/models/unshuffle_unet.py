"""A diffusers ``UNet2DModel`` that runs at 1/r of the chain's resolution by pixel (un)shuffling.

ResShift's released models diffuse in the latent space of a VQ-f4 autoencoder, so their denoiser works at the LR
resolution. :class:`PixelUnshuffleUNet` gets the same cost in pixel space with a lossless "autoencoder": space-to-depth
(``F.pixel_unshuffle``, Shi et al. 2016) by ``r``. For ``x_t`` of ``(N, C, H, W)`` and the LR conditioning ``lq``
(``y_0``, the bicubic-upsampled LR image, at the same size):

    u = cat(unshuffle_r(x_t), unshuffle_r(lq))          (N, (C + C_lq)·r², H/r, W/r)
    out = shuffle_r(UNet2DModel(u, t))                   (N, C_out, H, W)

so a ×4 model with ``r = 4`` runs its convolutions on the LR grid: 16x fewer positions than a UNet on ``x_t`` itself,
while the chain, the loss and the LR-consistency stay in pixel space (nothing is lost to an autoencoder).

The output side is a choice (``upsampler``). ``"pixelshuffle"`` (above) predicts each ``r × r`` block of the output
from one LR position with ``r²`` unrelated kernels, which leaves a faint ``r``-periodic mesh on smooth areas
(:mod:`~sr_diffusion.models.upsamplers`). ``"nearest_conv"`` has the UNet predict ``F = block_out_channels[0]``
features on the LR grid and upsamples them ESRGAN's way, with every conv at its output resolution::

    h = UNet2DModel(u, t)                                 (N, F, H/r, W/r)
    out = conv_last(NearestConvUpsampler_r(h))            (N, C_out, H, W)   [+ lq if lq_residual]

so every output pixel is computed by the same kernels (``hr_channels`` wide at the full resolution).
``"bilinear_conv"`` interpolates bilinearly instead (same weights; it also damps the grid frequencies).

It follows the ``ResShiftUNet`` calling convention, ``unet(sample, timestep, lq=..., return_dict=False)``, so
:class:`~sr_diffusion.pipelines.ResShiftPipeline` and :class:`~sr_diffusion.training.ResShiftTask` take it as they
take the paper's Swin-UNet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .outputs import check_sample
from .resshift_unet import ResShiftUNetOutput
from .upsamplers import INTERPOLATION_MODES, UPSAMPLERS, NearestConvUpsampler, icnr_

__all__ = ["PixelUnshuffleUNet"]


class PixelUnshuffleUNet(ModelMixin, ConfigMixin):
    """A ``UNet2DModel`` between a pixel unshuffle and a pixel shuffle by ``unshuffle_factor`` (module docstring).

    Args:
        in_channels: ``C``, channels of ``x_t`` (3 in pixel space).
        out_channels: channels of the output (``C`` for an ``x_0`` or noise prediction).
        lq_channels: ``C_lq``, channels of ``lq`` (0: no LR conditioning).
        unshuffle_factor: ``r``; ``x_t`` and ``lq`` need H and W divisible by ``r · 2^(levels - 1)``.
        sample_size: the training crop side (``x_t``'s), recorded for reference; any multiple of
            :attr:`input_multiple` runs.
        block_out_channels, layers_per_block, down_block_types, up_block_types, norm_num_groups, attention_head_dim,
        dropout: those of the inner ``UNet2DModel``; the block types default to attention-free ``DownBlock2D`` /
            ``UpBlock2D``, one per level.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        lq_channels: int = 3,
        unshuffle_factor: int = 4,
        sample_size: int = 128,
        block_out_channels: tuple[int, ...] = (64, 128, 128),
        layers_per_block: int = 1,
        down_block_types: tuple[str, ...] | None = None,
        up_block_types: tuple[str, ...] | None = None,
        norm_num_groups: int = 32,
        attention_head_dim: int | None = 8,
        dropout: float = 0.0,
        upsampler: str = "pixelshuffle",
        upsample_init: str = "default",
        hr_channels: int = 32,
        lq_residual: bool = False,
    ):
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("unshuffle_factor", unshuffle_factor),
        ):
            if int(value) < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if lq_channels < 0:
            raise ValueError(f"lq_channels must be at least 0, got {lq_channels}")
        if upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler must be one of {UPSAMPLERS}, got {upsampler!r}")
        if upsample_init not in ("default", "icnr") or (upsample_init == "icnr" and upsampler != "pixelshuffle"):
            raise ValueError(
                f"upsample_init must be 'default', or 'icnr' with the pixelshuffle upsampler, got {upsample_init!r}"
            )
        if lq_residual and (upsampler == "pixelshuffle" or lq_channels != out_channels):
            raise ValueError(
                "lq_residual needs upsampler='nearest_conv' or 'bilinear_conv' and lq_channels == out_channels"
            )
        levels = len(block_out_channels)
        r2 = unshuffle_factor**2
        shuffle_out = upsampler == "pixelshuffle"
        self.unet = UNet2DModel(
            sample_size=sample_size // unshuffle_factor,
            in_channels=(in_channels + lq_channels) * r2,
            out_channels=out_channels * r2 if shuffle_out else block_out_channels[0],
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=tuple(down_block_types or ("DownBlock2D",) * levels),
            up_block_types=tuple(up_block_types or ("UpBlock2D",) * levels),
            norm_num_groups=norm_num_groups,
            attention_head_dim=attention_head_dim,
            dropout=dropout,
        )
        if shuffle_out:
            if upsample_init == "icnr":
                icnr_(self.unet.conv_out.weight, unshuffle_factor)
                nn.init.zeros_(self.unet.conv_out.bias)
        else:
            mode = INTERPOLATION_MODES[upsampler]
            self.upsample = NearestConvUpsampler(unshuffle_factor, block_out_channels[0], hr_channels, mode=mode)
            self.conv_last = nn.Conv2d(hr_channels, out_channels, 3, 1, 1)

    @property
    def input_multiple(self) -> int:
        """``x_t``'s H and W must be multiples of this: ``r · 2^(levels - 1)``."""
        return int(self.config.unshuffle_factor) * 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def lq_scale(self) -> int:
        """``lq`` has the size of ``x_t`` (in pixel space: ``y_0``)."""
        return 1

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        lq: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> ResShiftUNetOutput | tuple[torch.Tensor]:
        """``sample`` ``(N, C, H, W)`` and ``lq`` ``(N, C_lq, H, W)`` at timestep ``t`` (scalar or ``(N,)``) →
        ``(N, out_channels, H, W)``."""
        r = int(self.config.unshuffle_factor)
        check_sample(sample, self.input_multiple, type(self).__name__)
        if sample.shape[1] != self.config.in_channels:
            raise ValueError(f"sample must be (N, {self.config.in_channels}, H, W), got {tuple(sample.shape)}")
        height, width = sample.shape[-2:]
        parts = [F.pixel_unshuffle(sample, r)]
        if self.config.lq_channels:
            expected = (sample.shape[0], self.config.lq_channels, height, width)
            if lq is None or tuple(lq.shape) != expected:
                got = None if lq is None else tuple(lq.shape)
                raise ValueError(f"lq must be {expected} (the LR image at x_t's size), got {got}")
            parts.append(F.pixel_unshuffle(lq.to(sample.dtype), r))
        out = self.unet(torch.cat(parts, dim=1), timestep, return_dict=False)[0]
        if self.config.upsampler == "pixelshuffle":
            out = F.pixel_shuffle(out, r)
        else:
            out = self.conv_last(self.upsample(out))
            if self.config.lq_residual:
                out = out + lq.to(out.dtype)
        if not return_dict:
            return (out,)
        return ResShiftUNetOutput(sample=out)
