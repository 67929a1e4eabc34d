"""Load the models the SeeSR authors released into a :class:`~sr_diffusion.pipelines.SeeSRPipeline`.

Released files (https://github.com/cswry/SeeSR, README "Download the SeeSR and DAPE models"; used by ``test_seesr.py``
as ``--seesr_model_path preset/models/seesr`` on ``--pretrained_model_path preset/models/stable-diffusion-2-base``):

* ``seesr/unet/``: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (or ``.bin``) of SeeSR's own
  ``UNet2DConditionModel`` (``models/unet_2d_condition.py``, diffusers 0.21's with ``use_image_cross_attention=True``):
  every key of diffusers' ``UNet2DConditionModel`` for the same config (SD 2-base's weights, frozen in training) plus
  the ``{down_blocks.i, mid_block, up_blocks.i}.image_attentions.j.*`` keys → our base ``UNet2DConditionModel`` (built
  from the folder's config less ``use_image_cross_attention``) and a
  :class:`~sr_diffusion.models.block_attention.BlockAttentions` add-on (the image keys, as they are);
* ``seesr/controlnet/``: the same for SeeSR's ``ControlNetModel`` (``models/controlnet.py``, diffusers 0.21's with the
  image cross-attention in the down and mid blocks) → diffusers' ``ControlNetModel`` + add-on.

The soft-prompt width of the image attentions is read from the weights (``attn2.to_k`` of an image attention: 512 in
the released model, RAM's ``image_embeds``). Every part is loaded strictly: missing keys, unexpected keys and shape
mismatches raise a :class:`~sr_diffusion.checkpoints.CheckpointError` naming them.

Not converted: ``DAPE.pth`` (a LoRA on RAM's Swin-L tagger); our :class:`~sr_diffusion.prompts.DAPE` is built on
open_clip. A converted pipeline therefore has no prompt extractor unless one is given; the released image attentions
expect RAM's 512-d ``image_embeds`` as soft prompts (pass them as ``image_prompt_embeds``), and with none the pipeline
attends to a null soft prompt.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from ..checkpoints import CheckpointError, check_keys_and_shapes, preview
from ..models.block_attention import BlockAttentions
from ..models.seesr import SEESR_IMAGE_ATTENTIONS, seesr_image_attentions
from .common import as_float32, build_and_load, check_sd_folder, load_sd_parts, read_diffusers_folder

__all__ = [
    "convert_seesr",
    "convert_seesr_model",
    "read_diffusers_folder",
    "split_image_attentions",
]

#: config keys of SeeSR's classes that diffusers' do not take (or that are bookkeeping)
DROPPED_CONFIG_KEYS = ("use_image_cross_attention", "_class_name", "_diffusers_version", "_name_or_path")


def split_image_attentions(
    state_dict: Mapping[str, torch.Tensor], name: str = SEESR_IMAGE_ATTENTIONS
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(base keys, image-attention keys)``: the keys with a ``.{name}.`` part go to the add-on, as they are."""
    extra = {k: v for k, v in state_dict.items() if f".{name}." in k}
    base = {k: v for k, v in state_dict.items() if k not in extra}
    return base, extra


def _context_dim(extra: Mapping[str, torch.Tensor], source: str) -> int:
    dims = {int(v.shape[1]) for k, v in extra.items() if k.endswith(".attn2.to_k.weight")}
    if len(dims) != 1:
        raise CheckpointError(
            f"{source}: cannot read the soft-prompt width of its {SEESR_IMAGE_ATTENTIONS} (attn2.to_k widths "
            f"{sorted(dims)})"
        )
    return dims.pop()


