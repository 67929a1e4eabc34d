"""Load the models the PASD authors released into a :class:`~sr_diffusion.pipelines.PASDPipeline`.

Released files (https://github.com/yangxy/PASD, ``runs/pasd/README.md``: ``pasd.zip``; ``pasd_rrdb``, ``pasd_light``,
``pasd_light_rrdb`` alike): a training checkpoint folder ``checkpoint-100000/`` written by ``train_pasd.py``'s
``save_model_hook`` (diffusers ``save_pretrained`` of the two trained models; facts only):

* ``unet/``: ``config.json`` (SD 1.5's UNet configuration; ``_class_name`` ``UNet2DConditionModel``, the original's
  own class in ``pasd/models/pasd/unet_2d_condition.py``) and ``diffusion_pytorch_model.bin`` / ``.safetensors``: the
  SD 1.5 UNet's weights (frozen during training) with diffusers' names, *plus* the pixel-aware cross-attention layers
  ``up_blocks.{i}.pixel_attentions.{j}.*`` (the only trained UNet weights) → the base keys load strictly into a
  diffusers ``UNet2DConditionModel`` of that config, the ``pixel_attentions`` keys, as they are, into the
  :class:`~sr_diffusion.models.block_attention.BlockAttentions` add-on built for it
  (:meth:`~sr_diffusion.models.block_attention.BlockAttentions.pasd_pixel_attentions`);
* ``controlnet/``: ``config.json`` (``_class_name`` ``ControlNetModel``, with the original's ``return_rgbs`` and
  ``use_rrdb`` keys) and its weights → :class:`~sr_diffusion.models.PASDControlNetModel` (the same names).

The VAE, text encoder, tokenizer and scheduler configuration come from the SD base the model was trained on (SD 1.5;
``checkpoints/stable-diffusion-v1-5`` in the original); the scheduler is UniPC on the base's schedule, as the original's
``test_pasd.py``.

Reading is safe (safetensors, or ``torch.load(weights_only=True)``), also for sharded folders (``*.index.json``), and
strict: missing keys, unexpected keys and shape mismatches raise a
:class:`~sr_diffusion.checkpoints.CheckpointError` naming them. The PASD-light models (``pasd_light``,
``pasd_light_rrdb``: the pixel attention inside each text Transformer block, ``attn2_plus`` / ``norm2_plus`` /
``proj_in_plus``) have another architecture and are refused with a message that says so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from ..checkpoints import CheckpointError, preview
from ..models.block_attention import BlockAttentions
from ..models.pasd_controlnet import PASDControlNetModel
from .common import build_and_load, check_sd_folder, load_sd_parts, load_strict, read_diffusers_folder

__all__ = [
    "convert_pasd",
    "convert_pasd_controlnet",
    "convert_pasd_unet",
    "read_diffusers_folder",
    "split_pasd_unet_state_dict",
]

PIXEL_ATTENTION_KEY = ".pixel_attentions."
LIGHT_KEYS = ("attn2_plus", "norm2_plus", "proj_in_plus")


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------


def split_pasd_unet_state_dict(
    state_dict: Mapping[str, torch.Tensor], source: str = "the checkpoint"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(base, pixel_attentions)``: the keys of PASD's UNet split into the SD UNet's and the add-on's (names kept).

    Raises:
        CheckpointError: a PASD-light UNet, or a UNet without ``pixel_attentions`` keys (not PASD's).
    """
    light = [k for k in state_dict if any(f".{name}." in k for name in LIGHT_KEYS)]
    if light:
        raise CheckpointError(
            f"{source} is a PASD-light UNet (pixel attention inside the Transformer blocks: {preview(light, 2)}); "
            "only the full PASD models (pasd, pasd_rrdb: up_blocks.*.pixel_attentions.*) are supported"
        )
    pixel = {k: v for k, v in state_dict.items() if PIXEL_ATTENTION_KEY in k}
    if not pixel:
        raise CheckpointError(
            f"{source} is not PASD's UNet: it has no up_blocks.*.pixel_attentions.* keys (a plain Stable Diffusion "
            f"UNet?; first keys: {preview(state_dict)})"
        )
    base = {k: v for k, v in state_dict.items() if PIXEL_ATTENTION_KEY not in k}
    return base, pixel


