"""ResShift's denoiser: the Swin-UNet of Yue et al., "ResShift: Efficient Diffusion Model for Image
Super-resolution by Residual Shifting", NeurIPS 2023 (arXiv:2307.12348), also used unchanged by the
journal version (arXiv:2403.07319).

An ADM-style UNet (Dhariwal & Nichol 2021): a sinusoidal timestep embedding → MLP, residual blocks
with scale-shift (FiLM) timestep conditioning, strided-conv downsampling and nearest + conv upsampling,
skip concatenation. Where ADM has self-attention, ResShift puts a ``BasicLayer`` of ``swin_depth``
(shifted) window-attention blocks wrapped in 1×1 conv "patch" (un)embeddings; its norms are GroupNorms
and its MLP uses 1×1 convs, so features stay NCHW throughout.

Conditioning (the ``lq`` path of the original code): the LR image ``lq`` (RGB, [-1, 1]; with the
inpainting mask appended as a 4th channel when ``cond_mask``) is concatenated to ``x_t`` along the
channels. When ``lq_size == image_size`` (all released SR models: a 64×64 LR image next to the 64×64
latent of the 256×256 HR image) the LR image is concatenated as is; otherwise a small
``feature_extractor`` of ``log2(lq_size / image_size)`` [conv, SiLU, stride-2 conv] stages (16, 32, 64,
... channels) brings it down to the latent size first (the ×2 SR config, and the released inpainting
and face models).

Parameter names are those of the official ``UNetModelSwin``, so the released ``resshift_*.pth`` files
load after :func:`sr_diffusion.conversion.convert_resshift_unet` drops two kinds of buffers the original
saves: ``relative_position_index`` (recomputed, non-persistent here) and ``attn_mask`` (computed here for
the actual input size, then cached).

Faithfulness notes (behaviour of the released code that is kept on purpose, because the released
weights were trained with it):

* ``image_size`` fixes the window of each level: where the level's resolution at ``image_size`` is at
  most ``window_size``, the window shrinks to that resolution and the shift is disabled, whatever the
  size of the actual input (in the released models: the 8×8 bottom level and the middle block).
* The shifted-window mask of the original does not follow the Swin paper. Its region labels are written
  along the rows only, and read back in column-major order inside each window, so that in the last row
  of windows the tokens are split by their column in the window (``col < window - shift`` vs the rest)
  and every other window attends without a mask. :func:`resshift_window_mask` reproduces it exactly; it
  is not a bug of this port.
* GroupNorm is computed in float32 (``GroupNorm32``), 32 groups, eps 1e-5.

Not carried over: ``dims`` other than 2, ``use_fp16`` (kept in the config for fidelity but unused; cast
the model with ``.to(dtype)``), ``cond_lq=False`` as the original builds it (it adds 16 unused input
channels and cannot run); here ``cond_lq=False`` means no LR channels at all.
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

from .swinir import relative_position_index, window_partition, window_reverse

__all__ = ["ResShiftUNet", "ResShiftUNetOutput", "resshift_window_mask", "timestep_embedding"]


@dataclass
class ResShiftUNetOutput(BaseOutput):
    """Output of :class:`ResShiftUNet`.

    Args:
        sample (`torch.Tensor` of shape `(N, out_channels, H, W)`):
            The network output; for the released models the prediction of ``x_0`` (``predict_type:
            xstart``) in the latent space of the VQ-f4 autoencoder.
    """

    sample: torch.Tensor


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``(N,)`` → ``(N, dim)``, float32: ``[cos(t·f_k), sin(t·f_k)]`` with
    ``f_k = max_period^(-k / (dim/2))``, ``k = 0 … dim/2 - 1`` (ADM order: cosines first), zero-padded
    to an odd ``dim``. ``timesteps`` are the step indices as the sampler passes them (may be fractional).
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=timesteps.device) * (-math.log(max_period) / half))
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """``GroupNorm(32, C)`` computed in float32 and cast back to the input dtype."""

    def __init__(self, num_channels: int):
        super().__init__(32, num_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def resshift_window_mask(
    height: int, width: int, window_size: int, shift_size: int, device=None, dtype=torch.float32
) -> torch.Tensor:
    """The additive shifted-window mask of the released ResShift code, ``(nW, N, N)``, ``N = ws²``.

    Windows are in row-major order over the ``(height / ws, width / ws)`` grid and tokens row-major
    inside a window (token ``j`` at row ``j // ws``, column ``j % ws``). As in the original (see the module
    docstring), only the last row of windows is masked: a token's region there is whether its *column*
    in the window is ``< ws - shift``; entries between two regions are -100, others 0.
    """
    n_rows, n_cols = height // window_size, width // window_size
    col = torch.arange(window_size * window_size, device=device) % window_size
    last_row = (col >= window_size - shift_size).to(torch.int8)  # region of each token, last window row
    labels = torch.zeros(n_rows, n_cols, window_size * window_size, dtype=torch.int8, device=device)
    labels[-1] = last_row
    labels = labels.view(n_rows * n_cols, -1)
    different = labels[:, :, None] != labels[:, None, :]
    return torch.zeros(different.shape, dtype=dtype, device=device).masked_fill_(different, -100.0)


# ----------------------------------------------------------------------------------------------
# UNet blocks (ADM)
# ----------------------------------------------------------------------------------------------


class TimestepEmbedSequential(nn.Sequential):
    """``nn.Sequential`` that passes the timestep embedding to the children that take one (ResBlocks)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Downsample(nn.Module):
    """Halve H and W: 3×3 stride-2 conv (``op``) or 2×2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            if out_channels != channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour interpolation, then an optional 3×3 conv (``conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class ResBlock(nn.Module):
    """ADM residual block with timestep conditioning, ``(B, C, H, W)`` → ``(B, C_out, H', W')``.

    ``h = conv(SiLU(GN(x)))``; with ``use_scale_shift_norm``: ``h = GN(h)·(1 + s) + b`` with
    ``(s, b) = Linear(SiLU(emb))``, else ``h = GN(h + Linear(SiLU(emb)))``; then
    ``x' = skip(x) + conv(dropout(SiLU(h)))``. ``up``/``down`` resample both paths (nearest ×2 /
    average pooling) between the first norm and conv.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.out_layers[3].weight)  # as the original: each block starts as the identity
        nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[2](self.h_upd(self.in_layers[1](self.in_layers[0](x))))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


