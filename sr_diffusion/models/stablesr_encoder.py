"""StableSR's time-aware encoder: the LR latent and the timestep in, one condition map per UNet level out.

Paper: J. Wang, Z. Yue, S. Zhou, K. C. K. Chan, C. C. Loy, "Exploiting Diffusion Prior for Real-World Image
Super-Resolution", IJCV 2024 (arXiv:2305.07015), Sec. 3.1 ("time-aware encoder") and Fig. 2. In the released code it
is ``EncoderUNetModelWT`` (``structcond_stage_model`` of ``LatentDiffusionSRTextWT``; facts only):

- the encoder half of an ADM UNet (Dhariwal & Nichol 2021) with a sinusoidal timestep embedding → MLP: a 3×3
  ``conv_in``, per level ``num_res_blocks`` residual blocks (``h = GN(conv(SiLU(GN(x))) + Linear(SiLU(emb)))``, then
  ``skip(x) + conv(SiLU(h))``), self-attention blocks at the downsampling rates in ``attention_resolutions``, and a
  stride-2 conv between levels; a middle block ``ResBlock → attention → ResBlock``;
- the feature map of every level just before it is downsampled, and the middle block's output, each go through one
  more residual block (``fea_tran.i``) that maps it to ``out_channels``: ``len(channel_mult)`` maps in all,
  ``(N, out_channels, H / 2^l, W / 2^l)`` for level ``l``, which the SFT layers of the denoiser
  (:mod:`sr_diffusion.models.stablesr_sft`) read at the resolution of each of its residual blocks;
- it is fed the *LR latent* (the VAE encoding of the LR image bicubic-upsampled to the output size, times the VAE's
  scaling factor) and the same timestep as the denoiser, in the 1000-step scale (``t_ori``).

Released configuration (``configs/stableSRNew/v2-finetune_text_T_512.yaml``, ``structcond_stage_config``): the
defaults of :class:`StableSRTimeAwareEncoder`, ``in_channels=4, model_channels=256, out_channels=256,
num_res_blocks=2, attention_resolutions=(4, 2, 1), channel_mult=(1, 1, 2, 2), num_heads=4``.

Parameter names are those of ``EncoderUNetModelWT`` (``time_embed.{0,2}``, ``input_blocks.i.j.*``,
``middle_block.{0,1,2}.*``, ``fea_tran.i.*``; residual blocks ``in_layers.{0,2}``, ``emb_layers.1``,
``out_layers.{0,3}``, ``skip_connection``; attention ``norm``, ``qkv``, ``proj_out`` as 1-D convs), so the released
weights load after stripping the ``structcond_stage_model.`` prefix. GroupNorms are computed in float32, 32 groups
(every width must be a multiple of 32; the original falls back to one group per channel in its residual blocks'
second norm otherwise, which no released model uses).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn

from .resshift_unet import Downsample, GroupNorm32, ResBlock, TimestepEmbedSequential, timestep_embedding

__all__ = ["StableSRAttentionBlock", "StableSRTimeAwareEncoder", "StableSRTimeAwareEncoderOutput"]


@dataclass
class StableSRTimeAwareEncoderOutput(BaseOutput):
    """Output of :class:`StableSRTimeAwareEncoder`.

    Args:
        features (`tuple` of `torch.Tensor`): one condition map per level ``l = 0 … L-1`` (``L = len(channel_mult)``),
            ``(N, out_channels, H_l, W_l)`` with ``H_l`` the input height after ``l`` stride-2 convolutions.
    """

    features: tuple[torch.Tensor, ...]


class StableSRAttentionBlock(nn.Module):
    """ADM self-attention over all positions, ``(N, C, H, W)`` → same: ``x + proj_out(attn(qkv(GN(x))))``.

    ``qkv`` and ``proj_out`` are 1×1 1-D convolutions (``proj_out`` zero-initialised). The legacy head order (the
    original's default, ``use_new_attention_order=False``) splits the ``3C`` channels into heads first, then each head
    into q, k, v; the new order splits q, k, v first.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, new_order: bool = False):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels are not divisible by num_head_channels={num_head_channels}")
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"{channels} channels are not divisible by {self.num_heads} heads")
        self.new_order = new_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        heads, length = self.num_heads, x.shape[-1]
        ch = c // heads
        if self.new_order:
            q, k, v = (t.reshape(b * heads, ch, length) for t in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
        # (B·heads, T, ch); scaled dot product with 1/sqrt(ch), as the original's (q·s)·(k·s), s = ch^(-1/4)
        h = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = h.transpose(1, 2).reshape(b, c, length)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class StableSRTimeAwareEncoder(ModelMixin, ConfigMixin):
    r"""StableSR's time-aware encoder (``EncoderUNetModelWT``); see the module docstring.

    Args:
        in_channels: channels of the LR latent (4 for Stable Diffusion's VAE).
        model_channels: width of level 0; the timestep embedding has ``4 · model_channels`` channels.
        out_channels: channels of every condition map (``semb_channels`` of the SFT layers).
        num_res_blocks: residual blocks per level.
        attention_resolutions: downsampling rates ``2^l`` whose levels get self-attention after each residual block.
        dropout: dropout inside the residual blocks.
        channel_mult: level ``l`` has ``channel_mult[l] · model_channels`` channels; ``len(channel_mult)`` levels
            (must equal the denoiser's number of levels).
        conv_resample: stride-2 conv (True) or 2×2 average pooling between levels.
        num_heads / num_head_channels: attention heads (``num_head_channels=-1``: use ``num_heads``).
        use_scale_shift_norm: FiLM-style timestep conditioning in the residual blocks.
        resblock_updown: downsample with a residual block instead of a conv.
        use_new_attention_order: split q, k, v before heads (see :class:`StableSRAttentionBlock`).
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        model_channels: int = 256,
        out_channels: int = 256,
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (4, 2, 1),
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 1, 2, 2),
        conv_resample: bool = True,
        num_heads: int = 4,
        num_head_channels: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        widths = [model_channels * m for m in channel_mult] + [out_channels]
        if any(w % 32 for w in widths):
            raise ValueError(f"every width must be a multiple of 32 (GroupNorm with 32 groups), got {widths}")
        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res(ch_in: int, ch_out: int, down: bool = False) -> ResBlock:
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm=use_scale_shift_norm, down=down)

        def attn(ch: int) -> StableSRAttentionBlock:
            return StableSRAttentionBlock(ch, num_heads, num_head_channels, use_new_attention_order)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        self._downsample_blocks: list[int] = []  # indices of the input blocks that halve H and W
        level_channels = []  # width of each level's feature map before it is downsampled (and of the middle block)
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self._downsample_blocks.append(len(self.input_blocks))
                self.input_blocks.append(TimestepEmbedSequential(down))
                level_channels.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch), res(ch, ch))
        level_channels.append(ch)
        self.fea_tran = nn.ModuleList([res(c, out_channels) for c in level_channels])

    @property
    def num_levels(self) -> int:
        """``L``: the number of condition maps (levels)."""
        return len(self.config.channel_mult)

    @property
    def input_multiple(self) -> int:
        """H and W of the input should be multiples of this (``2^(L-1)``) for the maps to halve exactly."""
        return 2 ** (self.num_levels - 1)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | float | int, return_dict: bool = True
    ) -> StableSRTimeAwareEncoderOutput | tuple:
        """The condition maps of an LR latent.

        Args:
            sample: the LR latent ``(N, in_channels, H, W)`` (VAE latent times its scaling factor).
            timestep: the denoiser's timestep in the 1000-step scale, a scalar or ``(N,)``.
            return_dict: return a :class:`StableSRTimeAwareEncoderOutput` rather than ``(features,)``.

        Returns:
            ``L`` maps ``(N, out_channels, H_l, W_l)``, level 0 (full size) first.
        """
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"StableSRTimeAwareEncoder expects (N, {self.config.in_channels}, H, W) latents, got "
                f"{tuple(sample.shape)}"
            )
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(sample.shape[0])
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))

        maps = []
        h = sample.to(dtype)
        for i, block in enumerate(self.input_blocks):
            if i in self._downsample_blocks:
                maps.append(h)  # the level's last feature map, before it is downsampled
            h = block(h, emb)
        maps.append(self.middle_block(h, emb))
        features = tuple(tran(m, emb) for tran, m in zip(self.fea_tran, maps))
        if not return_dict:
            return (features,)
        return StableSRTimeAwareEncoderOutput(features=features)
