"""Tiled VAE with GroupNorm statistics shared across tiles, as PASD's and SeeSR's scripts use it.

PASD (``pasd/myutils/vaehook.py``) and SeeSR (``utils/vaehook.py``) ship the tiled VAE of multidiffusion-upscaler
(pkuliyi2015/multidiffusion-upscaler-for-automatic1111, ``tile_vae.py``) and install it with
``_init_tiled_vae(encoder_tile_size=1024, decoder_tile_size=224)`` (``fast_encoder=fast_decoder=False``,
``color_fix=False``). This module implements the same algorithm (our code, the original's facts):

* **When.** A net (encoder or decoder) is tiled only when its input is larger than ``tile_size + 2 · pad`` on a side
  (``pad``: 32 image pixels for the encoder, 11 latent pixels for the decoder); otherwise the plain forward runs. With
  the scripts' sizes: an encoder input above 1088 pixels, a latent above 246 pixels (1968 image pixels) a side.
* **Grid** (:func:`split_tiles`). ``n = max(1, ceil((side - 2 pad) / tile_size))`` tiles a side, of
  ``ceil((side - 2 pad) / n)`` rounded up to a multiple of 32 (else 16, 8, 4, 2) when that stays within
  ``tile_size``; tile ``j`` covers ``[pad + j t, min(pad + (j + 1) t, side)]``, is read with ``pad`` more on each side
  (clipped to the image), and owns its core, extended to the image border when it is within ``pad`` of it.
* **Tasks** (:func:`build_tasks`). The net is cut into per-tile steps: ``conv_in``; every ResNet block as store
  residual (identity or the shortcut conv), GroupNorm, SiLU, conv1, GroupNorm, SiLU, conv2, add residual; the mid
  block's attention as store residual, GroupNorm, attention over the tile, add residual; down/up-samplers; then
  ``conv_norm_out``, SiLU, ``conv_out``. Encoder: down blocks, then the mid block; decoder: the mid block, then the
  up blocks.
* **Shared statistics** (:class:`GroupNormStatistics`). All tiles run up to the next GroupNorm; each gives its
  per-(sample, group) biased variance and mean; the norm then uses the averages of these over the tiles, weighted by
  the tiles' pixel counts at that layer (``var = Σ n_i var_i / Σ n_i``, the same for the mean), for every tile.
* **Stitch.** Each tile's output is cropped to the part it owns and written into the result (no blending).

What this guarantees: with one tile the result is the plain net's (to float rounding: the statistics are computed
as ``var_mean`` + ``batch_norm`` instead of ``group_norm``). With several tiles it is *not* the plain net's: the
padding (32 image / 11 latent pixels) is less than the nets' receptive field, the attention sees one tile, and the
shared statistics average the padded tiles' own variances (overlaps counted once per tile, the spread of the tiles'
means left out), so it is the original's approximation, reproduced.

Generalised where the original hard-codes Stable Diffusion's VAE (same results on it): the down factor ``f`` (8 there)
is the VAE's own, the number of ResNet blocks per level and the GroupNorm's groups and eps (32, 1e-6) are read from
the modules.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

__all__ = [
    "DECODER_PAD",
    "ENCODER_PAD",
    "GroupNormStatistics",
    "best_tile_size",
    "build_tasks",
    "needs_tiling",
    "split_tiles",
    "tiled_decode",
    "tiled_decoder_forward",
    "tiled_encode",
    "tiled_encoder_forward",
    "tiled_vae",
]

#: context read around each encoder tile, in image pixels (the original's ``pad`` of the encoder)
ENCODER_PAD = 32
#: context read around each decoder tile, in latent pixels (the original's ``pad`` of the decoder)
DECODER_PAD = 11

# A task: (kind, callable or module). Kinds: "apply" (tile -> tile), "norm" (a GroupNorm with shared statistics),
# "store_res" (keep callable(tile) for the next "add_res"), "add_res" (tile + the kept residual).
Task = tuple[str, Callable | None]


# ----------------------------------------------------------------------------------------------------------------------
# Grid
# ----------------------------------------------------------------------------------------------------------------------


def needs_tiling(height: int, width: int, tile_size: int, pad: int) -> bool:
    """Whether the original tiles an input of ``height`` × ``width``: a side above ``tile_size + 2 · pad``."""
    return max(height, width) > tile_size + 2 * pad


def best_tile_size(lower: int, upper: int) -> int:
    """``lower`` rounded up to a multiple of 32, else of 16, 8, 4 or 2, the first that stays within ``upper``
    (``lower`` itself when it already is one, or when none does)."""
    divider = 32
    while divider >= 2:
        remainder = lower % divider
        if remainder == 0:
            return lower
        candidate = lower - remainder + divider
        if candidate <= upper:
            return candidate
        divider //= 2
    return lower


def split_tiles(
    height: int, width: int, tile_size: int, pad: int, scale: float
) -> tuple[list[list[int]], list[list[int]]]:
    """``(input boxes, output boxes)`` of the tiles of an input of ``height`` × ``width``, row by row, each box
    ``[x1, x2, y1, y2]``: the input a tile reads (its core with ``pad`` on each side, clipped to the input) and the
    part of the output it writes (its core, extended to the border within ``pad`` of it, times ``scale``: ``f`` for
    the decoder, ``1 / f`` for the encoder, floored)."""
    n_h = max(math.ceil((height - 2 * pad) / tile_size), 1)
    n_w = max(math.ceil((width - 2 * pad) / tile_size), 1)
    tile_h = best_tile_size(math.ceil((height - 2 * pad) / n_h), tile_size)
    tile_w = best_tile_size(math.ceil((width - 2 * pad) / n_w), tile_size)
    inputs, outputs = [], []
    for i in range(n_h):
        for j in range(n_w):
            core = [
                pad + j * tile_w,
                min(pad + (j + 1) * tile_w, width),
                pad + i * tile_h,
                min(pad + (i + 1) * tile_h, height),
            ]
            owned = [
                core[0] if core[0] > pad else 0,
                core[1] if core[1] < width - pad else width,
                core[2] if core[2] > pad else 0,
                core[3] if core[3] < height - pad else height,
            ]
            outputs.append([_scale(v, scale) for v in owned])
            inputs.append(
                [max(0, core[0] - pad), min(width, core[1] + pad), max(0, core[2] - pad), min(height, core[3] + pad)]
            )
    return inputs, outputs


def _scale(value: int, scale: float) -> int:
    """``value · scale`` for an int ``scale``, ``value // (1 / scale)`` for a fraction (the encoder's ``// f``)."""
    return value * int(scale) if scale >= 1 else value // round(1 / scale)