# ----------------------------------------------------------------------------------------------
# Swin blocks (NCHW, GroupNorm, 1×1-conv MLP)
# ----------------------------------------------------------------------------------------------


class WindowAttention(nn.Module):
    """Multi-head self-attention inside ``ws × ws`` windows with a learned relative position bias
    (Swin, Sec. 3.2): ``(B·nW, N, C)`` → ``(B·nW, N, C)``; ``mask`` ``(nW, N, N)`` or None."""

    def __init__(self, dim: int, window_size: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"swin_embed_dim {dim} is not divisible by the number of heads {num_heads}")
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b_, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b_, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, -1).permute(2, 0, 1).to(q.dtype)  # heads, N, N
        if mask is None:
            attn_mask = bias.unsqueeze(0).expand(b_, -1, -1, -1)
        else:
            nw = mask.shape[0]
            attn_mask = (bias.unsqueeze(0) + mask.unsqueeze(1)).unsqueeze(0)  # 1, nW, heads, N, N
            attn_mask = attn_mask.expand(b_ // nw, -1, -1, -1, -1).reshape(b_, self.num_heads, n, n)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b_, n, c)))


class Mlp(nn.Module):
    """``fc2(dropout(GELU(fc1(x))))`` with 1×1 convs on ``(B, C, H, W)``."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class SwinTransformerBlock(nn.Module):
    """Pre-norm (shifted) window attention + MLP, both residual, on ``(B, C, H, W)``.

    ``window_size`` and ``shift_size`` are the effective ones (see :class:`ResShiftUNet`); H and W must be
    multiples of ``window_size``. ``resolution`` (metadata only) is the size this level has at ``image_size``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        dropout: float,
        resolution: int | None = None,
    ):
        super().__init__()
        self.resolution = resolution  # the level's size at image_size (the original's input_resolution)
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = GroupNorm32(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, dropout)
        self.norm2 = GroupNorm32(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)
        self._mask_cache: dict = {}

    def attention_mask(self, height: int, width: int, device, dtype) -> torch.Tensor | None:
        """The shifted-window mask for this size (None for unshifted blocks), cached per size/device/dtype."""
        if not self.shift_size:
            return None
        key = (height, width, str(device), dtype)
        mask = self._mask_cache.get(key)
        if mask is None:
            mask = resshift_window_mask(height, width, self.window_size, self.shift_size, device, dtype)
            if len(self._mask_cache) >= 8:
                self._mask_cache.clear()
            self._mask_cache[key] = mask
        return mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _b, c, height, width = x.shape
        ws, shift = self.window_size, self.shift_size
        h = self.norm1(x).permute(0, 2, 3, 1)  # B, H, W, C
        if shift:
            h = torch.roll(h, shifts=(-shift, -shift), dims=(1, 2))
        h = self.attn(window_partition(h, ws), self.attention_mask(height, width, x.device, x.dtype))
        h = window_reverse(h, ws, height, width)
        if shift:
            h = torch.roll(h, shifts=(shift, shift), dims=(1, 2))
        x = x + h.permute(0, 3, 1, 2)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """1×1 conv ``C → embed_dim`` (patch size 1), optionally followed by a GroupNorm."""

    def __init__(self, in_chans: int, embed_dim: int, patch_norm: bool):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, 1)
        self.norm = GroupNorm32(embed_dim) if patch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class PatchUnEmbed(nn.Module):
    """1×1 conv ``embed_dim → C``, optionally followed by a GroupNorm."""

    def __init__(self, out_chans: int, embed_dim: int, patch_norm: bool):
        super().__init__()
        self.proj = nn.Conv2d(embed_dim, out_chans, 1)
        self.norm = GroupNorm32(out_chans) if patch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class BasicLayer(nn.Module):
    """``patch_embed`` → ``depth`` Swin blocks (odd ones shifted by ``shift_size``) → ``patch_unembed``,
    ``(B, C, H, W)`` → ``(B, C, H, W)``. Note there is no residual around the whole layer."""

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        depth: int,
        mlp_ratio: float,
        dropout: float,
        patch_norm: bool,
        resolution: int | None = None,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_norm)
        self.patch_unembed = PatchUnEmbed(in_chans, embed_dim, patch_norm)
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                embed_dim, num_heads, window_size, 0 if i % 2 == 0 else shift_size, mlp_ratio, dropout, resolution
            )
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for block in self.blocks:
            x = block(x)
        return self.patch_unembed(x)


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------


