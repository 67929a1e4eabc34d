"""What the converters of the add-on methods on a Stable Diffusion base share (StableSR, PASD, SeeSR).

* strict loading of a converted state dict into a model (:func:`load_strict`, :func:`build_and_load`): every missing
  key, unexpected key and shape mismatch is named (:func:`~sr_diffusion.checkpoints.check_keys_and_shapes`), weights
  are cast to float32;
* reading a folder written by diffusers' ``save_pretrained`` (:func:`read_diffusers_folder`), the form the PASD and
  SeeSR authors released their trained models in;
* the SD base folder the released add-ons were trained on: its check (:func:`check_sd_folder`) and the parts a
  converted pipeline takes from it as they are (:func:`load_sd_parts`).

Reading is safe throughout: safetensors, or ``torch.load(weights_only=True)`` (:func:`~sr_diffusion.checkpoints.
load_state_dict`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import CheckpointError, check_keys_and_shapes, load_state_dict

__all__ = [
    "WEIGHT_NAMES",
    "as_float32",
    "build_and_load",
    "check_sd_folder",
    "load_sd_parts",
    "load_strict",
    "read_diffusers_folder",
]

#: the weight files of a diffusers model folder, in the order diffusers prefers them
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


# ----------------------------------------------------------------------------------------------------------------------
# Strict loading
# ----------------------------------------------------------------------------------------------------------------------


def as_float32(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` with its floating-point tensors in float32 (the released weights may be half precision)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


def load_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, target: str):
    """``model`` (in eval mode) with the weights of ``state_dict`` (float32), after checking that they fit exactly:
    a :class:`~sr_diffusion.checkpoints.CheckpointError` names what does not (``source`` the weights, ``target`` the
    model, in words)."""
    check_keys_and_shapes(model.state_dict(), state_dict, source, target)
    model.load_state_dict(as_float32(state_dict), strict=True)
    return model.eval()


def build_and_load(cls, config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], source: str, target: str):
    """``cls.from_config(config)`` with the weights of ``state_dict`` (strict, as :func:`load_strict`); built without
    random initialisation (on the meta device, then the tensors are assigned) when nothing is left on the meta
    device."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls.from_config(config)
    check_keys_and_shapes(model.state_dict(), state_dict, source, target)
    model.load_state_dict(as_float32(state_dict), strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model = load_strict(cls.from_config(config), state_dict, source, target)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------


def read_diffusers_folder(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """``(config, state dict, source)`` of a folder written by diffusers' ``save_pretrained``: ``config.json`` and
    ``diffusion_pytorch_model.safetensors`` / ``.bin`` (or their sharded ``*.index.json`` form), read safely;
    ``source`` names the weights for error messages.

    Raises:
        FileNotFoundError: no ``config.json``, or no weights.
        CheckpointError: a corrupt ``config.json`` or shard index, or unreadable / unsafe weights.
    """
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: not a diffusers model folder (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file}: corrupt config.json ({err})") from err
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return config, load_state_dict(folder / name), f"checkpoint {folder / name}"
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                raise CheckpointError(f"{index}: corrupt shard index ({err})") from err
            state_dict: dict[str, torch.Tensor] = {}
            for shard in shards:
                state_dict.update(load_state_dict(folder / shard))
            return config, state_dict, f"checkpoint {index}"
    raise FileNotFoundError(f"{folder}: no weight file ({' or '.join(WEIGHT_NAMES)}, or their sharded form)")


# ----------------------------------------------------------------------------------------------------------------------
# The SD base
# ----------------------------------------------------------------------------------------------------------------------


def check_sd_folder(base: str | os.PathLike, parts: Sequence[str], hint: str) -> Path:
    """``base`` as a ``Path``, after checking that it has the SD subfolders ``parts``; else a ``FileNotFoundError``
    ending in ``hint`` (which base to pass)."""
    base = Path(base)
    missing = [name for name in parts if not (base / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{base}: not a Stable Diffusion diffusers folder (no {', '.join(f'{m}/' for m in missing)}); {hint}"
        )
    return base


def load_sd_parts(base: str | os.PathLike, parts: Sequence[str]) -> dict[str, Any]:
    """The SD components ``parts`` (of ``vae``, ``text_encoder``, ``tokenizer``) of the diffusers folder ``base``, as
    they are (models in eval mode)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    classes = {"vae": AutoencoderKL, "text_encoder": CLIPTextModel, "tokenizer": CLIPTokenizer}
    loaded = {}
    for name in parts:
        if name not in classes:
            raise ValueError(f"cannot load {name!r} from an SD base as it is; one of {sorted(classes)}")
        component = classes[name].from_pretrained(base, subfolder=name)
        loaded[name] = component.eval() if isinstance(component, torch.nn.Module) else component
    return loaded
