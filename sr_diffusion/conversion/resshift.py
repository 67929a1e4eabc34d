"""Load the denoisers that the ResShift authors released (``resshift_*.pth``) into :class:`ResShiftUNet`.

``convert_resshift_unet("resshift_realsrx4_s4_v3.pth")`` reads the file safely (safetensors, or
``torch.load(weights_only=True)`` through :func:`sr_diffusion.checkpoints.load_state_dict`), unwraps
``state_dict`` / ``model`` / ``params_ema`` nesting and ``module.`` / ``_orig_mod.`` prefixes (DDP,
``torch.compile``), infers the hyper-parameters from the key names and tensor shapes, and loads the
weights strictly. Parameter names are the original ones, so the only change is dropping two kinds of
buffers the original saves and this port recomputes; both are checked first:

* ``*.attn.relative_position_index``: must equal the index of that block's window;
* ``*.attn_mask`` (shifted blocks, computed at ``image_size``): must equal
  :func:`~sr_diffusion.models.resshift_unet.resshift_window_mask`, and only shifted blocks may have one.

What is inferred, and from what:

* ``model_channels``: ``time_embed.0.weight`` (``4·mc × mc``); ``out_channels``: ``out.2.weight``.
* ``channel_mult``, ``num_res_blocks``: the decoder blocks between two upsamplers
  (``output_blocks.i.k.conv`` or an up-``ResBlock``), else the encoder blocks between two downsamplers
  (``input_blocks.i.0.op``, or an index without weights: average pooling).
* ``resblock_updown``: a second ``ResBlock`` in a decoder block; ``conv_resample``: the resampling convs
  are present (True when there is nothing to tell); ``use_scale_shift_norm``: ``emb_layers.1`` has twice
  the block's channels.
* ``swin_embed_dim``, ``swin_depth``, ``num_head_channels``, ``mlp_ratio``, ``patch_norm``: the middle
  block's ``BasicLayer`` (``patch_embed.proj``, number of ``blocks``, ``relative_position_bias_table``
  columns = heads, ``mlp.fc1``, ``patch_embed.norm``).
* ``window_size``: the largest window, from the bias-table rows ``(2·ws - 1)²``.
* ``image_size``: the stored ``attn_mask`` (``nW = (res / ws)²`` at its level); else a level whose window
  is smaller than ``window_size`` (that level's size is its window); else ``window_size · 2^(levels-1)``
  (64 for the released models). Only the shifts depend on it: a model without shifted blocks does not care.
* ``attention_resolutions``: ``image_size / 2^level`` for the levels with a ``BasicLayer``.
* ``cond_lq``, ``cond_mask``, ``lq_size``, ``in_channels``: the ``feature_extractor`` stages (``lq_size =
  image_size · 2^stages``; a 4-channel first conv means a mask) and the input channels of
  ``input_blocks.0.0.weight``; without an extractor ``in_channels = out_channels`` and the remaining 3
  (4 with a mask, 0 without ``lq``) channels are the LR image.

Not inferable, documented defaults: ``dropout=0.0``, ``dims=2``, ``use_fp16=False``, ``num_heads=1``
(unused when ``num_head_channels`` is set). Everything can be overridden: ``convert_resshift_unet(path,
config={"image_size": 64})`` (``attention_resolutions`` and ``lq_size`` then follow the given ``image_size``).

Released checkpoints (https://github.com/zsyOAOA/ResShift/releases, v2.0) and their configs in that
repository: ``resshift_realsrx4_s15_v1.pth`` / ``_v2`` (``realsr_swinunet_realesrgan256.yaml``),
``resshift_realsrx4_s4_v3.pth`` (``..._journal.yaml``), ``resshift_bicsrx4_s4.pth``
(``bicx4_swinunet_lpips.yaml``): all ``image_size=64, in/out_channels=3, model_channels=160,
channel_mult=(1, 2, 2, 4), num_res_blocks=2, attention_resolutions=(64, 32, 16, 8), swin_depth=2,
swin_embed_dim=192, num_head_channels=32, window_size=8, mlp_ratio=4, use_scale_shift_norm=True,
lq_size=64`` (the defaults of :class:`ResShiftUNet`); the inpainting models add ``cond_mask=True,
lq_size=256``, the face model has ``in/out_channels=8, lq_size=512``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from ..checkpoints import (
    CheckpointError,
    check_keys_and_shapes,
    load_state_dict,
    required_tensor,
    unwrap_state_dict,
)
from ..models.resshift_unet import (
    ResShiftUNet,
    SwinTransformerBlock,
    WindowAttention,
    resshift_window_mask,
)

#: What the converter's input must be, for its error messages
_LAYOUT = "a ResShift UNetModelSwin state dict"

__all__ = ["convert_resshift_unet", "infer_resshift_unet_config"]

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
RECOMPUTED_BUFFERS = ("attn_mask", "relative_position_index")


# ----------------------------------------------------------------------------------------------
# shared helpers (also used by the VQ converter)
# ----------------------------------------------------------------------------------------------


def read_flat_state_dict(
    state_dict_or_path: str | os.PathLike | Mapping[str, Any],
) -> tuple[dict[str, torch.Tensor], str]:
    """``(flat state dict, description for messages)``: a file is read with
    :func:`~sr_diffusion.checkpoints.load_state_dict` (safe), a mapping is unwrapped; then ``module.`` and
    ``_orig_mod.`` prefixes shared by every key are stripped (in any order, repeatedly)."""
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        source = f"checkpoint {os.fspath(state_dict_or_path)}"
        state_dict = load_state_dict(state_dict_or_path)
    else:
        source = "the given state dict"
        try:
            state_dict = unwrap_state_dict(state_dict_or_path)
        except CheckpointError as err:
            raise CheckpointError(str(err).replace("the checkpoint", source)) from err
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
                stripped = True
    return state_dict, source


def indices(state_dict: Mapping[str, Any], pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` (one group, full match) over the keys."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state_dict if (m := regex.fullmatch(k))})


# ----------------------------------------------------------------------------------------------
# config inference
# ----------------------------------------------------------------------------------------------


def _upsampler(sd: Mapping[str, torch.Tensor], i: int) -> str | None:
    """``"conv"`` / ``"resblock"`` if decoder block ``i`` ends with an upsampler that has weights."""
    for k in (1, 2):
        if f"output_blocks.{i}.{k}.conv.weight" in sd:
            return "conv"
        if f"output_blocks.{i}.{k}.in_layers.0.weight" in sd:
            return "resblock"
    return None


def _levels(sd: Mapping[str, torch.Tensor], source: str) -> tuple[list[int], list[int], bool, bool]:
    """``(block widths per level, num_res_blocks, resblock_updown, conv_resample)``, level 0 first."""
    out_blocks = indices(sd, r"output_blocks\.(\d+)\.0\.in_layers\.0\.weight")
    if not out_blocks or out_blocks != list(range(len(out_blocks))):
        raise CheckpointError(f"{source}: decoder ResBlocks output_blocks.N.0 are missing or not numbered 0..N")
    kinds = [_upsampler(sd, i) for i in out_blocks]
    resblock_updown = "resblock" in kinds
    if any(kinds):
        # decoder side: level L-1 first, each level ends with its upsampler (level 0 has none)
        segments, current = [], []
        for i, kind in zip(out_blocks, kinds):
            current.append(i)
            if kind:
                segments.append(current)
                current = []
        segments.append(current)
        if not segments[-1]:
            raise CheckpointError(f"{source}: the last decoder block has an upsampler, which level 0 never has")
        segments.reverse()
        widths = [int(sd[f"output_blocks.{seg[0]}.0.out_layers.3.weight"].shape[0]) for seg in segments]
        num_res = [len(seg) - 1 for seg in segments]
        return widths, num_res, resblock_updown, resblock_updown or kinds.count("conv") > 0
    # encoder side: downsamplers are stride-2 convs (`op`) or weightless pooling (an index with no keys)
    blocks = indices(sd, r"input_blocks\.(\d+)\..*")
    widths, num_res, current = [], [], 0
    conv_resample = False
    for i in range(1, (blocks[-1] if blocks else 0) + 1):
        key = f"input_blocks.{i}.0.out_layers.3.weight"
        if key in sd:
            if current == 0:
                widths.append(int(sd[key].shape[0]))
            current += 1
        else:
            conv_resample = conv_resample or f"input_blocks.{i}.0.op.weight" in sd
            num_res.append(current)
            current = 0
    num_res.append(current)
    if len(widths) != len(num_res) or not all(num_res):
        raise CheckpointError(f"{source}: cannot tell the UNet levels from the encoder blocks {blocks}")
    return widths, num_res, False, conv_resample or len(widths) == 1


def _window(table: torch.Tensor, key: str, source: str) -> int:
    rows = int(table.shape[0])
    ws = (math.isqrt(rows) + 1) // 2
    if (2 * ws - 1) ** 2 != rows:
        raise CheckpointError(f"{source}: {key} has {rows} rows, not (2·window-1)²")
    return ws


def _image_size(
    sd: Mapping[str, torch.Tensor], windows: Mapping[str, tuple[int, int]], window_size: int, num_levels: int
) -> int:
    """``image_size`` from the Swin layers ``{prefix: (level, window)}`` (see the module docstring)."""
    for prefix, (level, ws) in windows.items():
        masks = [k for k in sd if k.startswith(f"{prefix}.blocks.") and k.endswith(".attn_mask")]
        if masks:
            return math.isqrt(int(sd[masks[0]].shape[0])) * ws * 2**level
    shrunk = [(level, ws) for level, ws in windows.values() if ws < window_size]
    return shrunk[0][1] * 2 ** shrunk[0][0] if shrunk else window_size * 2 ** (num_levels - 1)


def infer_resshift_unet_config(
    state_dict: Mapping[str, torch.Tensor], image_size: int | None = None, source: str = "the checkpoint"
) -> dict:
    """The :class:`ResShiftUNet` keyword arguments of a flat, original-layout state dict (see the module
    docstring for what is inferred from what). ``image_size``, when given, replaces the inferred one and
    the values derived from it (``attention_resolutions``, ``lq_size``) follow.

    Raises:
        CheckpointError: the keys are not those of ResShift's ``UNetModelSwin``, or are inconsistent.
    """
    sd = state_dict
    mc = int(required_tensor(sd, "time_embed.0.weight", source, _LAYOUT).shape[1])
    out_channels = int(required_tensor(sd, "out.2.weight", source, _LAYOUT).shape[0])
    total_in = int(required_tensor(sd, "input_blocks.0.0.weight", source, _LAYOUT).shape[1])

    # 1. levels
    widths, num_res, resblock_updown, conv_resample = _levels(sd, source)
    num_levels = len(widths)
    channel_mult = [w // mc if w % mc == 0 else w / mc for w in widths]
    first_blocks = [1 + sum(num_res[:level]) + level for level in range(num_levels)]  # encoder index per level
    first_res = int(required_tensor(sd, "input_blocks.1.0.out_layers.3.weight", source, _LAYOUT).shape[0])
    use_scale_shift_norm = (
        int(required_tensor(sd, "input_blocks.1.0.emb_layers.1.weight", source, _LAYOUT).shape[0]) == 2 * first_res
    )

    # 2. Swin layers: the middle one gives the widths, each level its window
    mid = "middle_block.1"
    swin_embed_dim = int(required_tensor(sd, f"{mid}.patch_embed.proj.weight", source, _LAYOUT).shape[0])
    swin_depth = len(indices(sd, rf"{re.escape(mid)}\.blocks\.(\d+)\.attn\.qkv\.weight"))
    heads = int(required_tensor(sd, f"{mid}.blocks.0.attn.relative_position_bias_table", source, _LAYOUT).shape[1])
    hidden = int(required_tensor(sd, f"{mid}.blocks.0.mlp.fc1.weight", source, _LAYOUT).shape[0])
    swin_levels = [
        lvl for lvl in range(num_levels) if f"input_blocks.{first_blocks[lvl]}.1.blocks.0.attn.qkv.weight" in sd
    ]
    layers = {f"input_blocks.{first_blocks[lvl]}.1": lvl for lvl in swin_levels}
    layers[mid] = num_levels - 1
    windows = {}
    for prefix, level in layers.items():
        key = f"{prefix}.blocks.0.attn.relative_position_bias_table"
        windows[prefix] = (level, _window(required_tensor(sd, key, source, _LAYOUT), key, source))
    window_size = max(ws for _, ws in windows.values())

    # 3. image_size: stored shifted-window masks, else a shrunk window, else the smallest consistent size
    if image_size is None:
        image_size = _image_size(sd, windows, window_size, num_levels)

    # 4. LR conditioning
    convs = indices(sd, r"feature_extractor\.(\d+)\.weight")
    downs = indices(sd, r"feature_extractor\.(\d+)\.op\.weight")
    if convs != [3 * i for i in range(len(convs))] or downs != [3 * i + 2 for i in range(len(convs))]:
        raise CheckpointError(
            f"{source}: feature_extractor convs at {convs} and downsamplers at {downs} do not alternate as "
            "[conv, SiLU, Downsample] stages"
        )
    if downs:
        cond_lq, cond_mask = True, int(sd["feature_extractor.0.weight"].shape[1]) == 4
        lq_channels = int(sd[f"feature_extractor.{downs[-1]}.op.weight"].shape[0])
        in_channels = total_in - lq_channels
    elif total_in - out_channels in (0, 3, 4):
        cond_lq, cond_mask = total_in > out_channels, total_in - out_channels == 4
        in_channels = out_channels
    else:
        cond_lq, cond_mask, in_channels = True, False, total_in - 3

    return {
        "image_size": image_size,
        "in_channels": in_channels,
        "model_channels": mc,
        "out_channels": out_channels,
        "num_res_blocks": num_res,
        "attention_resolutions": [image_size // 2**lvl for lvl in swin_levels],
        "dropout": 0.0,
        "channel_mult": channel_mult,
        "conv_resample": conv_resample,
        "dims": 2,
        "use_fp16": False,
        "num_heads": 1 if swin_embed_dim % heads == 0 else heads,
        "num_head_channels": swin_embed_dim // heads if swin_embed_dim % heads == 0 else -1,
        "use_scale_shift_norm": use_scale_shift_norm,
        "resblock_updown": resblock_updown,
        "swin_depth": swin_depth,
        "swin_embed_dim": swin_embed_dim,
        "window_size": window_size,
        "mlp_ratio": hidden / swin_embed_dim,
        "patch_norm": f"{mid}.patch_embed.norm.weight" in sd,
        "cond_lq": cond_lq,
        "cond_mask": cond_mask,
        "lq_size": image_size * 2 ** len(downs),
    }


# ----------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------


def _check_recomputed_buffers(model: ResShiftUNet, buffers: Mapping[str, torch.Tensor], source: str) -> None:
    """The saved ``relative_position_index`` / ``attn_mask`` must be what this port computes."""
    for key, value in buffers.items():
        owner, name = key.rsplit(".", 1)
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            module = None
        if name == "relative_position_index":
            if not isinstance(module, WindowAttention):
                raise CheckpointError(f"{source}: unexpected buffer {key!r} (no window attention there)")
            if tuple(value.shape) != tuple(module.relative_position_index.shape) or not torch.equal(
                value.long(), module.relative_position_index
            ):
                raise CheckpointError(f"{source}: {key} differs from the index of a {module.window_size}² window")
            continue
        if not isinstance(module, SwinTransformerBlock):
            raise CheckpointError(f"{source}: unexpected buffer {key!r} (no Swin block there)")
        if not module.shift_size:
            raise CheckpointError(
                f"{source}: {key} is stored for a block that is not shifted with this config (image_size="
                f"{model.config.image_size}, window_size={model.config.window_size}); pass the right image_size"
            )
        res, ws = module.resolution, module.window_size
        expected = resshift_window_mask(res, res, ws, module.shift_size)
        if tuple(value.shape) != tuple(expected.shape):
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(value.shape)}, but image_size={model.config.image_size} gives "
                f"{tuple(expected.shape)} for this level; pass the right image_size"
            )
        if not torch.equal(value.float(), expected):
            raise CheckpointError(
                f"{source}: {key} is not the shifted-window mask of the released ResShift code, so this "
                "checkpoint comes from other code and would not give its outputs here"
            )


def convert_resshift_unet(
    state_dict_or_path: str | os.PathLike | Mapping[str, Any], config: Mapping[str, Any] | None = None
) -> tuple[ResShiftUNet, dict]:
    """Build the :class:`ResShiftUNet` that a released ResShift denoiser checkpoint holds.

    Args:
        state_dict_or_path: a ``resshift_*.pth`` / ``.safetensors`` file, or a loaded object: a flat state
            dict or one nested under ``state_dict`` / ``model`` / ``params_ema``, keys possibly prefixed
            by ``module.`` and/or ``_orig_mod.``.
        config: values that override the inferred hyper-parameters (``ResShiftUNet`` keyword arguments).

    Returns:
        ``(model, config)``: the model in eval mode with every parameter loaded (strict), and the keyword
        arguments it was built with.

    Raises:
        CheckpointError: unreadable file, not a ResShift ``UNetModelSwin`` state dict, saved buffers that
            disagree with this port, or missing / unexpected keys or shape mismatches (all named).
        TypeError: ``config`` names an unknown hyper-parameter.
    """
    state_dict, source = read_flat_state_dict(state_dict_or_path)
    buffers = {k: v for k, v in state_dict.items() if k.rsplit(".", 1)[-1] in RECOMPUTED_BUFFERS}
    params = {k: v for k, v in state_dict.items() if k not in buffers}

    hint = (config or {}).get("image_size")
    inferred = infer_resshift_unet_config(params | buffers, hint, source)
    unknown = set(config or {}) - set(inferred)
    if unknown:
        raise TypeError(f"ResShiftUNet has no hyper-parameter(s) {sorted(unknown)}; it takes {sorted(inferred)}")
    final = {**inferred, **(config or {})}
    try:
        model = ResShiftUNet(**final)
    except ValueError as err:
        raise CheckpointError(f"{source}: the config {final} is not valid: {err}") from err

    target = "ResShiftUNet(" + ", ".join(f"{k}={v!r}" for k, v in final.items()) + ")"
    check_keys_and_shapes(model.state_dict(), params, source, target)
    _check_recomputed_buffers(model, buffers, source)
    model.load_state_dict(params, strict=True)
    return model.eval(), final
