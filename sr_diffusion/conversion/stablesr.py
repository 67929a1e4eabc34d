"""Load the checkpoints the StableSR authors released into a :class:`~sr_diffusion.pipelines.StableSRPipeline`.

Released files (https://github.com/IceClear/StableSR, README "Pretrained Models"), facts taken from its configs:

* ``stablesr_000117.ckpt`` (``configs/stableSRNew/v2-finetune_text_T_512.yaml``; also ``stablesr_768v_000139.ckpt``
  for ``..._768v.yaml``): a PyTorch Lightning checkpoint of ``LatentDiffusionSRTextWT``. Its ``state_dict`` holds

  - ``model.diffusion_model.*``: SD 2.1's UNet (frozen) in the LDM layout, *plus* the SFT layers ``….spade.*``
    (``UNetModelDualcondV2``) → the base keys go through diffusers' own SD conversion
    (``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint``) into a ``UNet2DConditionModel`` built from the
    base folder's ``unet/config.json``; the ``spade`` keys, prefix stripped, are :class:`StableSRSFT`'s names;
  - ``structcond_stage_model.*``: the time-aware encoder (``EncoderUNetModelWT``), prefix stripped →
    :class:`StableSRTimeAwareEncoder` (its hyper-parameters are inferred from the shapes, see
    :func:`infer_time_aware_encoder_config`);
  - ``first_stage_model.*``: SD's KL autoencoder → ``convert_ldm_vae_checkpoint`` into an ``AutoencoderKL`` built from
    the base's ``vae/config.json`` (used when no CFW checkpoint is given);
  - ``cond_stage_model.*`` (the frozen OpenCLIP text encoder, SD 2.1's) and ``model_ema.*``: dropped; the text encoder
    and tokenizer come from the base folder; top-level schedule buffers (``betas``, ``alphas_cumprod``, ...): dropped
    (the pipeline's scheduler recomputes them).
* ``vqgan_cfw_00011.ckpt`` (``configs/autoencoder/autoencoder_kl_64x64x4_resi.yaml``, ``AutoencoderKLResi``): SD's
  autoencoder with the CFW layers ``decoder.fusion_layer_{1,2}.*`` → :class:`StableSRCFW` (prefix ``decoder.``
  stripped) and, as the original's inference script encodes and decodes with this autoencoder, the ``AutoencoderKL``
  weights; ``loss.*`` (LPIPS, discriminator) is dropped.

Reading is safe: safetensors, or ``torch.load(weights_only=True)``. A Lightning checkpoint may also hold numpy
scalars (e.g. in callback states); only those (``numpy`` scalar and dtype reconstruction, ``_codecs.encode``) are
allowed in addition, on an explicit list; anything else is refused. Every part is loaded strictly: missing keys,
unexpected keys and shape mismatches raise a :class:`~sr_diffusion.checkpoints.CheckpointError` naming them.

The base folder is a diffusers Stable Diffusion folder of the family the checkpoint was trained on (SD 2.1-base for
``stablesr_000117.ckpt``, SD 2.1 for the 768v model); a base of another family (e.g. SD 1.5: 768-d text) is refused
with a message that says so.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

from ..checkpoints import (
    CheckpointError,
    preview,
    required_tensor,
    torch_load_weights,
    unsafe_pickle_refusal,
    unwrap_state_dict,
)
from ..models.stablesr_cfw import StableSRCFW
from ..models.stablesr_encoder import StableSRTimeAwareEncoder
from ..models.stablesr_sft import StableSRSFT
from .common import build_and_load, check_sd_folder, load_sd_parts, load_strict
from .resshift import indices, read_flat_state_dict

__all__ = [
    "convert_stablesr",
    "convert_stablesr_cfw",
    "convert_time_aware_encoder",
    "infer_time_aware_encoder_config",
    "read_stablesr_checkpoint",
    "split_stablesr_state_dict",
]

UNET_PREFIX = "model.diffusion_model."
ENCODER_PREFIX = "structcond_stage_model."
VAE_PREFIX = "first_stage_model."
DROPPED_PREFIXES = ("cond_stage_model.", "model_ema.", "loss.")
VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
CFW_PREFIX = "decoder.fusion_layer_"


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------


def _numpy_globals() -> list:
    """numpy scalar / dtype reconstruction, which Lightning checkpoints may hold besides tensors (nothing else)."""
    import numpy as np

    multiarray = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
    dtypes = [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_)]
    return [multiarray.scalar, np.dtype, *dtypes, codecs.encode]


def read_stablesr_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, Any],
) -> tuple[dict[str, torch.Tensor], str]:
    """``(flat state dict, description)`` of a StableSR / CFW checkpoint (file or loaded mapping); see the module
    docstring for what is allowed besides tensors."""
    try:
        return read_flat_state_dict(checkpoint)
    except CheckpointError as err:
        if not isinstance(checkpoint, (str, os.PathLike)) or "unsafe unpickling" not in str(err):
            raise
    source = f"checkpoint {os.fspath(checkpoint)}"
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            obj = torch_load_weights(checkpoint)
    except Exception as err:  # still an object outside the allow-list, or damaged
        refusal = unsafe_pickle_refusal(err, f"{source} (beyond tensors and numpy scalars)")
        raise CheckpointError(
            refusal or f"{source} could not be read (truncated or corrupt?): {type(err).__name__}"
        ) from err
    try:
        return unwrap_state_dict(obj), source
    except CheckpointError as err:
        raise CheckpointError(str(err).replace("the checkpoint", source)) from err


def split_stablesr_state_dict(
    state_dict: Mapping[str, torch.Tensor], source: str = "the checkpoint"
) -> dict[str, dict[str, torch.Tensor]]:
    """Split a ``LatentDiffusionSRTextWT`` state dict into ``unet`` (LDM keys, prefix kept), ``sft`` (prefix stripped),
    ``encoder`` (stripped) and ``vae`` (stripped).

    Raises:
        CheckpointError: no UNet / SFT / encoder keys (not a StableSR checkpoint), or keys of unknown parts.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "sft": {}, "encoder": {}, "vae": {}}
    unknown = []
    for key, value in state_dict.items():
        if key.startswith(UNET_PREFIX):
            name = key[len(UNET_PREFIX) :]
            if ".spade." in name:
                parts["sft"][name] = value
            else:
                parts["unet"][key] = value
        elif key.startswith(ENCODER_PREFIX):
            parts["encoder"][key[len(ENCODER_PREFIX) :]] = value
        elif key.startswith(VAE_PREFIX):
            parts["vae"][key[len(VAE_PREFIX) :]] = value
        elif key.startswith(DROPPED_PREFIXES) or "." not in key:
            continue  # text encoder, EMA copies, losses, schedule buffers
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{source} has keys of no StableSR part: {preview(sorted(unknown))}")
    for part, prefix in (("unet", UNET_PREFIX), ("sft", UNET_PREFIX + "….spade"), ("encoder", ENCODER_PREFIX)):
        if not parts[part]:
            raise CheckpointError(
                f"{source} is not a StableSR (LatentDiffusionSRTextWT) checkpoint: it has no {prefix}* keys "
                f"(first keys: {preview(state_dict)})"
            )
    return parts


