"""Load the SR3 checkpoints of the widely used re-implementation (Janspiry,
"Image-Super-Resolution-via-Iterative-Refinement") into :class:`~sr_diffusion.models.sr3_unet.SR3UNet` and a
``DDPMScheduler``.

``convert_sr3_pipeline("I640000_E37_gen.pth")`` reads the file safely (safetensors, or
``torch.load(weights_only=True)`` through :func:`sr_diffusion.checkpoints.load_state_dict`), finds the UNet inside
whatever wraps it, infers its hyper-parameters, loads it strictly and returns an
:class:`~sr_diffusion.pipelines.SR3Pipeline` with ``noise_level_scale=1`` (the original feeds ``sqrt(alpha_bar)``
itself to the UNet).

File layout. ``*_gen.pth`` is the ``state_dict()`` of the original ``GaussianDiffusion``: the UNet under
``denoise_fn.``, and, when the noise schedule was set before saving (always, in the original training script), its
buffers ``betas``, ``alphas_cumprod``, ``posterior_variance``, ... at the top level. Other wrappers are found too:
``state_dict`` / ``model`` / ``params_ema`` nesting, ``module.`` / ``_orig_mod.`` prefixes, and any prefix before the
UNet's keys (``netG.``, ``netG.module.denoise_fn.``, ...): the UNet is where ``downs.0.weight`` is.

What is inferred, and from what:

* ``in_channel``, ``inner_channel``: ``downs.0.weight``; ``out_channel``: ``final_conv.block.3.weight``;
  ``with_noise_level_emb``: ``noise_level_mlp.1.weight`` is present.
* ``channel_mults``, ``res_blocks``: the decoder blocks between two upsamplers (``ups.i.conv``; every level has
  ``res_blocks + 1`` blocks) and their widths; ``use_affine_level``: ``noise_func.noise_func.0`` is twice as wide
  as its block.
* which levels have self-attention (``ups.i.attn``); ``attn_res`` is then ``image_size / 2^level`` of those levels.
* the noise schedule: the saved ``betas`` (a linear or ``quad`` schedule becomes ``beta_schedule="linear"`` /
  ``"scaled_linear"``, anything else ``trained_betas``); without them, the released configs' schedule (``linear``,
  2000 steps, ``beta_start=1e-6``, ``beta_end=1e-2``: both ``sr_sr3_16_128.json`` and ``sr_sr3_64_512.json``).

Not stored in the file: ``norm_groups`` (GroupNorm weights do not tell), ``image_size`` (only places the attention
levels), ``dropout`` (training only) and the SR factor. A UNet with the structure of a released config takes that
config's values (:data:`RELEASED_CONFIGS`: 16→128 with ``norm_groups=32``, 64→512 with ``norm_groups=16``); any
other takes ``norm_groups=32`` (the original code's default when the json has none) if 32 divides its widths, else
the conversion stops and asks for it, ``image_size=128``, ``dropout=0``. Override with
``convert_sr3_unet(path, config={"norm_groups": 16})``. The SR factor is 8 (both released models) unless given.

The DDPM variant of the same repository (``model/ddpm_modules``: ``time_mlp``, step-index conditioning) is
recognised and refused.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from ..checkpoints import CheckpointError, check_keys_and_shapes, preview, required_tensor
from ..models.sr3_unet import SR3UNet
from .resshift import indices, read_flat_state_dict

#: What the converter's input must be, for its error messages
_LAYOUT = "an SR3 UNet state dict of the re-implementation"

__all__ = [
    "RELEASED_CONFIGS",
    "RELEASED_SCHEDULE",
    "convert_sr3_pipeline",
    "convert_sr3_scheduler",
    "convert_sr3_unet",
    "infer_sr3_unet_config",
    "split_sr3_state_dict",
]

#: The SR3 configs of the re-implementation's released checkpoints (``config/*.json``, ``norm_groups`` filled in
#: with ``model/networks.py``'s default where the json has none), as :class:`SR3UNet` keyword arguments.
RELEASED_CONFIGS: dict[str, dict[str, Any]] = {
    "sr_sr3_16_128": {
        "in_channel": 6,
        "out_channel": 3,
        "inner_channel": 64,
        "norm_groups": 32,
        "channel_mults": [1, 2, 4, 8, 8],
        "attn_res": [16],
        "res_blocks": 2,
        "dropout": 0.2,
        "with_noise_level_emb": True,
        "image_size": 128,
        "use_affine_level": False,
    },
    "sr_sr3_64_512": {
        "in_channel": 6,
        "out_channel": 3,
        "inner_channel": 64,
        "norm_groups": 16,
        "channel_mults": [1, 2, 4, 8, 16],
        "attn_res": [],
        "res_blocks": 1,
        "dropout": 0.0,
        "with_noise_level_emb": True,
        "image_size": 512,
        "use_affine_level": False,
    },
}

#: ``model.beta_schedule`` (train and val alike) of both released configs, as ``DDPMScheduler`` arguments.
RELEASED_SCHEDULE = {"num_train_timesteps": 2000, "beta_schedule": "linear", "beta_start": 1e-6, "beta_end": 1e-2}

#: The SR factor of both released models (16→128, 64→512).
RELEASED_UPSCALE = 8

#: Buffers of the original ``GaussianDiffusion`` (``set_new_noise_schedule``) saved next to ``denoise_fn.``.
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

ANCHOR = "downs.0.weight"
DEFAULT_NORM_GROUPS = 32
DEFAULT_IMAGE_SIZE = 128


# ----------------------------------------------------------------------------------------------
# finding the UNet
# ----------------------------------------------------------------------------------------------


def split_sr3_state_dict(
    state_dict: Mapping[str, torch.Tensor], source: str = "the checkpoint"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(UNet state dict, schedule buffers)`` of a flat state dict: the UNet's keys are those after the prefix of
    ``downs.0.weight`` (``denoise_fn.``, ``netG.denoise_fn.``, none, ...), the schedule buffers are
    :data:`SCHEDULE_BUFFERS` next to the UNet's wrapper.

    Raises:
        CheckpointError: no SR3 UNet in it (the DDPM variant is named), several, or other keys beside it.
    """
    prefixes = sorted(k[: -len(ANCHOR)] for k in state_dict if k == ANCHOR or k.endswith("." + ANCHOR))
    if not prefixes:
        if any(k.endswith("time_mlp.1.weight") for k in state_dict):
            raise CheckpointError(
                f"{source} is the re-implementation's DDPM UNet (model/ddpm_modules: time_mlp, conditioned on the "
                "step index), not its SR3 UNet (noise_level_mlp); only the SR3 model is supported"
            )
        raise CheckpointError(
            f"{source} is not an SR3 UNet state dict (no {ANCHOR!r} under any prefix; first keys: "
            f"{preview(state_dict)})"
        )
    if len(prefixes) > 1:
        raise CheckpointError(
            f"{source} holds several SR3 UNets (under {', '.join(repr(p) for p in prefixes)}); save the one to "
            "convert on its own"
        )
    prefix = prefixes[0]
    outer = prefix[: -len("denoise_fn.")] if prefix.endswith("denoise_fn.") else prefix
    buffers = {outer + name: name for name in SCHEDULE_BUFFERS if outer + name in state_dict}
    schedule = {name: state_dict[key] for key, name in buffers.items()}
    unet = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix) and k not in buffers}
    other = sorted(k for k in state_dict if not k.startswith(prefix) and k not in buffers)
    if other:
        raise CheckpointError(
            f"{source}: keys {preview(other)} are neither the SR3 UNet's (under {prefix!r}) nor the diffusion's "
            "noise-schedule buffers"
        )
    return unet, schedule


