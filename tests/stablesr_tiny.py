"""Tiny StableSR components for the tests: an SD-like base the way diffusers' own tests build one (random weights,
``block_out_channels=(32, 64)``), an offline CLIP tokenizer, and the original (LDM) parameter layout of such a base.

Nothing here downloads anything: the tokenizer is built from a vocabulary and merges file written to a temporary
folder (lower-case letters, digits and a little punctuation, byte-level as CLIP's; anything else is the unknown token).
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sr_diffusion.models.stablesr_cfw import StableSRCFW
from sr_diffusion.models.stablesr_encoder import StableSRTimeAwareEncoder
from sr_diffusion.models.stablesr_sft import StableSRSFT
from sr_diffusion.pipelines.stablesr import stablesr_scheduler

UNET_WIDTHS = (32, 64)
VAE_WIDTHS = (32, 32, 64)  # f = 4, one CFW level (1)
TEXT_DIM = 32


def write_tokenizer_files(folder: str | Path) -> Path:
    """``vocab.json`` and ``merges.txt`` of a tiny byte-level BPE vocabulary (no merges) in ``folder``."""
    folder = Path(folder)
    specials = ["<|startoftext|>", "<|endoftext|>"]
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(i) for i in range(10)] + list(".,!?-'")
    vocab = {token: i for i, token in enumerate(specials + chars + [c + "</w>" for c in chars])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as folder:
        write_tokenizer_files(folder)
        return CLIPTokenizer.from_pretrained(folder, model_max_length=77, local_files_only=True)


def tiny_unet(cross_attention_dim: int = TEXT_DIM, **overrides) -> UNet2DConditionModel:
    torch.manual_seed(0)
    config = dict(
        block_out_channels=UNET_WIDTHS,
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=16,  # two channels per group at 32: the 1x1 bottom of a 2x2 latent can be normalised
    )
    return UNet2DConditionModel(**{**config, **overrides}).eval()


def tiny_vae(widths=VAE_WIDTHS) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=widths,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=32,
    ).eval()


def tiny_text_encoder(hidden_size: int = TEXT_DIM) -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=100,
        max_position_embeddings=77,
    )
    return CLIPTextModel(config).eval()


def tiny_encoder(seed: int = 0) -> StableSRTimeAwareEncoder:
    torch.manual_seed(seed)
    return StableSRTimeAwareEncoder(
        model_channels=64,  # >= 64 everywhere: two channels per GroupNorm group, so 1x1 maps can be normalised
        out_channels=64,
        num_res_blocks=1,
        attention_resolutions=(2,),
        channel_mult=(1, 1),
        num_heads=2,
    )


def tiny_sft(seed: int = 0) -> StableSRSFT:
    torch.manual_seed(seed)
    return StableSRSFT(block_out_channels=UNET_WIDTHS, layers_per_block=1, cond_channels=64, hidden_channels=16)


def tiny_cfw(widths=VAE_WIDTHS, seed: int = 0) -> StableSRCFW:
    torch.manual_seed(seed)
    return StableSRCFW(block_out_channels=widths, num_fuse_block=1, num_grow_ch=8)


def tiny_components(cfw: bool = True) -> dict:
    return {
        "vae": tiny_vae(),
        "text_encoder": tiny_text_encoder(),
        "tokenizer": tiny_tokenizer(),
        "unet": tiny_unet(),
        "scheduler": stablesr_scheduler(),
        "time_aware_encoder": tiny_encoder(),
        "sft": tiny_sft(),
        "cfw": tiny_cfw() if cfw else None,
    }


def lr_image(seed: int, size=(8, 8)) -> torch.Tensor:
    """A smooth random LR image (1, 3, h, w) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 3, 3, generator=g)
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=True).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------------------
# The original (LDM) layout: names and shapes written from the architectures of ldm's openaimodel.py (UNetModel with
# SpatialTransformer) and model.py (Encoder / Decoder), independently of any converter
# ----------------------------------------------------------------------------------------------------------------------


