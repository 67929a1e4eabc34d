"""Tiny PASD components for the tests: StableSR's tiny SD base (tests/stablesr_tiny.py) plus a PASD ControlNet made
from its UNet, the pixel-aware cross-attention add-on, a UniPC scheduler (the original's), and the released layout of
PASD's extra keys and its UNet forward (:func:`reference_pasd_unet`) written from the original architecture
(``pasd/models/pasd/controlnet.py``, ``unet_2d_condition.py`` and ``unet_2d_blocks.py``), independently of our
builders and hooks."""

from __future__ import annotations

import torch
from diffusers import UniPCMultistepScheduler
from stablesr_tiny import (  # noqa: F401  (lr_image: re-exported for the PASD tests)
    UNET_WIDTHS,
    _transformer,
    lr_image,
    tiny_text_encoder,
    tiny_tokenizer,
    tiny_unet,
    tiny_vae,
)

from sr_diffusion.models.block_attention import BlockAttentions
from sr_diffusion.models.pasd_controlnet import PASDControlNetModel

COND_CHANNELS = (8, 16, 32)  # the degradation-removal module: two stride-2 stages = the tiny VAE's f = 4


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter: the ControlNet's zero convolutions would make it a no-op otherwise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def tiny_scheduler() -> UniPCMultistepScheduler:
    """SD 1.5's schedule (``scaled_linear``, 0.00085 → 0.012) in the UniPC sampler the original's inference uses."""
    return UniPCMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def tiny_controlnet(unet=None, seed: int = 2, use_rrdb: bool = False) -> PASDControlNetModel:
    torch.manual_seed(seed)
    controlnet = PASDControlNetModel.from_unet(
        unet or tiny_unet(), conditioning_embedding_out_channels=COND_CHANNELS, use_rrdb=use_rrdb
    )
    return perturb(controlnet, seed).eval()


def tiny_pixel_attentions(unet=None, seed: int = 3) -> BlockAttentions:
    torch.manual_seed(seed)
    return perturb(BlockAttentions.pasd_pixel_attentions(unet or tiny_unet()), seed).eval()


def tiny_components(**overrides) -> dict:
    unet = tiny_unet()
    components = {
        "vae": tiny_vae(),
        "text_encoder": tiny_text_encoder(),
        "tokenizer": tiny_tokenizer(),
        "unet": unet,
        "scheduler": tiny_scheduler(),
        "controlnet": tiny_controlnet(unet),
        "pixel_attentions": tiny_pixel_attentions(unet),
    }
    return {**components, **overrides}


# ----------------------------------------------------------------------------------------------------------------------
# The released layout, from the original architectures
# ----------------------------------------------------------------------------------------------------------------------


def reference_pasd_unet(unet, extra, sample, t, text, residuals, mid_residual):
    """PASD's ``UNet2DConditionModel.forward`` / ``CrossAttnUpBlock2D`` / ``UpBlock2D`` written against the diffusers
    modules: the residuals are added to the skips, and each up layer's PACA attends to the residual its skip pops."""
    emb = unet.time_embedding(unet.time_proj(t.expand(sample.shape[0])).to(sample.dtype))
    h = unet.conv_in(sample)
    skips = [h]
    for block in unet.down_blocks:
        for j, resnet in enumerate(block.resnets):
            h = resnet(h, emb)
            if getattr(block, "attentions", None):
                h = block.attentions[j](h, encoder_hidden_states=text, return_dict=False)[0]
            skips.append(h)
        for down in block.downsamplers or []:
            skips.append(h := down(h))
    skips = [s + r for s, r in zip(skips, residuals)]
    pixelwise = list(residuals)
    h = unet.mid_block(h, emb, encoder_hidden_states=text) + mid_residual
    for i, block in enumerate(unet.up_blocks):
        for j, resnet in enumerate(block.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), emb)
            if getattr(block, "attentions", None):
                h = block.attentions[j](h, encoder_hidden_states=text, return_dict=False)[0]
            context = pixelwise.pop().flatten(2).transpose(1, 2)  # 'b c h w -> b (h w) c'
            h = extra.up_blocks[i].pixel_attentions[j](h, encoder_hidden_states=context, return_dict=False)[0]
        for up in block.upsamplers or []:
            h = up(h)
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))


