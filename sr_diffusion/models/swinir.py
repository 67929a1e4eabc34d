"""SwinIR: Liang et al., "SwinIR: Image Restoration Using Swin Transformer", ICCV-W 2021.

Shallow conv features → residual Swin Transformer blocks (RSTB, Sec. 3.1: ``depths[i]`` Swin layers
with (shifted) window self-attention and a relative position bias, then a conv, plus a skip) →
conv → reconstruction by one of the released upsamplers:

* ``"pixelshuffle"`` (classical SR): conv(embed_dim → num_feat) + LeakyReLU, pixel-shuffle stages,
  conv_last. Released: embed_dim 180, depths/heads [6]*6, window 8, mlp_ratio 2, ×2/3/4/8.
* ``"pixelshuffledirect"`` (lightweight SR): one conv(embed_dim → 3·s²) + pixel-shuffle.
  Released: embed_dim 60, depths/heads [6]*4, window 8, ×2/3/4.
* ``"nearest+conv"`` (real-world SR): nearest ×2 + conv stages (``conv_up1``, ``conv_up2``),
  ``conv_hr``, ``conv_last``. Released ×4 (and ×2): ``resi_connection`` "1conv" (embed_dim 180)
  or "3conv" (large: embed_dim 240, depths/heads [6]*9 / [8]*9).
* ``""`` (denoising / JPEG artefact removal, upscale 1): ``x + conv_last(features)``.

Parameter names are those of the official code (shared by BasicSR). The two buffers the original
stores, ``attn_mask`` and ``relative_position_index``, are recomputed here (the index is a
non-persistent buffer; the shifted-window mask is computed for the actual input size and cached),
so the model runs at any input size, unlike a fixed ``img_size``.

Padding: like the original, the input is padded internally on the bottom/right (reflect, or
replicate when the image is smaller than the pad) to a multiple of ``window_size`` and the output is
cropped back to ``h·upscale × w·upscale``. ``input_multiple`` is ``window_size`` so that callers that
pad themselves (the regression pipeline) make this padding a no-op.

Not supported (unused by any released SR model): absolute position embedding (``ape``), patch
size > 1, dropout / stochastic depth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .edsr import DIV2K_RGB_MEAN
from .outputs import RegressionModelOutput, check_sample, conv_flops
from .upsamplers import make_pixelshuffle_upsampler, pixelshuffle_upsampler_flops

__all__ = ["SwinIR"]

UPSAMPLERS = ("pixelshuffle", "pixelshuffledirect", "nearest+conv", "")
RESI_CONNECTIONS = ("1conv", "3conv")


# ----------------------------------------------------------------------------------------------
# window helpers
# ----------------------------------------------------------------------------------------------


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """``(B, H, W, C)`` → ``(B·nW, window_size², C)``, windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, c)


