"""SeeSR's model parts on diffusers classes: the image cross-attention add-ons, the LR ControlNet, and the conditioned
denoiser call that the pipeline and the training share.

Wu et al., "SeeSR: Towards Semantics-Aware Real-World Image Super-Resolution", CVPR 2024, Sec. 3.2; released code
``models/unet_2d_condition.py``, ``models/controlnet.py``, ``models/unet_2d_blocks.py`` (facts only). Notation and
shapes (``N`` images, ``f`` the VAE factor):

- ``z_t`` ``(N, 4, H/f, W/f)``: the noisy latent; ``t``: the timestep (1000-step scale);
- ``c_text`` ``(N, 77, D_text)``: the text embedding of the hard prompt (tags + quality words);
- ``p_soft`` ``(N, L, D_img)``: the soft prompts (DAPE's image tokens), attended to by the *image cross-attention*:
  after every text cross-attention ``Transformer2DModel`` (``attentions[j]``) of the down, middle and up blocks of the
  UNet and of the down and middle blocks of the ControlNet, ``h <- ImageAttn(h, p_soft)``, a ``Transformer2DModel``
  with the block's own attention settings and ``cross_attention_dim = D_img``. Released names:
  ``{block}.image_attentions.{j}.…``; the released model hard-codes ``D_img = 512`` (RAM's ``image_embeds``; the
  original blocks' ``image_cross_attention_dim=512`` default is never overridden);
- ``x_lr`` ``(N, 3, H, W)`` in [0, 1]: the LR image upsampled to the output size, the ControlNet's condition;
- ``eps = UNet(z_t, t, c_text, p_soft; ControlNet(z_t, t, c_text, p_soft, x_lr) · scale)``.

The ControlNet is diffusers' own ``ControlNetModel``: SeeSR's ``models/controlnet.py`` is diffusers 0.21's with the
image cross-attention added and nothing else changed (same conditioning embedding, ``(16, 32, 96, 256)`` channels,
zero convolutions and mid block); it is built from the UNet as the original's ``ControlNetModel.from_unet``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from .block_attention import BlockAttentions

__all__ = [
    "SEESR_IMAGE_ATTENTIONS",
    "SEESR_IMAGE_CONTEXT_DIM",
    "null_image_prompt",
    "seesr_controlnet_from_unet",
    "seesr_image_attentions",
    "seesr_noise_pred",
]

#: the attribute (and released parameter-name part) of the image cross-attention layers
SEESR_IMAGE_ATTENTIONS = "image_attentions"
#: the released model's soft-prompt width (RAM's ``image_embeds``)
SEESR_IMAGE_CONTEXT_DIM = 512


def seesr_image_attentions(model: torch.nn.Module, context_dim: int = SEESR_IMAGE_CONTEXT_DIM) -> BlockAttentions:
    """SeeSR's image cross-attention layers for ``model`` (a ``UNet2DConditionModel`` or a ``ControlNetModel``): one
    after every text cross-attention, attending to ``context_dim``-wide soft prompts; freshly initialised (the
    original's default ``Transformer2DModel`` initialisation)."""
    return BlockAttentions.after_cross_attention(model, name=SEESR_IMAGE_ATTENTIONS, context_dim=context_dim)


def seesr_controlnet_from_unet(
    unet: UNet2DConditionModel,
    unet_image_attentions: BlockAttentions | None = None,
    context_dim: int | None = None,
    conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256),
) -> tuple[ControlNetModel, BlockAttentions]:
    """``(controlnet, controlnet_image_attentions)`` initialised as the original's ``ControlNetModel.from_unet(unet,
    use_image_cross_attention=True)``: the ControlNet copies the UNet's input convolution, time embedding, down and
    mid blocks, and its image cross-attention layers copy the UNet's down/mid ones (the original loads
    ``unet.down_blocks`` / ``unet.mid_block`` state dicts, image attentions included, into the ControlNet's).

    Args:
        unet: the SD UNet.
        unet_image_attentions: the UNet's image cross-attention add-on to copy from; ``None``: fresh layers.
        context_dim: the soft-prompt width; default: ``unet_image_attentions``' (else :data:`SEESR_IMAGE_CONTEXT_DIM`).
        conditioning_embedding_out_channels: the condition encoder's widths; one stride-2 stage per entry after the
            first, so ``2^(len - 1)`` must be the VAE's factor (SD: 8, the default).
    """
    if context_dim is None:
        context_dim = SEESR_IMAGE_CONTEXT_DIM if unet_image_attentions is None else _context_dim(unet_image_attentions)
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels)
    )
    extra = seesr_image_attentions(controlnet, context_dim)
    if unet_image_attentions is not None:
        if _context_dim(unet_image_attentions) != context_dim:
            raise ValueError(
                f"the UNet's image attentions take {_context_dim(unet_image_attentions)}-d soft prompts, "
                f"context_dim={context_dim}"
            )
        source = unet_image_attentions.state_dict()
        target = extra.state_dict()
        with torch.no_grad():
            for key, value in target.items():
                value.copy_(source[key])  # every ControlNet position (down, mid) exists in the UNet's add-on
    return controlnet, extra


