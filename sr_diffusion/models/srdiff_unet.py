"""SRDiff's conditional noise predictor: a small attention-free UNet conditioned on RRDB features of the LR image.

Paper: H. Li, Y. Yang, M. Chang, S. Chen, H. Feng, Z. Xu, Q. Li, Y. Chen, "SRDiff: Single image super-resolution with
diffusion probabilistic models", Neurocomputing 479 (2022) 47-59, Sec. 3 (Fig. 3: the conditional noise predictor),
and the authors' code (``LeiaLi/SRDiff``: ``models/diffsr_modules.py``, ``Unet``; ``models/commons.py``; facts and
names only). Notation of the paper:

- ``x_t``: the noisy *residual* image at step ``t`` (SRDiff diffuses ``x_r = (x_H - up(x_L)) · res_rescale``, not
  the HR image), ``(N, 3, H, W)`` with ``H = sr_scale · h``;
- ``x_e``: the LR encoder's hidden features (an RRDBNet trunk run on the LR image ``x_L``, ``(N, 3, h, w)``);
- ``eps_theta(x_t, t, x_e)``: this network, predicting the noise ``(N, 3, H, W)``.

Structure (``dim`` = the original's ``hidden_size``, ``dims = [3, dim·m for m in dim_mults]``):

- time: sinusoidal embedding of ``t`` (``dim`` channels, ``log(10000) / (dim/2 - 1)`` frequency step) → ``mlp``
  (Linear ``dim → 4·dim``, Mish, Linear ``4·dim → dim``);
- condition: every third RRDB feature map (``cond_features[2::3]``: blocks 3, 6, ... and, for ``num_block ≡ 2
  (mod 3)``, the trunk output), concatenated, ``(N, cond_dim · ⌊(rrdb_num_block + 1) / 3⌋, h, w)``, projected to the
  HR size by ``cond_proj`` (a transposed conv, kernel ``2s``, stride ``s``, padding ``s/2``) → ``(N, dim, H, W)`` and
  *added* after the first level's two ResnetBlocks (with ``up_input``, ``up_proj(up(x_L))`` too);
- ``downs``: per level two ResnetBlocks (``block1``: reflect-pad + 3×3 conv + Mish; the time embedding added;
  ``block2`` likewise; a 1×1 ``res_conv`` skip when the width changes; no normalisation) and a stride-2 conv
  (reflect-padded) except at the last level; ``mid_block1``, an optional residual, ReZero-gated linear attention
  (``mid_attn``, 4 heads of 32), ``mid_block2``; ``ups``: per level but the first, concatenation with the skip,
  two ResnetBlocks and a ×2 transposed conv; ``final_conv``: Block + 1×1 conv to ``out_dim``.

The parameter names and shapes are the original's (``cond_proj``, ``mlp.0``, ``downs.0.0.block1.block.1``,
``mid_attn.fn.fn.to_qkv``, ``ups.0.2.conv.0``, ``final_conv.1``, ``up_proj.1``, ...), so the ``denoise_fn.*`` weights
of a released checkpoint load after stripping that prefix (:mod:`sr_diffusion.conversion.srdiff`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn

__all__ = ["SRDiffUNet", "SRDiffUNetOutput", "srdiff_num_cond_features", "srdiff_timestep_embedding"]


@dataclass
class SRDiffUNetOutput(BaseOutput):
    """Output of :class:`SRDiffUNet`.

    Args:
        sample (`torch.Tensor` of shape `(N, out_dim, H, W)`): the predicted noise ``eps_theta(x_t, t, x_e)``.
    """

    sample: torch.Tensor


def srdiff_num_cond_features(rrdb_num_block: int) -> int:
    """How many RRDB feature maps the UNet uses: ``len(range(2, num_block + 1, 3)) = ⌊(num_block + 1) / 3⌋``."""
    return (int(rrdb_num_block) + 1) // 3


def srdiff_timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """The original's sinusoidal embedding: ``[sin(t·f_k), cos(t·f_k)]``, ``f_k = exp(-k · log(10000) / (dim/2 - 1))``
    for ``k < dim/2``. ``timesteps`` ``(N,)`` (integer or fractional steps) → ``(N, dim)`` float32."""
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, device=timesteps.device, dtype=torch.float32) * -step)
    angles = timesteps.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks (attribute names are the original's: they are the state-dict keys)
# ----------------------------------------------------------------------------------------------------------------------


class ConvMish(nn.Module):
    """``block``: reflect-pad 1, 3×3 conv, Mish (the original ``Block`` with ``groups=0``: no normalisation)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(in_channels, out_channels, 3), nn.Mish())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class TimeResnetBlock(nn.Module):
    """``h = block1(x) + mlp(t_emb)``, ``block2(h) + res_conv(x)``; ``(N, C_in, H, W) → (N, C_out, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int, time_emb_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, out_channels))
        self.block1 = ConvMish(in_channels, out_channels)
        self.block2 = ConvMish(out_channels, out_channels)
        self.res_conv = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x) + self.mlp(time_emb)[:, :, None, None]
        return self.block2(h) + self.res_conv(x)


class Downsample(nn.Module):
    """Reflect-pad 1 and a 3×3 stride-2 conv: ``(N, C, H, W) → (N, C, ⌈H/2⌉, ⌈W/2⌉)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """A 4×4 stride-2 transposed conv: ``(N, C, H, W) → (N, C, 2H, 2W)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(nn.ConvTranspose2d(channels, channels, 4, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class LinearAttention(nn.Module):
    """Linear attention (Shen et al.): keys softmaxed over positions, ``context = k vᵀ`` per head, ``out = contextᵀ q``;
    no query softmax and no scaling, as the original. ``(N, C, H, W) → (N, C, H, W)``."""

    def __init__(self, channels: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.heads = heads
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(channels, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        # channels are laid out (qkv, heads, dim_head)
        q, k, v = self.to_qkv(x).reshape(n, 3, self.heads, -1, h * w).unbind(dim=1)
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(n, -1, h, w))


class Rezero(nn.Module):
    """``fn(x) · g`` with a learned scalar gate ``g`` initialised to 0 (Bachlechner et al., ReZero)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn
        self.g = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) * self.g