def window_reverse(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B·nW, window_size², C)`` → ``(B, H, W, C)``."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window_size, width // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def relative_position_index(window_size: int) -> torch.Tensor:
    """``(N, N)`` index into the ``(2·ws-1)²`` relative-position bias table, ``N = ws²`` (Swin, Sec. 3.2)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    coords = coords.flatten(1)  # 2, N
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)  # N, N, 2
    return rel[:, :, 0] * (2 * window_size - 1) + rel[:, :, 1]


def shifted_window_mask(
    height: int, width: int, window_size: int, shift_size: int, device=None, dtype=torch.float32
) -> torch.Tensor:
    """Additive attention mask ``(nW, N, N)`` of the shifted windows: 0 within a region, -100 across.

    After the cyclic shift a window can hold pixels from up to four image regions that were not
    neighbours; the mask stops attention between them (as in the original, -100 rather than -inf).
    """
    img_mask = torch.zeros((1, height, width, 1), device=device)
    cuts = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    region = 0
    for hs in cuts:
        for ws in cuts:
            img_mask[:, hs, ws, :] = region
            region += 1
    windows = window_partition(img_mask, window_size).squeeze(-1)  # nW, N
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return torch.zeros_like(diff, dtype=dtype).masked_fill_(diff != 0, -100.0)


# ----------------------------------------------------------------------------------------------
# blocks
# ----------------------------------------------------------------------------------------------


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias.

    ``(B·nW, N, C)`` → ``(B·nW, N, C)``; ``mask`` is ``(nW, N, N)`` for shifted windows, else None.
    """

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> torch.Tensor:
        """``(num_heads, N, N)`` bias gathered from the table."""
        n = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b_, n, c = x.shape
        qkv = self.qkv(x).reshape(b_, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.relative_position_bias().to(q.dtype)
        if mask is None:
            attn_mask = bias.unsqueeze(0).expand(b_, -1, -1, -1)
        else:
            nw = mask.shape[0]
            attn_mask = bias.unsqueeze(0) + mask.unsqueeze(1)  # nW, heads, N, N
            if b_ != nw:
                attn_mask = attn_mask.unsqueeze(0).expand(b_ // nw, -1, -1, -1, -1).reshape(b_, *attn_mask.shape[1:])
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        return self.proj(x.transpose(1, 2).reshape(b_, n, c))


class Mlp(nn.Module):
    """``fc2(gelu(fc1(x)))`` on ``(..., C)``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinTransformerBlock(nn.Module):
    """Pre-norm (shifted) window attention + MLP, both residual; tokens ``(B, H·W, C)``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        qkv_bias: bool = True,
    ):
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, x_size: tuple[int, int], attn_mask: torch.Tensor | None) -> torch.Tensor:
        height, width = x_size
        b, n, c = x.shape
        ws, shift = self.window_size, self.shift_size
        h = self.norm1(x).view(b, height, width, c)
        if shift:
            h = torch.roll(h, shifts=(-shift, -shift), dims=(1, 2))
        h = self.attn(window_partition(h, ws), attn_mask if shift else None)
        h = window_reverse(h, ws, height, width)
        if shift:
            h = torch.roll(h, shifts=(shift, shift), dims=(1, 2))
        x = x + h.reshape(b, n, c)
        return x + self.mlp(self.norm2(x))


