"""Load the checkpoints of the SRDiff authors (``LeiaLi/SRDiff`` releases, ``model_ckpt_steps_*.ckpt``) into an
:class:`~sr_diffusion.pipelines.srdiff.SRDiffPipeline`.

``convert_srdiff_pipeline("model_ckpt_steps_400000.ckpt")`` reads the file safely (safetensors, or
``torch.load(weights_only=True)`` through :func:`sr_diffusion.checkpoints.load_state_dict`). The original trainer saves
``{"global_step", "optimizer_states", "state_dict": {"model": GaussianDiffusion.state_dict()}}``; flat
``{"state_dict": {"model.denoise_fn.…": …}}`` files and bare state dicts are accepted too (a ``model.`` prefix and
``module.`` / ``_orig_mod.`` wrapper prefixes shared by every key are stripped). The state dict then holds:

* ``denoise_fn.*``: the UNet, in :class:`~sr_diffusion.models.SRDiffUNet`'s own names (only the prefix is stripped);
  weight-normalised convs (``use_wn``: ``weight_g`` / ``weight_v``) are folded into plain weights;
* ``rrdb.*``: the LR encoder in the 2019 ESRGAN layout (``RRDB_trunk.N.RDB1.conv1``, ``trunk_conv``, ``upconv1``,
  ``HRconv``, ...), renamed to :class:`~sr_diffusion.models.RRDBNet`'s by :func:`sr_diffusion.checkpoints.
  convert_state_dict`;
* ``betas``, ``alphas_cumprod``, ... (``GaussianDiffusion``'s schedule buffers): ``betas`` gives ``T`` and the schedule
  (:func:`~sr_diffusion.pipelines.srdiff.pipeline_srdiff.srdiff_scheduler` when it is the cosine one with ``s =
  0.008``, else ``DDPMScheduler(trained_betas=betas)``); the others are recomputed and not used.

Inferred from shapes: ``dim`` (``mlp.0.weight``: ``4·dim × dim``), ``dim_mults`` (the first conv of each level's first
ResnetBlock), ``out_dim`` (``final_conv.1``), ``sr_scale`` (``cond_proj`` kernel ``2s``), ``use_attn``
(``mid_attn.*``), ``up_input`` (``up_proj.*``), ``cond_dim`` / ``rrdb_num_block`` (the RRDB's ``num_feat`` and number of
blocks; checked against ``cond_proj``'s input channels ``cond_dim · ⌊(n + 1) / 3⌋``), and the RRDB's ``num_feat``,
``num_block``, ``num_grow_ch`` and scale. Not stored, documented defaults (the released configs' values, which can be
overridden): ``res_rescale = 2``, ``clip_input = True``, ``lr_up_gain = 255/256`` (the original makes ``up(x_L)`` from
``img_lr / 256``); with no ``betas`` buffer, the cosine schedule with ``T = 100``.

Released models (``LeiaLi/SRDiff`` release v1.0.0): ``srdiff_pretrained_celebA/model_ckpt_steps_300000.ckpt`` (×8,
``unet_dim_mults 1|2|2|4``) and ``srdiff_pretrained_div2k/model_ckpt_steps_400000.ckpt`` (×4, ``1|2|3|4``); their
configs (``configs/diffsr_base.yaml``) give ``hidden_size 64``, ``timesteps 100``, the cosine schedule,
``res_rescale 2`` and an encoder of ``rrdb_num_feat 32`` × ``rrdb_num_block 8`` (the DIV2K encoder pre-training config,
``configs/rrdb/df2k4x_pretrain.yaml``, says 64 × 17 instead); every width is read from the file, so either loads.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..checkpoints import CheckpointError, check_keys_and_shapes, convert_state_dict, preview
from ..models.rrdbnet import RRDBNet
from ..models.srdiff_unet import SRDiffUNet, srdiff_num_cond_features
from .resshift import indices, read_flat_state_dict

__all__ = [
    "SCHEDULE_BUFFERS",
    "convert_srdiff_pipeline",
    "fold_weight_norm",
    "infer_srdiff_config",
    "is_srdiff_state_dict",
    "split_srdiff_state_dict",
]

#: ``GaussianDiffusion``'s registered buffers: the schedule, recomputed by the scheduler (``betas`` is read).
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)

#: What the original's data pipeline multiplies ``up(x_L)`` by: ``imresize(img_lr / 256, s)`` of 8-bit images.
ORIGINAL_LR_UP_GAIN = 255.0 / 256.0


# ----------------------------------------------------------------------------------------------------------------------
# reading and splitting
# ----------------------------------------------------------------------------------------------------------------------


def is_srdiff_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """Whether a flat state dict (``model.`` prefix or not) holds an SRDiff ``denoise_fn``."""
    return any(re.fullmatch(r"(model\.)?denoise_fn\.cond_proj\.weight", k) for k in state_dict)


def split_srdiff_state_dict(
    state_dict: Mapping[str, torch.Tensor], source: str = "the checkpoint"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(denoise_fn, rrdb, schedule buffers)`` of a flat ``GaussianDiffusion`` state dict, prefixes stripped.

    Raises:
        CheckpointError: no ``denoise_fn.*`` keys, or keys that are none of the three.
    """
    if state_dict and all(k.startswith("model.") for k in state_dict):
        state_dict = {k[len("model.") :]: v for k, v in state_dict.items()}
    parts: dict[str, dict[str, torch.Tensor]] = {"denoise_fn.": {}, "rrdb.": {}}
    buffers, unknown = {}, []
    for key, value in state_dict.items():
        prefix = next((p for p in parts if key.startswith(p)), None)
        if prefix is not None:
            parts[prefix][key[len(prefix) :]] = value
        elif key in SCHEDULE_BUFFERS:
            buffers[key] = value
        else:
            unknown.append(key)
    if not parts["denoise_fn."]:
        raise CheckpointError(
            f"{source} is not an SRDiff checkpoint: it has no denoise_fn.* (or model.denoise_fn.*) weights; its first "
            f"keys are {preview(state_dict)}"
        )
    if unknown:
        raise CheckpointError(
            f"{source}: keys {preview(unknown)} are neither denoise_fn.*, rrdb.* nor GaussianDiffusion's schedule "
            "buffers"
        )
    return parts["denoise_fn."], parts["rrdb."], buffers