def original_pixel_attention_shapes(
    widths=UNET_WIDTHS,
    up_cross_attention=(True, False),
    layers_per_block: int = 1,
    linear: bool = False,
) -> dict[str, tuple]:
    """``up_blocks.{i}.pixel_attentions.{j}.*`` of PASD's ``UNet2DConditionModel``: each up block has
    ``layers_per_block + 1`` layers; in a ``CrossAttnUpBlock2D`` the layer's context is its skip (``res_skip_channels``:
    the level's width, the level above's for the last layer), in an ``UpBlock2D`` the block's output width."""
    shapes: dict[str, tuple] = {}
    reversed_widths = list(reversed(widths))
    for i, cross in enumerate(up_cross_attention):
        out_channels = reversed_widths[i]
        in_channels = reversed_widths[min(i + 1, len(widths) - 1)]
        for j in range(layers_per_block + 1):
            res_skip = in_channels if j == layers_per_block else out_channels
            context = res_skip if cross else out_channels
            shapes.update(_transformer(f"up_blocks.{i}.pixel_attentions.{j}", out_channels, context, linear))
    return shapes


def original_condition_embedding_shapes(
    widths=COND_CHANNELS, out_channels: int = UNET_WIDTHS[0], use_rrdb: bool = False, return_rgbs: bool = True
) -> dict[str, tuple]:
    """``controlnet_cond_embedding.*`` of PASD's ``ControlNetConditioningEmbedding``: ``conv_in``, the optional
    ``preprocesser`` (two BasicSR RRDBs of ``widths[0]`` features and growth), ``blocks`` (a 3×3 conv and a stride-2
    3×3 conv per level), ``to_rgbs`` (one 3×3 conv to RGB per level) and ``conv_out``."""
    c0 = widths[0]
    shapes: dict[str, tuple] = {"conv_in.weight": (c0, 3, 3, 3), "conv_in.bias": (c0,)}
    if use_rrdb:
        for b in range(2):
            for r in (1, 2, 3):
                for n in range(1, 6):
                    # conv1-4: nf + (n-1)·gc → gc, conv5: nf + 4·gc → nf; here nf = gc = c0
                    key = f"preprocesser.{b}.rdb{r}.conv{n}"
                    shapes |= {f"{key}.weight": (c0, c0 + (n - 1) * c0, 3, 3), f"{key}.bias": (c0,)}
    for k, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
        shapes |= {f"blocks.{2 * k}.weight": (c_in, c_in, 3, 3), f"blocks.{2 * k}.bias": (c_in,)}
        shapes |= {f"blocks.{2 * k + 1}.weight": (c_out, c_in, 3, 3), f"blocks.{2 * k + 1}.bias": (c_out,)}
        if return_rgbs:
            shapes |= {f"to_rgbs.{k}.weight": (3, c_out, 3, 3), f"to_rgbs.{k}.bias": (3,)}
    shapes |= {"conv_out.weight": (out_channels, widths[-1], 3, 3), "conv_out.bias": (out_channels,)}
    return {f"controlnet_cond_embedding.{k}": v for k, v in shapes.items()}


def original_controlnet_config(unet, use_rrdb: bool = False) -> dict:
    """A ``controlnet/config.json`` as the original's ``ControlNetModel.from_unet`` + ``save_pretrained`` write it (an
    older diffusers: no ``mid_block_type``), for ``unet``."""
    c = unet.config
    return {
        "_class_name": "ControlNetModel",
        "_diffusers_version": "0.21.4",
        "act_fn": c.act_fn,
        "addition_embed_type": None,
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": None,
        "attention_head_dim": c.attention_head_dim,
        "block_out_channels": list(c.block_out_channels),
        "class_embed_type": None,
        "conditioning_channels": 3,
        "conditioning_embedding_out_channels": list(COND_CHANNELS),
        "controlnet_conditioning_channel_order": "rgb",
        "cross_attention_dim": c.cross_attention_dim,
        "down_block_types": list(c.down_block_types),
        "downsample_padding": 1,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "global_pool_conditions": False,
        "in_channels": 4,
        "layers_per_block": c.layers_per_block,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": c.norm_num_groups,
        "num_attention_heads": None,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "projection_class_embeddings_input_dim": None,
        "resnet_time_scale_shift": "default",
        "return_rgbs": True,
        "transformer_layers_per_block": 1,
        "upcast_attention": False,
        "use_linear_projection": False,
        "use_rrdb": use_rrdb,
    }