def _context_dim(extra: BlockAttentions) -> int:
    dims = {int(layer["cross_attention_dim"]) for layer in extra.config.layers}
    if len(dims) != 1:
        raise ValueError(f"the image attentions have mixed context widths {sorted(dims)}")
    return dims.pop()


def null_image_prompt(batch_size: int, context_dim: int, device=None, dtype=None) -> torch.Tensor:
    """The soft prompt used when there are none (no prompt extractor, none given): one zero token ``(N, 1, D)``.

    The image cross-attention's keys and values have no bias, so it attends to nothing and adds only its output
    projection's bias (and the block's residual path): the same for every image, as an empty text prompt is."""
    return torch.zeros(batch_size, 1, context_dim, device=device, dtype=dtype)


def seesr_noise_pred(
    unet: UNet2DConditionModel,
    controlnet: ControlNetModel,
    unet_image_attentions: BlockAttentions,
    controlnet_image_attentions: BlockAttentions,
    sample: torch.Tensor,
    timestep: torch.Tensor | int,
    encoder_hidden_states: torch.Tensor,
    controlnet_cond: torch.Tensor,
    image_prompt_embeds: torch.Tensor,
    conditioning_scale: float = 1.0,
) -> torch.Tensor:
    """One conditioned denoiser evaluation (the original's ``controlnet(...)`` then ``unet(...)`` pair).

    Args:
        sample: ``z_t`` ``(B, 4, h, w)`` (already through ``scheduler.scale_model_input``).
        timestep: a scalar or ``(B,)``.
        encoder_hidden_states: ``c_text`` ``(B, L, D_text)``.
        controlnet_cond: ``x_lr`` ``(B, 3, f·h, f·w)`` in [0, 1].
        image_prompt_embeds: ``p_soft`` ``(B', L', D_img)`` with ``B'`` dividing ``B`` (repeated, e.g. for both halves
            of classifier-free guidance).
        conditioning_scale: multiplies the ControlNet's residuals.

    Returns:
        The UNet output ``(B, 4, h, w)`` in ``sample``'s dtype.
    """
    dtype = unet.dtype
    text = encoder_hidden_states.to(dtype)
    with controlnet_image_attentions.attach(controlnet, image_prompt_embeds):
        down, mid = controlnet(
            sample.to(controlnet.dtype),
            timestep,
            encoder_hidden_states=text.to(controlnet.dtype),
            controlnet_cond=controlnet_cond.to(controlnet.dtype),
            conditioning_scale=float(conditioning_scale),
            return_dict=False,
        )
    with unet_image_attentions.attach(unet, image_prompt_embeds):
        out = unet(
            sample.to(dtype),
            timestep,
            encoder_hidden_states=text,
            down_block_additional_residuals=[d.to(dtype) for d in down],
            mid_block_additional_residual=mid.to(dtype),
            return_dict=False,
        )[0]
    return out.to(sample.dtype)
