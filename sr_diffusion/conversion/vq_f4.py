"""Load the VQ-GAN autoencoder of ResShift / latent diffusion (``autoencoder_vq_f4.pth``) into ``diffusers.VQModel``.

ResShift diffuses in the latent space of an LDM VQ-f4 autoencoder (Rombach et al., CVPR 2022, Sec. 3.1:
an ``Encoder`` with ``len(ch_mult) - 1`` stride-2 downsamplings, a ``VectorQuantizer`` codebook, a
``Decoder``), loaded in the original code as ``ldm.models.autoencoder.VQModelTorch``:

* ``encode(x) = quant_conv(encoder(x))`` (not quantised), ``decode(h) = decoder(post_quant_conv(q(h)))``
  with ``q`` the nearest codebook vector, exactly ``VQModel.encode(x).latents`` and
  ``VQModel.decode(h).sample``. ResShift's ``scale_factor`` is 1.0, so ``scaling_factor=1.0`` here.
* ``autoencoder_vq_f4.pth`` (``configs/realsr_swinunet_realesrgan256.yaml``, ``autoencoder``): ``ch=128,
  ch_mult=(1, 2, 4), num_res_blocks=2, attn_resolutions=[], z_channels=embed_dim=3, n_embed=8192``,
  ``double_z=False``: ``VQModel(block_out_channels=(128, 256, 512), layers_per_block=2,
  latent_channels=3, num_vq_embeddings=8192, vq_embed_dim=3)``.

Key mapping (LDM → diffusers), written from the two layouts; :func:`convert_vq_f4` raises a
:class:`~sr_diffusion.checkpoints.CheckpointError` naming every key it cannot place:

=============================================  ==========================================================
``encoder.down.i.block.j.{norm1,conv1,...}``   ``encoder.down_blocks.i.resnets.j.…`` (``nin_shortcut`` →
                                               ``conv_shortcut``)
``encoder.down.i.attn.j.{norm,q,k,v,proj_out}``  ``encoder.down_blocks.i.attentions.j.{group_norm,to_q,
                                               to_k,to_v,to_out.0}`` (1×1 conv weights → linear)
``encoder.down.i.downsample.conv``             ``encoder.down_blocks.i.downsamplers.0.conv``
``{en,de}coder.mid.block_{1,2}`` / ``attn_1``  ``….mid_block.resnets.{0,1}`` / ``attentions.0``
``{en,de}coder.norm_out``                      ``….conv_norm_out``
``decoder.up.i.…`` (``upsample.conv``)         ``decoder.up_blocks.{L-1-i}.…`` (``upsamplers.0.conv``)
``quant_conv``, ``post_quant_conv``,           unchanged
``quantize.embedding.weight``
=============================================  ==========================================================

Inferred: ``in_channels``, ``out_channels``, ``block_out_channels`` (``encoder.down.i`` widths),
``layers_per_block``, block types (levels with attention), ``latent_channels`` (``encoder.conv_out``),
``num_vq_embeddings`` / ``vq_embed_dim`` (``quantize.embedding.weight``), ``mid_block_add_attention``.
Defaults for what the tensors cannot tell: ``norm_num_groups=32`` (fixed in LDM), ``sample_size=256``,
``scaling_factor=1.0``; override with ``config={...}``. Training-only entries of Lightning checkpoints
(``loss.*``: LPIPS and discriminator) are dropped. Not representable in ``VQModel``, hence refused with a
clear error: a different number of residual blocks per level (e.g. ResShift's face VQ-f8,
``num_res_blocks=[1, 2, 3, 4]``), ``double_z`` (KL) encoders, codebook index remapping (``quantize.used``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import VQModel

from ..checkpoints import CheckpointError, check_keys_and_shapes, preview, required_tensor
from .resshift import indices, read_flat_state_dict

#: What the converter's input must be, for its error messages
_LAYOUT = "an LDM VQ autoencoder state dict"

__all__ = ["RELEASED_VQ_F4_CONFIG", "convert_vq_f4", "infer_vq_f4_config", "ldm_vq_to_diffusers"]

#: ``VQModel`` arguments of the released LDM / ResShift VQ-f4 autoencoder (``autoencoder_vq_f4.pth``), for building it
#: with random weights (benchmarks) or checking a converted one.
RELEASED_VQ_F4_CONFIG = {
    "block_out_channels": (128, 256, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "layers_per_block": 2,
    "latent_channels": 3,
    "num_vq_embeddings": 8192,
    "vq_embed_dim": 3,
}

TRAINING_ONLY_PREFIXES = ("loss.",)

_RESNET = {"nin_shortcut": "conv_shortcut"}
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def infer_vq_f4_config(state_dict: Mapping[str, torch.Tensor], source: str = "the checkpoint") -> dict:
    """The ``diffusers.VQModel`` keyword arguments of a flat LDM-layout VQ state dict.

    Raises:
        CheckpointError: not an LDM VQ autoencoder, or a layout ``VQModel`` cannot represent.
    """
    sd = state_dict
    if "quantize.used" in sd:
        raise CheckpointError(f"{source} uses codebook index remapping (quantize.used), which VQModel does not support")
    conv_in = required_tensor(sd, "encoder.conv_in.weight", source, _LAYOUT)
    levels = indices(sd, r"encoder\.down\.(\d+)\.block\.0\.conv1\.weight")
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(f"{source}: encoder levels encoder.down.N are missing or not numbered 0..N ({levels})")
    widths = [int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in levels]
    enc_blocks = [len(indices(sd, rf"encoder\.down\.{i}\.block\.(\d+)\.conv1\.weight")) for i in levels]
    dec_blocks = [len(indices(sd, rf"decoder\.up\.{i}\.block\.(\d+)\.conv1\.weight")) for i in levels]
    if len(set(enc_blocks)) != 1 or dec_blocks != [n + 1 for n in enc_blocks]:
        raise CheckpointError(
            f"{source} has {enc_blocks} residual blocks per encoder level and {dec_blocks} per decoder level; "
            "diffusers.VQModel needs the same number n on every encoder level and n + 1 on every decoder level "
            "(one layers_per_block)"
        )
    latent_channels = int(required_tensor(sd, "encoder.conv_out.weight", source, _LAYOUT).shape[0])
    quant_in = int(required_tensor(sd, "quant_conv.weight", source, _LAYOUT).shape[1])
    if quant_in != latent_channels:
        raise CheckpointError(
            f"{source}: the encoder outputs {latent_channels} channels but quant_conv takes {quant_in}; a "
            "double_z (KL) encoder is not a VQ model"
        )
    codebook = required_tensor(sd, "quantize.embedding.weight", source, _LAYOUT)
    down_types = [
        "AttnDownEncoderBlock2D" if f"encoder.down.{i}.attn.0.q.weight" in sd else "DownEncoderBlock2D" for i in levels
    ]
    up_types = [
        "AttnUpDecoderBlock2D" if f"decoder.up.{i}.attn.0.q.weight" in sd else "UpDecoderBlock2D"
        for i in reversed(levels)
    ]
    return {
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(required_tensor(sd, "decoder.conv_out.weight", source, _LAYOUT).shape[0]),
        "down_block_types": down_types,
        "up_block_types": up_types,
        "block_out_channels": widths,
        "layers_per_block": enc_blocks[0],
        "act_fn": "silu",
        "latent_channels": latent_channels,
        "sample_size": 256,
        "num_vq_embeddings": int(codebook.shape[0]),
        "norm_num_groups": 32,
        "vq_embed_dim": int(codebook.shape[1]),
        "scaling_factor": 1.0,
        "norm_type": "group",
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in sd,
        "lookup_from_codebook": False,
        "force_upcast": False,
    }


def _map_key(key: str, num_levels: int) -> str | None:
    """The diffusers name of one LDM VQ key, or None when it has no place in ``VQModel``."""
    if key in ("quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight", "post_quant_conv.bias"):
        return key
    if key == "quantize.embedding.weight":
        return key
    if m := re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)", key):
        part, layer, p = m.groups()
        return f"{part}.{'conv_norm_out' if layer == 'norm_out' else layer}.{p}"
    if m := re.fullmatch(
        r"(encoder|decoder)\.mid\.block_([12])\.(norm1|conv1|norm2|conv2|nin_shortcut)\.(weight|bias)", key
    ):
        part, j, layer, p = m.groups()
        return f"{part}.mid_block.resnets.{int(j) - 1}.{_RESNET.get(layer, layer)}.{p}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", key):
        part, layer, p = m.groups()
        return f"{part}.mid_block.attentions.0.{_ATTENTION[layer]}.{p}"
    if m := re.fullmatch(r"(encoder\.down|decoder\.up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)\.(weight|bias)", key):
        where, i, kind, j, layer, p = m.groups()
        i = int(i)
        if i >= num_levels:
            return None
        blocks = "encoder.down_blocks" if where == "encoder.down" else "decoder.up_blocks"
        index = i if where == "encoder.down" else num_levels - 1 - i
        if kind == "block" and layer in ("norm1", "conv1", "norm2", "conv2", "nin_shortcut"):
            return f"{blocks}.{index}.resnets.{j}.{_RESNET.get(layer, layer)}.{p}"
        if kind == "attn" and layer in _ATTENTION:
            return f"{blocks}.{index}.attentions.{j}.{_ATTENTION[layer]}.{p}"
        return None
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)", key):
        i, p = m.groups()
        return f"encoder.down_blocks.{i}.downsamplers.0.conv.{p}" if int(i) < num_levels else None
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)", key):
        i, p = m.groups()
        return f"decoder.up_blocks.{num_levels - 1 - int(i)}.upsamplers.0.conv.{p}" if int(i) < num_levels else None
    return None


def ldm_vq_to_diffusers(
    state_dict: Mapping[str, torch.Tensor], num_levels: int, source: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename a flat LDM VQ state dict to ``VQModel`` names (attention 1×1 conv weights become linear).

    Raises:
        CheckpointError: listing every key that has no place in ``VQModel``.
    """
    converted, unmatched = {}, []
    for key, value in state_dict.items():
        new = _map_key(key, num_levels)
        if new is None:
            unmatched.append(key)
            continue
        if ".attentions." in new and new.endswith(".weight") and value.ndim == 4:
            value = value[:, :, 0, 0]
        converted[new] = value
    if unmatched:
        raise CheckpointError(
            f"{source} has keys that are not part of an LDM VQ autoencoder (VQModel): {preview(sorted(unmatched))}"
        )
    return converted