# ----------------------------------------------------------------------------------------------
# config inference
# ----------------------------------------------------------------------------------------------


def _decoder_levels(sd: Mapping[str, torch.Tensor], source: str) -> list[list[int]]:
    """The decoder blocks ``ups.i`` of every level, deepest level first (levels end at an upsampler ``ups.i.conv``)."""
    ups = indices(sd, r"ups\.(\d+)\..*")
    if not ups or ups != list(range(len(ups))):
        raise CheckpointError(f"{source}: the decoder modules ups.N are missing or not numbered 0..N (found {ups})")
    levels, current = [], []
    for i in ups:
        if f"ups.{i}.conv.weight" in sd:
            if not current:
                raise CheckpointError(f"{source}: ups.{i} is an upsampler with no decoder block before it")
            levels.append(current)
            current = []
        elif f"ups.{i}.res_block.block1.block.3.weight" in sd:
            current.append(i)
        else:
            raise CheckpointError(f"{source}: ups.{i} is neither a residual block nor an upsampler")
    if not current:
        raise CheckpointError(f"{source}: the decoder ends with an upsampler; SR3's ends with the level-0 blocks")
    levels.append(current)
    if len({len(level) for level in levels}) != 1:
        raise CheckpointError(
            f"{source}: the decoder levels have {[len(level) for level in levels]} blocks; SR3 has res_blocks + 1 "
            "in every level"
        )
    return levels