def _resblock(prefix: str, cin: int, cout: int, emb: int) -> dict[str, tuple]:
    shapes = {
        "in_layers.0.weight": (cin,),
        "in_layers.0.bias": (cin,),
        "in_layers.2.weight": (cout, cin, 3, 3),
        "in_layers.2.bias": (cout,),
        "emb_layers.1.weight": (cout, emb),
        "emb_layers.1.bias": (cout,),
        "out_layers.0.weight": (cout,),
        "out_layers.0.bias": (cout,),
        "out_layers.3.weight": (cout, cout, 3, 3),
        "out_layers.3.bias": (cout,),
    }
    if cin != cout:
        shapes |= {"skip_connection.weight": (cout, cin, 1, 1), "skip_connection.bias": (cout,)}
    return {f"{prefix}.{k}": v for k, v in shapes.items()}


def _spade(prefix: str, channels: int, cond: int, hidden: int) -> dict[str, tuple]:
    shapes = {
        "param_free_norm.weight": (channels,),
        "param_free_norm.bias": (channels,),
        "mlp_shared.0.weight": (hidden, cond, 3, 3),
        "mlp_shared.0.bias": (hidden,),
        "mlp_gamma.weight": (channels, hidden, 3, 3),
        "mlp_gamma.bias": (channels,),
        "mlp_beta.weight": (channels, hidden, 3, 3),
        "mlp_beta.bias": (channels,),
    }
    return {f"{prefix}.spade.{k}": v for k, v in shapes.items()}


def _transformer(prefix: str, c: int, context: int, linear: bool) -> dict[str, tuple]:
    proj = (c, c) if linear else (c, c, 1, 1)
    shapes = {"norm.weight": (c,), "norm.bias": (c,), "proj_in.weight": proj, "proj_in.bias": (c,)}
    block = {
        "attn1.to_q.weight": (c, c),
        "attn1.to_k.weight": (c, c),
        "attn1.to_v.weight": (c, c),
        "attn1.to_out.0.weight": (c, c),
        "attn1.to_out.0.bias": (c,),
        "ff.net.0.proj.weight": (8 * c, c),
        "ff.net.0.proj.bias": (8 * c,),
        "ff.net.2.weight": (c, 4 * c),
        "ff.net.2.bias": (c,),
        "attn2.to_q.weight": (c, c),
        "attn2.to_k.weight": (c, context),
        "attn2.to_v.weight": (c, context),
        "attn2.to_out.0.weight": (c, c),
        "attn2.to_out.0.bias": (c,),
    }
    for n in (1, 2, 3):
        block |= {f"norm{n}.weight": (c,), f"norm{n}.bias": (c,)}
    shapes |= {f"transformer_blocks.0.{k}": v for k, v in block.items()}
    shapes |= {"proj_out.weight": proj, "proj_out.bias": (c,)}
    return {f"{prefix}.{k}": v for k, v in shapes.items()}


def ldm_unet_shapes(
    widths=UNET_WIDTHS,
    attention=(False, True),
    layers_per_block: int = 1,
    context: int = TEXT_DIM,
    linear: bool = False,
    sft: tuple[int, int] | None = (64, 16),
) -> dict[str, tuple]:
    """``UNetModelDualcondV2`` (or, with ``sft=None``, SD's ``UNetModel``) names and shapes, without the
    ``model.diffusion_model.`` prefix; ``sft = (cond_channels, hidden)`` adds the ``spade`` layers."""
    mc, emb = widths[0], 4 * widths[0]
    shapes: dict[str, tuple] = {
        "time_embed.0.weight": (emb, mc),
        "time_embed.0.bias": (emb,),
        "time_embed.2.weight": (emb, emb),
        "time_embed.2.bias": (emb,),
        "input_blocks.0.0.weight": (mc, 4, 3, 3),
        "input_blocks.0.0.bias": (mc,),
    }

    def res(prefix, cin, cout):
        shapes.update(_resblock(prefix, cin, cout, emb))
        if sft is not None:
            shapes.update(_spade(prefix, cout, *sft))

    chans, ch, k = [mc], mc, 1
    for level, width in enumerate(widths):
        for _ in range(layers_per_block):
            res(f"input_blocks.{k}.0", ch, width)
            ch = width
            if attention[level]:
                shapes.update(_transformer(f"input_blocks.{k}.1", ch, context, linear))
            chans.append(ch)
            k += 1
        if level != len(widths) - 1:
            shapes |= {f"input_blocks.{k}.0.op.weight": (ch, ch, 3, 3), f"input_blocks.{k}.0.op.bias": (ch,)}
            chans.append(ch)
            k += 1
    res("middle_block.0", ch, ch)
    shapes.update(_transformer("middle_block.1", ch, context, linear))
    res("middle_block.2", ch, ch)
    k = 0
    for level in reversed(range(len(widths))):
        width = widths[level]
        for i in range(layers_per_block + 1):
            res(f"output_blocks.{k}.0", ch + chans.pop(), width)
            ch = width
            j = 1
            if attention[level]:
                shapes.update(_transformer(f"output_blocks.{k}.1", ch, context, linear))
                j = 2
            if level and i == layers_per_block:
                shapes |= {
                    f"output_blocks.{k}.{j}.conv.weight": (ch, ch, 3, 3),
                    f"output_blocks.{k}.{j}.conv.bias": (ch,),
                }
            k += 1
    shapes |= {"out.0.weight": (mc,), "out.0.bias": (mc,), "out.2.weight": (4, mc, 3, 3), "out.2.bias": (4,)}
    return shapes