def convert_vq_f4(
    state_dict_or_path: str | os.PathLike | Mapping[str, Any], config: Mapping[str, Any] | None = None
) -> VQModel:
    """Build the ``diffusers.VQModel`` that an LDM / ResShift VQ autoencoder checkpoint holds.

    Args:
        state_dict_or_path: ``autoencoder_vq_f4.pth`` (or ``.safetensors``), or a loaded object, flat or
            nested under ``state_dict`` / ``model``, keys possibly prefixed by ``module.`` / ``_orig_mod.``.
        config: values that override the inferred ``VQModel`` keyword arguments.

    Returns:
        The ``VQModel`` in eval mode with every parameter loaded (strict).

    Raises:
        CheckpointError: unreadable file, a layout ``VQModel`` cannot represent, keys it cannot place,
            missing keys or shape mismatches (all named).
        TypeError: ``config`` names an unknown ``VQModel`` argument.
    """
    state_dict, source = read_flat_state_dict(state_dict_or_path)
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    inferred = infer_vq_f4_config(state_dict, source)
    unknown = set(config or {}) - set(inferred)
    if unknown:
        raise TypeError(f"VQModel has no argument(s) {sorted(unknown)}; it takes {sorted(inferred)}")
    final = {**inferred, **(config or {})}
    converted = ldm_vq_to_diffusers(state_dict, len(final["block_out_channels"]), source)

    model = VQModel(**final)
    target = "VQModel(" + ", ".join(f"{k}={v!r}" for k, v in final.items()) + ")"
    check_keys_and_shapes(model.state_dict(), converted, source, target)
    model.load_state_dict(converted, strict=True)
    return model.eval()