class Residual(nn.Module):
    """``fn(x) + x``."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


# ----------------------------------------------------------------------------------------------------------------------
# The UNet
# ----------------------------------------------------------------------------------------------------------------------


class SRDiffUNet(ModelMixin, ConfigMixin):
    r"""SRDiff's conditional noise predictor ``eps_theta(x_t, t, x_e)`` (the original ``Unet``; module docstring).

    Args:
        dim (`int`): base width (the original's ``hidden_size``; 64 in both released models).
        dim_mults (`tuple[int]`): width multipliers per level (``unet_dim_mults``: ``(1, 2, 2, 4)`` by default,
            ``(1, 2, 3, 4)`` for DIV2K); the first must be 1 (the condition is added at width ``dim``).
        out_dim (`int`): output channels (3).
        cond_dim (`int`): width of the RRDB features (``rrdb_num_feat``, 32).
        rrdb_num_block (`int`): number of RRDBs of the LR encoder (8); the UNet uses ``⌊(n + 1) / 3⌋`` of its
            ``n + 1`` feature maps.
        sr_scale (`int`): the SR factor ``s`` (even: ``cond_proj`` maps ``h`` to exactly ``s·h``).
        use_attn (`bool`): the middle linear attention (``use_attn``, off in the released configs).
        up_input (`bool`): also add ``up_proj(up(x_L))`` at the first level (``up_input``, off by default).

    The input's H and W must be multiples of :attr:`input_multiple` (``2^(levels - 1)``) and equal ``sr_scale`` ×
    the feature maps' size.
    """

    @register_to_config
    def __init__(
        self,
        dim: int = 64,
        dim_mults: Sequence[int] = (1, 2, 2, 4),
        out_dim: int = 3,
        cond_dim: int = 32,
        rrdb_num_block: int = 8,
        sr_scale: int = 4,
        use_attn: bool = False,
        up_input: bool = False,
    ):
        super().__init__()
        dim_mults = tuple(int(m) for m in dim_mults)
        if not dim_mults or dim_mults[0] != 1 or min(dim_mults) < 1:
            raise ValueError(
                f"dim_mults must be positive and start with 1 (the condition is added at width dim), got "
                f"{list(dim_mults)}"
            )
        if dim < 4 or dim % 2:
            raise ValueError(f"dim must be an even number >= 4 (the sinusoidal embedding), got {dim}")
        if sr_scale < 2 or sr_scale % 2:
            raise ValueError(f"sr_scale must be even (cond_proj has kernel 2s, stride s, padding s/2), got {sr_scale}")
        num_cond = srdiff_num_cond_features(rrdb_num_block)
        if num_cond < 1:
            raise ValueError(f"rrdb_num_block must be >= 2 (the UNet uses features[2::3]), got {rrdb_num_block}")
        dims = [3, *(dim * m for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))

        self.cond_proj = nn.ConvTranspose2d(cond_dim * num_cond, dim, sr_scale * 2, sr_scale, sr_scale // 2)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 4), nn.Mish(), nn.Linear(dim * 4, dim))

        self.downs = nn.ModuleList()
        for level, (c_in, c_out) in enumerate(in_out):
            last = level == len(in_out) - 1
            self.downs.append(
                nn.ModuleList(
                    [
                        TimeResnetBlock(c_in, c_out, dim),
                        TimeResnetBlock(c_out, c_out, dim),
                        nn.Identity() if last else Downsample(c_out),
                    ]
                )
            )
        mid = dims[-1]
        self.mid_block1 = TimeResnetBlock(mid, mid, dim)
        if use_attn:
            self.mid_attn = Residual(Rezero(LinearAttention(mid)))
        self.mid_block2 = TimeResnetBlock(mid, mid, dim)
        self.ups = nn.ModuleList()
        for c_in, c_out in reversed(in_out[1:]):
            self.ups.append(
                nn.ModuleList([TimeResnetBlock(c_out * 2, c_in, dim), TimeResnetBlock(c_in, c_in, dim), Upsample(c_in)])
            )
        self.final_conv = nn.Sequential(ConvMish(dim, dim), nn.Conv2d(dim, out_dim, 1))
        if up_input:
            self.up_proj = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(3, dim, 3))

    @property
    def input_multiple(self) -> int:
        """H and W of ``x_t`` must be multiples of this: ``2^(len(dim_mults) - 1)``."""
        return 2 ** (len(self.config.dim_mults) - 1)

    @property
    def num_cond_features(self) -> int:
        """How many of the RRDB's ``rrdb_num_block + 1`` feature maps the UNet uses (every third, from the third)."""
        return srdiff_num_cond_features(self.config.rrdb_num_block)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        cond_features: Sequence[torch.Tensor],
        img_lr_up: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SRDiffUNetOutput | tuple:
        r"""``eps_theta(x_t, t, x_e)``.

        Args:
            sample: ``x_t``, the noisy residual ``(N, 3, H, W)``, H and W multiples of :attr:`input_multiple`.
            timestep: ``t``: a number or ``(N,)`` tensor (integer steps ``0..T-1`` as in training; fractional steps
                work too).
            cond_features: the LR encoder's ``rrdb_num_block + 1`` maps ``(N, cond_dim, H/s, W/s)``
                (``RRDBNet(..., output_hidden_states=True).hidden_states``); every third, from the third, is used.
            img_lr_up: ``up(x_L)`` ``(N, 3, H, W)`` in [-1, 1]; needed only with ``up_input``.
            return_dict: return a :class:`SRDiffUNetOutput` rather than a tuple.

        Returns:
            The predicted noise ``(N, out_dim, H, W)``.
        """
        c = self.config
        n, _, height, width = sample.shape
        m = self.input_multiple
        if height % m or width % m:
            raise ValueError(f"SRDiffUNet needs H and W divisible by {m} (its input_multiple), got {height}x{width}")
        if len(cond_features) != c.rrdb_num_block + 1:
            raise ValueError(
                f"cond_features must hold the rrdb_num_block + 1 = {c.rrdb_num_block + 1} RRDB feature maps, got "
                f"{len(cond_features)}"
            )
        if c.up_input and img_lr_up is None:
            raise ValueError("this SRDiffUNet has up_input=True: pass img_lr_up, the upsampled LR image")
        t = torch.as_tensor(timestep, device=sample.device)
        if t.ndim == 0:
            t = t.expand(n)
        emb = self.mlp(srdiff_timestep_embedding(t, c.dim).to(sample.dtype))
        cond = self.cond_proj(torch.cat(list(cond_features[2::3]), dim=1).to(sample.dtype))
        if cond.shape[-2:] != (height, width):
            raise ValueError(
                f"the RRDB features project to {tuple(cond.shape[-2:])}, but x_t is {height}x{width}: the features "
                f"must be sr_scale={c.sr_scale} times smaller than x_t"
            )

        x = sample
        skips = []
        for level, (block1, block2, downsample) in enumerate(self.downs):
            x = block2(block1(x, emb), emb)
            if level == 0:
                x = x + cond
                if c.up_input:
                    x = x + self.up_proj(img_lr_up.to(x.dtype))
            skips.append(x)
            x = downsample(x)

        x = self.mid_block1(x, emb)
        if c.use_attn:
            x = self.mid_attn(x)
        x = self.mid_block2(x, emb)

        for block1, block2, upsample in self.ups:
            x = torch.cat([x, skips.pop()], dim=1)
            x = upsample(block2(block1(x, emb), emb))

        out = self.final_conv(x)
        if not return_dict:
            return (out,)
        return SRDiffUNetOutput(sample=out)
