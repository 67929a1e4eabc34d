"""Learned x2^k / x3 upsamplers for SR networks, and why the choice shows in every output.

A sub-pixel convolution (Shi et al., CVPR 2016: a conv to ``r²·C`` channels, then ``PixelShuffle(r)``) computes each
of the ``r × r`` output phases ``(y mod r, x mod r)`` with its own kernel. Nothing ties those kernels together, so a
trained network easily leaves a phase-dependent offset: a faint ``r``-periodic mesh, most visible on smooth areas
(sky, bokeh). Two remedies are known:

* **ICNR** (Aitken et al., "Checkerboard artifact free sub-pixel convolution", 2017): initialise the conv so the
  ``r²`` kernels of each output channel are equal, i.e. the layer starts as a conv followed by nearest-neighbour
  upsampling (:func:`icnr_`). Training may still drift apart.
* **Nearest-neighbour upsampling + convolution** (Odena et al., "Deconvolution and checkerboard artifacts",
  Distill 2016; ESRGAN / Real-ESRGAN's RRDBNet): upsample the features by repetition and convolve *at the output
  resolution*, so the same kernel is applied at every output pixel (:class:`NearestConvUpsampler`).
* **Bilinear upsampling + convolution** (``mode="bilinear"``): nearest ×2 followed by the fixed ``[1, 2, 1] / 4``
  blur is exactly bilinear ×2 (``align_corners=False``), and that blur has a zero at the x2 grid frequency. A
  trained nearest + conv stack still leaves content-dependent peaks at periods 2 and 4 (the features are 2×2 blocks
  before the conv, and a 3×3 kernel cannot cancel the block edges for every input); with bilinear features the
  images of the LR spectrum at the grid frequencies are attenuated before the conv sees them. Its weights have the
  same names and shapes, so a nearest + conv model fine-tunes into one.

Layouts: :func:`make_pixelshuffle_upsampler` keeps BasicSR's parameter names (``upsample.0``, ``upsample.2``, …);
:class:`NearestConvUpsampler` is a ``Sequential`` of ``(Upsample, Conv2d, LeakyReLU)`` per x2 stage.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .outputs import conv_flops

__all__ = [
    "UPSAMPLERS",
    "INTERPOLATION_MODES",
    "NearestConvUpsampler",
    "icnr_",
    "make_pixelshuffle_upsampler",
    "pixelshuffle_upsampler_flops",
    "upsample_factors",
]

#: ``upsampler`` values accepted by the models that offer a choice.
UPSAMPLERS = ("pixelshuffle", "nearest_conv", "bilinear_conv")
#: the interpolation each conv-after-upsampling choice uses before its convs.
INTERPOLATION_MODES = {"nearest_conv": "nearest", "bilinear_conv": "bilinear"}


def upsample_factors(scale: int) -> list[int]:
    """The per-stage factors of an x``scale`` upsampler: ``[3]`` for 3, ``[2] * log2(scale)`` for a power of 2."""
    if scale == 3:
        return [3]
    if scale >= 1 and scale & (scale - 1) == 0:
        return [2] * int(math.log2(scale))
    raise ValueError(f"learned upsampling supports scale 1, 3 or a power of 2, got {scale}")


def make_pixelshuffle_upsampler(scale: int, num_feat: int) -> nn.Sequential:
    """Conv(C → r²C) + PixelShuffle(r) stages: log2(scale) stages of r=2, or one of r=3; empty for 1.

    Conv layers sit at even indices (``upsample.0``, ``upsample.2``, ...), as in BasicSR and SwinIR.
    """
    layers: list[nn.Module] = []
    for r in upsample_factors(scale):
        layers += [nn.Conv2d(num_feat, r * r * num_feat, 3, 1, 1), nn.PixelShuffle(r)]
    return nn.Sequential(*layers)


def pixelshuffle_upsampler_flops(scale: int, num_feat: int, height: int, width: int) -> int:
    """FLOPs of :func:`make_pixelshuffle_upsampler` for an ``height × width`` feature map."""
    flops = 0
    for r in upsample_factors(scale):
        flops += conv_flops(num_feat, r * r * num_feat, 3, height, width)
        height, width = r * height, r * width
    return flops


@torch.no_grad()
def icnr_(weight: torch.Tensor, scale: int, init=nn.init.kaiming_normal_) -> torch.Tensor:
    """ICNR initialisation, in place, of a conv weight ``(r²·C_out, C_in, k, k)`` that feeds ``PixelShuffle(r)``.

    ``PixelShuffle`` sends channel ``c·r² + s`` to output channel ``c`` at sub-pixel ``s``; ICNR draws one kernel
    ``w_c`` per output channel (``init`` of a ``(C_out, C_in, k, k)`` tensor) and repeats it for the ``r²``
    sub-pixels, so conv + shuffle starts as conv + nearest-neighbour upsampling: no phase differs from another.
    """
    out_channels = weight.shape[0]
    if out_channels % (scale * scale):
        raise ValueError(f"ICNR needs out channels divisible by scale² = {scale * scale}, got {out_channels}")
    base = torch.empty(out_channels // (scale * scale), *weight.shape[1:], dtype=weight.dtype, device=weight.device)
    init(base)
    weight.copy_(base.repeat_interleave(scale * scale, dim=0))
    return weight


def icnr_pixelshuffle_upsampler_(upsample: nn.Sequential) -> None:
    """Apply :func:`icnr_` to every conv of a :func:`make_pixelshuffle_upsampler` stack (biases to zero)."""
    layers = list(upsample)
    for conv, shuffle in zip(layers[0::2], layers[1::2]):
        icnr_(conv.weight, shuffle.upscale_factor)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)


class NearestConvUpsampler(nn.Sequential):
    """x``scale`` by ``(nearest ×r, conv 3×3, LeakyReLU(0.2))`` stages (ESRGAN's upsampler, :func:`upsample_factors`).

    ``(N, in_channels, h, w) → (N, out_channels, h·scale, w·scale)``; the first stage maps ``in_channels`` to
    ``out_channels``, the others keep ``out_channels``. Each conv runs at its stage's output resolution.
    ``mode="bilinear"`` interpolates bilinearly (``align_corners=False``) instead of repeating: the same parameters.
    """

    def __init__(self, scale: int, in_channels: int, out_channels: int | None = None, mode: str = "nearest"):
        if mode not in INTERPOLATION_MODES.values():
            raise ValueError(f"mode must be one of {sorted(INTERPOLATION_MODES.values())}, got {mode!r}")
        out_channels = in_channels if out_channels is None else out_channels
        layers: list[nn.Module] = []
        channels = in_channels
        for r in upsample_factors(scale):
            layers += [
                nn.Upsample(scale_factor=r, mode=mode)
                if mode == "nearest"
                else nn.Upsample(scale_factor=r, mode=mode, align_corners=False),
                nn.Conv2d(channels, out_channels, 3, 1, 1),
                nn.LeakyReLU(negative_slope=0.2, inplace=True),
            ]
            channels = out_channels
        super().__init__(*layers)
        self.scale, self.in_channels, self.out_channels, self.mode = scale, in_channels, out_channels, mode

    def flops(self, height: int, width: int) -> int:
        """Convolution FLOPs for an ``height × width`` input."""
        flops, channels = 0, self.in_channels
        for r in upsample_factors(self.scale):
            height, width = r * height, r * width
            flops += conv_flops(channels, self.out_channels, 3, height, width)
            channels = self.out_channels
        return flops