def _released_match(inferred: Mapping[str, Any], attn_levels: list[int]) -> dict[str, Any] | None:
    """The released config whose inferable part equals ``inferred`` (attention at the same levels), if any."""
    for config in RELEASED_CONFIGS.values():
        same = all(inferred[k] == config[k] for k in inferred)
        num_levels = len(config["channel_mults"])
        levels = [lvl for lvl in range(num_levels) if config["image_size"] >> lvl in config["attn_res"]]
        if same and levels == attn_levels:
            return dict(config)
    return None


def infer_sr3_unet_config(
    state_dict: Mapping[str, torch.Tensor],
    image_size: int | None = None,
    norm_groups: int | None = None,
    source: str = "the checkpoint",
) -> dict[str, Any]:
    """The :class:`SR3UNet` keyword arguments of an original-layout UNet state dict (no ``denoise_fn.`` prefix; see
    the module docstring for what is inferred from what and the defaults). ``image_size`` / ``norm_groups``, when
    given, replace the inferred or default ones (``attn_res`` follows ``image_size``).

    Raises:
        CheckpointError: the keys are not those of the re-implementation's SR3 UNet, or are inconsistent, or
            ``norm_groups`` cannot be defaulted (32 does not divide the widths) and was not given.
    """
    sd = state_dict
    inner_channel, in_channel = (int(s) for s in required_tensor(sd, "downs.0.weight", source, _LAYOUT).shape[:2])
    out_channel = int(required_tensor(sd, "final_conv.block.3.weight", source, _LAYOUT).shape[0])
    with_emb = "noise_level_mlp.1.weight" in sd
    if with_emb:
        for key, shape in (
            ("noise_level_mlp.1.weight", (4 * inner_channel, inner_channel)),
            ("noise_level_mlp.3.weight", (inner_channel, 4 * inner_channel)),
        ):
            if tuple(required_tensor(sd, key, source, _LAYOUT).shape) != shape:
                raise CheckpointError(
                    f"{source}: {key} has shape {tuple(sd[key].shape)}, but inner_channel={inner_channel} (from "
                    f"downs.0.weight) gives {shape}"
                )

    # 1. levels, from the decoder: deepest first, res_blocks + 1 blocks each
    levels = _decoder_levels(sd, source)[::-1]
    widths = [int(sd[f"ups.{level[0]}.res_block.block1.block.3.weight"].shape[0]) for level in levels]
    if any(w % inner_channel for w in widths):
        raise CheckpointError(f"{source}: block widths {widths} are not multiples of inner_channel={inner_channel}")
    first = f"ups.{levels[0][0]}.res_block.noise_func.noise_func.0.weight"
    affine = with_emb and int(required_tensor(sd, first, source, _LAYOUT).shape[0]) == 2 * widths[0]
    attn_levels = [lvl for lvl, level in enumerate(levels) if f"ups.{level[0]}.attn.qkv.weight" in sd]
    inferred = {
        "in_channel": in_channel,
        "out_channel": out_channel,
        "inner_channel": inner_channel,
        "channel_mults": [w // inner_channel for w in widths],
        "res_blocks": len(levels[0]) - 1,
        "with_noise_level_emb": with_emb,
        "use_affine_level": affine,
    }

    # 2. what the file does not hold: a released config's values, else the defaults
    released = _released_match(inferred, attn_levels)
    if released is not None:
        config = released
    else:
        widest = max(2 ** (len(levels) - 1), DEFAULT_IMAGE_SIZE)
        config = {**inferred, "norm_groups": DEFAULT_NORM_GROUPS, "dropout": 0.0, "image_size": widest}
        if norm_groups is None and math.gcd(inner_channel, *widths) % DEFAULT_NORM_GROUPS:
            raise CheckpointError(
                f"{source}: norm_groups is not stored in SR3 checkpoints, and the default {DEFAULT_NORM_GROUPS} does "
                f"not divide the block widths {[inner_channel, *widths]}: pass the training config's "
                "model.unet.norm_groups (config={'norm_groups': N}, or --norm-groups N)"
            )
    if norm_groups is not None:
        config["norm_groups"] = int(norm_groups)
    if image_size is not None or released is None:
        config["image_size"] = int(image_size or config["image_size"])
        config["attn_res"] = [config["image_size"] >> lvl for lvl in attn_levels]
        if len(set(config["attn_res"])) != len(attn_levels) or 0 in config["attn_res"]:
            raise CheckpointError(f"{source}: image_size={config['image_size']} is too small for {len(levels)} levels")
    return {key: config[key] for key in RELEASED_CONFIGS["sr_sr3_16_128"]}


# ----------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------


def _read(state_dict_or_path: str | os.PathLike | Mapping[str, Any]):
    """``(UNet state dict, schedule buffers, source)`` of a file or a loaded object."""
    try:
        flat, source = read_flat_state_dict(state_dict_or_path)
    except CheckpointError as err:
        name = os.fspath(state_dict_or_path) if isinstance(state_dict_or_path, (str, os.PathLike)) else ""
        if name.endswith("_opt.pth"):
            raise CheckpointError(f"{err}; {name} is the optimizer state: pass the matching *_gen.pth") from err
        raise
    unet, schedule = split_sr3_state_dict(flat, source)
    return unet, schedule, source


def _build_unet(unet_sd: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None, source: str):
    config = dict(config or {})
    known = RELEASED_CONFIGS["sr_sr3_16_128"]
    unknown = set(config) - set(known)
    if unknown:
        raise TypeError(f"SR3UNet has no hyper-parameter(s) {sorted(unknown)}; it takes {sorted(known)}")
    inferred = infer_sr3_unet_config(unet_sd, config.get("image_size"), config.get("norm_groups"), source)
    final = {**inferred, **config}
    try:
        model = SR3UNet(**final)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: the config {final} is not valid: {err}") from err
    target = "SR3UNet(" + ", ".join(f"{k}={v!r}" for k, v in final.items()) + ")"
    check_keys_and_shapes(model.state_dict(), unet_sd, source, target)
    model.load_state_dict(unet_sd, strict=True)
    return model.eval(), final


def convert_sr3_unet(
    state_dict_or_path: str | os.PathLike | Mapping[str, Any], config: Mapping[str, Any] | None = None
) -> tuple[SR3UNet, dict[str, Any]]:
    """Build the :class:`SR3UNet` that a checkpoint of the re-implementation holds.

    Args:
        state_dict_or_path: an ``I..._E.._gen.pth`` / ``.safetensors`` file, or a loaded object (see the module
            docstring for the wrappers recognised).
        config: values that override the inferred hyper-parameters (:class:`SR3UNet` keyword arguments), e.g.
            ``{"norm_groups": 16}``.

    Returns:
        ``(model, config)``: the model in eval mode with every parameter loaded (strict), and the keyword arguments
        it was built with.

    Raises:
        CheckpointError: unreadable file, not the re-implementation's SR3 UNet, keys beside it that are not its
            noise schedule, or missing / unexpected keys or shape mismatches (all named).
        TypeError: ``config`` names an unknown hyper-parameter.
    """
    unet_sd, _, source = _read(state_dict_or_path)
    return _build_unet(unet_sd, config, source)


def convert_sr3_scheduler(schedule: Mapping[str, torch.Tensor] | None = None, source: str = "the checkpoint"):
    """The training ``DDPMScheduler`` of the original ``GaussianDiffusion`` buffers ``schedule`` (``betas``,
    optionally ``alphas_cumprod`` to cross-check), or :data:`RELEASED_SCHEDULE` when there are none.

    The original samples as diffusers' ``DDPMScheduler`` with its defaults: ``epsilon`` prediction, ``x_0``
    clipped to [-1, 1], the posterior variance ``beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)``
    (``fixed_small``), no noise at the last step.
    """
    from diffusers import DDPMScheduler

    betas = (schedule or {}).get("betas")
    if betas is None:
        return DDPMScheduler(**RELEASED_SCHEDULE)
    betas = betas.detach().double().cpu()
    if betas.ndim != 1 or len(betas) < 2 or not ((betas > 0) & (betas < 1)).all():
        raise CheckpointError(f"{source}: the saved betas {tuple(betas.shape)} are not a noise schedule in (0, 1)")
    alphas_cumprod = (schedule or {}).get("alphas_cumprod")
    if alphas_cumprod is not None and not torch.allclose(
        alphas_cumprod.double().cpu(), torch.cumprod(1 - betas, 0), rtol=1e-4, atol=1e-7
    ):
        raise CheckpointError(f"{source}: the saved alphas_cumprod is not the cumulative product of 1 - betas")
    n = len(betas)
    start, end = float(f"{betas[0].item():.6g}"), float(f"{betas[-1].item():.6g}")
    kwargs: dict[str, Any] = {"num_train_timesteps": n}
    linear = torch.linspace(start, end, n, dtype=torch.float64)
    quad = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    if torch.allclose(betas, linear, rtol=1e-5, atol=1e-10):
        kwargs.update(beta_schedule="linear", beta_start=start, beta_end=end)
    elif torch.allclose(betas, quad, rtol=1e-5, atol=1e-10):
        kwargs.update(beta_schedule="scaled_linear", beta_start=start, beta_end=end)  # the original's "quad"
    else:
        kwargs["trained_betas"] = betas.tolist()
    return DDPMScheduler(**kwargs)


def convert_sr3_pipeline(
    state_dict_or_path: str | os.PathLike | Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    upscale: int | None = None,
):
    """An :class:`~sr_diffusion.pipelines.SR3Pipeline` from a checkpoint of the re-implementation: the converted
    UNet (:func:`convert_sr3_unet`), its noise schedule (:func:`convert_sr3_scheduler`), ``upscale`` (8, both
    released models, when None) and ``noise_level_scale=1`` (the UNet sees ``sqrt(alpha_bar)`` as the original
    feeds it). Sample with ``num_inference_steps=2000`` (all steps, DDPM) for the original's sampler."""
    from sr_diffusion.pipelines import SR3Pipeline

    unet_sd, schedule, source = _read(state_dict_or_path)
    unet, _ = _build_unet(unet_sd, config, source)
    scheduler = convert_sr3_scheduler(schedule, source)
    return SR3Pipeline(unet=unet, scheduler=scheduler, upscale=int(upscale or RELEASED_UPSCALE), noise_level_scale=1.0)
