"""Training configuration: YAML → nested dataclasses, with dotted command-line overrides.

A run is described by one YAML file whose top-level keys are the sections below; any value can be
overridden on the command line with ``section.key=value`` (the value is parsed as YAML, so
``optim.betas=[0.9,0.99]``, ``train.checkpoints_total_limit=null`` and ``train.loss=l1`` all work)::

    python training/train_regression.py --config configs/regression_tiny.yaml train.max_steps=10 model.num_feat=16

Unknown keys, wrong types and invalid values fail early with a message naming the dotted key (pydantic checks
keys and types against the dataclasses' annotations and reports all such errors at once). Two
sections are open-ended: ``model`` (``arch`` plus that architecture's constructor arguments) and
``data.degradation`` (``type`` plus that degradation's config fields); their extra keys are checked by
the code that builds the model or the degradation, still before training starts.

A method that needs more settings subclasses :class:`ExperimentConfig` and adds a section dataclass;
:func:`load_config` and :func:`parse_args` work on any such dataclass tree.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import inspect
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml
from typing_extensions import TypedDict

__all__ = [
    "ConfigError",
    "ModelConfig",
    "DegradationConfig",
    "DataConfig",
    "ValidationConfig",
    "OptimConfig",
    "TrainConfig",
    "ExperimentConfig",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "load_config",
    "save_config",
    "parse_args",
]


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the dotted key."""


