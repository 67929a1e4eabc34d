"""PASD's ControlNet: a diffusers ``ControlNetModel`` whose condition encoder is PASD's degradation-removal module.

Paper: T. Yang, R. Wu, P. Ren, X. Xie, L. Zhang, "Pixel-Aware Stable Diffusion for Realistic Image Super-Resolution and
Personalized Stylization", ECCV 2024 (arXiv:2308.14469), Sec. 3.2 ("degradation removal module") and Fig. 2. Released
code: ``pasd/models/pasd/controlnet.py`` (``ControlNetModel`` and its ``ControlNetConditioningEmbedding``; facts only).

The ControlNet is diffusers' (a trainable copy of the SD UNet's encoder and middle block, zero-initialised 1×1
"controlnet blocks" on every skip, Zhang et al. 2023). Only its condition encoder differs from diffusers':

- input: the LR image ``y`` upsampled to the output size, ``(N, 3, H, W)`` in **[0, 1]** (the original feeds it
  unnormalised, in training and at inference);
- ``conv_in`` (3×3, to ``c_0`` channels) → SiLU → optionally two RRDBs (``use_rrdb``: ``preprocesser``, the
  ``pasd_rrdb`` / ``pasd_light_rrdb`` models; ``RRDB(c_0, num_grow_ch=c_0)``, BasicSR's block) → for each level
  ``k = 1 … K-1``: a 3×3 conv (``c_{k-1} → c_{k-1}``) → SiLU → a stride-2 3×3 conv (``c_{k-1} → c_k``) → SiLU, and,
  with ``return_rgbs``, ``to_rgbs[k-1]``: a 3×3 conv to 3 channels of that level's features; the last level goes
  through the zero-initialised ``conv_out`` to the ControlNet's width and is added to its ``conv_in(z_t)``;
- the RGB outputs ``I_k`` ``(N, 3, H / 2^k, W / 2^k)`` (``k = 1 … K-1``; ``K = 4``: ``H/2, H/4, H/8``) are what the
  degradation-removal loss pulls towards the HR image ``x`` (in [-1, 1]) downsampled to their size,
  ``sum_k || I_k - bilinear(x, H / 2^k) ||_1`` (``train_pasd.py``).

:class:`PASDControlNetModel` subclasses ``diffusers.ControlNetModel`` (its forward, attention processors, gradient
checkpointing and ``from_unet`` are diffusers'), swaps ``controlnet_cond_embedding`` for
:class:`PASDConditioningEmbedding`, and collects the RGB outputs with forward hooks during a call. Parameter names and
config keys are the original's (``controlnet_cond_embedding.{conv_in, preprocesser.{0,1}.rdb{1,2,3}.conv{1..5},
blocks.{i}, to_rgbs.{k}, conv_out}``; config ``return_rgbs``, ``use_rrdb``), so a released ``controlnet/`` folder
(``config.json`` + ``diffusion_pytorch_model.bin`` / ``.safetensors``) loads with ``from_pretrained`` and no missing or
unexpected keys.

Not carried over: the original's ``fg_mask`` argument (foreground/background conditioning scales of 1.5 / 0.6, not
used by its pipelines).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ModelMixin by name: diffusers' pipeline loader looks a saved component's base class up in its module
from diffusers import ControlNetModel, ModelMixin, UNet2DConditionModel  # noqa: F401
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn

from .rrdbnet import RRDB

__all__ = ["PASDConditioningEmbedding", "PASDControlNetModel", "PASDControlNetOutput"]

#: RRDBs in the degradation-removal module's ``preprocesser`` (the original hard-codes 2)
NUM_RRDB = 2


@dataclass
class PASDControlNetOutput(BaseOutput):
    """Output of :class:`PASDControlNetModel`.

    Args:
        down_block_res_samples (`tuple` of `torch.Tensor`): one residual per skip connection of the UNet encoder,
            ``(N, C_i, h_i, w_i)`` in execution order, already times ``conditioning_scale``.
        mid_block_res_sample (`torch.Tensor`): the middle block's residual ``(N, C_mid, h_mid, w_mid)``, scaled.
        rgbs (`tuple` of `torch.Tensor` or `None`): the degradation-removal module's RGB outputs ``I_k``,
            ``(N, 3, H / 2^k, W / 2^k)`` for ``k = 1 … K-1`` (about [-1, 1] once trained); None without ``return_rgbs``.
    """

    down_block_res_samples: tuple[torch.Tensor, ...]
    mid_block_res_sample: torch.Tensor
    rgbs: tuple[torch.Tensor, ...] | None = None


class PASDConditioningEmbedding(nn.Module):
    """PASD's degradation-removal module: ``(N, 3, H, W)`` in [0, 1] → the ControlNet's input features
    ``(N, conditioning_embedding_channels, H / 2^(K-1), W / 2^(K-1))`` (see the module docstring).

    ``forward`` returns the features alone (what ``ControlNetModel.forward`` expects); :meth:`embed` also returns the
    RGB outputs, which ``forward`` computes too when ``return_rgbs`` (so that hooks on ``to_rgbs`` see them).
    """

    def __init__(
        self,
        conditioning_embedding_channels: int,
        conditioning_channels: int = 3,
        block_out_channels: Sequence[int] = (16, 32, 96, 256),
        return_rgbs: bool = True,
        use_rrdb: bool = False,
    ):
        super().__init__()
        if len(block_out_channels) < 2:
            raise ValueError(f"conditioning_embedding_out_channels needs at least 2 widths, got {block_out_channels}")
        self.return_rgbs = return_rgbs
        self.use_rrdb = use_rrdb
        widths = list(block_out_channels)
        self.conv_in = nn.Conv2d(conditioning_channels, widths[0], kernel_size=3, padding=1)
        if use_rrdb:
            self.preprocesser = nn.Sequential(*(RRDB(widths[0], widths[0]) for _ in range(NUM_RRDB)))
        self.blocks = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            self.blocks.append(nn.Conv2d(c_in, c_in, kernel_size=3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=2))
            if return_rgbs:
                self.to_rgbs.append(nn.Conv2d(c_out, 3, kernel_size=3, padding=1))
        self.conv_out = nn.Conv2d(widths[-1], conditioning_embedding_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def embed(self, conditioning: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(features, [I_1, …, I_{K-1}])``; the list is empty without ``return_rgbs``."""
        h = F.silu(self.conv_in(conditioning))
        if self.use_rrdb:
            h = self.preprocesser(h)
        rgbs = []
        for i, block in enumerate(self.blocks):
            h = F.silu(block(h))
            if i % 2 == 1 and self.return_rgbs:
                rgbs.append(self.to_rgbs[i // 2](h))
        return self.conv_out(h), rgbs

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        return self.embed(conditioning)[0]


class PASDControlNetModel(ControlNetModel):
    r"""PASD's ControlNet (Yang et al., ECCV 2024): ``diffusers.ControlNetModel`` with PASD's degradation-removal
    module as its condition encoder; see the module docstring.

    Args:
        return_rgbs: build ``to_rgbs`` and return the multi-scale RGB outputs (the released models: True).
        use_rrdb: two RRDBs after the encoder's ``conv_in`` (``pasd_rrdb``; the released ``pasd``: False).
        **kwargs: ``ControlNetModel``'s arguments (the released model: SD 1.5's UNet configuration,
            ``conditioning_embedding_out_channels=(16, 32, 96, 256)``).

    ``forward(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0, ...)`` takes
    ``sample`` ``(N, 4, h, w)`` (the noisy latent ``z_t``), ``controlnet_cond`` ``(N, 3, 8h, 8w)`` in [0, 1] and
    returns a :class:`PASDControlNetOutput` (or ``(down_block_res_samples, mid_block_res_sample, rgbs)``).
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        conditioning_channels: int = 3,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        only_cross_attention: bool | tuple[bool] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1280,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int | tuple[int, ...] = 8,
        num_attention_heads: int | tuple[int, ...] | None = None,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        projection_class_embeddings_input_dim: int | None = None,
        controlnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] | None = (16, 32, 96, 256),
        global_pool_conditions: bool = False,
        addition_embed_type_num_heads: int = 64,
        return_rgbs: bool = True,
        use_rrdb: bool = False,
    ):
        super().__init__(
            in_channels=in_channels,
            conditioning_channels=conditioning_channels,
            flip_sin_to_cos=flip_sin_to_cos,
            freq_shift=freq_shift,
            down_block_types=down_block_types,
            mid_block_type=mid_block_type,
            only_cross_attention=only_cross_attention,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            downsample_padding=downsample_padding,
            mid_block_scale_factor=mid_block_scale_factor,
            act_fn=act_fn,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            cross_attention_dim=cross_attention_dim,
            transformer_layers_per_block=transformer_layers_per_block,
            encoder_hid_dim=encoder_hid_dim,
            encoder_hid_dim_type=encoder_hid_dim_type,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            use_linear_projection=use_linear_projection,
            class_embed_type=class_embed_type,
            addition_embed_type=addition_embed_type,
            addition_time_embed_dim=addition_time_embed_dim,
            num_class_embeds=num_class_embeds,
            upcast_attention=upcast_attention,
            resnet_time_scale_shift=resnet_time_scale_shift,
            projection_class_embeddings_input_dim=projection_class_embeddings_input_dim,
            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
            conditioning_embedding_out_channels=conditioning_embedding_out_channels,
            global_pool_conditions=global_pool_conditions,
            addition_embed_type_num_heads=addition_embed_type_num_heads,
        )
        self.controlnet_cond_embedding = PASDConditioningEmbedding(
            conditioning_embedding_channels=block_out_channels[0],
            conditioning_channels=conditioning_channels,
            block_out_channels=conditioning_embedding_out_channels,
            return_rgbs=return_rgbs,
            use_rrdb=use_rrdb,
        )

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        controlnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] | None = (16, 32, 96, 256),
        load_weights_from_unet: bool = True,
        conditioning_channels: int = 3,
        return_rgbs: bool = True,
        use_rrdb: bool = False,
    ) -> PASDControlNetModel:
        """diffusers' ``ControlNetModel.from_unet`` (the encoder and middle block copied from ``unet``, as the
        original initialises training), with PASD's degradation-removal module (``return_rgbs``, ``use_rrdb``)."""
        controlnet = super().from_unet(
            unet,
            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
            conditioning_embedding_out_channels=conditioning_embedding_out_channels,
            load_weights_from_unet=load_weights_from_unet,
            conditioning_channels=conditioning_channels,
        )
        if (return_rgbs, use_rrdb) != (controlnet.config.return_rgbs, controlnet.config.use_rrdb):
            controlnet.controlnet_cond_embedding = PASDConditioningEmbedding(
                conditioning_embedding_channels=controlnet.config.block_out_channels[0],
                conditioning_channels=conditioning_channels,
                block_out_channels=conditioning_embedding_out_channels,
                return_rgbs=return_rgbs,
                use_rrdb=use_rrdb,
            ).to(device=controlnet.device, dtype=controlnet.dtype)
        # explicit values: diffusers' from_config would replace a key it recorded as defaulted by the default
        flags = ("return_rgbs", "use_rrdb")
        defaulted = [k for k in controlnet.config.get("_use_default_values", []) if k not in flags]
        controlnet.register_to_config(return_rgbs=return_rgbs, use_rrdb=use_rrdb, _use_default_values=defaulted)
        return controlnet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict | None = None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ) -> PASDControlNetOutput | tuple:
        """``ControlNetModel.forward`` (see the class docstring for the shapes), plus the RGB outputs of the
        degradation-removal module when ``return_rgbs``."""
        rgbs: list[torch.Tensor] = []
        handles = [conv.register_forward_hook(lambda m, a, out: rgbs.append(out)) for conv in self._rgb_convs()]
        try:
            down, mid = super().forward(
                sample,
                timestep,
                encoder_hidden_states=encoder_hidden_states,
                controlnet_cond=controlnet_cond,
                conditioning_scale=conditioning_scale,
                class_labels=class_labels,
                timestep_cond=timestep_cond,
                attention_mask=attention_mask,
                added_cond_kwargs=added_cond_kwargs,
                cross_attention_kwargs=cross_attention_kwargs,
                guess_mode=guess_mode,
                return_dict=False,
            )
        finally:
            for handle in handles:
                handle.remove()
        out_rgbs = tuple(rgbs) if self.config.return_rgbs else None
        if not return_dict:
            return tuple(down), mid, out_rgbs
        return PASDControlNetOutput(down_block_res_samples=tuple(down), mid_block_res_sample=mid, rgbs=out_rgbs)

    def _rgb_convs(self) -> list[nn.Module]:
        return list(self.controlnet_cond_embedding.to_rgbs) if self.config.return_rgbs else []