def fold_weight_norm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace each ``torch.nn.utils.weight_norm`` pair (``X.weight_g``, ``X.weight_v``; ``dim=0``) by
    ``X.weight = g · v / ||v||`` (the norm over every dimension but the first), as the original's
    ``make_generation_fast_`` does."""
    out = {k: v for k, v in state_dict.items() if not k.endswith((".weight_g", ".weight_v"))}
    for key in state_dict:
        if key.endswith(".weight_v"):
            base = key[: -len("_v")]
            v, g = state_dict[key].float(), state_dict[base + "_g"].float()
            norm = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.ndim - 1)))
            out[base] = (g * v / norm).to(state_dict[key].dtype)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# config inference
# ----------------------------------------------------------------------------------------------------------------------


def _shape(state_dict: Mapping[str, torch.Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise CheckpointError(f"{source}: the SRDiff UNet (denoise_fn) lacks {key!r}; first keys {preview(state_dict)}")
    return tuple(state_dict[key].shape)


def _schedule(buffers: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``{"num_train_timesteps", "beta_schedule", "trained_betas"}`` of the ``betas`` buffer (none: cosine, T=100)."""
    from sr_diffusion.pipelines.srdiff.pipeline_srdiff import srdiff_betas

    if "betas" not in buffers:
        return {"num_train_timesteps": 100, "beta_schedule": "cosine", "trained_betas": None}
    betas = buffers["betas"].double().flatten().numpy()
    T = len(betas)
    if np.allclose(betas, srdiff_betas(T, "cosine", 0.008), rtol=0, atol=1e-6):
        return {"num_train_timesteps": T, "beta_schedule": "cosine", "trained_betas": None}
    return {"num_train_timesteps": T, "beta_schedule": "trained", "trained_betas": betas.tolist()}


def infer_srdiff_config(
    state_dict_or_path: str | os.PathLike | Mapping[str, Any],
) -> dict[str, Any]:
    """The hyper-parameters of an SRDiff checkpoint (file or loaded dict): ``{"unet": SRDiffUNet kwargs, "rrdb":
    RRDBNet kwargs or None (no rrdb.* weights), "schedule": {"num_train_timesteps", "beta_schedule",
    "trained_betas"}}``. See the module docstring for what is inferred from what."""
    state_dict, source = read_flat_state_dict(state_dict_or_path)
    return _infer(*split_srdiff_state_dict(state_dict, source), source)[0]