def convert_seesr_model(
    folder: str | os.PathLike, kind: str = "unet"
) -> tuple[UNet2DConditionModel | ControlNetModel, BlockAttentions]:
    """``(model, image_attentions)`` of a released SeeSR ``unet/`` (``kind="unet"``) or ``controlnet/``
    (``kind="controlnet"``) folder: diffusers' class with the base keys, and the add-on with the
    ``image_attentions`` keys.

    Raises:
        CheckpointError: not a SeeSR model folder (no image attentions), or keys that fit neither part (named).
        FileNotFoundError: no ``config.json`` or weight file.
    """
    classes = {"unet": UNet2DConditionModel, "controlnet": ControlNetModel}
    if kind not in classes:
        raise ValueError(f"kind must be 'unet' or 'controlnet', got {kind!r}")
    cls = classes[kind]
    config, state_dict, source = read_diffusers_folder(folder)
    base_sd, extra_sd = split_image_attentions(state_dict)
    if not extra_sd:
        flag = config.get("use_image_cross_attention")
        raise CheckpointError(
            f"{source} has no {SEESR_IMAGE_ATTENTIONS} weights (use_image_cross_attention={flag!r}): it is not a "
            f"SeeSR {kind} (first keys: {preview(state_dict)})"
        )
    base_config = {k: v for k, v in config.items() if k not in DROPPED_CONFIG_KEYS and not k.startswith("_")}
    unknown = sorted(set(base_config) - set(inspect.signature(cls.__init__).parameters))
    if unknown:
        raise CheckpointError(f"{Path(folder) / 'config.json'}: unknown {cls.__name__} settings {unknown}")
    model = build_and_load(cls, base_config, base_sd, source, f"diffusers' {cls.__name__} of its config")
    context_dim = _context_dim(extra_sd, source)
    from accelerate import init_empty_weights

    with init_empty_weights():
        extra = seesr_image_attentions(model, context_dim)
    check_keys_and_shapes(extra.state_dict(), extra_sd, source, f"SeeSR's {kind} image attentions of its config")
    extra.load_state_dict(as_float32(extra_sd), strict=True, assign=True)
    return model.eval(), extra.eval()


def convert_seesr(
    seesr_folder: str | os.PathLike,
    base: str | os.PathLike,
    prompt_extractor: Any = None,
    upscale: int = 4,
):
    """The :class:`~sr_diffusion.pipelines.SeeSRPipeline` of the released SeeSR model.

    Args:
        seesr_folder: the released ``seesr/`` folder (``unet/``, ``controlnet/``).
        base: the diffusers SD folder it was trained on (SD 2-base): VAE, text encoder, tokenizer and scheduler come
            from it (the UNet, base weights included, from ``seesr_folder``).
        prompt_extractor: an optional :class:`~sr_diffusion.prompts.DAPE` making soft prompts of the released width
            (512); the released ``DAPE.pth`` (RAM) is not convertible (see the module docstring).
        upscale: the pipeline's SR factor (the released model: 4).
    """
    from sr_diffusion.pipelines.seesr import SeeSRPipeline

    seesr_folder = Path(seesr_folder)
    missing = [name for name in ("unet", "controlnet") if not (seesr_folder / name / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"{seesr_folder}: not a released SeeSR folder (no {', '.join(f'{m}/config.json' for m in missing)})"
        )
    base = check_sd_folder(
        base,
        ("vae", "text_encoder", "tokenizer"),
        "pass the SD base SeeSR was trained on (a local copy of stabilityai/stable-diffusion-2-base)",
    )
    unet, unet_image_attentions = convert_seesr_model(seesr_folder / "unet", "unet")
    controlnet, controlnet_image_attentions = convert_seesr_model(seesr_folder / "controlnet", "controlnet")
    return SeeSRPipeline(
        **load_sd_parts(base, ("vae", "text_encoder", "tokenizer")),
        unet=unet,
        scheduler=SeeSRPipeline.base_scheduler(base),  # as test_seesr.py
        controlnet=controlnet,
        unet_image_attentions=unet_image_attentions,
        controlnet_image_attentions=controlnet_image_attentions,
        prompt_extractor=prompt_extractor,
        upscale=upscale,
    )
