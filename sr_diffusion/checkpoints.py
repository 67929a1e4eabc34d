"""Load the checkpoints that the authors of EDSR, ESRGAN / Real-ESRGAN, SwinIR and SRVGGNetCompact released.

``load_regression_model("RealESRGAN_x4plus.pth")`` reads the file safely (safetensors, or
``torch.load(weights_only=True)``: never arbitrary unpickling), unwraps ``params_ema`` / ``params`` /
``state_dict`` / ``model`` nesting and ``module.`` prefixes, recognises the parameter layout, infers
the hyper-parameters from key names and tensor shapes, renames the parameters to our layout (that
of BasicSR) and returns the model from :mod:`sr_diffusion.models` in eval mode, loaded strictly.

Layouts recognised (``detect_architecture`` returns the architecture name of the right column):

=======================  ===========================================================  ===========
layout                   typical keys                                                 arch
=======================  ===========================================================  ===========
BasicSR / ours EDSR      ``conv_first``, ``body.N.conv1``, ``upsample.0``, ``mean``    ``edsr``
EDSR-PyTorch (official)  ``sub_mean``, ``head.0``, ``body.N.body.0``, ``tail.0.0``     ``edsr``
BasicSR / ours RRDBNet   ``conv_first``, ``body.N.rdb1.conv1``, ``conv_up1``          ``rrdbnet``
ESRGAN (2019 repo)       ``RRDB_trunk.N.RDB1.conv1``, ``trunk_conv``, ``HRconv``      ``rrdbnet``
ESRGAN old arch          ``model.0``, ``model.1.sub.N.RDB1.conv1.0``, ``model.10``     ``rrdbnet``
SwinIR (official/ours)   ``layers.N.residual_group.blocks.M.attn.qkv``                ``swinir``
SRVGGNetCompact          ``body.0`` … ``body.2K+2`` only                              ``srvgg``
=======================  ===========================================================  ===========

What is inferred, and the documented defaults for what cannot be:

* EDSR: ``num_feat``, ``num_block``, ``upscale`` (number and width of the upsampling convs),
  channels; ``rgb_mean`` and ``img_range`` from the official ``add_mean`` bias (or our ``mean``
  buffer). ``res_scale`` cannot be inferred: 0.1 when ``num_feat >= 256`` (EDSR full), else 1.0.
  ``img_range`` defaults to 255 (all released EDSR models).
* RRDBNet: ``num_feat``, ``num_block``, ``num_grow_ch``; ``scale`` from the first conv's input
  channels (3 → ×4, or ×8 with a third upsampling conv; 12 → ×2 and 48 → ×1 by pixel-unshuffle),
  assuming as many input as output channels.
* SwinIR: ``embed_dim``, ``depths``, ``num_heads``, ``window_size`` (the bias table holds
  (2·ws-1)² rows), ``mlp_ratio``, ``qkv_bias``, ``patch_norm``, ``resi_connection``, ``upsampler``,
  ``num_feat`` and ``upscale`` (upsampling convs). ``img_range`` cannot be inferred: 1.0, except
  255.0 for restoration models (``upsampler=""``) with window 7, which is the released JPEG setting.
* SRVGGNetCompact: ``num_feat``, ``num_conv``, ``upscale`` (last conv has ``3·s²`` channels);
  ``act_type`` is ``"prelu"`` when PReLU weights are present, else ``"relu"`` (default, cannot be
  told apart from ``"leakyrelu"``).

Everything can be overridden: ``load_regression_model(path, res_scale=0.1, img_range=255.0)``.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .models import EDSR, REGRESSION_MODELS, RRDBNet, SRVGGNetCompact, SwinIR
from .models.edsr import DIV2K_RGB_MEAN

__all__ = [
    "CheckpointError",
    "check_keys_and_shapes",
    "convert_state_dict",
    "detect_architecture",
    "load_regression_model",
    "load_state_dict",
    "preview",
    "torch_load_weights",
    "unsafe_pickle_refusal",
    "unwrap_state_dict",
]

# wrappers seen in released files, in order of preference (EMA weights first, as Real-ESRGAN does)
NESTING_KEYS = ("params_ema", "params", "state_dict", "model")
# buffers of the original code that our models recompute
DROPPED_SUFFIXES = ("attn_mask", "relative_position_index")

_ARCH_ALIASES = {
    "edsr": "edsr",
    "rrdbnet": "rrdbnet",
    "rrdb": "rrdbnet",
    "esrgan": "rrdbnet",
    "realesrgan": "rrdbnet",
    "swinir": "swinir",
    "srvgg": "srvgg",
    "srvggnetcompact": "srvgg",
}
_SCALE_KEY = {"edsr": "upscale", "rrdbnet": "scale", "swinir": "upscale", "srvgg": "upscale"}
_CLASS_TO_ARCH = {cls: name for name, cls in REGRESSION_MODELS.items()}


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, not a state dict, or not the model that was asked for."""