def _crop(tile: torch.Tensor, input_box: list[int], output_box: list[int], scale: float) -> torch.Tensor:
    """The part of a tile's output that it owns: the output box relative to the input box scaled (the original's
    ``crop_valid_region``)."""
    read = [_scale(v, scale) for v in input_box]
    margin = [output_box[k] - read[k] for k in range(4)]
    return tile[:, :, margin[2] : tile.shape[2] + margin[3], margin[0] : tile.shape[3] + margin[1]]


# ----------------------------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------------------------


def _silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


def _resnet_tasks(block: nn.Module) -> list[Task]:
    if getattr(block, "time_emb_proj", None) is not None or block.upsample or block.downsample:
        raise ValueError("tiled VAE: ResNet blocks with a time embedding or their own resampling are not supported")
    if float(block.output_scale_factor) != 1.0:
        raise ValueError(f"tiled VAE: ResNet output_scale_factor must be 1, got {block.output_scale_factor}")
    shortcut = block.conv_shortcut if block.conv_shortcut is not None else (lambda x: x)
    return [
        ("store_res", shortcut),
        ("norm", block.norm1),
        ("apply", _silu),
        ("apply", block.conv1),
        ("norm", block.norm2),
        ("apply", _silu),
        ("apply", block.conv2),
        ("add_res", None),
    ]