class ResShiftUNet(ModelMixin, ConfigMixin):
    r"""ResShift's Swin-UNet denoiser ``f_θ(x_t, y_0, t)``, with the original parameter names.

    ``forward(sample, timestep, lq)``: ``sample`` is ``x_t`` ``(N, in_channels, H, W)`` (the VQ-f4
    latent, already divided by the scheduler's input normalisation), ``timestep`` the step index
    (``0 … T-1``), ``lq`` the LR image ``(N, 3, H·r, W·r)`` in [-1, 1] with ``r = lq_size / image_size``
    (``r = 1`` for the released ×4 SR models). Returns ``(N, out_channels, H, W)``. H and W must be
    multiples of :attr:`input_multiple` (64 for the released models; the original pads to it too).

    The defaults are the released real-world ×4 SR model (``realsr_swinunet_realesrgan256.yaml``, also
    the v3 / journal and bicubic ×4 models). The constructor defaults of the original class differ:
    ``channel_mult=(1, 2, 4, 8)``, ``num_head_channels=-1``, ``use_scale_shift_norm=False``,
    ``swin_embed_dim=96``, ``mlp_ratio=2.0``, ``lq_size=256``.

    Args:
        image_size (`int`): latent size at training; sets each level's window and shift (see the module
            docstring) and, with ``attention_resolutions``, which levels hold Swin layers.
        in_channels (`int`): channels of ``x_t`` (3 for VQ-f4, 8 for the face VQ-f8).
        model_channels (`int`): base width; the time embedding is ``4 · model_channels`` wide.
        out_channels (`int`): output channels.
        num_res_blocks (`int` or `Sequence[int]`): residual blocks per level (encoder side; the decoder has
            one more).
        attention_resolutions (`Sequence[int]`): resolutions (at ``image_size``) whose first block of each
            level gets a Swin ``BasicLayer``; the middle block always has one.
        dropout (`float`): dropout in the residual blocks and the Swin MLP/projection.
        channel_mult (`Sequence[int]`): width multiplier of each level.
        conv_resample (`bool`): learned (conv) down/upsampling instead of pooling / plain nearest.
        dims (`int`): 2 (the only value supported).
        use_fp16 (`bool`): kept for fidelity, unused (cast with ``.to(dtype)``).
        num_heads (`int`): Swin heads when ``num_head_channels == -1``.
        num_head_channels (`int`): channels per Swin head (heads = ``swin_embed_dim // num_head_channels``).
        use_scale_shift_norm (`bool`): FiLM-style timestep conditioning in the residual blocks.
        resblock_updown (`bool`): residual blocks with resampling instead of ``Downsample``/``Upsample``.
        swin_depth (`int`): Swin blocks per ``BasicLayer``.
        swin_embed_dim (`int`): Swin width.
        window_size (`int`): attention window.
        mlp_ratio (`float`): Swin MLP width / ``swin_embed_dim``.
        patch_norm (`bool`): GroupNorm after the Swin patch (un)embeddings.
        cond_lq (`bool`): concatenate ``lq`` to the input.
        cond_mask (`bool`): ``lq`` comes with a 1-channel mask (inpainting).
        lq_size (`int`): size of ``lq`` at training; ``lq_size / image_size`` must be a power of two.
    """

    @register_to_config
    def __init__(
        self,
        image_size: int = 64,
        in_channels: int = 3,
        model_channels: int = 160,
        out_channels: int = 3,
        num_res_blocks: int | Sequence[int] = (2, 2, 2, 2),
        attention_resolutions: Sequence[int] = (64, 32, 16, 8),
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 2, 4),
        conv_resample: bool = True,
        dims: int = 2,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = 32,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = False,
        swin_depth: int = 2,
        swin_embed_dim: int = 192,
        window_size: int = 8,
        mlp_ratio: float = 4.0,
        patch_norm: bool = False,
        cond_lq: bool = True,
        cond_mask: bool = False,
        lq_size: int = 64,
    ):
        super().__init__()
        num_levels = len(channel_mult)
        if dims != 2:
            raise ValueError(f"only dims=2 is supported, got {dims}")
        if not num_levels:
            raise ValueError("channel_mult must not be empty")
        if isinstance(num_res_blocks, int):
            num_res_blocks = [num_res_blocks] * num_levels
        elif len(num_res_blocks) != num_levels:
            raise ValueError(f"num_res_blocks {list(num_res_blocks)} needs one entry per level of {list(channel_mult)}")
        if num_head_channels == -1:
            heads = num_heads
        elif num_head_channels <= 0 or swin_embed_dim % num_head_channels:
            raise ValueError(
                f"swin_embed_dim {swin_embed_dim} is not a multiple of num_head_channels {num_head_channels}"
            )
        else:
            heads = swin_embed_dim // num_head_channels
        ratio = lq_size / image_size
        stages = round(math.log2(ratio)) if ratio >= 1 else -1
        if cond_lq and (stages < 0 or 2**stages != ratio):
            raise ValueError(f"lq_size / image_size must be a power of two >= 1, got {lq_size} / {image_size}")
        if image_size % 2 ** (num_levels - 1):
            raise ValueError(f"image_size {image_size} does not halve {num_levels - 1} times")

        # 1. time embedding
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )

        # 2. LR conditioning: identity, or [conv, SiLU, stride-2 conv] per halving (16, 32, ... channels)
        lq_channels = (4 if cond_mask else 3) if cond_lq else 0
        extractor: list[nn.Module] = []
        if cond_lq and stages:
            width = 16
            for _ in range(stages):
                extractor += [nn.Conv2d(lq_channels, width, 3, 1, 1), nn.SiLU(), Downsample(width, True, width * 2)]
                lq_channels = width = width * 2
        self.feature_extractor = nn.Sequential(*extractor) if extractor else nn.Identity()

        # 3. encoder
        def swin(channels: int, resolution: int) -> BasicLayer:
            ws = min(window_size, resolution)
            shift = window_size // 2 if resolution > window_size else 0
            return BasicLayer(
                channels, swin_embed_dim, heads, ws, shift, swin_depth, mlp_ratio, dropout, patch_norm, resolution
            )

        def resblock(channels: int, out: int | None = None, **updown) -> ResBlock:
            return ResBlock(channels, time_embed_dim, dropout, out, use_scale_shift_norm, **updown)

        ch = first_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels + lq_channels, ch, 3, padding=1))]
        )
        skip_channels = [ch]
        ds = image_size
        self._windows: list[tuple[int, int]] = []  # (level, effective window) of every Swin layer
        for level, mult in enumerate(channel_mult):
            for i in range(num_res_blocks[level]):
                layers: list[nn.Module] = [resblock(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions and i == 0:
                    layers.append(swin(ch, ds))
                    self._windows.append((level, min(window_size, ds)))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != num_levels - 1:
                down = resblock(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds //= 2

        # 4. middle
        self.middle_block = TimestepEmbedSequential(resblock(ch), swin(ch, ds), resblock(ch))
        self._windows.append((num_levels - 1, min(window_size, ds)))

        # 5. decoder
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks[level] + 1):
                layers = [resblock(ch + skip_channels.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions and i == 0:
                    layers.append(swin(ch, ds))
                    self._windows.append((level, min(window_size, ds)))
                if level and i == num_res_blocks[level]:
                    layers.append(resblock(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, ch))
                    ds *= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        # 6. output
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(first_ch, out_channels, 3, padding=1))

    # ------------------------------------------------------------------------------------------

    @property
    def input_multiple(self) -> int:
        """H and W of ``sample`` must be multiples of this: every level must halve exactly and hold
        whole windows (``lcm`` of ``2^(levels-1)`` and ``2^level · window`` over the Swin layers)."""
        multiple = 2 ** (len(self.config.channel_mult) - 1)
        for level, ws in self._windows:
            multiple = math.lcm(multiple, ws * 2**level)
        return multiple

    @property
    def lq_scale(self) -> int:
        """``lq`` is this many times larger than ``sample`` (``lq_size / image_size``)."""
        return self.config.lq_size // self.config.image_size if self.config.cond_lq else 1

    def _check_inputs(self, sample: torch.Tensor, lq: torch.Tensor | None, mask: torch.Tensor | None) -> None:
        c = self.config
        if not isinstance(sample, torch.Tensor) or sample.ndim != 4 or not sample.is_floating_point():
            got = (tuple(sample.shape), sample.dtype) if isinstance(sample, torch.Tensor) else type(sample).__name__
            raise ValueError(f"ResShiftUNet expects a floating (N, C, H, W) sample, got {got}")
        n, channels, height, width = sample.shape
        if channels != c.in_channels:
            raise ValueError(f"sample has {channels} channels, the model expects in_channels={c.in_channels}")
        multiple = self.input_multiple
        if height % multiple or width % multiple:
            raise ValueError(
                f"ResShiftUNet needs H and W divisible by {multiple} (its input_multiple), got {height}x{width}; "
                "pad the input first"
            )
        if not c.cond_lq:
            if lq is not None or mask is not None:
                raise ValueError("this model is not conditioned on lq (cond_lq=False); pass lq=None")
            return
        if lq is None:
            raise ValueError("this model is conditioned on the LR image (cond_lq=True); pass lq")
        if c.cond_mask and mask is None:
            raise ValueError("this model also takes the inpainting mask (cond_mask=True); pass mask")
        if not c.cond_mask and mask is not None:
            raise ValueError("this model takes no mask (cond_mask=False); pass mask=None")
        r = self.lq_scale
        expected = (n, 3, height * r, width * r)
        if lq.ndim != 4 or tuple(lq.shape) != expected:
            raise ValueError(
                f"lq must have shape {expected} (3-channel LR image, {r}x the sample size), got {tuple(lq.shape)}"
            )
        if mask is not None and (mask.ndim != 4 or tuple(mask.shape) != (n, 1, height * r, width * r)):
            raise ValueError(f"mask must have shape {(n, 1, height * r, width * r)}, got {tuple(mask.shape)}")

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int | float,
        lq: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> ResShiftUNetOutput | tuple:
        """Predict from ``x_t``.

        Args:
            sample: ``x_t`` ``(N, in_channels, H, W)``, H and W multiples of :attr:`input_multiple`.
            timestep: the step index, an int or a ``()`` / ``(N,)`` tensor.
            lq: the LR image ``(N, 3, H·r, W·r)`` in [-1, 1], ``r =`` :attr:`lq_scale`.
            mask: for ``cond_mask`` models, the inpainting mask ``(N, 1, H·r, W·r)`` in [-1, 1] (1 = missing).
            return_dict: return a :class:`ResShiftUNetOutput` rather than a tuple.

        Returns:
            ``(N, out_channels, H, W)`` in a :class:`ResShiftUNetOutput` (or a 1-tuple).
        """
        self._check_inputs(sample, lq, mask)
        n = sample.shape[0]
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(n)
        if timesteps.shape != (n,):
            raise ValueError(f"timestep must be a scalar or have shape ({n},), got {tuple(timesteps.shape)}")

        # 1. timestep embedding
        t_emb = timestep_embedding(timesteps, self.config.model_channels)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))

        # 2. LR conditioning
        h = sample
        if self.config.cond_lq:
            cond = lq if mask is None else torch.cat([lq, mask], dim=1)
            h = torch.cat([h, self.feature_extractor(cond.to(h.dtype))], dim=1)

        # 3. UNet
        skips = []
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
        out = self.out(h.to(sample.dtype))

        if not return_dict:
            return (out,)
        return ResShiftUNetOutput(sample=out)
