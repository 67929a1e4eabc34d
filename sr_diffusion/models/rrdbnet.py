"""RRDBNet: the generator of ESRGAN (Wang et al., ECCV-W 2018) and Real-ESRGAN (Wang et al., ICCV-W 2021).

A trunk of ``num_block`` Residual-in-Residual Dense Blocks (RRDB, Fig. 4 of ESRGAN: three dense
blocks of five 3×3 convs with ``num_grow_ch`` growth channels, residuals scaled by 0.2), a global
skip, and nearest-neighbour ×2 + conv upsampling stages.

Scales: 4 (two ×2 stages, ESRGAN), 8 (three stages, ``conv_up3``), and, as in Real-ESRGAN's
x2plus, 2 and 1 by pixel-unshuffling the input by 2 or 4 first (then the x4 trunk), which is why
the input H and W must then divide by 2 or 4 (``input_multiple``).

Parameter names follow BasicSR: ``conv_first``, ``body.N.rdb{1,2,3}.conv{1..5}``, ``conv_body``,
``conv_up1``, ``conv_up2`` (``conv_up3`` at ×8), ``conv_hr``, ``conv_last``. The original ESRGAN
layouts are converted by :mod:`sr_diffusion.checkpoints`.

Hidden features: ``forward(sample, output_hidden_states=True)`` also returns the trunk's feature maps, as
SRDiff's ``RRDBNet.forward(x, get_fea=True)`` (Li et al., Neurocomputing 2022, Sec. 3.3: the "LR encoder"):
the output of each of the ``num_block`` RRDBs, then the trunk output ``conv_first(x) + conv_body(...)``, i.e.
``num_block + 1`` maps of shape ``(N, num_feat, h / u, w / u)`` (``u`` the pixel-unshuffle factor: 1 at ×4, ×8).
:class:`~sr_diffusion.models.SRDiffUNet` conditions on every third of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .outputs import RegressionModelOutput, check_sample, conv_flops

__all__ = ["RRDBNet", "RRDBNetOutput"]

# pixel-unshuffle factor applied to the input for each native scale
_UNSHUFFLE = {1: 4, 2: 2, 4: 1, 8: 1}


@dataclass
class RRDBNetOutput(RegressionModelOutput):
    """:class:`RegressionModelOutput` plus the trunk's hidden features.

    Args:
        sample (`torch.Tensor` of shape `(N, C, h·scale, w·scale)`): the super-resolved image in [0, 1] (not
            clamped).
        hidden_states (`tuple` of `torch.Tensor`): ``num_block + 1`` maps ``(N, num_feat, h/u, w/u)``: the output
            of each RRDB, then the trunk output ``conv_first(x) + conv_body(body(...))`` (SRDiff's ``get_fea``).
    """

    hidden_states: tuple[torch.Tensor, ...] | None = None


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3×3 convs; ``x + 0.2 · conv5([x, x1..x4])``, shape-preserving."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        # ESRGAN's initialisation: Kaiming-normal scaled by 0.1 keeps the deep residual trunk stable
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            nn.init.kaiming_normal_(conv.weight)
            conv.weight.data.mul_(0.1)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = F.leaky_relu(self.conv1(x), 0.2, inplace=True)
        x2 = F.leaky_relu(self.conv2(torch.cat((x, x1), 1)), 0.2, inplace=True)
        x3 = F.leaky_relu(self.conv3(torch.cat((x, x1, x2), 1)), 0.2, inplace=True)
        x4 = F.leaky_relu(self.conv4(torch.cat((x, x1, x2, x3), 1)), 0.2, inplace=True)
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    """Residual in Residual Dense Block: three dense blocks, ``x + 0.2 · rdb3(rdb2(rdb1(x)))``."""

    def __init__(self, num_feat: int, num_grow_ch: int = 32):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(ModelMixin, ConfigMixin):
    r"""ESRGAN / Real-ESRGAN generator.

    Input ``(N, num_in_ch, h, w)`` in [0, 1] (h, w divisible by ``input_multiple``); output
    ``(N, num_out_ch, h·scale, w·scale)`` in [0, 1], not clamped.

    Args:
        num_in_ch / num_out_ch (`int`): image channels (3).
        scale (`int`): 1, 2, 4 or 8 (1 and 2 via pixel-unshuffle, as Real-ESRGAN x2plus).
        num_feat (`int`): trunk width (64).
        num_block (`int`): number of RRDBs (23 for ESRGAN / x4plus, 6 for the anime_6B model).
        num_grow_ch (`int`): growth channels of the dense blocks (32).
    """

    @register_to_config
    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        scale: int = 4,
        num_feat: int = 64,
        num_block: int = 23,
        num_grow_ch: int = 32,
    ):
        super().__init__()
        if scale not in _UNSHUFFLE:
            raise ValueError(f"RRDBNet supports scale 1, 2, 4 or 8, got {scale}")
        unshuffle = _UNSHUFFLE[scale]
        self.conv_first = nn.Conv2d(num_in_ch * unshuffle**2, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(num_feat, num_grow_ch) for _ in range(num_block)])
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        if scale == 8:
            self.conv_up3 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)

    @property
    def upscale(self) -> int:
        """The native scale factor."""
        return int(self.config.scale)

    @property
    def input_multiple(self) -> int:
        """H and W of the input must be divisible by this: 4 at scale 1, 2 at scale 2, else 1."""
        return _UNSHUFFLE[self.config.scale]

    def forward(
        self, sample: torch.Tensor, return_dict: bool = True, output_hidden_states: bool = False
    ) -> RegressionModelOutput | RRDBNetOutput | tuple:
        """``(N, C, h, w)`` in [0, 1] → ``(N, C, h·scale, w·scale)`` in [0, 1].

        With ``output_hidden_states`` the result is an :class:`RRDBNetOutput` (or ``(sample, hidden_states)``)
        that also holds the ``num_block + 1`` trunk features (see the module docstring); the image is the same.
        """
        unshuffle = _UNSHUFFLE[self.config.scale]
        check_sample(sample, unshuffle, "RRDBNet")
        feat = F.pixel_unshuffle(sample, unshuffle) if unshuffle > 1 else sample
        feat = self.conv_first(feat)
        if output_hidden_states:
            hidden_states = []
            trunk = feat
            for block in self.body:
                trunk = block(trunk)
                hidden_states.append(trunk)
            feat = feat + self.conv_body(trunk)
            hidden_states.append(feat)
        else:
            feat = feat + self.conv_body(self.body(feat))
        ups = [self.conv_up1, self.conv_up2] + ([self.conv_up3] if self.config.scale == 8 else [])
        for conv in ups:
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2, inplace=True)
        out = self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2, inplace=True))
        if output_hidden_states:
            if not return_dict:
                return (out, tuple(hidden_states))
            return RRDBNetOutput(sample=out, hidden_states=tuple(hidden_states))
        if not return_dict:
            return (out,)
        return RegressionModelOutput(sample=out)

    def flops(self, height: int, width: int) -> int:
        """Convolution FLOPs (2 × multiply-adds) of one forward pass on a ``height × width`` LR image."""
        c = self.config
        unshuffle = _UNSHUFFLE[c.scale]
        h, w = height // unshuffle, width // unshuffle
        f, g = c.num_feat, c.num_grow_ch
        flops = conv_flops(c.num_in_ch * unshuffle**2, f, 3, h, w)
        rdb = sum(conv_flops(f + i * g, g, 3, h, w) for i in range(4)) + conv_flops(f + 4 * g, f, 3, h, w)
        flops += 3 * c.num_block * rdb
        flops += conv_flops(f, f, 3, h, w)  # conv_body
        for _ in range(3 if c.scale == 8 else 2):
            h, w = 2 * h, 2 * w
            flops += conv_flops(f, f, 3, h, w)
        flops += conv_flops(f, f, 3, h, w) + conv_flops(f, c.num_out_ch, 3, h, w)  # conv_hr, conv_last
        return flops