def _attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The self-attention of a (normalised) tile ``(N, C, H, W)`` over its own ``H · W`` positions: ``to_q``,
    ``to_k``, ``to_v``, softmax attention per head with ``attn.scale``, ``to_out`` (no residual)."""
    n, c, h, w = x.shape
    tokens = x.reshape(n, c, h * w).transpose(1, 2)
    q, k, v = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
    heads = attn.heads
    q, k, v = (t.reshape(n, h * w, heads, -1).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    out = out.transpose(1, 2).reshape(n, h * w, -1).to(q.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    return out.transpose(1, 2).reshape(n, c, h, w)


def _attention_tasks(attn: nn.Module | None) -> list[Task]:
    if attn is None:
        return []
    if attn.group_norm is None or attn.spatial_norm is not None or float(attn.rescale_output_factor) != 1.0:
        raise ValueError("tiled VAE: only the SD VAE's attention (GroupNorm, no spatial norm, no rescale) is supported")
    if not attn.residual_connection:
        raise ValueError("tiled VAE: the mid block's attention must have a residual connection")
    return [
        ("store_res", lambda x: x),
        ("norm", attn.group_norm),
        ("apply", lambda x, attn=attn: _attention(attn, x)),
        ("add_res", None),
    ]


def _mid_tasks(mid: nn.Module) -> list[Task]:
    tasks = _resnet_tasks(mid.resnets[0])
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        tasks += _attention_tasks(attn) + _resnet_tasks(resnet)
    return tasks


def build_tasks(net: nn.Module, is_decoder: bool) -> list[Task]:
    """The per-tile steps of a diffusers VAE ``Encoder`` or ``Decoder`` (the original's ``build_task_queue``):
    ``conv_in``; encoder: every down block's ResNets then its downsampler, then the mid block; decoder: the mid block,
    then every up block's ResNets then its upsampler; then ``conv_norm_out``, SiLU, ``conv_out``."""
    tasks: list[Task] = [("apply", net.conv_in)]
    if is_decoder:
        tasks += _mid_tasks(net.mid_block)
    for block in net.up_blocks if is_decoder else net.down_blocks:
        for resnet in block.resnets:
            tasks += _resnet_tasks(resnet)
        samplers = block.upsamplers if is_decoder else block.downsamplers
        for sampler in samplers or []:
            tasks.append(("apply", sampler))
    if not is_decoder:
        tasks += _mid_tasks(net.mid_block)
    if not isinstance(net.conv_norm_out, nn.GroupNorm):
        raise ValueError("tiled VAE: conv_norm_out must be a GroupNorm (no spatial norm)")
    tasks += [("norm", net.conv_norm_out), ("apply", _silu), ("apply", net.conv_out)]
    return tasks


# ----------------------------------------------------------------------------------------------------------------------
# Shared GroupNorm statistics
# ----------------------------------------------------------------------------------------------------------------------


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(N, C, H, W)`` viewed as ``(1, N · G, C / G, H, W)``: one batch-norm channel per (sample, group)."""
    n, c = x.shape[:2]
    return x.contiguous().view(1, n * groups, c // groups, *x.shape[2:])


class GroupNormStatistics:
    """The statistics of one GroupNorm gathered over all tiles (the original's ``GroupNormParam``): each tile's
    biased variance and mean per (sample, group), averaged over the tiles with weights proportional to their pixel
    counts at that layer; :meth:`normalize` then normalises any tile with them and the norm's affine."""

    def __init__(self, norm: nn.GroupNorm):
        self.norm = norm
        self.variances: list[torch.Tensor] = []
        self.means: list[torch.Tensor] = []
        self.pixels: list[int] = []
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None

    def add(self, tile: torch.Tensor) -> None:
        var, mean = torch.var_mean(_grouped(tile, self.norm.num_groups), dim=[0, 2, 3, 4], unbiased=False)
        if var.dtype == torch.float16 and var.isinf().any():  # a large image's variance can exceed float16's range
            var, mean = torch.var_mean(_grouped(tile.float(), self.norm.num_groups), dim=[0, 2, 3, 4], unbiased=False)
        self.variances.append(var)
        self.means.append(mean)
        self.pixels.append(tile.shape[2] * tile.shape[3])

    def summarize(self) -> None:
        device = self.variances[0].device
        pixels = torch.tensor(self.pixels, dtype=torch.float32, device=device) / max(self.pixels)
        weights = (pixels / pixels.sum()).unsqueeze(1)
        self.var = (torch.vstack(self.variances) * weights).sum(dim=0)
        self.mean = (torch.vstack(self.means) * weights).sum(dim=0)

    def normalize(self, tile: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        out = F.batch_norm(
            _grouped(tile, norm.num_groups),
            self.mean.to(tile.device),
            self.var.to(tile.device),
            training=False,
            momentum=0.0,
            eps=norm.eps,
        ).view(tile.shape)
        if norm.affine:
            out = out * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
        return out


# ----------------------------------------------------------------------------------------------------------------------
# Tiled forward
# ----------------------------------------------------------------------------------------------------------------------


def _tiled_forward(
    net: nn.Module, x: torch.Tensor, tile_size: int, pad: int, is_decoder: bool, factor: int, offload: bool
) -> torch.Tensor:
    """Run ``net`` on the tiles of ``x`` (:func:`split_tiles`) task by task, every GroupNorm with the statistics of
    all tiles, and stitch the tiles' owned parts. Tiles wait between norms on the CPU with ``offload`` (as the
    original keeps them), else on ``x``'s device."""
    device = x.device
    scale = factor if is_decoder else 1 / factor
    height, width = x.shape[-2:]
    input_boxes, output_boxes = split_tiles(height, width, tile_size, pad, scale)
    store = torch.device("cpu") if offload else device
    tiles = [x[:, :, b[2] : b[3], b[0] : b[1]].to(store) for b in input_boxes]
    residuals: list[torch.Tensor | None] = [None] * len(tiles)
    tasks = build_tasks(net, is_decoder)
    # segments of tasks between GroupNorms: every tile runs a segment, then the next norm's statistics are gathered
    start = 0
    while start < len(tasks):
        end = start
        while end < len(tasks) and tasks[end][0] != "norm":
            end += 1
        statistics = GroupNormStatistics(tasks[end][1]) if end < len(tasks) else None
        for i in range(len(tiles)):
            tile = tiles[i].to(device)
            for kind, op in tasks[start:end]:
                if kind == "apply":
                    tile = op(tile)
                elif kind == "store_res":
                    residuals[i] = op(tile).to(store)
                elif kind == "add_res":
                    tile = tile + residuals[i].to(device)
                    residuals[i] = None
                elif kind == "normalize":
                    tile = op.normalize(tile)
            if statistics is not None:
                statistics.add(tile)
            tiles[i] = tile.to(store)
        if statistics is None:
            break
        statistics.summarize()
        # the norm itself runs at the head of the next segment
        tasks = tasks[:end] + [("normalize", statistics)] + tasks[end + 1 :]
        start = end
    out_h, out_w = (height * factor, width * factor) if is_decoder else (height // factor, width // factor)
    result = None
    for tile, in_box, out_box in zip(tiles, input_boxes, output_boxes):
        if result is None:
            result = torch.zeros(x.shape[0], tile.shape[1], out_h, out_w, dtype=tile.dtype, device=device)
        result[:, :, out_box[2] : out_box[3], out_box[0] : out_box[1]] = _crop(tile, in_box, out_box, scale).to(device)
    return result


def _factor(net: nn.Module, is_decoder: bool) -> int:
    blocks = net.up_blocks if is_decoder else net.down_blocks
    samplers = sum(len((b.upsamplers if is_decoder else b.downsamplers) or []) for b in blocks)
    return 2**samplers


@torch.no_grad()
def tiled_encoder_forward(
    encoder: nn.Module, x: torch.Tensor, tile_size: int, pad: int = ENCODER_PAD, offload: bool | None = None
) -> torch.Tensor:
    """A diffusers VAE ``Encoder``'s output for images ``x`` ``(N, C, H, W)``, computed in tiles of ``tile_size``
    image pixels read with ``pad`` pixels of context, GroupNorm statistics shared across tiles (module docstring).
    Always tiles (one tile when the image fits); :func:`tiled_vae` applies the original's size threshold.
    ``offload``: keep waiting tiles on the CPU (default: when ``x`` is on an accelerator)."""
    offload = x.device.type != "cpu" if offload is None else offload
    return _tiled_forward(encoder, x, tile_size, pad, False, _factor(encoder, False), offload)


@torch.no_grad()
def tiled_decoder_forward(
    decoder: nn.Module, z: torch.Tensor, tile_size: int, pad: int = DECODER_PAD, offload: bool | None = None
) -> torch.Tensor:
    """A diffusers VAE ``Decoder``'s output for latents ``z`` ``(N, C_z, h, w)`` (after ``post_quant_conv``), in
    tiles of ``tile_size`` latent pixels read with ``pad`` latent pixels of context (as
    :func:`tiled_encoder_forward`)."""
    offload = z.device.type != "cpu" if offload is None else offload
    return _tiled_forward(decoder, z, tile_size, pad, True, _factor(decoder, True), offload)


class _Hook:
    """The forward a net gets inside :func:`tiled_vae`: the plain forward up to the original's size threshold, the
    tiled one above it."""

    def __init__(self, net: nn.Module, forward: Callable, tile_size: int, pad: int, is_decoder: bool):
        self.net, self.forward, self.tile_size, self.pad, self.is_decoder = net, forward, tile_size, pad, is_decoder

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        extra = [a for a in (*args, *kwargs.values()) if a is not None]
        if extra or not needs_tiling(x.shape[-2], x.shape[-1], self.tile_size, self.pad):
            return self.forward(x, *args, **kwargs)
        run = tiled_decoder_forward if self.is_decoder else tiled_encoder_forward
        return run(self.net, x, self.tile_size, self.pad)


@contextlib.contextmanager
def tiled_vae(
    vae: AutoencoderKL,
    encoder_tile_size: int | None = 1024,
    decoder_tile_size: int | None = 224,
    encoder_pad: int | None = None,
    decoder_pad: int | None = None,
) -> Iterator[AutoencoderKL]:
    """Within the block, ``vae.encode`` / ``vae.decode`` run their encoder / decoder tiled as PASD's and SeeSR's
    ``_init_tiled_vae(encoder_tile_size, decoder_tile_size)`` (defaults: the scripts' 1024 image pixels and 224 latent
    pixels): only for inputs larger than ``tile_size + 2 · pad`` on a side, else unchanged. A tile size of ``None`` or
    ``0`` leaves that net alone. The pads default to :data:`ENCODER_PAD` and :data:`DECODER_PAD`. The nets'
    ``forward`` are restored on exit."""
    encoder_pad = ENCODER_PAD if encoder_pad is None else encoder_pad
    decoder_pad = DECODER_PAD if decoder_pad is None else decoder_pad
    patched = []
    try:
        for net, tile_size, pad, is_decoder in (
            (vae.encoder, encoder_tile_size, encoder_pad, False),
            (vae.decoder, decoder_tile_size, decoder_pad, True),
        ):
            if not tile_size:
                continue
            own = net.__dict__.get("forward")
            net.forward = _Hook(net, net.forward, tile_size, pad, is_decoder)
            patched.append((net, own))
        yield vae
    finally:
        for net, own in patched:
            if own is None:
                del net.forward
            else:
                net.forward = own


def tiled_encode(vae: AutoencoderKL, x: torch.Tensor, tile_size: int = 1024, pad: int | None = None):
    """``vae.encode(x).latent_dist`` with the encoder tiled (:func:`tiled_vae`; untiled up to the threshold)."""
    with tiled_vae(vae, tile_size, None, encoder_pad=pad):
        return vae.encode(x).latent_dist


def tiled_decode(vae: AutoencoderKL, z: torch.Tensor, tile_size: int = 224, pad: int | None = None) -> torch.Tensor:
    """``vae.decode(z).sample`` with the decoder tiled (:func:`tiled_vae`; untiled up to the threshold)."""
    with tiled_vae(vae, None, tile_size, decoder_pad=pad):
        return vae.decode(z).sample