def _infer(
    unet_sd, rrdb_sd, buffers, source: str, rrdb: RRDBNet | None = None
) -> tuple[dict[str, Any], dict, dict | None]:
    unet_sd = fold_weight_norm(unet_sd)
    dim = _shape(unet_sd, "mlp.0.weight", source)[1]
    levels = indices(unet_sd, r"downs\.(\d+)\.0\.block1\.block\.1\.weight")
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(f"{source}: denoise_fn.downs.N.0 ResnetBlocks are missing or not numbered 0..N")
    widths = [_shape(unet_sd, f"downs.{i}.0.block1.block.1.weight", source)[0] for i in levels]
    if any(w % dim for w in widths):
        raise CheckpointError(f"{source}: level widths {widths} are not multiples of dim={dim}")
    cond_in, cond_out, kernel, _ = _shape(unet_sd, "cond_proj.weight", source)
    rrdb_config, rrdb_converted = None, None
    if rrdb_sd:
        try:
            _, rrdb_config, rrdb_converted = convert_state_dict(rrdb_sd, arch="rrdbnet")
        except CheckpointError as err:
            raise CheckpointError(f"{source}: its rrdb.* weights are not an RRDBNet: {err}") from err
        cond_dim, num_block = rrdb_config["num_feat"], rrdb_config["num_block"]
        if cond_dim * srdiff_num_cond_features(num_block) != cond_in:
            raise CheckpointError(
                f"{source}: cond_proj takes {cond_in} channels, but an RRDB of {num_block} blocks x {cond_dim} "
                f"features gives {cond_dim * srdiff_num_cond_features(num_block)}"
            )
    elif rrdb is not None:  # the given encoder
        cond_dim, num_block = int(rrdb.config.num_feat), int(rrdb.config.num_block)
    else:  # not separable: the released configs' RRDB width, and the smallest block count it implies
        cond_dim = 32
        if cond_in % cond_dim:
            raise CheckpointError(f"{source} has no rrdb.* weights and cond_proj's {cond_in} inputs are not 32·k")
        num_block = 3 * (cond_in // cond_dim) - 1
    unet_config = {
        "dim": dim,
        "dim_mults": [w // dim for w in widths],
        "out_dim": _shape(unet_sd, "final_conv.1.weight", source)[0],
        "cond_dim": cond_dim,
        "rrdb_num_block": num_block,
        "sr_scale": kernel // 2,
        "use_attn": "mid_attn.fn.g" in unet_sd,
        "up_input": "up_proj.1.weight" in unet_sd,
    }
    if cond_out != dim:
        raise CheckpointError(f"{source}: cond_proj outputs {cond_out} channels, the UNet's dim is {dim}")
    if rrdb_config is not None and rrdb_config["scale"] != unet_config["sr_scale"]:
        raise CheckpointError(
            f"{source}: the RRDB is x{rrdb_config['scale']} but cond_proj upsamples x{unet_config['sr_scale']}"
        )
    config = {"unet": unet_config, "rrdb": rrdb_config, "schedule": _schedule(buffers)}
    return config, unet_sd, rrdb_converted


# ----------------------------------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------------------------------


def convert_srdiff_pipeline(
    state_dict_or_path: str | os.PathLike | Mapping[str, Any],
    *,
    rrdb: RRDBNet | None = None,
    res_rescale: float = 2.0,
    clip_input: bool = True,
    lr_up_gain: float = ORIGINAL_LR_UP_GAIN,
    scheduler=None,
):
    """An :class:`~sr_diffusion.pipelines.srdiff.SRDiffPipeline` holding the weights of an SRDiff checkpoint.

    Args:
        state_dict_or_path: the ``.ckpt`` / ``.pth`` / ``.safetensors`` file, or a loaded (wrapped or flat) dict.
        rrdb: the LR encoder, for checkpoints without ``rrdb.*`` weights (e.g. from
            ``load_regression_model("rrdb.ckpt")``); an error if the checkpoint has its own.
        res_rescale, clip_input, lr_up_gain: the pipeline's settings (the released models' by default).
        scheduler: the sampler; by default the checkpoint's own schedule as a ``DDPMScheduler`` (the original's).

    Returns:
        The pipeline, its models in eval mode, every parameter loaded strictly.

    Raises:
        CheckpointError: unreadable file, not SRDiff, missing / unexpected keys or shape mismatches.
    """
    from diffusers import DDPMScheduler

    from sr_diffusion.pipelines.srdiff.pipeline_srdiff import SRDiffPipeline, srdiff_scheduler

    state_dict, source = read_flat_state_dict(state_dict_or_path)
    unet_sd, rrdb_sd, buffers = split_srdiff_state_dict(state_dict, source)
    if rrdb is not None and rrdb_sd:
        raise CheckpointError(f"{source} has its own rrdb.* weights; do not pass rrdb")
    if rrdb is None and not rrdb_sd:
        raise CheckpointError(
            f"{source} has no rrdb.* weights (the LR encoder); pass rrdb=load_regression_model(<its checkpoint>)"
        )
    config, unet_sd, rrdb_converted = _infer(unet_sd, rrdb_sd, buffers, source, rrdb)

    unet_config = config["unet"]
    with torch.device("meta"):
        expected = SRDiffUNet(**unet_config).state_dict()
    target = f"SRDiffUNet({', '.join(f'{k}={v!r}' for k, v in unet_config.items())})"
    check_keys_and_shapes(expected, unet_sd, source, target)
    unet = SRDiffUNet(**unet_config)
    unet.load_state_dict(unet_sd, strict=True)
    if rrdb is None:
        rrdb = RRDBNet(**config["rrdb"])
        rrdb.load_state_dict(rrdb_converted, strict=True)

    if scheduler is None:
        schedule = config["schedule"]
        if schedule["trained_betas"] is None:
            scheduler = srdiff_scheduler(schedule["num_train_timesteps"])
        else:
            scheduler = DDPMScheduler(
                num_train_timesteps=schedule["num_train_timesteps"],
                trained_betas=schedule["trained_betas"],
                clip_sample=True,
                variance_type="fixed_small",
            )
    return SRDiffPipeline(
        unet=unet.eval(),
        rrdb=rrdb.eval(),
        scheduler=scheduler,
        res_rescale=res_rescale,
        clip_input=clip_input,
        lr_up_gain=lr_up_gain,
    )