# ----------------------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """``model``: the architecture name and its constructor arguments (every key but ``arch``).

    For regression training ``arch`` is a key of ``sr_diffusion.models.REGRESSION_MODELS``
    (``edsr``, ``rrdbnet``, ``swinir``, ``srvgg``); the scale argument (``upscale`` or ``scale``) is
    filled from the top-level ``scale`` when absent.
    """

    _extra_field = "kwargs"

    arch: str = "srvgg"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DegradationConfig:
    """``data.degradation``: how LR training inputs are made from HR crops (not used with ``paired``).

    ``type``: ``bicubic`` (MATLAB ``imresize``, in the data workers), ``realesrgan`` or ``bsrgan``
    (kernels sampled per sample in the workers, the batched degradation applied on the training
    device). Every other key is a field of ``RealESRGANDegradationConfig`` / ``BSRGANDegradationConfig``.
    """

    _extra_field = "kwargs"

    type: Literal["bicubic", "realesrgan", "bsrgan"] = "bicubic"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class SyntheticConfig:
    """``data.synthetic``: dead-leaves images (:class:`sr_diffusion.training.synthetic.DeadLeaves`) mixed
    into the training crops, a ``fraction`` of the samples (0: photos only; 1: synthetic only).

    ``r_min``/``r_max`` (output pixels; ``r_max`` null = the crop side), ``alpha``, ``supersample``,
    ``shading`` and ``blur_sigma`` are the generator's arguments; ``palette``: ``photos`` draws the leaf
    colours from pixels of the training images, ``uniform`` from the RGB cube.
    """

    fraction: float = 0.0
    r_min: float = 1.0
    r_max: float | None = None
    alpha: float = 3.0
    supersample: int = 2
    shading: float = 0.0
    blur_sigma: list[float] = field(default_factory=lambda: [0.0, 0.0])
    palette: Literal["photos", "uniform"] = "photos"


@dataclass
class DataConfig:
    """``data``: training images, crops, augmentation and loading.

    ``source``:
      * ``skimage_sklearn``: the public-domain / CC photos bundled with scikit-image and scikit-learn
        (see :mod:`sr_diffusion.training.data`), minus the held-out validation photos;
      * ``folder``: every image under ``hr_dirs`` (recursive; png/jpg/jpeg/webp/bmp/tif/tiff), LR made
        by ``degradation``; with ``include_bundled`` the ``skimage_sklearn`` training photos too (e.g.
        ``hr_dirs: [data/photos/train]``, the corpus of ``training/prepare_photos.py``, plus those);
      * ``paired``: ``hr_dirs[i]`` and ``lr_dirs[i]`` hold the same names (LR name =
        ``lr_filename_tmpl.format(hr_stem)`` with any image extension), crops aligned by ``scale``.

    ``image_cache_mb``: each data process keeps decoded image files (uint8 for 8-bit files) up to this
    many MiB, least recently used evicted first, instead of decoding the file for every sample; 0
    disables it. The samples are identical either way.
    """

    source: Literal["skimage_sklearn", "folder", "paired"] = "skimage_sklearn"
    hr_dirs: list[str] = field(default_factory=list)
    lr_dirs: list[str] = field(default_factory=list)
    lr_filename_tmpl: str = "{}"
    include_bundled: bool = False
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    gt_size: int = 128
    random_downscale: list[float] | None = None  # [lo, hi]: shrink each HR photo by U[lo, hi] before cropping
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    use_hflip: bool = True
    use_rot: bool = True
    batch_size: int = 16
    num_workers: int = 4
    image_cache_mb: float = 2048


@dataclass
class ValidationConfig:
    """``validation``: held-out images scored every ``train.validation_steps``.

    ``source``: ``skimage_sklearn`` (the held-out photos), ``folder`` (HR images under ``hr_dirs``, LR by
    MATLAB bicubic), ``paired`` (``hr_dirs`` + ``lr_dirs``) or ``none``. ``crop_size`` center-crops each HR
    image (a multiple of ``scale``) to keep validation cheap; ``max_images`` keeps the first N (sorted).
    """

    source: Literal["skimage_sklearn", "folder", "paired", "none"] = "skimage_sklearn"
    hr_dirs: list[str] = field(default_factory=list)
    lr_dirs: list[str] = field(default_factory=list)
    lr_filename_tmpl: str = "{}"
    crop_size: int | None = None
    max_images: int | None = None
    num_log_images: int = 4


@dataclass
class OptimConfig:
    """``optim``: optimizer and learning-rate schedule (steps are optimizer steps).

    ``scheduler``: ``constant``; ``cosine`` (from ``lr`` to ``min_lr`` over ``train.max_steps``);
    ``multistep`` (``lr`` times ``gamma`` at each of ``milestones``). All with a linear warmup from 0
    over ``warmup_steps``.
    """

    name: Literal["adam", "adamw"] = "adam"
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    scheduler: Literal["constant", "cosine", "multistep"] = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.5


@dataclass
class TrainConfig:
    """``train``: the loop, precision, EMA, checkpointing, logging.

    ``ema_decay``: ``null`` or ``0`` disables the EMA (the exported pipeline then holds the raw weights).
    ``checkpointing_steps`` / ``validation_steps``: ``0`` disables. ``resume_from_checkpoint``: ``latest``
    or a checkpoint directory. ``logging_dir`` is relative to ``output_dir``. ``phase_bias_weight``: weight of
    the sub-pixel phase-bias penalty added to ``loss`` (:class:`~sr_diffusion.training.losses.PhaseBiasLoss`,
    period ``scale``; 0 disables). ``init_from``: a saved model folder (``config.json`` + weights, e.g. a
    pipeline's ``model/`` or ``unet/``) whose weights start a new run (a fine-tune; its architecture must be the
    config's; ignored when resuming from a checkpoint, which has its own weights).
    """

    output_dir: str = "outputs/regression"
    logging_dir: str = "logs"
    seed: int = 0
    max_steps: int = 1000
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    loss: Literal["l1", "mse", "charbonnier"] = "l1"
    charbonnier_eps: float = 1e-3
    phase_bias_weight: float = 0.0
    init_from: str | None = None
    ema_decay: float | None = 0.999
    ema_update_after_step: int = 0
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    validation_steps: int = 500
    log_steps: int = 10
    resume_from_checkpoint: str | None = None
    report_to: Literal["tensorboard", "none"] = "tensorboard"
    tracker_project_name: str = "sr_diffusion"


@dataclass
class ExperimentConfig:
    """The whole run. ``scale`` is the one super-resolution factor used by the model, the LR
    synthesis and validation (BasicSR convention)."""

    scale: int = 4
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        """Cross-field checks; raises :class:`ConfigError`."""
        _check(self.scale >= 1, "scale", f"must be >= 1, got {self.scale}")
        d, v, o, t = self.data, self.validation, self.optim, self.train
        _check(
            d.gt_size >= self.scale and d.gt_size % self.scale == 0,
            "data.gt_size",
            f"must be a positive multiple of scale={self.scale}, got {d.gt_size}",
        )
        _check(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
        _check(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
        if d.source in ("folder", "paired"):
            _check(bool(d.hr_dirs), "data.hr_dirs", f"is required when data.source={d.source!r}")
        _check(
            not d.include_bundled or d.source == "folder",
            "data.include_bundled",
            f"adds the bundled photos to data.source='folder' only, got data.source={d.source!r}",
        )
        _check(d.image_cache_mb >= 0, "data.image_cache_mb", f"must be >= 0 (0 disables), got {d.image_cache_mb}")
        if d.source == "paired":
            _check(
                len(d.lr_dirs) == len(d.hr_dirs),
                "data.lr_dirs",
                f"must list one LR folder per HR folder ({len(d.hr_dirs)}), got {len(d.lr_dirs)}",
            )
            _check(
                d.degradation.type == "bicubic" and not d.degradation.kwargs,
                "data.degradation",
                "must be left unset with data.source='paired' (the LR images are given)",
            )
        _check(
            0 <= d.synthetic.fraction <= 1, "data.synthetic.fraction", f"must be in [0, 1], got {d.synthetic.fraction}"
        )
        if d.source == "paired":
            _check(
                d.synthetic.fraction == 0,
                "data.synthetic.fraction",
                "must be 0 with data.source='paired' (synthetic images have no given LR)",
            )
        if d.degradation.type == "bicubic":
            _check(
                not d.degradation.kwargs,
                "data.degradation",
                f"type 'bicubic' takes no options, got {sorted(d.degradation.kwargs)}",
            )
        if v.source in ("folder", "paired"):
            _check(bool(v.hr_dirs), "validation.hr_dirs", f"is required when validation.source={v.source!r}")
        if v.source == "paired":
            _check(len(v.lr_dirs) == len(v.hr_dirs), "validation.lr_dirs", "must list one LR folder per HR folder")
        if v.crop_size is not None:
            _check(
                v.crop_size >= self.scale and v.crop_size % self.scale == 0,
                "validation.crop_size",
                f"must be a positive multiple of scale={self.scale}, got {v.crop_size}",
            )
        _check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
        _check(all(0 <= b < 1 for b in o.betas), "optim.betas", f"must be in [0, 1), got {list(o.betas)}")
        _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(list(o.milestones) == sorted(o.milestones), "optim.milestones", "must be increasing")
        _check(t.max_steps >= 1, "train.max_steps", f"must be >= 1, got {t.max_steps}")
        _check(t.phase_bias_weight >= 0, "train.phase_bias_weight", f"must be >= 0, got {t.phase_bias_weight}")
        _check(t.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps", "must be >= 1")
        _check(
            t.ema_decay is None or 0 <= t.ema_decay < 1,
            "train.ema_decay",
            f"must be in [0, 1) or null, got {t.ema_decay}",
        )
        _check(t.charbonnier_eps > 0, "train.charbonnier_eps", "must be > 0")
        for key in ("checkpointing_steps", "validation_steps", "ema_update_after_step"):
            _check(getattr(t, key) >= 0, f"train.{key}", "must be >= 0 (0 disables)")
        _check(t.log_steps >= 1, "train.log_steps", "must be >= 1")
        _check(
            t.checkpoints_total_limit is None or t.checkpoints_total_limit >= 1,
            "train.checkpoints_total_limit",
            "must be >= 1 or null",
        )


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


# ----------------------------------------------------------------------------------------------------------
# dict <-> dataclass
# ----------------------------------------------------------------------------------------------------------
# The dataclasses above are the API. pydantic checks a dict against a mirror of them (a TypedDict per section, its
# unknown keys refused but in open sections; ints, bools and strings strict; ints taken for floats, lists for
# tuples) and builds the dataclasses; its errors are reworded to name the dotted key.


def _yaml_float(value: Any) -> Any:
    try:  # YAML 1.1 (PyYAML) reads "1e-4" as a string
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


_LEAVES = {int: pydantic.StrictInt, bool: pydantic.StrictBool, str: pydantic.StrictStr}
_LEAVES[float] = Annotated[float, pydantic.Strict(), pydantic.BeforeValidator(_yaml_float)]


def _validator(tp: Any) -> Any:
    """The pydantic type that checks a value for the config annotation ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):  # a section: a mapping, null (the defaults) or an instance
        return Annotated[
            _section(tp),
            pydantic.WrapValidator(lambda v, check: v if isinstance(v, tp) else check({} if v is None else v)),
        ]
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(map(_validator, args))]
    if origin in (list, tuple):
        return origin[tuple(a if a is Ellipsis else _validator(a) for a in args)] if args else origin
    return dict if origin is dict else _LEAVES.get(tp, tp)


