"""Exponential moving average of model weights: diffusers' ``EMAModel`` plus the glue the trainer needs.

Update (``EMAModel.step``, after every optimizer step ``t`` counted from 1)::

    d_t = min(decay, (1 + u) / (10 + u)),  u = t - update_after_step - 1   (d_t = 0 while u <= 0)
    θ_ema ← θ_ema - (1 - d_t) · (θ_ema - θ)

i.e. the EMA copies the weights for the first ``update_after_step + 1`` steps, then averages with a
decay that warms up towards ``decay``. Frozen parameters are copied. In a checkpoint the EMA is a
diffusers model folder (``ema/``: the averaged weights, plus ``decay``, ``optimization_step``, … in its
``config.json``), loadable on its own with ``<ModelClass>.from_pretrained(checkpoint/"ema")``.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel

__all__ = ["EMAModel", "create_ema", "save_ema", "load_ema", "copy_with_ema_weights"]

# EMAModel.state_dict() entries that save_pretrained stores in config.json
_STATE_KEYS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power")


def create_ema(model: torch.nn.Module, decay: float | None, update_after_step: int = 0) -> EMAModel | None:
    """An ``EMAModel`` tracking ``model``'s parameters (a diffusers ``ModelMixin``), or None when
    ``decay`` is None or 0 (EMA disabled). Shadow weights live on the parameters' device."""
    if not decay:
        return None
    return EMAModel(
        model.parameters(),
        decay=float(decay),
        update_after_step=int(update_after_step),
        model_cls=type(model),
        model_config=model.config,
    )


def save_ema(ema: EMAModel, directory: str | os.PathLike) -> None:
    """Write the EMA as a diffusers model folder (weights + EMA state in ``config.json``)."""
    ema.save_pretrained(os.fspath(directory))


def load_ema(ema: EMAModel, directory: str | os.PathLike, device: torch.device | str | None = None) -> None:
    """Restore ``ema`` in place (weights and step counter) from a folder written by :func:`save_ema`."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    state = {key: config[key] for key in _STATE_KEYS if key in config}
    weights = ema.model_cls.from_pretrained(directory)
    state["shadow_params"] = [p.detach().clone() for p in weights.parameters()]
    ema.load_state_dict(state)
    if device is not None:
        ema.to(device)


@torch.no_grad()
def copy_with_ema_weights(model: torch.nn.Module, ema: EMAModel | None) -> torch.nn.Module:
    """A fresh copy of ``model`` (an unwrapped diffusers ``ModelMixin``; built from its config, so no
    accelerate forward wrappers are carried over), in eval mode, carrying the EMA weights, or the raw
    weights when ``ema`` is None. The training model is left untouched."""
    clone = type(model).from_config(copy.deepcopy(dict(model.config)))
    clone.load_state_dict(model.state_dict())
    clone.to(device=next(model.parameters()).device)
    if ema is not None:
        ema.copy_to(clone.parameters())
    return clone.eval().requires_grad_(False)