# ----------------------------------------------------------------------------------------------
# reading files
# ----------------------------------------------------------------------------------------------


def _sniff(path: Path) -> str:
    """``"safetensors"``, ``"torch"`` (zip or legacy pickle) or ``"unknown"`` from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < size:
        return "safetensors"
    return "unknown"


def load_state_dict(path: str | os.PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict on the CPU.

    ``.safetensors`` files are read with safetensors. Other files (``.pth/.pt/.bin/.ckpt``, ...) are
    told apart by their first bytes: a torch zip or pickle is read with
    ``torch.load(map_location="cpu", weights_only=True)`` only (a file that would need unsafe
    unpickling is refused), a safetensors header with safetensors. The result is passed through
    :func:`unwrap_state_dict` (``key`` picks a wrapper entry, e.g. ``"params"`` instead of the
    default ``"params_ema"``).

    Raises:
        CheckpointError: the file is missing, empty, truncated or corrupt, not a checkpoint, holds
            non-tensor objects, or is not a state dict. The message names the file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a directory; pass the weight file (a folder written by save_pretrained "
            "loads with the model class's from_pretrained)"
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); the download or copy probably failed")

    kind = "safetensors" if path.suffix.lower() == ".safetensors" else _sniff(path)
    if kind == "unknown":
        with open(path, "rb") as f:
            head = f.read(16)
        raise CheckpointError(
            f"{path} is not a checkpoint: it is neither safetensors nor a PyTorch file (starts with {head!r})"
        )

    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises SafetensorError, OSError, ... on damaged files
            raise CheckpointError(
                f"checkpoint {path} is not a readable safetensors file (truncated or corrupt?): {err}"
            ) from err
    else:
        try:
            obj = torch_load_weights(path)
        except Exception as err:  # torch raises RuntimeError, OSError, EOFError, UnpicklingError, ...
            unsafe = unsafe_pickle_refusal(err, f"checkpoint {path}")
            if unsafe:
                raise CheckpointError(unsafe) from err
            raise CheckpointError(
                f"checkpoint {path} could not be read (truncated or corrupt?): {type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}"
            ) from err
    return _unwrap(obj, key, f"checkpoint {path}")


def torch_load_weights(path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, without torch's warning about the pickle
    protocol of a plain pickle (the refusal that follows says what matters)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=True)


def unsafe_pickle_refusal(err: BaseException, source: str) -> str | None:
    """The message refusing ``source`` when ``err`` is torch's safe (``weights_only``) loader meeting a pickled object
    beyond tensors (a class or function such as ``posix.system``, or an opcode it does not run), else ``None``.

    Matched on the exception type and on both wordings torch has used (``Unsupported global: GLOBAL x`` and
    ``Trying to load unsupported GLOBAL x``). Torch's own text invites re-running with ``weights_only=False``; this
    says plainly that the file is refused, because loading it could run code from it.
    """
    import pickle

    text = str(err)
    if not (isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in text):
        return None
    found = re.search(r"unsupported\s+(?:global:\s+)?GLOBAL\s+([\w.]+)", text, re.IGNORECASE)
    if found:
        what = f"a pickled {found.group(1)} object"
    else:
        operand = re.search(r"Unsupported operand \S+", text)
        what = f"pickled Python objects ({operand.group(0) if operand else type(err).__name__})"
    return (
        f"{source} holds {what}, not only tensors, and is refused: loading it would need unsafe unpickling, which "
        "can execute code hidden in the file. If you trust its source, re-save just the state dict (or convert it to "
        ".safetensors) there"
    )


def unwrap_state_dict(obj: Any, key: str | None = None) -> dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` state dict inside a loaded checkpoint object.

    Descends into ``params_ema`` (preferred, as Real-ESRGAN), ``params``, ``state_dict`` or ``model``
    entries (or into ``key`` when given), and strips a ``module.`` prefix (DataParallel) from
    every name.

    Raises:
        CheckpointError: ``obj`` is not a mapping of names to tensors.
    """
    return _unwrap(obj, key, "the checkpoint")