def _init_kwargs(cls, config: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a saved config that ``cls.__init__`` takes (diffusers' own filtering: newer or older versions
    write other keys)."""
    init, _, _ = cls.extract_init_dict(dict(config))
    return init


# ----------------------------------------------------------------------------------------------------------------------
# The two trained folders
# ----------------------------------------------------------------------------------------------------------------------


def convert_pasd_unet(folder: str | os.PathLike) -> tuple[UNet2DConditionModel, BlockAttentions]:
    """``(unet, pixel_attentions)`` from a released PASD ``unet/`` folder: the diffusers SD UNet of its config with the
    base weights, and the PACA add-on with the ``up_blocks.{i}.pixel_attentions.{j}.*`` weights (see the module
    docstring)."""
    config, state_dict, source = read_diffusers_folder(folder)
    base, pixel = split_pasd_unet_state_dict(state_dict, source)
    unet_config = _init_kwargs(UNet2DConditionModel, config)
    unet = build_and_load(
        UNet2DConditionModel, unet_config, base, source, "a diffusers UNet2DConditionModel of its config.json"
    )
    pixel_attentions = BlockAttentions.pasd_pixel_attentions(unet)
    pixel_attentions = load_strict(
        pixel_attentions, pixel, source, "PASD's pixel-aware cross-attention layers for that UNet"
    )
    return unet, pixel_attentions


def convert_pasd_controlnet(folder: str | os.PathLike) -> PASDControlNetModel:
    """:class:`PASDControlNetModel` from a released PASD ``controlnet/`` folder (strict, the original names)."""
    config, state_dict, source = read_diffusers_folder(folder)
    if "return_rgbs" not in config and not any(".to_rgbs." in k for k in state_dict):
        raise CheckpointError(
            f"{source} is not PASD's ControlNet: its config has no return_rgbs and its weights no "
            "controlnet_cond_embedding.to_rgbs.* (a plain diffusers ControlNet?)"
        )
    controlnet = PASDControlNetModel.from_config(_init_kwargs(PASDControlNetModel, config))
    target = f"PASDControlNetModel(use_rrdb={controlnet.config.use_rrdb}, return_rgbs={controlnet.config.return_rgbs})"
    return load_strict(controlnet, state_dict, source, target)


# ----------------------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------------------


def convert_pasd(
    pasd_folder: str | os.PathLike,
    base: str | os.PathLike,
    upscale: int = 4,
    prompt_extractor: Any = None,
):
    """The :class:`~sr_diffusion.pipelines.PASDPipeline` of a released PASD model.

    Args:
        pasd_folder: the released checkpoint folder (``runs/pasd/checkpoint-100000``) with ``unet/`` and
            ``controlnet/``.
        base: a diffusers SD folder of the model's family (SD 1.5): ``vae/``, ``text_encoder/``, ``tokenizer/`` (and
            ``scheduler/``, whose schedule UniPC samples with).
        upscale: the pipeline's SR factor (the model works at any: the LR image is upsampled to the output size).
        prompt_extractor: an optional :class:`~sr_diffusion.prompts.PromptExtractor` for ``prompt="auto"``.

    Raises:
        CheckpointError: unreadable or unsafe files, a folder that is not PASD's (or is PASD-light), a base whose text
            width differs from the UNet's, or any missing / unexpected key or shape mismatch (named).
        FileNotFoundError: ``pasd_folder`` lacks ``unet/`` or ``controlnet/`` (or they lack ``config.json`` or
            weights), or ``base`` is not an SD folder.
    """
    from sr_diffusion.pipelines.pasd import PASDPipeline

    pasd_folder = Path(pasd_folder)
    missing = [name for name in ("unet", "controlnet") if not (pasd_folder / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{pasd_folder}: not a PASD model folder (no {', '.join(f'{m}/' for m in missing)}); pass the released "
            "checkpoint folder, e.g. runs/pasd/checkpoint-100000 from pasd.zip"
        )
    base = check_sd_folder(
        base,
        ("vae", "text_encoder", "tokenizer"),
        "pass the SD base PASD was trained on (a local copy of stable-diffusion-v1-5)",
    )
    unet, pixel_attentions = convert_pasd_unet(pasd_folder / "unet")
    controlnet = convert_pasd_controlnet(pasd_folder / "controlnet")
    parts = load_sd_parts(base, ("vae", "text_encoder", "tokenizer"))
    text_encoder = parts["text_encoder"]
    if text_encoder.config.hidden_size != unet.config.cross_attention_dim:
        families = {768: "SD 1.x", 1024: "SD 2.x"}
        raise CheckpointError(
            f"{base}'s text encoder gives {text_encoder.config.hidden_size}-d embeddings "
            f"({families.get(text_encoder.config.hidden_size, '?')}) but PASD's UNet cross-attends to "
            f"{unet.config.cross_attention_dim}-d ones: pass the SD base the model was trained on (SD 1.5)"
        )
    return PASDPipeline(
        **parts,
        unet=unet,
        scheduler=PASDPipeline.base_scheduler(base),
        controlnet=controlnet,
        pixel_attentions=pixel_attentions,
        prompt_extractor=prompt_extractor,
        upscale=upscale,
    )