# ----------------------------------------------------------------------------------------------------------------------
# The add-ons
# ----------------------------------------------------------------------------------------------------------------------


def infer_time_aware_encoder_config(state_dict: Mapping[str, torch.Tensor], source: str = "the checkpoint") -> dict:
    """The :class:`StableSRTimeAwareEncoder` keyword arguments of an ``EncoderUNetModelWT`` state dict (prefix
    stripped): ``model_channels``, ``in_channels``, ``out_channels``, ``channel_mult``, ``num_res_blocks``,
    ``attention_resolutions``, ``use_scale_shift_norm``. Not in the tensors, the released values: ``num_heads=4``,
    ``num_head_channels=-1``, conv downsampling, ``resblock_updown=False``, the legacy attention order."""
    what = "a StableSR time-aware encoder (EncoderUNetModelWT) state dict"
    sd = state_dict
    model_channels = int(required_tensor(sd, "time_embed.0.weight", source, what).shape[1])
    in_channels = int(required_tensor(sd, "input_blocks.0.0.weight", source, what).shape[1])
    out_channels = int(required_tensor(sd, "fea_tran.0.out_layers.3.weight", source, what).shape[0])
    levels: list[list[tuple[int, bool]]] = [[]]  # per level: (width, has attention) of each residual block
    for k in indices(sd, r"input_blocks\.(\d+)\.0\.(?:in_layers\.0|op)\.weight"):
        if k == 0:
            continue
        if f"input_blocks.{k}.0.op.weight" in sd:
            levels.append([])
        else:
            width = int(sd[f"input_blocks.{k}.0.out_layers.3.weight"].shape[0])
            levels[-1].append((width, f"input_blocks.{k}.1.qkv.weight" in sd))
    counts = {len(blocks) for blocks in levels}
    if len(counts) != 1 or 0 in counts:
        raise CheckpointError(
            f"{source}: the encoder levels have {[len(b) for b in levels]} residual blocks; expected the same number "
            "(at least one) on every level"
        )
    num_fea = len(indices(sd, r"fea_tran\.(\d+)\.in_layers\.0\.weight"))
    if num_fea != len(levels):
        raise CheckpointError(f"{source}: {len(levels)} encoder levels but {num_fea} fea_tran blocks")
    widths = [blocks[0][0] for blocks in levels]
    if any(w % model_channels for w in widths):
        raise CheckpointError(f"{source}: level widths {widths} are not multiples of model_channels={model_channels}")
    emb_out = int(required_tensor(sd, "fea_tran.0.emb_layers.1.weight", source, what).shape[0])
    return {
        "in_channels": in_channels,
        "model_channels": model_channels,
        "out_channels": out_channels,
        "num_res_blocks": counts.pop(),
        "attention_resolutions": [2**level for level, blocks in enumerate(levels) if blocks[0][1]],
        "dropout": 0.0,
        "channel_mult": [w // model_channels for w in widths],
        "conv_resample": True,
        "num_heads": 4,
        "num_head_channels": -1,
        "use_scale_shift_norm": emb_out == 2 * out_channels,
        "resblock_updown": False,
        "use_new_attention_order": False,
    }


def convert_time_aware_encoder(
    state_dict_or_path: str | os.PathLike | Mapping[str, Any], config: Mapping[str, Any] | None = None
) -> StableSRTimeAwareEncoder:
    """A :class:`StableSRTimeAwareEncoder` from a state dict or file holding ``structcond_stage_model.*`` keys (a whole
    StableSR checkpoint) or the bare ``EncoderUNetModelWT`` keys; ``config`` overrides inferred values."""
    state_dict, source = read_stablesr_checkpoint(state_dict_or_path)
    if any(k.startswith(ENCODER_PREFIX) for k in state_dict):
        state_dict = {k[len(ENCODER_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(ENCODER_PREFIX)}
    inferred = infer_time_aware_encoder_config(state_dict, source)
    unknown = set(config or {}) - set(inferred)
    if unknown:
        raise TypeError(f"StableSRTimeAwareEncoder has no argument(s) {sorted(unknown)}; it takes {sorted(inferred)}")
    final = {**inferred, **(config or {})}
    target = "StableSRTimeAwareEncoder(" + ", ".join(f"{k}={v!r}" for k, v in final.items()) + ")"
    return load_strict(StableSRTimeAwareEncoder(**final), state_dict, source, target)


def _convert_sft(state_dict: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any], source: str) -> StableSRSFT:
    first = next(k for k in sorted(state_dict) if k.endswith(".spade.mlp_shared.0.weight"))
    shared = state_dict[first]
    config = {
        "block_out_channels": list(unet_config["block_out_channels"]),
        "layers_per_block": int(unet_config["layers_per_block"]),
        "cond_channels": int(shared.shape[1]),
        "hidden_channels": int(shared.shape[0]),
        "kernel_size": int(shared.shape[-1]),
    }
    target = "StableSRSFT(" + ", ".join(f"{k}={v!r}" for k, v in config.items()) + ")"
    return load_strict(StableSRSFT(**config), state_dict, source, target)


def convert_stablesr_cfw(
    checkpoint: str | os.PathLike | Mapping[str, Any], vae_config: Mapping[str, Any]
) -> tuple[StableSRCFW, dict[str, torch.Tensor]]:
    """``(cfw, vae_state_dict)`` from the CFW autoencoder checkpoint (``vqgan_cfw_00011.ckpt``): the fusion layers for a
    VAE of ``vae_config``, and the autoencoder's own weights in the LDM layout (prefix-free), for
    :func:`convert_ldm_vae_checkpoint`."""
    state_dict, source = read_stablesr_checkpoint(checkpoint)
    if any(k.startswith(VAE_PREFIX) for k in state_dict):
        state_dict = {k[len(VAE_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(VAE_PREFIX)}
    fusion = {k[len("decoder.") :]: v for k, v in state_dict.items() if k.startswith(CFW_PREFIX)}
    vae = {k: v for k, v in state_dict.items() if k.startswith(VAE_PARTS) and not k.startswith(CFW_PREFIX)}
    unknown = [k for k in state_dict if not k.startswith((*VAE_PARTS, "loss."))]
    if not fusion:
        raise CheckpointError(
            f"{source} is not a StableSR CFW autoencoder: it has no {CFW_PREFIX}* keys (first keys: "
            f"{preview(state_dict)})"
        )
    if unknown:
        raise CheckpointError(f"{source} has keys that are not part of the CFW autoencoder: {preview(sorted(unknown))}")
    levels = indices(fusion, r"fusion_layer_(\d+)\.encode_enc_1\.conv1\.weight")
    rrdb = f"fusion_layer_{levels[0]}.encode_enc_2" if levels else "fusion_layer_?.encode_enc_2"
    config = {
        "block_out_channels": list(vae_config["block_out_channels"]),
        "num_fuse_block": len(indices(fusion, rf"{re.escape(rrdb)}\.(\d+)\.rdb1\.conv1\.weight")),
        "num_grow_ch": int(
            required_tensor(fusion, f"{rrdb}.0.rdb1.conv1.weight", source, "a CFW autoencoder").shape[0]
        ),
        "norm_num_groups": int(vae_config.get("norm_num_groups", 32)),
    }
    target = "StableSRCFW(" + ", ".join(f"{k}={v!r}" for k, v in config.items()) + ")"
    return load_strict(StableSRCFW(**config), fusion, source, target), vae


# ----------------------------------------------------------------------------------------------------------------------
# The SD base parts
# ----------------------------------------------------------------------------------------------------------------------


def _check_base_fits(unet_ldm: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any], source: str, base: Path):
    """Refuse a base of another family before converting (the shapes would not fit anyway, less readably)."""
    if unet_config.get("addition_embed_type") is not None or unet_config.get("class_embed_type") is not None:
        raise CheckpointError(
            f"{base} is not an SD 1.x/2.x text-to-image base (its UNet has addition/class embeddings: SDXL, the x4 "
            "upscaler, ...); StableSR's checkpoints build on SD 2.1"
        )
    context = [v.shape[1] for k, v in unet_ldm.items() if k.endswith(".attn2.to_k.weight")]
    if context and int(context[0]) != int(unet_config["cross_attention_dim"]):
        families = {768: "SD 1.x", 1024: "SD 2.x"}
        raise CheckpointError(
            f"{source} cross-attends to {context[0]}-d text embeddings ({families.get(int(context[0]), '?')}) but the "
            f"UNet of {base} takes {unet_config['cross_attention_dim']}-d ones "
            f"({families.get(int(unet_config['cross_attention_dim']), '?')}): pass the SD base the checkpoint was "
            "trained on (SD 2.1-base for stablesr_000117.ckpt)"
        )
    width = unet_ldm.get(UNET_PREFIX + "time_embed.0.weight")
    if width is not None and int(width.shape[1]) != int(unet_config["block_out_channels"][0]):
        raise CheckpointError(
            f"{source} has a {int(width.shape[1])}-channel UNet but {base}'s has {unet_config['block_out_channels'][0]}"
        )


def _convert_unet(unet_ldm: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any], source: str):
    converted = convert_ldm_unet_checkpoint(dict(unet_ldm), dict(unet_config))
    if len(converted) != len(unet_ldm):
        raise CheckpointError(
            f"{source}: {len(unet_ldm) - len(converted)} of its {len(unet_ldm)} UNet keys have no place in a diffusers "
            "UNet2DConditionModel of the base's config"
        )
    return build_and_load(UNet2DConditionModel, unet_config, converted, source, "the base's UNet2DConditionModel")


def _convert_vae(vae_ldm: Mapping[str, torch.Tensor], vae_config: Mapping[str, Any], source: str):
    converted = convert_ldm_vae_checkpoint(dict(vae_ldm), dict(vae_config))
    if len(converted) != len(vae_ldm):
        raise CheckpointError(
            f"{source}: {len(vae_ldm) - len(converted)} of its {len(vae_ldm)} autoencoder keys have no place in a "
            "diffusers AutoencoderKL of the base's config"
        )
    return build_and_load(AutoencoderKL, vae_config, converted, source, "the base's AutoencoderKL")


def convert_stablesr(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    base: str | os.PathLike,
    cfw_checkpoint: str | os.PathLike | Mapping[str, Any] | None = None,
    upscale: int = 4,
    encoder_config: Mapping[str, Any] | None = None,
):
    """The :class:`~sr_diffusion.pipelines.StableSRPipeline` of the released StableSR checkpoints.

    Args:
        checkpoint: ``stablesr_000117.ckpt`` (or a loaded state dict of the same layout).
        base: a diffusers SD folder of the checkpoint's family (``vae/``, ``text_encoder/``, ``tokenizer/``,
            ``unet/``; e.g. stabilityai/stable-diffusion-2-1-base): configs, text encoder and tokenizer come from it.
        cfw_checkpoint: ``vqgan_cfw_00011.ckpt``: adds the CFW layers, and its autoencoder weights replace the
            checkpoint's ``first_stage_model`` (as in the original's inference); None: no CFW (``fidelity_weight=0``).
        upscale: the pipeline's SR factor (the released model: 4).
        encoder_config: overrides of the inferred time-aware encoder hyper-parameters.

    Raises:
        CheckpointError: unreadable or unsafe file, not a StableSR checkpoint, a base of another family, or any
            missing / unexpected key or shape mismatch (named).
        FileNotFoundError: ``base`` is not a diffusers SD folder.
    """
    from sr_diffusion.pipelines.stablesr import StableSRPipeline, stablesr_scheduler

    base = check_sd_folder(
        base,
        ("vae", "text_encoder", "tokenizer", "unet"),
        "pass the SD base the checkpoint was trained on, e.g. a local copy of stabilityai/stable-diffusion-2-1-base",
    )
    state_dict, source = read_stablesr_checkpoint(checkpoint)
    parts = split_stablesr_state_dict(state_dict, source)
    unet_config = UNet2DConditionModel.load_config(base, subfolder="unet")
    vae_config = AutoencoderKL.load_config(base, subfolder="vae")
    _check_base_fits(parts["unet"], unet_config, source, base)

    unet = _convert_unet(parts["unet"], unet_config, source)
    sft = _convert_sft(parts["sft"], unet_config, source)
    encoder = convert_time_aware_encoder(parts["encoder"], encoder_config)
    cfw = None
    vae_ldm, vae_source = parts["vae"], source
    if cfw_checkpoint is not None:
        cfw, vae_ldm = convert_stablesr_cfw(cfw_checkpoint, vae_config)
        is_file = isinstance(cfw_checkpoint, (str, os.PathLike))
        vae_source = f"checkpoint {os.fspath(cfw_checkpoint)}" if is_file else "the CFW state dict"
    if not vae_ldm:
        raise CheckpointError(f"{vae_source} has no autoencoder (first_stage_model.*) weights")
    vae = _convert_vae(vae_ldm, vae_config, vae_source)
    prediction_type = "epsilon"  # the 512 model; the 768v model's base scheduler says "v_prediction"
    scheduler_config = base / "scheduler" / "scheduler_config.json"
    if scheduler_config.is_file():
        prediction_type = json.loads(scheduler_config.read_text()).get("prediction_type", prediction_type)
    return StableSRPipeline(
        vae=vae,
        **load_sd_parts(base, ("text_encoder", "tokenizer")),
        unet=unet,
        scheduler=stablesr_scheduler(prediction_type),
        time_aware_encoder=encoder,
        sft=sft,
        cfw=cfw,
        upscale=upscale,
    )
