"""StableSR's controllable feature wrapping (CFW): the VAE decoder borrows detail from the LR image's encoder features.

Paper: J. Wang et al., "Exploiting Diffusion Prior for Real-World Image Super-Resolution", IJCV 2024
(arXiv:2305.07015), Sec. 3.3, Eq. 4: with ``F_e`` the VAE *encoder* features of the (upsampled) LR image and ``F_d``
the decoder features at the same resolution, the decoder continues with

    ``F_m = F_d + C(F_e, F_d; theta) · w``,   ``w ∈ [0, 1]`` (the "fidelity weight"),

``w = 0`` giving the plain SD decoder (most "generative"), larger ``w`` more fidelity to the input. The released code
(``Decoder_Mix``, ``Fuse_sft_block_RRDB`` in ``ldm/modules/diffusionmodules/model.py``, ``AutoencoderKLResi``;
``fusion_w`` / ``--dec_w``, 0.5 in the README's commands; facts only):

- encoder features: the output of the last residual block of encoder levels ``1 … L-2`` (before each is
  downsampled; ``L = len(ch_mult)``, levels 1 and 2 of SD's 4-level VAE: 256 channels at ``H/2``, 512 at ``H/4``);
- decoder: after the residual blocks of decoder level ``l ∈ {1 … L-2}`` and before its upsampling,
  ``h = h + w · fusion_layer_l(F_e[l], h)``, where ``fusion_layer_l`` is ``ResBlock(2C → C)`` on the channel
  concatenation ``[F_e, h]``, ``num_fuse_block`` RRDBs (ESRGAN, ``num_grow_ch=32``), ``ResBlock(C → C)``; the
  ``ResBlock`` is ``x' + conv2(SiLU(GN(conv1(SiLU(GN(x))))))`` with ``x'`` a 1×1 conv when the width changes, GroupNorm
  32 groups, eps 1e-6;
- only the fusion layers are trained (``freeze_dec: True``), the rest of the autoencoder is SD's.

Here the diffusers ``AutoencoderKL`` is not forked. :meth:`StableSRCFW.capture_encoder_features` (a ``with`` block)
records, with forward pre-hooks on ``encoder.down_blocks[l].downsamplers[0]``, the input of each level's downsampler,
i.e. ``F_e[l]``; :meth:`StableSRCFW.fuse_decoder` adds the fusion, with pre-hooks on
``decoder.up_blocks[L-1-l].upsamplers[0]`` (diffusers numbers the decoder levels from the bottom). Both work with
``vae.enable_slicing()``; tiled VAE encoding/decoding is refused (the features would belong to other tiles).

Parameter names are the original's inside ``decoder.``: ``fusion_layer_{l}.encode_enc_1.{norm1,conv1,norm2,conv2,
conv_out}``, ``fusion_layer_{l}.encode_enc_2.{k}.rdb{1,2,3}.conv{1..5}``, ``fusion_layer_{l}.encode_enc_3.*``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .rrdbnet import RRDB

__all__ = ["CFWResBlock", "FuseSFTBlock", "StableSRCFW"]


class CFWResBlock(nn.Module):
    """``x ↦ skip(x) + conv2(SiLU(GN(conv1(SiLU(GN(x))))))``, ``(N, C_in, H, W)`` → ``(N, C_out, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int | None = None, num_groups: int = 32):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = nn.GroupNorm(num_groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(num_groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_out = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.conv_out(x) if self.conv_out is not None else x)


class FuseSFTBlock(nn.Module):
    """``C(F_e, F_d)`` of Eq. 4: ``ResBlock(2C → C)`` on ``[F_e, F_d]``, RRDBs, ``ResBlock(C → C)``."""

    def __init__(self, channels: int, num_fuse_block: int = 2, num_grow_ch: int = 32, num_groups: int = 32):
        super().__init__()
        self.encode_enc_1 = CFWResBlock(2 * channels, channels, num_groups)
        self.encode_enc_2 = nn.Sequential(*[RRDB(channels, num_grow_ch) for _ in range(num_fuse_block)])
        self.encode_enc_3 = CFWResBlock(channels, channels, num_groups)

    def forward(self, enc_feat: torch.Tensor, dec_feat: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """``F_d + w · C(F_e, F_d)``."""
        h = self.encode_enc_3(self.encode_enc_2(self.encode_enc_1(torch.cat([enc_feat, dec_feat], dim=1))))
        return dec_feat + weight * h


class StableSRCFW(ModelMixin, ConfigMixin):
    r"""The CFW fusion layers for an SD ``AutoencoderKL``; see the module docstring.

    Args:
        block_out_channels: the VAE's ``block_out_channels`` (SD: ``(128, 256, 512, 512)``); a fusion layer is built
            for each level ``1 … L-2``.
        num_fuse_block: RRDBs per fusion layer (released: 2).
        num_grow_ch: growth channels of the RRDBs (released: 32).
        norm_num_groups: groups of the GroupNorms (the original: 32).
    """

    @register_to_config
    def __init__(
        self,
        block_out_channels: Sequence[int] = (128, 256, 512, 512),
        num_fuse_block: int = 2,
        num_grow_ch: int = 32,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        for level in self.levels:
            channels = block_out_channels[level]
            block = FuseSFTBlock(channels, num_fuse_block, num_grow_ch, norm_num_groups)
            self.add_module(f"fusion_layer_{level}", block)

    @property
    def levels(self) -> list[int]:
        """The VAE levels (0 = full resolution) that have a fusion layer: ``1 … L-2``."""
        return list(range(1, len(self.config.block_out_channels) - 1))

    def fusion_layer(self, level: int) -> FuseSFTBlock:
        return getattr(self, f"fusion_layer_{level}")

    # ------------------------------------------------------------------------------------------------------------------
    # Hooks into a diffusers AutoencoderKL
    # ------------------------------------------------------------------------------------------------------------------

    def check_vae(self, vae: nn.Module) -> None:
        """Raise a ``ValueError`` unless ``vae`` is an ``AutoencoderKL`` whose levels these fusion layers fit."""
        widths = list(getattr(getattr(vae, "config", None), "block_out_channels", []) or [])
        if widths != list(self.config.block_out_channels):
            raise ValueError(
                f"the CFW layers were built for a VAE with block_out_channels={list(self.config.block_out_channels)}, "
                f"but the VAE has {widths}"
            )
        num_levels = len(widths)
        for level in self.levels:
            down = vae.encoder.down_blocks[level]
            up = vae.decoder.up_blocks[num_levels - 1 - level]
            if not getattr(down, "downsamplers", None) or not getattr(up, "upsamplers", None):
                raise ValueError(f"VAE level {level} has no down/upsampler to attach the CFW fusion layer to")

    @staticmethod
    def _check_untiled(vae: nn.Module) -> None:
        if getattr(vae, "use_tiling", False):
            raise ValueError(
                "CFW (fidelity_weight > 0) cannot run with a tiled VAE (vae.enable_tiling()): call "
                "vae.disable_tiling() or pass fidelity_weight=0"
            )

    @contextlib.contextmanager
    def capture_encoder_features(self, vae: nn.Module, store: dict[int, list[torch.Tensor]]) -> Iterator[None]:
        """Within the block, ``vae.encode(x)`` also appends ``F_e[l]`` of ``x`` to ``store[l]`` for every fusion level
        (one entry per encoder call: several with ``vae.enable_slicing()``; concatenate them along the batch)."""
        self._check_untiled(vae)
        handles = []

        def make_hook(level: int):
            def hook(module, args):
                store.setdefault(level, []).append(args[0])

            return hook

        try:
            for level in self.levels:
                downsampler = vae.encoder.down_blocks[level].downsamplers[0]
                handles.append(downsampler.register_forward_pre_hook(make_hook(level)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def fuse_decoder(self, vae: nn.Module, features: dict[int, torch.Tensor], weight: float) -> Iterator[None]:
        """Within the block, ``vae.decode(z)`` computes ``F_d + w · C(F_e, F_d)`` at every fusion level.

        Args:
            vae: the ``AutoencoderKL`` (possibly with ``enable_slicing()``: the batch is then walked through in order).
            features: ``F_e[l]`` per fusion level, ``(N, C_l, H_l, W_l)``, of the images whose latents are decoded.
            weight: ``w`` in [0, 1]; 0 adds nothing (the fusion layers are not even run).
        """
        self._check_untiled(vae)
        if weight == 0:
            yield
            return
        missing = [level for level in self.levels if level not in features]
        if missing:
            raise ValueError(f"no encoder features for CFW level(s) {missing}; encode the LR image with them first")
        num_levels = len(self.config.block_out_channels)
        handles = []

        def make_hook(level: int):
            offset = [0]  # where the next decoder call's batch starts in features[level] (VAE slicing)

            def hook(module, args):
                h = args[0]
                enc = features[level][offset[0] : offset[0] + h.shape[0]]
                offset[0] += h.shape[0]
                if enc.shape[0] != h.shape[0] or enc.shape[-2:] != h.shape[-2:]:
                    raise ValueError(
                        f"CFW level {level}: encoder features {tuple(features[level].shape)} do not fit the decoder "
                        f"feature {tuple(h.shape)}; decode the latents of the images that were encoded"
                    )
                layer = self.fusion_layer(level)
                dtype = layer.encode_enc_1.conv1.weight.dtype
                fused = layer(enc.to(device=h.device, dtype=dtype), h.to(dtype), weight)
                return (fused.to(h.dtype), *args[1:])

            return hook

        try:
            for level in self.levels:
                upsampler = vae.decoder.up_blocks[num_levels - 1 - level].upsamplers[0]
                handles.append(upsampler.register_forward_pre_hook(make_hook(level)))
            yield
        finally:
            for handle in handles:
                handle.remove()