def _vae_res(prefix: str, cin: int, cout: int) -> dict[str, tuple]:
    shapes = {
        "norm1.weight": (cin,),
        "norm1.bias": (cin,),
        "conv1.weight": (cout, cin, 3, 3),
        "conv1.bias": (cout,),
        "norm2.weight": (cout,),
        "norm2.bias": (cout,),
        "conv2.weight": (cout, cout, 3, 3),
        "conv2.bias": (cout,),
    }
    if cin != cout:
        shapes |= {"nin_shortcut.weight": (cout, cin, 1, 1), "nin_shortcut.bias": (cout,)}
    return {f"{prefix}.{k}": v for k, v in shapes.items()}


def _vae_attn(prefix: str, c: int) -> dict[str, tuple]:
    shapes = {"norm.weight": (c,), "norm.bias": (c,)}
    for name in ("q", "k", "v", "proj_out"):
        shapes |= {f"{name}.weight": (c, c, 1, 1), f"{name}.bias": (c,)}
    return {f"{prefix}.{k}": v for k, v in shapes.items()}


def ldm_vae_shapes(widths=VAE_WIDTHS, num_res_blocks: int = 1, z: int = 4) -> dict[str, tuple]:
    """LDM ``AutoencoderKL`` (``Encoder`` / ``Decoder`` with ``double_z``, no attention levels) names and shapes."""
    ch = widths[0]
    shapes: dict[str, tuple] = {"encoder.conv_in.weight": (ch, 3, 3, 3), "encoder.conv_in.bias": (ch,)}
    for i, width in enumerate(widths):
        for j in range(num_res_blocks):
            shapes.update(_vae_res(f"encoder.down.{i}.block.{j}", ch, width))
            ch = width
        if i != len(widths) - 1:
            shapes |= {f"encoder.down.{i}.downsample.conv.weight": (ch, ch, 3, 3)}
            shapes |= {f"encoder.down.{i}.downsample.conv.bias": (ch,)}
    for part in ("encoder", "decoder"):
        shapes.update(_vae_res(f"{part}.mid.block_1", widths[-1], widths[-1]))
        shapes.update(_vae_attn(f"{part}.mid.attn_1", widths[-1]))
        shapes.update(_vae_res(f"{part}.mid.block_2", widths[-1], widths[-1]))
    shapes |= {"encoder.norm_out.weight": (ch,), "encoder.norm_out.bias": (ch,)}
    shapes |= {"encoder.conv_out.weight": (2 * z, ch, 3, 3), "encoder.conv_out.bias": (2 * z,)}
    shapes |= {"quant_conv.weight": (2 * z, 2 * z, 1, 1), "quant_conv.bias": (2 * z,)}
    shapes |= {"post_quant_conv.weight": (z, z, 1, 1), "post_quant_conv.bias": (z,)}
    ch = widths[-1]
    shapes |= {"decoder.conv_in.weight": (ch, z, 3, 3), "decoder.conv_in.bias": (ch,)}
    for i in reversed(range(len(widths))):
        for j in range(num_res_blocks + 1):
            shapes.update(_vae_res(f"decoder.up.{i}.block.{j}", ch, widths[i]))
            ch = widths[i]
        if i != 0:
            shapes |= {f"decoder.up.{i}.upsample.conv.weight": (ch, ch, 3, 3)}
            shapes |= {f"decoder.up.{i}.upsample.conv.bias": (ch,)}
    shapes |= {"decoder.norm_out.weight": (ch,), "decoder.norm_out.bias": (ch,)}
    shapes |= {"decoder.conv_out.weight": (3, ch, 3, 3), "decoder.conv_out.bias": (3,)}
    return shapes


