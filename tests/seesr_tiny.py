"""Tiny SeeSR components for the tests: StableSR's tiny SD base (tests/stablesr_tiny.py) plus a ControlNet made from
its UNet, the two image cross-attention add-ons, the SD 2-base DDPM scheduler, and the released layout of the
``image_attentions`` keys written from the original architecture (``models/unet_2d_blocks.py``), independently of
the add-on's own builder."""

from __future__ import annotations

import torch
from diffusers import ControlNetModel
from stablesr_tiny import (
    TEXT_DIM,
    UNET_WIDTHS,
    _transformer,
    tiny_text_encoder,
    tiny_tokenizer,
    tiny_unet,
    tiny_vae,
)

from sr_diffusion.models.block_attention import BlockAttentions
from sr_diffusion.models.seesr import seesr_controlnet_from_unet, seesr_image_attentions
from sr_diffusion.pipelines.seesr import seesr_scheduler

IMAGE_DIM = 24  # the soft prompts' width: other than the text's, so that a mix-up fails
COND_CHANNELS = (16, 16, 32)  # the ControlNet's condition encoder: two stride-2 stages = the tiny VAE's f = 4


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter: the ControlNet's zero convolutions would make it a no-op otherwise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def tiny_unet_image_attentions(unet=None, seed: int = 1) -> BlockAttentions:
    torch.manual_seed(seed)
    return seesr_image_attentions(unet or tiny_unet(), IMAGE_DIM).eval()


def tiny_controlnet(unet=None, seed: int = 2) -> tuple[ControlNetModel, BlockAttentions]:
    unet = unet or tiny_unet()
    torch.manual_seed(seed)
    controlnet, extra = seesr_controlnet_from_unet(
        unet, context_dim=IMAGE_DIM, conditioning_embedding_out_channels=COND_CHANNELS
    )
    return perturb(controlnet, seed).eval(), extra.eval()


def tiny_components() -> dict:
    unet = tiny_unet()
    controlnet, controlnet_image_attentions = tiny_controlnet(unet)
    return {
        "vae": tiny_vae(),
        "text_encoder": tiny_text_encoder(),
        "tokenizer": tiny_tokenizer(),
        "unet": unet,
        "scheduler": seesr_scheduler(),
        "controlnet": controlnet,
        "unet_image_attentions": tiny_unet_image_attentions(unet),
        "controlnet_image_attentions": controlnet_image_attentions,
    }


# A tiny open_clip CLIP for DAPE (as tests/test_prompts_dape.py): ViT width 64, 2 blocks, 64px input in 8px patches
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "pool_type": "avg"},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_VOCABULARY = ["dog", "cat", "grass", "sky", "car", "tree"]


def tiny_dape(seed: int = 0, cross_attention_dim: int = IMAGE_DIM):
    """A tiny random DAPE making ``cross_attention_dim``-wide soft prompts, its three best tags as the hard prompt."""
    from sr_diffusion.prompts import DAPE

    torch.manual_seed(seed)
    dape = DAPE.from_open_clip(
        "tiny-vit",
        model_config=TINY_CLIP,
        vocabulary=TINY_VOCABULARY,
        lora_rank=4,
        cross_attention_dim=cross_attention_dim,
        top_k=3,
        threshold=None,
    )
    return perturb(dape.projector, seed + 1, scale=0.1) and dape


def soft_prompts(seed: int = 0, batch: int = 1, tokens: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, IMAGE_DIM, generator=g)


# ----------------------------------------------------------------------------------------------------------------------
# The released layout of the image cross-attention keys (SeeSR's CrossAttnDownBlock2D / UNetMidBlock2DCrossAttn /
# CrossAttnUpBlock2D with use_image_cross_attention=True): per block, one Transformer2DModel per text attention, of the
# block's output width, built with the text attention's arguments but cross_attention_dim=image_cross_attention_dim
# ----------------------------------------------------------------------------------------------------------------------


def seesr_image_attention_shapes(
    widths=UNET_WIDTHS,
    down_cross_attention=(False, True),
    up_cross_attention=(True, False),
    layers_per_block: int = 1,
    context: int = IMAGE_DIM,
    linear: bool = False,
    up: bool = True,
) -> dict[str, tuple]:
    """``{name: shape}`` of the ``image_attentions`` keys of the original UNet (``up=True``) or ControlNet
    (``up=False``: down and mid blocks only)."""
    shapes: dict[str, tuple] = {}
    for i, has_attention in enumerate(down_cross_attention):
        if has_attention:
            for j in range(layers_per_block):
                shapes.update(_transformer(f"down_blocks.{i}.image_attentions.{j}", widths[i], context, linear))
    shapes.update(_transformer("mid_block.image_attentions.0", widths[-1], context, linear))
    if up:
        reversed_widths = list(reversed(widths))
        for i, has_attention in enumerate(up_cross_attention):
            if has_attention:
                for j in range(layers_per_block + 1):
                    name = f"up_blocks.{i}.image_attentions.{j}"
                    shapes.update(_transformer(name, reversed_widths[i], context, linear))
    return shapes


__all__ = [
    "COND_CHANNELS",
    "IMAGE_DIM",
    "TEXT_DIM",
    "perturb",
    "seesr_image_attention_shapes",
    "soft_prompts",
    "tiny_components",
    "tiny_controlnet",
    "tiny_dape",
    "tiny_unet_image_attentions",
]