@functools.cache
def _section(cls: type) -> Any:
    """A TypedDict mirroring dataclass ``cls``, validated into an instance of ``cls``."""
    hints, extra_name = typing.get_type_hints(cls), getattr(cls, "_extra_field", None)
    fields = {f.name: _validator(hints[f.name]) for f in dataclasses.fields(cls) if f.name != extra_name}
    mirror = TypedDict(cls.__name__, fields, total=False)
    mirror.__pydantic_config__ = pydantic.ConfigDict(extra="forbid" if extra_name is None else "allow")

    def build(values: dict) -> Any:
        if extra_name is not None:  # the open section's other keys
            values = {**{k: values.pop(k) for k in list(values) if k in fields}, extra_name: values}
        return cls(**values)

    return Annotated[mirror, pydantic.AfterValidator(build)]


def _annotation_at(cls: type, loc: tuple) -> Any:
    """The annotation of the value at pydantic location ``loc``, Optional stripped (the configs' only unions)."""
    tp = cls
    for part in (*loc, None):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 else tp
        if part is not None:
            fixed = typing.get_origin(tp) is tuple and Ellipsis not in args
            tp = typing.get_type_hints(tp)[part] if dataclasses.is_dataclass(tp) else args[part if fixed else 0]
    return tp


def _dotted(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


_EXPECTED = {"int_type": "an integer", "bool_type": "true/false", "float_type": "a number", "string_type": "a string"}
_EXPECTED |= {"list_type": "a list", "tuple_type": "a list", "dict_type": "a mapping"}


def _message(error: dict, cls: type) -> str:
    """One pydantic error in this module's words: the dotted key first, or the unknown key and its section's keys."""
    loc, kind, value, ctx = error["loc"], error["type"], error["input"], error.get("ctx", {})
    key = _dotted(loc) or "config"
    if kind == "extra_forbidden":
        section, prefix = _annotation_at(cls, loc[:-1]), "".join(f"{p}." for p in loc[:-1])
        known = [f.name for f in dataclasses.fields(section) if f.name != getattr(section, "_extra_field", None)]
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        return f"unknown config key {key!r}{hint}; valid keys in {prefix[:-1] or 'the top level'}: {', '.join(known)}"
    if kind == "invalid_key":
        return f"{'.'.join(map(str, loc))}: keys must be strings"
    if kind == "literal_error":
        choices = ", ".join(map(repr, typing.get_args(_annotation_at(cls, loc))))
        return f"{key}: must be one of {choices}; got {value!r}"
    if kind in ("missing", "too_long"):  # a fixed-length tuple given too few (an item missing) or too many values
        loc = loc[:-1] if kind == "missing" else loc
        return f"{_dotted(loc)}: expected {len(typing.get_args(_annotation_at(cls, loc)))} values, got {len(value)}"
    if kind == "value_error" and isinstance(ctx["error"], ConfigError):  # raised by a section's __post_init__
        return str(ctx["error"])
    if kind in _EXPECTED:
        section = " (section)" if loc and dataclasses.is_dataclass(_annotation_at(cls, loc)) else ""
        return f"{key}: expected {_EXPECTED[kind]}{section}, got {value!r}"
    return f"{key}: {error['msg']}"


@functools.cache
def _adapter(cls: type) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(_section(cls))


def config_from_dict(data: dict, cls=None):
    """Build dataclass ``cls`` (default :class:`ExperimentConfig`) from a nested dict, checking every key."""
    cls = ExperimentConfig if cls is None else cls
    try:
        return _adapter(cls).validate_python(data)
    except pydantic.ValidationError as err:
        raise ConfigError("\n".join(_message(e, cls) for e in err.errors())) from None


def config_to_dict(config) -> dict:
    """The nested plain-dict (YAML-ready) form of a config dataclass; open sections are flattened back."""
    out: dict[str, Any] = {}
    extra_name = getattr(type(config), "_extra_field", None)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == extra_name:
            out.update(value)
            continue
        if dataclasses.is_dataclass(value):
            value = config_to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def apply_overrides(data: dict, overrides: Sequence[str | tuple[str, Any]]) -> dict:
    """Apply overrides to a nested dict, in order; returns a copy.

    Each override is ``"a.b.c=value"`` (the value parsed as YAML, or kept as a string when it is not valid
    YAML) or a ``("a.b.c", value)`` pair (taken as is).
    """
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        if isinstance(item, tuple):
            path, value = item
        else:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like section.key=value")
            path, raw = item.split("=", 1)
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                value = raw  # not YAML (e.g. "{}x4"): the plain string
        parts = path.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: bad key {path!r}")
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: depth + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str | tuple[str, Any]] = (), cls=None):
    """Read a YAML config (or start from the defaults when ``path`` is None), apply overrides, validate."""
    cls = ExperimentConfig if cls is None else cls
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    config = config_from_dict(apply_overrides(data, overrides), cls)
    if hasattr(config, "validate"):
        config.validate()
    return config