def ldm_cfw_shapes(widths=VAE_WIDTHS, num_fuse_block: int = 1, grow: int = 8) -> dict[str, tuple]:
    """``Decoder_Mix``'s ``fusion_layer_{l}`` names (with the ``decoder.`` prefix) and shapes, ``l = 1 … L-2``."""
    shapes: dict[str, tuple] = {}
    for level in range(1, len(widths) - 1):
        c, prefix = widths[level], f"decoder.fusion_layer_{level}"
        shapes.update(_cfw_res(f"{prefix}.encode_enc_1", 2 * c, c))
        for b in range(num_fuse_block):
            for r in (1, 2, 3):
                for n in range(1, 6):
                    cin, cout = c + (n - 1) * grow, (c if n == 5 else grow)
                    key = f"{prefix}.encode_enc_2.{b}.rdb{r}.conv{n}"
                    shapes |= {f"{key}.weight": (cout, cin, 3, 3), f"{key}.bias": (cout,)}
        shapes.update(_cfw_res(f"{prefix}.encode_enc_3", c, c))
    return shapes


def _cfw_res(prefix: str, cin: int, cout: int) -> dict[str, tuple]:
    shapes = _vae_res(prefix, cin, cout)
    if cin != cout:  # the CFW ResBlock calls its 1x1 shortcut conv_out
        shapes = {k.replace("nin_shortcut", "conv_out"): v for k, v in shapes.items()}
    return shapes


def random_state_dict(shapes: dict[str, tuple], prefix: str = "", seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {prefix + k: torch.randn(v, generator=g) * 0.05 for k, v in shapes.items()}


def _attention(prefix: str, c: int) -> dict[str, tuple]:
    shapes = {
        "norm.weight": (c,),
        "norm.bias": (c,),
        "qkv.weight": (3 * c, c, 1),
        "qkv.bias": (3 * c,),
        "proj_out.weight": (c, c, 1),
        "proj_out.bias": (c,),
    }
    return {f"{prefix}.{k}": v for k, v in shapes.items()}


def ldm_encoder_shapes(
    model_channels: int = 64,
    out_channels: int = 64,
    channel_mult=(1, 1),
    num_res_blocks: int = 1,
    attention=(False, True),
) -> dict[str, tuple]:
    """``EncoderUNetModelWT`` names and shapes (without ``structcond_stage_model.``)."""
    mc, emb = model_channels, 4 * model_channels
    shapes: dict[str, tuple] = {
        "time_embed.0.weight": (emb, mc),
        "time_embed.0.bias": (emb,),
        "time_embed.2.weight": (emb, emb),
        "time_embed.2.bias": (emb,),
        "input_blocks.0.0.weight": (mc, 4, 3, 3),
        "input_blocks.0.0.bias": (mc,),
    }
    ch, k, level_channels = mc, 1, []
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            shapes.update(_resblock(f"input_blocks.{k}.0", ch, mult * mc, emb))
            ch = mult * mc
            if attention[level]:
                shapes.update(_attention(f"input_blocks.{k}.1", ch))
            k += 1
        if level != len(channel_mult) - 1:
            shapes |= {f"input_blocks.{k}.0.op.weight": (ch, ch, 3, 3), f"input_blocks.{k}.0.op.bias": (ch,)}
            level_channels.append(ch)
            k += 1
    shapes.update(_resblock("middle_block.0", ch, ch, emb))
    shapes.update(_attention("middle_block.1", ch))
    shapes.update(_resblock("middle_block.2", ch, ch, emb))
    level_channels.append(ch)
    for i, c in enumerate(level_channels):
        shapes.update(_resblock(f"fea_tran.{i}", c, out_channels, emb))
    return shapes


SD_BASE_PARTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")


def save_sd_base(parts: dict, folder: Path) -> Path:
    """Write the SD base of a tiny component dict (``vae/``, ``text_encoder/``, ``tokenizer/``, ``unet/``,
    ``scheduler/``) to ``folder``, as ``from_sd_base`` and the trainers read it; returns ``folder``."""
    for name in SD_BASE_PARTS:
        parts[name].save_pretrained(folder / name)
    return folder
