"""The SR3 denoiser of the widely used re-implementation (Janspiry, "Image-Super-Resolution-via-Iterative-Refinement",
``model/sr3_modules/unet.py``), with its parameter names, so that its ``I..._E.._gen.pth`` checkpoints load.

Written from a reading of that code (facts only). A DDPM-style UNet (Ho et al. 2020) conditioned on the continuous
noise level ``gamma = sqrt(alpha_bar)`` of SR3 (Saharia et al., TPAMI 2022, Sec. 2.4) the way WaveGrad does (Chen et
al. 2021, Sec. 3):

* the noise level goes through a sinusoidal encoding ``[sin(gamma f_k), cos(gamma f_k)]`` with
  ``f_k = 10000^(-k / (C/2))``, ``k = 0 … C/2 - 1`` (sines first; ``C = inner_channel``, ``gamma`` itself, not a
  scaled step index), then ``Linear(C, 4C) → Swish → Linear(4C, C)``: the embedding is only ``C`` wide;
* every residual block adds ``Linear(C, width)(emb)`` to its features after the first conv (FiLM without a
  nonlinearity on the embedding; with ``use_affine_level`` it applies ``(1 + scale) h + shift`` instead);
* residual blocks are ``[GroupNorm, Swish, (Dropout), Conv3x3]`` twice (dropout in the second only) plus a 1×1
  skip conv where the width changes; a level's blocks all carry single-head self-attention when the level's
  resolution (``image_size / 2^level``) is in ``attn_res``; the middle has an attention block then a plain one;
* the encoder keeps every feature map (the input conv's, every block's, every strided-conv downsampler's); each
  decoder level has ``res_blocks + 1`` blocks, each fed ``cat([h, skip])`` (the current features first), and a
  nearest-×2 + conv upsampler between levels; the output is one more ``[GroupNorm, Swish, Conv3x3]`` block.

Module tree (the checkpoint's key prefixes): ``noise_level_mlp.{1,3}`` (the two Linears), ``downs.0`` (input conv),
``downs.i.res_block.{noise_func.noise_func.0, block1.block.{0,3}, block2.block.{0,3}, res_conv}``,
``downs.i.attn.{norm, qkv, out}``, ``downs.i.conv`` (downsampler), ``mid.{0,1}``, ``ups.i.*`` (blocks as ``downs``,
upsamplers ``ups.i.conv``), ``final_conv.block.{0,3}``.

Differences from the original code, none of which changes the outputs of its checkpoints:

* ``attn_res`` may be an int (the original's default ``(8)`` is an int, which its constructor cannot use);
* the noise-level encoding is computed in float32 and cast to the weights' dtype (the original uses the input's);
* ``with_noise_level_emb=False`` builds a model without the noise-level path at all (the original cannot build it:
  its blocks then ask for ``Linear(None, ·)``); the timestep is ignored;
* ``use_affine_level`` is a constructor argument (the original's ``FeatureWiseAffine`` has it, but its UNet never
  turns it on).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn

__all__ = ["SR3UNet", "SR3UNetOutput", "noise_level_encoding"]


@dataclass
class SR3UNetOutput(BaseOutput):
    """Output of :class:`SR3UNet`.

    Args:
        sample (`torch.Tensor` of shape `(N, out_channel, H, W)`):
            The predicted noise ``eps`` (for SR3's objective).
    """

    sample: torch.Tensor


# ----------------------------------------------------------------------------------------------------------------------
# building blocks (attribute names are the original's: they are the checkpoint keys)
# ----------------------------------------------------------------------------------------------------------------------


def noise_level_encoding(noise_level: torch.Tensor, dim: int) -> torch.Tensor:
    """WaveGrad's encoding of a continuous noise level: ``(N,)`` → ``(N, 2·(dim // 2))`` float32,
    ``[sin(gamma f_k), cos(gamma f_k)]`` with ``f_k = 10000^(-k / (dim // 2))``."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=noise_level.device, dtype=torch.float32) * (-math.log(1e4) / half))
    angles = noise_level.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class NoiseLevelEncoding(nn.Module):
    """:func:`noise_level_encoding` as a module (the first entry of ``noise_level_mlp``; no parameters)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, noise_level: torch.Tensor) -> torch.Tensor:
        return noise_level_encoding(noise_level, self.dim)


class ConvBlock(nn.Module):
    """``block = [GroupNorm, Swish, Dropout (or Identity), Conv3x3]`` (the original's ``Block``)."""

    def __init__(self, channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Dropout(dropout) if dropout else nn.Identity(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class NoiseLevelAffine(nn.Module):
    """Adds ``Linear(emb)`` per channel, or applies ``(1 + scale) x + shift`` with ``use_affine_level`` (the
    original's ``FeatureWiseAffine``; its ``Linear`` sits in ``noise_func.0``)."""

    def __init__(self, emb_channels: int, channels: int, use_affine_level: bool = False):
        super().__init__()
        self.use_affine_level = use_affine_level
        self.noise_func = nn.Sequential(nn.Linear(emb_channels, channels * (2 if use_affine_level else 1)))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        film = self.noise_func(emb)[:, :, None, None]
        if self.use_affine_level:
            scale, shift = film.chunk(2, dim=1)
            return x * (1 + scale) + shift
        return x + film


class ResnetBlock(nn.Module):
    """``block2(block1(x) ⊕ emb) + res_conv(x)`` (``⊕``: :class:`NoiseLevelAffine`, absent without an embedding)."""

    def __init__(
        self,
        channels: int,
        out_channels: int,
        emb_channels: int | None,
        groups: int,
        dropout: float,
        use_affine_level: bool,
    ):
        super().__init__()
        if emb_channels is not None:
            self.noise_func = NoiseLevelAffine(emb_channels, out_channels, use_affine_level)
        self.block1 = ConvBlock(channels, out_channels, groups)
        self.block2 = ConvBlock(out_channels, out_channels, groups, dropout)
        self.res_conv = nn.Conv2d(channels, out_channels, 1) if channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        h = self.block1(x)
        if emb is not None:
            h = self.noise_func(h, emb)
        return self.block2(h) + self.res_conv(x)


class SelfAttention(nn.Module):
    """Single-head self-attention over all positions, residual: ``x + out(softmax(q k^T / sqrt(C)) v)`` with
    ``q, k, v`` the thirds of a bias-free 1×1 ``qkv`` conv of ``GroupNorm(x)``."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, channels * 3, 1, bias=False)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, c, h * w).transpose(-1, -2).unbind(dim=1)  # (N, HW, C) each
        attended = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        return x + self.out(attended.transpose(-1, -2).reshape(n, c, h, w))


class ResnetBlocWithAttn(nn.Module):
    """A :class:`ResnetBlock` (``res_block``), then :class:`SelfAttention` (``attn``) when ``with_attn``."""

    def __init__(
        self,
        channels: int,
        out_channels: int,
        emb_channels: int | None,
        groups: int,
        dropout: float,
        use_affine_level: bool,
        with_attn: bool,
    ):
        super().__init__()
        self.res_block = ResnetBlock(channels, out_channels, emb_channels, groups, dropout, use_affine_level)
        self.attn = SelfAttention(out_channels, groups) if with_attn else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        x = self.res_block(x, emb)
        return x if self.attn is None else self.attn(x)


class Downsample(nn.Module):
    """Stride-2 3×3 conv (``conv``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest ×2, then a 3×3 conv (``conv``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ----------------------------------------------------------------------------------------------------------------------
# the UNet
# ----------------------------------------------------------------------------------------------------------------------


class SR3UNet(ModelMixin, ConfigMixin):
    r"""The re-implementation's SR3 UNet ``eps_theta(cat([x, y_t]), gamma)``, with its parameter names.

    ``forward(sample, timestep)``: ``sample`` is ``cat([x, y_t], dim=1)`` ``(N, in_channel, H, W)`` (the upsampled
    LR image, then the noisy image, both in [-1, 1]); ``timestep`` is the *continuous noise level*
    ``gamma = sqrt(alpha_bar)`` in [0, 1] (``(N,)``, ``(N, 1)`` as the original passes it, or a scalar), exactly what
    the original feeds, not a step index. Returns the predicted noise ``(N, out_channel, H, W)``. H and W must be
    multiples of :attr:`input_multiple` (``2^(levels - 1)``). With :class:`~sr_diffusion.pipelines.SR3Pipeline` use
    ``noise_level_scale=1.0`` for the re-implementation's weights.

    The defaults are the released 16→128 face model (``config/sr_sr3_16_128.json``; its ``norm_groups`` is the
    code's default 32). The 64→512 model (``sr_sr3_64_512.json``) has ``norm_groups=16, channel_mults=(1, 2, 4, 8,
    16), attn_res=(), res_blocks=1, dropout=0, image_size=512``. The original class's own defaults differ:
    ``inner_channel=32, attn_res=8, res_blocks=3, dropout=0``.

    Args:
        in_channel (`int`): input channels (6: the upsampled LR image and ``y_t``).
        out_channel (`int`): output channels (3).
        inner_channel (`int`): base width ``C`` (even); also the width of the noise-level embedding.
        norm_groups (`int`): groups of every GroupNorm (not stored in checkpoints: it must be the training value).
        channel_mults (`Sequence[int]`): width multiplier of each level.
        attn_res (`Sequence[int]` or `int`): resolutions (``image_size / 2^level``) whose blocks get self-attention.
        res_blocks (`int`): residual blocks per encoder level (the decoder has one more).
        dropout (`float`): dropout before the second conv of every residual block (training only).
        with_noise_level_emb (`bool`): condition on the noise level (see the module docstring for ``False``).
        image_size (`int`): training HR size; only used with ``attn_res`` to place the attention levels.
        use_affine_level (`bool`): scale-and-shift noise conditioning instead of a shift.
    """

    @register_to_config
    def __init__(
        self,
        in_channel: int = 6,
        out_channel: int = 3,
        inner_channel: int = 64,
        norm_groups: int = 32,
        channel_mults: Sequence[int] = (1, 2, 4, 8, 8),
        attn_res: Sequence[int] | int = (16,),
        res_blocks: int = 2,
        dropout: float = 0.2,
        with_noise_level_emb: bool = True,
        image_size: int = 128,
        use_affine_level: bool = False,
    ):
        super().__init__()
        if not channel_mults:
            raise ValueError("channel_mults must not be empty")
        if with_noise_level_emb and inner_channel % 2:
            raise ValueError(f"inner_channel must be even (the noise-level encoding is sin/cos pairs): {inner_channel}")
        attn_levels = {attn_res} if isinstance(attn_res, int) else set(attn_res)
        widths = [inner_channel * mult for mult in channel_mults]
        for width in {inner_channel, *widths}:
            if width % norm_groups:
                raise ValueError(f"norm_groups={norm_groups} does not divide the block width {width}")
        emb = inner_channel if with_noise_level_emb else None

        # 1. noise level gamma -> (N, C) embedding
        if with_noise_level_emb:
            self.noise_level_mlp = nn.Sequential(
                NoiseLevelEncoding(inner_channel),
                nn.Linear(inner_channel, inner_channel * 4),
                nn.SiLU(),
                nn.Linear(inner_channel * 4, inner_channel),
            )
        else:
            self.noise_level_mlp = None

        def block(channels: int, out_channels: int, with_attn: bool) -> ResnetBlocWithAttn:
            return ResnetBlocWithAttn(channels, out_channels, emb, norm_groups, dropout, use_affine_level, with_attn)

        # 2. encoder: every module's output is a skip
        downs: list[nn.Module] = [nn.Conv2d(in_channel, inner_channel, 3, padding=1)]
        skips = [inner_channel]
        ch = inner_channel
        for level, width in enumerate(widths):
            with_attn = image_size // 2**level in attn_levels
            for _ in range(res_blocks):
                downs.append(block(ch, width, with_attn))
                ch = width
                skips.append(ch)
            if level < len(widths) - 1:
                downs.append(Downsample(ch))
                skips.append(ch)
        self.downs = nn.ModuleList(downs)

        # 3. middle
        self.mid = nn.ModuleList([block(ch, ch, True), block(ch, ch, False)])

        # 4. decoder: res_blocks + 1 blocks per level, each on cat([h, skip])
        ups: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            with_attn = image_size // 2**level in attn_levels
            for _ in range(res_blocks + 1):
                ups.append(block(ch + skips.pop(), widths[level], with_attn))
                ch = widths[level]
            if level:
                ups.append(Upsample(ch))
        self.ups = nn.ModuleList(ups)

        # 5. output
        self.final_conv = ConvBlock(ch, out_channel, norm_groups)

    @property
    def input_multiple(self) -> int:
        """H and W of ``sample`` must be multiples of this (every level halves exactly)."""
        return 2 ** (len(self.config.channel_mults) - 1)

    def _noise_embedding(self, timestep: torch.Tensor | float, n: int, device: torch.device) -> torch.Tensor | None:
        if self.noise_level_mlp is None:
            return None
        level = torch.as_tensor(timestep, device=device)
        if level.ndim == 2 and level.shape[1] == 1:  # (N, 1), as the original passes it
            level = level[:, 0]
        if level.ndim == 0:
            level = level.expand(n)
        if level.shape != (n,):
            raise ValueError(
                f"timestep (the noise level) must be a scalar, (N,) or (N, 1) with N={n}, got {tuple(level.shape)}"
            )
        encoding = self.noise_level_mlp[0](level)
        return self.noise_level_mlp[1:](encoding.to(self.noise_level_mlp[1].weight.dtype))

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | float, return_dict: bool = True
    ) -> SR3UNetOutput | tuple:
        """Predict the noise.

        Args:
            sample: ``cat([x, y_t])`` ``(N, in_channel, H, W)``, H and W multiples of :attr:`input_multiple`.
            timestep: the noise level ``gamma = sqrt(alpha_bar)``: a scalar, ``(N,)`` or ``(N, 1)``.
            return_dict: return an :class:`SR3UNetOutput` rather than a tuple.

        Returns:
            ``eps`` ``(N, out_channel, H, W)`` in an :class:`SR3UNetOutput` (or a 1-tuple).
        """
        if not isinstance(sample, torch.Tensor) or sample.ndim != 4 or not sample.is_floating_point():
            got = (tuple(sample.shape), sample.dtype) if isinstance(sample, torch.Tensor) else type(sample).__name__
            raise ValueError(f"SR3UNet expects a floating (N, C, H, W) sample, got {got}")
        n, channels, height, width = sample.shape
        if channels != self.config.in_channel:
            raise ValueError(f"sample has {channels} channels, the model expects in_channel={self.config.in_channel}")
        multiple = self.input_multiple
        if height % multiple or width % multiple:
            raise ValueError(
                f"SR3UNet needs H and W divisible by {multiple} (its input_multiple), got {height}x{width}; "
                "pad the input first"
            )
        emb = self._noise_embedding(timestep, n, sample.device)

        h = sample
        skips = []
        for module in self.downs:
            h = module(h, emb) if isinstance(module, ResnetBlocWithAttn) else module(h)
            skips.append(h)
        for module in self.mid:
            h = module(h, emb)
        for module in self.ups:
            if isinstance(module, ResnetBlocWithAttn):
                h = module(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = module(h)
        out = self.final_conv(h)

        if not return_dict:
            return (out,)
        return SR3UNetOutput(sample=out)
