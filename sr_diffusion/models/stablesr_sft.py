"""StableSR's SFT layers: spatial feature transforms that condition a frozen Stable Diffusion UNet on the LR image.

Paper: J. Wang et al., "Exploiting Diffusion Prior for Real-World Image Super-Resolution", IJCV 2024
(arXiv:2305.07015), Sec. 3.1, Eq. 1: the features ``F`` of the denoiser are modulated by the condition maps ``C`` of
the time-aware encoder (:mod:`sr_diffusion.models.stablesr_encoder`) as ``F' = (1 + gamma(C)) ⊙ F + beta(C)``.

The released code (``UNetModelDualcondV2``, ``ResBlockDual``, ``ldm/modules/spade.py``; facts only) builds it with
SPADE layers (Park et al., CVPR 2019) and places one in *every* residual block of the UNet (the 8 of the encoder
half, the 2 of the middle block and the 12 of the decoder half of SD 2.1): after the block's second convolution,
before the skip connection is added,

    ``h = conv2(...)``;  ``h' = GN(h) ⊙ (1 + mlp_gamma(a)) + mlp_beta(a)``,  ``a = ReLU(mlp_shared(C_l))``;
    ``out = skip(x) + h'``,

with ``GN`` a GroupNorm (32 groups, float32, with its own affine parameters: ``param_free_norm``), 3×3 convs,
``a`` of 128 channels, and ``C_l`` the encoder's map at the block's resolution. The UNet's own weights stay frozen
(``unfrozen_diff: False``); only the SPADE layers and the encoder are trained.

Here the diffusers ``UNet2DConditionModel`` is not forked: :meth:`StableSRSFT.attach` registers, for the duration of a
``with`` block, a forward hook on ``conv2`` of each ``ResnetBlock2D`` that replaces its output ``h`` by ``h'`` (a
diffusers SD ``ResnetBlock2D`` computes exactly ``skip(x) + conv2(...)``, ``output_scale_factor = 1``).

Parameter names follow the original layout inside ``model.diffusion_model``: ``input_blocks.{k}.0.spade.*``,
``middle_block.{0,2}.spade.*`` and ``output_blocks.{k}.0.spade.*``; with ``lpb = layers_per_block`` the residual
block ``j`` of level ``i`` is ``input_blocks.{1 + i·(lpb+1) + j}`` (diffusers ``down_blocks.i.resnets.j``),
``middle_block.{0,2}`` (``mid_block.resnets.{0,1}``) and ``output_blocks.{i·(lpb+1) + j}``
(``up_blocks.i.resnets.j``), the numbering of diffusers' own SD checkpoint conversion. So the released weights load
after stripping ``model.diffusion_model.``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .resshift_unet import GroupNorm32

__all__ = ["SFTSlot", "SPADE", "StableSRSFT"]


class SPADE(nn.Module):
    """``(h, c) ↦ GN(h) ⊙ (1 + gamma) + beta`` with ``(gamma, beta) = (mlp_gamma(a), mlp_beta(a))``, ``a =
    ReLU(mlp_shared(c))``; ``h`` ``(N, C, H, W)``, ``c`` ``(N, C_cond, H, W)``. The norm runs in float32."""

    def __init__(self, norm_channels: int, cond_channels: int, hidden_channels: int = 128, kernel_size: int = 3):
        super().__init__()
        pad = kernel_size // 2
        self.param_free_norm = GroupNorm32(norm_channels)
        self.mlp_shared = nn.Sequential(nn.Conv2d(cond_channels, hidden_channels, kernel_size, padding=pad), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden_channels, norm_channels, kernel_size, padding=pad)
        self.mlp_beta = nn.Conv2d(hidden_channels, norm_channels, kernel_size, padding=pad)

    def forward(self, hidden_states: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if cond.shape[-2:] != hidden_states.shape[-2:] or cond.shape[0] != hidden_states.shape[0]:
            raise ValueError(
                f"SFT condition map {tuple(cond.shape)} does not fit the UNet feature {tuple(hidden_states.shape)}: "
                "the time-aware encoder's input must be the latent of the same (padded) images and guidance copies"
            )
        dtype = self.mlp_gamma.weight.dtype
        actv = self.mlp_shared(cond.to(dtype))
        gamma, beta = self.mlp_gamma(actv), self.mlp_beta(actv)
        normalized = self.param_free_norm(hidden_states.to(dtype))
        return (normalized * (1 + gamma) + beta).to(hidden_states.dtype)


class SFTSlot(nn.Module):
    """Holds the ``spade`` of one residual block (so that names read ``input_blocks.{k}.0.spade.…``)."""

    def __init__(self, spade: SPADE):
        super().__init__()
        self.spade = spade


@dataclass(frozen=True)
class _Target:
    """Where one SPADE acts: the diffusers resnet (``down_blocks`` / ``mid_block`` / ``up_blocks``, i, j) and the
    level ``l`` (resolution ``H / 2^l``) of the condition map it reads."""

    path: tuple[str, int, int]
    level: int
    spade: SPADE


class StableSRSFT(ModelMixin, ConfigMixin):
    r"""The SFT (SPADE) layers of every residual block of an SD ``UNet2DConditionModel``; see the module docstring.

    Args:
        block_out_channels: the UNet's ``block_out_channels`` (SD 1.x/2.x: ``(320, 640, 1280, 1280)``).
        layers_per_block: the UNet's ``layers_per_block`` (SD: 2).
        cond_channels: channels of the time-aware encoder's maps (its ``out_channels``; released: 256).
        hidden_channels: width of the shared conv (the original hard-codes 128).
        kernel_size: of the three convs (the original's ``spadeinstance3x3``: 3).
    """

    @register_to_config
    def __init__(
        self,
        block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        cond_channels: int = 256,
        hidden_channels: int = 128,
        kernel_size: int = 3,
    ):
        super().__init__()
        if any(c % 32 for c in block_out_channels):
            raise ValueError(
                f"block_out_channels must be multiples of 32 (GroupNorm, 32 groups), got {block_out_channels}"
            )
        widths = list(block_out_channels)
        levels, lpb = len(widths), layers_per_block

        def slot(channels: int) -> nn.ModuleDict:
            return nn.ModuleDict({"0": SFTSlot(SPADE(channels, cond_channels, hidden_channels, kernel_size))})

        self.input_blocks = nn.ModuleDict()
        for i in range(levels):
            for j in range(lpb):
                self.input_blocks[str(1 + i * (lpb + 1) + j)] = slot(widths[i])
        self.middle_block = nn.ModuleDict(
            {k: SFTSlot(SPADE(widths[-1], cond_channels, hidden_channels, kernel_size)) for k in ("0", "2")}
        )
        self.output_blocks = nn.ModuleDict()
        for i, channels in enumerate(reversed(widths)):
            for j in range(lpb + 1):
                self.output_blocks[str(i * (lpb + 1) + j)] = slot(channels)

    # ------------------------------------------------------------------------------------------------------------------
    # Placement
    # ------------------------------------------------------------------------------------------------------------------

    @property
    def num_levels(self) -> int:
        return len(self.config.block_out_channels)

    def targets(self) -> list[_Target]:
        """Every SPADE with the diffusers resnet it modulates and the level of the map it reads."""
        levels, lpb = self.num_levels, self.config.layers_per_block
        found = []
        for i in range(levels):
            for j in range(lpb):
                spade = self.input_blocks[str(1 + i * (lpb + 1) + j)]["0"].spade
                found.append(_Target(("down_blocks", i, j), i, spade))
        found.append(_Target(("mid_block", 0, 0), levels - 1, self.middle_block["0"].spade))
        found.append(_Target(("mid_block", 0, 1), levels - 1, self.middle_block["2"].spade))
        for i in range(levels):
            for j in range(lpb + 1):
                spade = self.output_blocks[str(i * (lpb + 1) + j)]["0"].spade
                found.append(_Target(("up_blocks", i, j), levels - 1 - i, spade))
        return found

    def check_unet(self, unet: nn.Module) -> None:
        """Raise a ``ValueError`` unless ``unet`` is an SD-style ``UNet2DConditionModel`` these layers fit."""
        config = getattr(unet, "config", None)
        widths = list(getattr(config, "block_out_channels", []) or [])
        lpb = getattr(config, "layers_per_block", None)
        if widths != list(self.config.block_out_channels) or lpb != self.config.layers_per_block:
            raise ValueError(
                f"the SFT layers were built for a UNet with block_out_channels={list(self.config.block_out_channels)} "
                f"and layers_per_block={self.config.layers_per_block}, but the UNet has {widths} and {lpb}"
            )
        for target in self.targets():
            resnet = self._resnet(unet, target.path)
            if resnet is None or not hasattr(resnet, "conv2"):
                raise ValueError(f"the UNet has no residual block {'.'.join(map(str, target.path))} with a conv2")
            if getattr(resnet, "output_scale_factor", 1.0) != 1.0:
                raise ValueError("the UNet's residual blocks rescale their output (output_scale_factor != 1)")

    @staticmethod
    def _resnet(unet: nn.Module, path: tuple[str, int, int]) -> nn.Module | None:
        where, i, j = path
        try:
            if where == "mid_block":
                return unet.mid_block.resnets[j]
            return getattr(unet, where)[i].resnets[j]
        except (AttributeError, IndexError, TypeError):
            return None

    @contextlib.contextmanager
    def attach(self, unet: nn.Module, features: Sequence[torch.Tensor]) -> Iterator[None]:
        """Within the block, every call of ``unet`` is modulated by the condition maps ``features``.

        Args:
            unet: the ``UNet2DConditionModel`` (possibly wrapped by accelerate's offload hooks).
            features: ``L`` maps from the time-aware encoder, level 0 first, with the batch of the UNet's input
                (repeat them for classifier-free guidance).
        """
        if len(features) != self.num_levels:
            raise ValueError(
                f"the SFT layers need {self.num_levels} condition maps (one per level), got {len(features)}"
            )
        handles = []

        def make_hook(spade: SPADE, cond: torch.Tensor):
            def hook(module, args, output):
                return spade(output, cond)

            return hook

        try:
            for target in self.targets():
                resnet = self._resnet(unet, target.path)
                if resnet is None:
                    raise ValueError(f"the UNet has no residual block {'.'.join(map(str, target.path))}")
                handles.append(resnet.conv2.register_forward_hook(make_hook(target.spade, features[target.level])))
            yield
        finally:
            for handle in handles:
                handle.remove()