class BasicLayer(nn.Module):
    """``depth`` Swin blocks, alternating regular and shifted windows."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float, qkv_bias: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, mlp_ratio, qkv_bias
            )
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor, x_size: tuple[int, int], attn_mask: torch.Tensor | None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, x_size, attn_mask)
        return x


def make_resi_connection(dim: int, kind: str) -> nn.Module:
    """The conv closing an RSTB and the trunk: one 3×3 conv, or 3×3 → 1×1 → 3×3 through dim/4 channels."""
    if kind == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    return nn.Sequential(
        nn.Conv2d(dim, dim // 4, 3, 1, 1),
        nn.LeakyReLU(negative_slope=0.2, inplace=True),
        nn.Conv2d(dim // 4, dim // 4, 1, 1, 0),
        nn.LeakyReLU(negative_slope=0.2, inplace=True),
        nn.Conv2d(dim // 4, dim, 3, 1, 1),
    )


def resi_connection_flops(dim: int, kind: str, height: int, width: int) -> int:
    if kind == "1conv":
        return conv_flops(dim, dim, 3, height, width)
    q = dim // 4
    return (
        conv_flops(dim, q, 3, height, width) + conv_flops(q, q, 1, height, width) + conv_flops(q, dim, 3, height, width)
    )


class RSTB(nn.Module):
    """Residual Swin Transformer Block: ``x + embed(conv(unembed(swin_layers(x))))``, tokens ``(B, H·W, C)``."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        resi_connection: str,
    ):
        super().__init__()
        self.residual_group = BasicLayer(dim, depth, num_heads, window_size, mlp_ratio, qkv_bias)
        self.conv = make_resi_connection(dim, resi_connection)

    def forward(self, x: torch.Tensor, x_size: tuple[int, int], attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, _n, c = x.shape
        h = self.residual_group(x, x_size, attn_mask).transpose(1, 2).reshape(b, c, *x_size)
        return self.conv(h).flatten(2).transpose(1, 2) + x


class PatchEmbed(nn.Module):
    """``(B, C, H, W)`` → tokens ``(B, H·W, C)`` (patch size 1), optionally layer-normed."""

    def __init__(self, dim: int, patch_norm: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)
        return self.norm(x) if self.norm is not None else x


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------


class SwinIR(ModelMixin, ConfigMixin):
    r"""SwinIR for SR (classical, lightweight, real-world) and restoration (upscale 1).

    Input ``(N, in_chans, h, w)`` in [0, 1], any size (padded internally to a multiple of
    ``window_size``); output ``(N, in_chans, h·upscale, w·upscale)`` in [0, 1], not clamped.
    The defaults are the released classical-SR ×4 model (SwinIR-M).

    Args:
        in_chans (`int`): image channels (3; the mean is the DIV2K RGB mean for 3, zero otherwise).
        embed_dim (`int`): token width (180 classical / real, 60 lightweight, 240 real large).
        depths (`Sequence[int]`): Swin layers in each RSTB.
        num_heads (`Sequence[int]`): attention heads in each RSTB.
        window_size (`int`): attention window (8; 7 for the JPEG models).
        mlp_ratio (`float`): MLP hidden width / embed_dim (2.0 in all released models).
        qkv_bias (`bool`): bias in the qkv projection.
        patch_norm (`bool`): LayerNorm after the patch embedding.
        upscale (`int`): scale factor (1, 2, 3, 4 or 8 depending on the upsampler).
        img_range (`float`): pixel range the weights expect (1.0; 255.0 for the JPEG models).
        upsampler (`str`): ``"pixelshuffle"``, ``"pixelshuffledirect"``, ``"nearest+conv"`` or ``""``.
        resi_connection (`str`): ``"1conv"`` or ``"3conv"``.
        num_feat (`int`): width of the reconstruction convs for ``"pixelshuffle"`` / ``"nearest+conv"``
            (64, fixed in the original code).
    """

    @register_to_config
    def __init__(
        self,
        in_chans: int = 3,
        embed_dim: int = 180,
        depths: Sequence[int] = (6, 6, 6, 6, 6, 6),
        num_heads: Sequence[int] = (6, 6, 6, 6, 6, 6),
        window_size: int = 8,
        mlp_ratio: float = 2.0,
        qkv_bias: bool = True,
        patch_norm: bool = True,
        upscale: int = 4,
        img_range: float = 1.0,
        upsampler: str = "pixelshuffle",
        resi_connection: str = "1conv",
        num_feat: int = 64,
    ):
        super().__init__()
        if upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler must be one of {UPSAMPLERS}, got {upsampler!r}")
        if resi_connection not in RESI_CONNECTIONS:
            raise ValueError(f"resi_connection must be one of {RESI_CONNECTIONS}, got {resi_connection!r}")
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"depths and num_heads need the same non-zero length, got {depths} and {num_heads}")
        if any(embed_dim % h for h in num_heads):
            raise ValueError(f"embed_dim {embed_dim} is not divisible by every entry of num_heads {num_heads}")
        allowed = {"pixelshuffle": (1, 2, 3, 4, 8), "nearest+conv": (2, 4), "": (1,)}.get(upsampler)
        if (allowed is not None and upscale not in allowed) or upscale < 1:
            raise ValueError(f"upsampler {upsampler!r} supports upscale {allowed}, got {upscale}")

        mean = DIV2K_RGB_MEAN if in_chans == 3 else (0.0,) * in_chans
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self._mask_cache: dict = {}

        # 1. shallow features
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        # 2. deep features
        self.patch_embed = PatchEmbed(embed_dim, patch_norm)
        self.layers = nn.ModuleList(
            RSTB(embed_dim, depth, heads, window_size, mlp_ratio, qkv_bias, resi_connection)
            for depth, heads in zip(depths, num_heads)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = make_resi_connection(embed_dim, resi_connection)
        # 3. reconstruction
        if upsampler in ("pixelshuffle", "nearest+conv"):
            self.conv_before_upsample = nn.Sequential(
                nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True)
            )
        if upsampler == "pixelshuffle":
            self.upsample = make_pixelshuffle_upsampler(upscale, num_feat)
            self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
        elif upsampler == "pixelshuffledirect":
            self.upsample = nn.Sequential(
                nn.Conv2d(embed_dim, upscale * upscale * in_chans, 3, 1, 1), nn.PixelShuffle(upscale)
            )
        elif upsampler == "nearest+conv":
            self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            if upscale == 4:
                self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
        else:
            self.conv_last = nn.Conv2d(embed_dim, in_chans, 3, 1, 1)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def upscale(self) -> int:
        """The native scale factor."""
        return int(self.config.upscale)

    @property
    def input_multiple(self) -> int:
        """``window_size``: inputs of other sizes are padded internally (see the module docstring)."""
        return int(self.config.window_size)

    def _attention_mask(self, height: int, width: int, device, dtype) -> torch.Tensor:
        """The shifted-window mask for this (padded) size, cached per size, device and dtype."""
        key = (height, width, str(device), dtype)
        mask = self._mask_cache.get(key)
        if mask is None:
            ws = self.config.window_size
            mask = shifted_window_mask(height, width, ws, ws // 2, device=device, dtype=dtype)
            if len(self._mask_cache) >= 8:
                self._mask_cache.clear()
            self._mask_cache[key] = mask
        return mask

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Deep features: ``(B, embed_dim, H, W)`` → same shape (H, W multiples of window_size)."""
        b, c, height, width = x.shape
        mask = None
        if self.config.window_size > 1 and any(d > 1 for d in self.config.depths):
            mask = self._attention_mask(height, width, x.device, x.dtype)
        tokens = self.patch_embed(x)
        for layer in self.layers:
            tokens = layer(tokens, (height, width), mask)
        tokens = self.norm(tokens)
        return tokens.transpose(1, 2).reshape(b, c, height, width)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> RegressionModelOutput | tuple:
        """``(N, C, h, w)`` in [0, 1] → ``(N, C, h·upscale, w·upscale)`` in [0, 1]."""
        check_sample(sample, 1, "SwinIR")
        c = self.config
        height, width = sample.shape[-2:]
        pad_h, pad_w = (-height) % c.window_size, (-width) % c.window_size
        x = sample
        if pad_h or pad_w:
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        mean = self.mean.to(x.dtype)
        x = (x - mean) * c.img_range

        first = self.conv_first(x)
        feat = self.conv_after_body(self.forward_features(first)) + first
        if c.upsampler == "pixelshuffle":
            out = self.conv_last(self.upsample(self.conv_before_upsample(feat)))
        elif c.upsampler == "pixelshuffledirect":
            out = self.upsample(feat)
        elif c.upsampler == "nearest+conv":
            feat = self.conv_before_upsample(feat)
            feat = F.leaky_relu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2, inplace=True)
            if c.upscale == 4:
                feat = F.leaky_relu(
                    self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2, inplace=True
                )
            out = self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2, inplace=True))
        else:
            out = x + self.conv_last(feat)

        out = out / c.img_range + mean
        if pad_h or pad_w:
            out = out[..., : height * c.upscale, : width * c.upscale]
        if not return_dict:
            return (out,)
        return RegressionModelOutput(sample=out)

    def flops(self, height: int, width: int) -> int:
        """FLOPs (2 × multiply-adds of convs, linears and the two attention matmuls) of one forward
        pass on a ``height × width`` LR image (counted at the internally padded size)."""
        c = self.config
        ws = c.window_size
        h, w = math.ceil(height / ws) * ws, math.ceil(width / ws) * ws
        dim, tokens, n = c.embed_dim, h * w, ws * ws
        hidden = int(dim * c.mlp_ratio)
        per_block = 2 * tokens * dim * (3 * dim + dim + 2 * hidden) + 2 * 2 * tokens * n * dim
        flops = conv_flops(c.in_chans, dim, 3, h, w)
        flops += sum(c.depths) * per_block
        flops += (len(c.depths) + 1) * resi_connection_flops(dim, c.resi_connection, h, w)
        s = c.upscale
        if c.upsampler == "pixelshuffle":
            flops += conv_flops(dim, c.num_feat, 3, h, w)
            flops += pixelshuffle_upsampler_flops(s, c.num_feat, h, w)
            flops += conv_flops(c.num_feat, c.in_chans, 3, h * s, w * s)
        elif c.upsampler == "pixelshuffledirect":
            flops += conv_flops(dim, s * s * c.in_chans, 3, h, w)
        elif c.upsampler == "nearest+conv":
            flops += conv_flops(dim, c.num_feat, 3, h, w)
            for k in range(int(math.log2(s))):
                flops += conv_flops(c.num_feat, c.num_feat, 3, h * 2 ** (k + 1), w * 2 ** (k + 1))
            flops += conv_flops(c.num_feat, c.num_feat, 3, h * s, w * s)
            flops += conv_flops(c.num_feat, c.in_chans, 3, h * s, w * s)
        else:
            flops += conv_flops(dim, c.in_chans, 3, h, w)
        return flops