def _unwrap(obj: Any, key: str | None, source: str) -> dict[str, torch.Tensor]:
    for _ in range(4):
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{source} is not a state dict (it holds a {type(obj).__name__})")
        if key is not None:
            if key not in obj:
                raise CheckpointError(f"{source} has no {key!r} entry; its top-level keys are {preview(obj)}")
            obj, key = obj[key], None
            continue
        nested = next((k for k in NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = obj[nested]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source} is not a state dict (it holds no tensors)")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{source} is not a state dict: entries {preview(not_tensors)} are not tensors")
    state_dict = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def preview(keys, n: int = 6) -> str:
    """The first ``n`` keys, quoted, and how many there are in all: for error messages."""
    keys = list(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(repr(k) for k in keys[:n]) + more


def check_keys_and_shapes(
    expected: Mapping[str, Any], found: Mapping[str, torch.Tensor], source: str, target: str
) -> None:
    """Strict state-dict check: raise a :class:`CheckpointError` naming every missing key, unexpected
    key and shape mismatch. ``expected`` maps names to tensors or shapes."""

    def shape(v) -> tuple:
        return tuple(v.shape) if hasattr(v, "shape") else tuple(v)

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [
        f"{k}: {tuple(found[k].shape)} vs {shape(v)}"
        for k, v in expected.items()
        if k in found and tuple(found[k].shape) != shape(v)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {preview(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches (checkpoint vs model) {'; '.join(mismatched[:6])}")
        raise CheckpointError(f"{source} does not fit {target}: " + "; ".join(parts))


# ----------------------------------------------------------------------------------------------
# recognising layouts
# ----------------------------------------------------------------------------------------------


def _indices(state_dict: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` (one group) over the keys."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state_dict if (m := regex.fullmatch(k))})


def _detect_layout(state_dict: Mapping[str, torch.Tensor], source: str = "the checkpoint") -> str:
    keys = state_dict.keys()
    if "layers.0.residual_group.blocks.0.attn.qkv.weight" in keys and "conv_first.weight" in keys:
        return "swinir"
    if "body.0.rdb1.conv1.weight" in keys and "conv_first.weight" in keys:
        return "rrdbnet"
    if "RRDB_trunk.0.RDB1.conv1.weight" in keys and "trunk_conv.weight" in keys:
        return "esrgan"
    if "model.0.weight" in keys and "model.1.sub.0.RDB1.conv1.0.weight" in keys:
        return "esrgan_old"
    if "body.0.conv1.weight" in keys and "conv_first.weight" in keys and "conv_after_body.weight" in keys:
        return "edsr"
    if "head.0.weight" in keys and "body.0.body.0.weight" in keys and "tail.1.weight" in keys:
        return "edsr_official"
    if "body.0.weight" in keys and all(re.fullmatch(r"body\.\d+\.(weight|bias)", k) for k in keys):
        return "srvgg"
    raise CheckpointError(
        f"{source} has a parameter layout that is not recognised as EDSR, RRDBNet (ESRGAN/Real-ESRGAN), "
        f"SwinIR or SRVGGNetCompact; its first keys are {preview(keys)}"
    )


_LAYOUT_ARCH = {
    "swinir": "swinir",
    "rrdbnet": "rrdbnet",
    "esrgan": "rrdbnet",
    "esrgan_old": "rrdbnet",
    "edsr": "edsr",
    "edsr_official": "edsr",
    "srvgg": "srvgg",
}


def required_tensor(
    state_dict: Mapping[str, torch.Tensor], key: str, source: str, what: str | None = None
) -> torch.Tensor:
    """``state_dict[key]``, or a :class:`CheckpointError` naming ``source``, the key and (with ``what``, the model the
    state dict should have been) its first keys."""
    if key not in state_dict:
        if what is None:
            raise CheckpointError(f"{source} lacks {key!r}, which its layout needs")
        raise CheckpointError(f"{source} is not {what}: it has no {key!r} (first keys: {preview(state_dict)})")
    return state_dict[key]


# ----------------------------------------------------------------------------------------------
# per-layout inference and renaming: each returns (config, converted state dict in our layout)
# ----------------------------------------------------------------------------------------------


def _pixelshuffle_scale(convs: list[torch.Tensor], num_feat: int, source: str) -> int:
    """Scale of a Conv(C→r²C)+PixelShuffle(r) chain: one r=3 stage, or n r=2 stages (1 when empty)."""
    if len(convs) == 1 and convs[0].shape[0] == 9 * num_feat:
        return 3
    if all(w.shape[0] == 4 * num_feat for w in convs):
        return 2 ** len(convs)
    raise CheckpointError(f"{source}: upsampling convs with {[w.shape[0] for w in convs]} channels fit no scale")


def _edsr(sd: Mapping[str, torch.Tensor], source: str) -> tuple[dict, dict]:
    conv_first = required_tensor(sd, "conv_first.weight", source)
    num_feat, num_in_ch = conv_first.shape[:2]
    ups = [sd[f"upsample.{i}.weight"] for i in _indices(sd, r"upsample\.(\d+)\.weight")]
    converted = dict(sd)
    if "mean" in sd:
        rgb_mean = [round(float(v), 6) for v in sd["mean"].flatten()]
    else:
        rgb_mean = list(DIV2K_RGB_MEAN)
        converted["mean"] = torch.tensor(rgb_mean).view(1, -1, 1, 1)
    config = {
        "num_in_ch": int(num_in_ch),
        "num_out_ch": int(required_tensor(sd, "conv_last.weight", source).shape[0]),
        "num_feat": int(num_feat),
        "num_block": len(_indices(sd, r"body\.(\d+)\.conv1\.weight")),
        "upscale": _pixelshuffle_scale(ups, num_feat, source),
        "res_scale": 0.1 if num_feat >= 256 else 1.0,
        "img_range": 255.0,
        "rgb_mean": rgb_mean,
    }
    return config, converted


def _edsr_official(sd: Mapping[str, torch.Tensor], source: str) -> tuple[dict, dict]:
    num_block = len(_indices(sd, r"body\.(\d+)\.body\.0\.weight"))
    rgb_range, rgb_mean = 255.0, list(DIV2K_RGB_MEAN)
    if "add_mean.bias" in sd:
        for name in ("sub_mean", "add_mean"):
            weight = sd.get(f"{name}.weight")
            if weight is not None and not torch.allclose(
                weight.float().flatten(1), torch.eye(weight.shape[0]), atol=1e-6
            ):
                raise CheckpointError(f"{source}: {name} is not an identity mean shift (rgb_std != 1 is not supported)")
        bias = sd["add_mean.bias"].float()
        # the bias is rgb_range · mean with the mean in (0, 1): it tells the range the model was trained on
        rgb_range = 255.0 if bias.abs().max() > 1.5 else 1.0
        rgb_mean = [round(float(v), 6) for v in bias / rgb_range]
    rename = {"head.0.": "conv_first.", f"body.{num_block}.": "conv_after_body.", "tail.1.": "conv_last."}
    converted: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith(("sub_mean.", "add_mean.")):
            continue
        new = key
        if m := re.fullmatch(r"body\.(\d+)\.body\.([02])\.(weight|bias)", key):
            new = f"body.{m.group(1)}.conv{1 if m.group(2) == '0' else 2}.{m.group(3)}"
        elif key.startswith("tail.0."):
            new = "upsample." + key[len("tail.0.") :]
        else:
            for old, repl in rename.items():
                if key.startswith(old):
                    new = repl + key[len(old) :]
                    break
        converted[new] = value
    converted["mean"] = torch.tensor(rgb_mean).view(1, -1, 1, 1)
    config, _ = _edsr(converted, source)
    config.update(img_range=rgb_range, rgb_mean=rgb_mean)
    return config, converted


def _rrdbnet(sd: Mapping[str, torch.Tensor], source: str) -> tuple[dict, dict]:
    conv_first = required_tensor(sd, "conv_first.weight", source)
    num_feat, in_ch = (int(v) for v in conv_first.shape[:2])
    num_out_ch = int(required_tensor(sd, "conv_last.weight", source).shape[0])
    num_up = len(_indices(sd, r"conv_up(\d+)\.weight"))
    ratio = in_ch // num_out_ch if in_ch % num_out_ch == 0 else 0
    if num_up == 3 and ratio == 1:
        scale = 8
    elif num_up == 2 and ratio in (1, 4, 16):
        scale = {1: 4, 4: 2, 16: 1}[ratio]
    else:
        raise CheckpointError(
            f"{source}: an RRDBNet with {num_up} upsampling convs and {in_ch} input channels for {num_out_ch} "
            "output channels fits none of scale 1, 2 (pixel-unshuffle), 4 or 8"
        )
    config = {
        "num_in_ch": num_out_ch,
        "num_out_ch": num_out_ch,
        "scale": scale,
        "num_feat": num_feat,
        "num_block": len(_indices(sd, r"body\.(\d+)\.rdb1\.conv1\.weight")),
        "num_grow_ch": int(required_tensor(sd, "body.0.rdb1.conv1.weight", source).shape[0]),
    }
    return config, dict(sd)


def _esrgan(sd: Mapping[str, torch.Tensor], source: str) -> tuple[dict, dict]:
    rename = (
        ("RRDB_trunk.", "body."),
        ("trunk_conv.", "conv_body."),
        ("upconv", "conv_up"),
        ("HRconv.", "conv_hr."),
    )
    converted = {}
    for key, value in sd.items():
        new = key
        for old, repl in rename:
            if new.startswith(old):
                new = repl + new[len(old) :]
        new = re.sub(r"\.RDB(\d)\.", r".rdb\1.", new)
        converted[new] = value
    return _rrdbnet(converted, source)[0], converted


def _esrgan_old(sd: Mapping[str, torch.Tensor], source: str) -> tuple[dict, dict]:
    num_block = len(_indices(sd, r"model\.1\.sub\.(\d+)\.RDB1\.conv1\.0\.weight"))
    top = _indices(sd, r"model\.(\d+)\.weight")
    # model.0 conv, model.1 trunk, then per ×2 stage (upsample, conv, lrelu), then HR conv, lrelu, last conv
    num_up = (top[-1] - 4) // 3 if top else 0
    if num_up < 1 or top != [0] + [3 + 3 * k for k in range(num_up)] + [2 + 3 * num_up, 4 + 3 * num_up]:
        raise CheckpointError(f"{source}: old-style ESRGAN top-level convs model.{top} do not fit the known layout")
    if num_up == 1:
        raise CheckpointError(f"{source}: old-style ESRGAN with a single ×2 upsampling stage is not supported")
    mapping = {0: "conv_first", 2 + 3 * num_up: "conv_hr", 4 + 3 * num_up: "conv_last"}
    mapping.update({3 + 3 * k: f"conv_up{k + 1}" for k in range(num_up)})
    converted = {}
    for key, value in sd.items():
        if m := re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", key):
            new = f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"
        elif m := re.fullmatch(rf"model\.1\.sub\.{num_block}\.(weight|bias)", key):
            new = f"conv_body.{m.group(1)}"
        elif (m := re.fullmatch(r"model\.(\d+)\.(weight|bias)", key)) and int(m.group(1)) in mapping:
            new = f"{mapping[int(m.group(1))]}.{m.group(2)}"
        else:
            new = key  # left for the strict check to report
        converted[new] = value
    return _rrdbnet(converted, source)[0], converted


def _swinir(sd: Mapping[str, torch.Tensor], source: str) -> tuple[dict, dict]:
    if "absolute_pos_embed" in sd:
        raise CheckpointError(f"{source}: SwinIR with absolute position embedding (ape=True) is not supported")
    conv_first = required_tensor(sd, "conv_first.weight", source)
    embed_dim, in_chans = (int(v) for v in conv_first.shape[:2])
    layers = _indices(sd, r"layers\.(\d+)\.residual_group\.blocks\.0\.attn\.qkv\.weight")
    depths = [len(_indices(sd, rf"layers\.{i}\.residual_group\.blocks\.(\d+)\.attn\.qkv\.weight")) for i in layers]
    tables = [
        required_tensor(sd, f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table", source)
        for i in layers
    ]
    num_heads = [int(t.shape[1]) for t in tables]
    window_size = (math.isqrt(int(tables[0].shape[0])) + 1) // 2
    if (2 * window_size - 1) ** 2 != tables[0].shape[0]:
        raise CheckpointError(f"{source}: relative_position_bias_table has {tables[0].shape[0]} rows, not (2·ws-1)²")
    hidden = int(required_tensor(sd, "layers.0.residual_group.blocks.0.mlp.fc1.weight", source).shape[0])
    resi_connection = "3conv" if "layers.0.conv.0.weight" in sd else "1conv"

    num_feat = 64
    if "conv_up1.weight" in sd:
        upsampler = "nearest+conv"
        upscale = 4 if "conv_up2.weight" in sd else 2
        num_feat = int(required_tensor(sd, "conv_before_upsample.0.weight", source).shape[0])
    elif "conv_before_upsample.0.weight" in sd:
        upsampler = "pixelshuffle"
        num_feat = int(sd["conv_before_upsample.0.weight"].shape[0])
        ups = [sd[f"upsample.{i}.weight"] for i in _indices(sd, r"upsample\.(\d+)\.weight")]
        upscale = _pixelshuffle_scale(ups, num_feat, source)
    elif "upsample.0.weight" in sd:
        upsampler = "pixelshuffledirect"
        out = int(sd["upsample.0.weight"].shape[0])
        upscale = math.isqrt(out // in_chans)
        if upscale * upscale * in_chans != out:
            raise CheckpointError(f"{source}: pixelshuffledirect conv with {out} channels fits no scale")
    else:
        upsampler, upscale = "", 1
    config = {
        "in_chans": in_chans,
        "embed_dim": embed_dim,
        "depths": depths,
        "num_heads": num_heads,
        "window_size": window_size,
        "mlp_ratio": hidden / embed_dim,
        "qkv_bias": "layers.0.residual_group.blocks.0.attn.qkv.bias" in sd,
        "patch_norm": "patch_embed.norm.weight" in sd,
        "upscale": upscale,
        "img_range": 255.0 if (upsampler == "" and window_size == 7) else 1.0,
        "upsampler": upsampler,
        "resi_connection": resi_connection,
        "num_feat": num_feat,
    }
    converted = {k: v for k, v in sd.items() if not k.endswith(DROPPED_SUFFIXES)}
    return config, converted


def _srvgg(sd: Mapping[str, torch.Tensor], source: str) -> tuple[dict, dict]:
    convs = [i for i in _indices(sd, r"body\.(\d+)\.weight") if sd[f"body.{i}.weight"].ndim == 4]
    last = convs[-1]
    if convs != list(range(0, last + 1, 2)) or last < 2:
        raise CheckpointError(f"{source}: SRVGGNetCompact convs must sit at body.0, body.2, ..., found {convs}")
    num_feat, num_in_ch = (int(v) for v in sd["body.0.weight"].shape[:2])
    out = int(sd[f"body.{last}.weight"].shape[0])
    upscale = math.isqrt(out // num_in_ch)
    if upscale * upscale * num_in_ch != out:
        raise CheckpointError(f"{source}: last conv with {out} channels fits no scale for {num_in_ch} channels")
    config = {
        "num_in_ch": num_in_ch,
        "num_out_ch": num_in_ch,
        "num_feat": num_feat,
        "num_conv": (last - 2) // 2,
        "upscale": upscale,
        "act_type": "prelu" if "body.1.weight" in sd else "relu",
    }
    return config, dict(sd)


_CONVERTERS = {
    "edsr": _edsr,
    "edsr_official": _edsr_official,
    "rrdbnet": _rrdbnet,
    "esrgan": _esrgan,
    "esrgan_old": _esrgan_old,
    "swinir": _swinir,
    "srvgg": _srvgg,
}


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def _arch_name(arch: str | type) -> str:
    if isinstance(arch, type):
        if arch not in _CLASS_TO_ARCH:
            raise ValueError(f"arch {arch.__name__} is not one of {list(REGRESSION_MODELS)}")
        return _CLASS_TO_ARCH[arch]
    name = _ARCH_ALIASES.get(str(arch).lower().replace("-", "").replace("_", ""))
    if name is None:
        raise ValueError(f"unknown arch {arch!r}; expected one of {list(REGRESSION_MODELS)}")
    return name


def _describe(arch: str, config: Mapping[str, Any]) -> str:
    name = REGRESSION_MODELS[arch].__name__
    article = "a" if name.startswith("Swin") else "an"
    return f"{article} {name} x{config[_SCALE_KEY[arch]]} model"


def _analyse(state_dict: Mapping[str, Any], source: str) -> tuple[str, dict, dict]:
    state_dict = _unwrap(state_dict, None, source)  # a no-op on a flat dict; tolerates a wrapped one
    layout = _detect_layout(state_dict, source)
    config, converted = _CONVERTERS[layout](state_dict, source)
    return _LAYOUT_ARCH[layout], config, converted


def detect_architecture(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, dict]:
    """Recognise the layout of a (flat, unwrapped) state dict and infer its hyper-parameters.

    Returns ``(arch, config)``: ``arch`` a key of :data:`sr_diffusion.models.REGRESSION_MODELS`
    (``"edsr"``, ``"rrdbnet"``, ``"swinir"``, ``"srvgg"``) and ``config`` the keyword arguments
    of that class (lists for sequences). See the module docstring for the defaults used for what
    the tensors do not tell.

    Raises:
        CheckpointError: the layout is not recognised or its shapes are inconsistent.
    """
    arch, config, _ = _analyse(state_dict, "the checkpoint")
    return arch, config


def _check_keys(model_cls: type, config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], source: str):
    """Strict comparison of names and shapes against the model built (on the meta device) from config."""
    with torch.device("meta"):
        model = model_cls(**config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys_and_shapes(expected, state_dict, source, f"{model_cls.__name__}({_short(config)})")


def _short(config: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in config.items())


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], arch: str | type | None = None
) -> tuple[type, dict, dict[str, torch.Tensor]]:
    """Convert a state dict in any recognised layout to our layout.

    Returns ``(model_class, config, converted_state_dict)`` such that
    ``model_class(**config).load_state_dict(converted_state_dict, strict=True)`` succeeds. Buffers that
    our models recompute (SwinIR ``attn_mask`` and ``relative_position_index``) are dropped; the
    official EDSR ``sub_mean``/``add_mean`` convs become our ``mean`` buffer.

    Raises:
        CheckpointError: the layout is not recognised, is not ``arch`` (when given), or leaves
            missing / unexpected keys or shape mismatches.
    """
    source = "the checkpoint"
    found, config, converted = _analyse(state_dict, source)
    if arch is not None and _arch_name(arch) != found:
        raise CheckpointError(f"{source} is {_describe(found, config)}, but arch={arch!r} was requested")
    model_cls = REGRESSION_MODELS[found]
    _check_keys(model_cls, config, converted, source)
    return model_cls, config, converted


def load_regression_model(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    arch: str | type | None = None,
    scale: int | None = None,
    **config_overrides: Any,
) -> EDSR | RRDBNet | SwinIR | SRVGGNetCompact:
    """Build the regression model that a released checkpoint (file or loaded dict) holds.

    Args:
        path_or_state_dict: a checkpoint file (see :func:`load_state_dict`) or an already loaded
            object (wrapped or not).
        arch: the architecture expected (``"edsr"``, ``"rrdbnet"``/``"esrgan"``, ``"swinir"``,
            ``"srvgg"``, or the class); ``None`` accepts any.
        scale: the scale factor expected; ``None`` accepts any.
        **config_overrides: values for hyper-parameters the tensors cannot tell (``res_scale``,
            ``img_range``, ``act_type``, ``rgb_mean``, ...).

    Returns:
        The model, in eval mode, with every parameter loaded (strict).

    Raises:
        CheckpointError: unreadable file, unrecognised layout, another architecture than ``arch``
            or another scale than ``scale`` (e.g. "checkpoint x.pth is an RRDBNet x2 model, but
            scale=4 was requested"), missing / unexpected keys.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = f"checkpoint {os.fspath(path_or_state_dict)}"
        state_dict = load_state_dict(path_or_state_dict)
    else:
        source = "the given state dict"
        state_dict = _unwrap(path_or_state_dict, None, source)

    found, config, converted = _analyse(state_dict, source)
    if arch is not None and _arch_name(arch) != found:
        raise CheckpointError(f"{source} is {_describe(found, config)}, but arch={arch!r} was requested")
    model_cls = REGRESSION_MODELS[found]
    unknown = set(config_overrides) - set(config)
    if unknown:
        raise TypeError(f"{model_cls.__name__} has no hyper-parameter(s) {sorted(unknown)}; it takes {sorted(config)}")
    config.update(config_overrides)
    if found == "edsr" and "rgb_mean" in config_overrides:
        converted["mean"] = torch.tensor(list(config_overrides["rgb_mean"]), dtype=torch.float32).view(1, -1, 1, 1)
    if scale is not None and int(scale) != int(config[_SCALE_KEY[found]]):
        raise CheckpointError(f"{source} is {_describe(found, config)}, but scale={scale} was requested")

    _check_keys(model_cls, config, converted, source)
    model = model_cls(**config)
    model.load_state_dict(converted, strict=True)
    return model.eval()