def save_config(config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from sr_diffusion.utils import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


#: diffusers-style flags of every training script, each a shortcut for one dotted override.
#: Values are taken verbatim (typed by argparse), not parsed as YAML.
FLAG_SHORTCUTS = {
    "resume_from_checkpoint": ("train.resume_from_checkpoint", str),  # 'latest' or a checkpoint directory
    "output_dir": ("train.output_dir", str),
    "checkpoints_total_limit": ("train.checkpoints_total_limit", int),
    "checkpointing_steps": ("train.checkpointing_steps", int),
    "max_train_steps": ("train.max_steps", int),
    "mixed_precision": ("train.mixed_precision", str),
    "seed": ("train.seed", int),
}


def parse_args(argv: Sequence[str] | None = None, cls=None, description: str | None = None):
    """Command line of every training script: ``--config FILE [section.key=value ...]`` plus the
    diffusers-style flags of :data:`FLAG_SHORTCUTS` (``--resume_from_checkpoint latest``,
    ``--checkpoints_total_limit 3``, ...). Returns the validated config."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Overrides: section.key=value, e.g. train.max_steps=10 model.num_feat=16 optim.betas=[0.9,0.99]",
    )
    parser.add_argument("--config", type=str, default=None, help="YAML config file (default: built-in defaults)")
    for flag, (key, kind) in FLAG_SHORTCUTS.items():
        parser.add_argument(f"--{flag}", type=kind, default=None, help=f"same as {key}=...")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    overrides: list = list(args.overrides)
    for flag, (key, _) in FLAG_SHORTCUTS.items():
        if getattr(args, flag) is not None:
            overrides.append((key, getattr(args, flag)))
    try:
        return load_config(args.config, overrides, cls)
    except ConfigError as err:
        parser.error(str(err))


def check_model_kwargs(cls: type, kwargs: dict[str, Any], arch: str) -> list[str]:
    """The keyword arguments ``cls.__init__`` takes; a :class:`ConfigError` naming any ``model.*`` key it does not."""
    params = inspect.signature(cls.__init__).parameters
    valid = [name for name in params if name != "self" and params[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join('model.' + k for k in unknown)} for arch {arch!r}; "
            f"valid keys: arch, {', '.join(valid)}"
        )
    return valid
