"""The method registry: one entry per method, read by the CLI, :class:`~sr_diffusion.pipelines.AutoSRPipeline`,
``convert``'s auto-detection and the generic training entry point (``python -m sr_diffusion.training``).

An entry (:class:`Method`) names, as ``"module:attribute"`` strings resolved only when used (so importing this module
imports nothing heavy), or as the objects themselves:

* ``pipeline``: the pipeline class, whose name is the ``_class_name`` its ``save_pretrained`` writes;
* ``converter``: ``converter(args) -> pipeline`` for ``sr-diffusion convert`` (``args``: the parsed ``convert``
  options: ``checkpoint``, ``scale``, and those of :attr:`Method.cli_options`);
* ``detector``: ``detector(probe) -> bool``, whether a :class:`CheckpointProbe` holds this method's original
  checkpoint; detectors run in ascending :attr:`Method.detect_order` (cheap and specific tests first);
* ``training_task`` and ``config``: the :class:`~sr_diffusion.training.TrainingTask` and the experiment config
  class (its sections) of ``python -m sr_diffusion.training --method NAME``;
* ``cli_options``: the method-specific ``convert`` flags it accepts (the others are refused);
* ``fidelity_knobs``: the ``__call__`` keywords ``fidelity="auto"`` may set
  (:data:`sr_diffusion.fidelity_auto.AUTO_KNOBS`).

Adding a method is one :func:`register_method` call (see ``docs/adding_a_method.md``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CONVERT_OPTIONS",
    "CheckpointProbe",
    "Method",
    "convert_checkpoint",
    "detect_method",
    "method",
    "methods",
    "pipeline_classes",
    "register_method",
    "resolve",
    "unregister_method",
]

#: The method-specific ``convert`` flags (``--scale`` is common to all), with their ``args`` attribute
CONVERT_OPTIONS = {"--preset": "preset", "--vae": "vae", "--base": "base", "--norm-groups": "norm_groups"}


def resolve(ref: Any) -> Any:
    """The object a ``"module:attribute"`` reference names (imported now), or ``ref`` itself if it is not a string."""
    if not isinstance(ref, str):
        return ref
    module, sep, attribute = ref.partition(":")
    if not sep or not module or not attribute:
        raise ValueError(f"{ref!r} is not a 'module:attribute' reference")
    obj = importlib.import_module(module)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


def _ref_name(ref: Any) -> str:
    """The last name of a reference (``"pkg.mod:Class"`` -> ``"Class"``) without importing it."""
    if isinstance(ref, str):
        return ref.rpartition(":")[2].rpartition(".")[2]
    return ref.__name__


@dataclass(frozen=True)
class Method:
    """One method's entry (see the module docstring for what each reference must be)."""

    #: the ``--arch`` / ``--method`` name
    name: str
    #: the pipeline class
    pipeline: str | type
    #: ``converter(args) -> pipeline``; None: ``convert`` does not offer the method
    converter: str | Callable | None = None
    #: ``detector(probe) -> bool``; None: only ``--arch`` selects it
    detector: str | Callable | None = None
    #: detectors run in ascending order
    detect_order: int = 100
    #: the training task class; None: no generic training entry
    training_task: str | type | None = None
    #: the experiment config class of the task (None: the shared ``ExperimentConfig``)
    config: str | type | None = None
    #: ``(("section.key", value), ...)`` the training config must hold for this entry (the regression architectures
    #: share one task and pick the network by ``model.arch``)
    config_requires: tuple[tuple[str, Any], ...] = ()
    #: method-specific ``convert`` flags it accepts (keys of :data:`CONVERT_OPTIONS`)
    cli_options: tuple[str, ...] = ()
    #: ``__call__`` keywords ``fidelity="auto"`` may set
    fidelity_knobs: tuple[str, ...] = ()
    #: a one-line description
    description: str = ""
    #: extra keyword arguments of ``training_task()``
    task_kwargs: dict = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self):
        unknown = [flag for flag in self.cli_options if flag not in CONVERT_OPTIONS]
        if unknown:
            raise ValueError(
                f"method {self.name!r}: unknown convert option(s) {unknown}; known: {list(CONVERT_OPTIONS)}"
            )
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"method name {self.name!r}: letters, digits, '-' and '_' only")

    @property
    def pipeline_class_name(self) -> str:
        """The ``_class_name`` of its saved folders (without importing the class)."""
        return _ref_name(self.pipeline)

    @property
    def label(self) -> str:
        """The name messages use: the pipeline class name without ``Pipeline`` (``ResShift``, ``StableSR``)."""
        name = self.pipeline_class_name
        return name[: -len("Pipeline")] if name.endswith("Pipeline") and name != "Pipeline" else name

    def pipeline_class(self) -> type:
        return resolve(self.pipeline)

    def convert(self, args) -> Any:
        if self.converter is None:
            raise ValueError(f"method {self.name!r} has no checkpoint converter")
        return resolve(self.converter)(args)

    def detects(self, probe: CheckpointProbe) -> bool:
        return self.detector is not None and bool(resolve(self.detector)(probe))

    def task(self):
        if self.training_task is None:
            raise ValueError(f"method {self.name!r} has no training task")
        return resolve(self.training_task)(**self.task_kwargs)

    def config_class(self) -> type:
        return resolve(self.config or "sr_diffusion.training.config:ExperimentConfig")

    def check_config(self, config) -> None:
        """A ``ValueError`` unless ``config`` holds :attr:`config_requires`."""
        for key, value in self.config_requires:
            node = config
            for part in key.split("."):
                node = node[part] if isinstance(node, dict) else getattr(node, part)
            if node != value:
                raise ValueError(
                    f"method {self.name!r} trains {key}={value}, but the config sets {key}={node!r}: "
                    f"pass {key}={value} (or --method {node})"
                )


_METHODS: dict[str, Method] = {}


def register_method(entry: Method, *, replace: bool = False) -> Method:
    """Add ``entry`` to the registry (a name already registered is an error unless ``replace``)."""
    if entry.name in _METHODS and not replace:
        raise ValueError(f"method {entry.name!r} is already registered")
    _METHODS[entry.name] = entry
    return entry


def unregister_method(name: str) -> Method:
    """Remove and return the entry ``name`` (a ``KeyError`` if there is none)."""
    return _METHODS.pop(name)


def methods() -> list[Method]:
    """Every registered entry, in registration order."""
    return list(_METHODS.values())


def method(name: str) -> Method:
    """The entry ``name``; a ``KeyError`` naming the registered ones otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"no method {name!r}; registered: {', '.join(_METHODS)}") from None


def pipeline_classes() -> dict[str, str | type]:
    """``{_class_name: reference}`` of every registered pipeline (several methods may share one class)."""
    return {entry.pipeline_class_name: entry.pipeline for entry in _METHODS.values()}


class CheckpointProbe:
    """What detectors look at: a checkpoint ``path`` (file or folder) and, read once on first use, its flat state
    dict (:func:`sr_diffusion.conversion.resshift.read_flat_state_dict`). ``cache`` lets detectors share work."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.cache: dict[str, Any] = {}
        #: why the path could not be read as a state dict (a folder, a missing or corrupt file), once tried
        self.read_error: Exception | None = None
        self._read: tuple[dict, str] | None = None

    def _load(self) -> tuple[dict, str]:
        if self.read_error is not None:
            raise self.read_error
        if self._read is None:
            from sr_diffusion.conversion.resshift import read_flat_state_dict

            try:
                self._read = read_flat_state_dict(str(self.path))
            except Exception as err:
                self.read_error = err
                raise
        return self._read

    @property
    def state_dict(self) -> dict:
        return self._load()[0]

    @property
    def source(self) -> str:
        return self._load()[1]


def detect_method(checkpoint: str | Path) -> Method:
    """The first entry (by ``detect_order``) whose detector recognises ``checkpoint``. A detector that fails because
    the path cannot be read as a state dict says no (a folder is for the folder detectors); if none recognises it,
    that read error is raised, else the regression architectures' :class:`~sr_diffusion.checkpoints.CheckpointError`
    (what the file lacks)."""
    probe = CheckpointProbe(checkpoint)
    for entry in sorted(_METHODS.values(), key=lambda m: m.detect_order):
        try:
            if entry.detects(probe):
                return entry
        except Exception as err:  # a path that is no state dict is another detector's (a folder) or nobody's
            if err is not probe.read_error:
                raise
    if probe.read_error is not None:
        raise probe.read_error
    from sr_diffusion.checkpoints import CheckpointError, detect_architecture

    error = probe.cache.get("regression_error")
    if error is None:
        try:
            detect_architecture(probe.state_dict)
        except CheckpointError as err:
            error = err
        else:  # a regression architecture without an entry
            error = CheckpointError(f"{checkpoint}: no registered method recognises this checkpoint")
    raise error


def refused_options_message(refused: list[str], entry: Method, checkpoint: str | Path) -> str:
    """Which methods each refused ``convert`` flag is for, and what ``entry`` takes instead."""
    parts = []
    for flag in refused:
        owners = list(dict.fromkeys(m.label for m in _METHODS.values() if flag in m.cli_options))
        parts.append(f"{flag} is for {' and '.join(owners) or 'no registered method'} checkpoints")
    takes = ", ".join(entry.cli_options) or "none of these options"
    return f"{'; '.join(parts)}; {checkpoint} holds {entry.name}, which takes {takes}"


def convert_checkpoint(checkpoint: str | Path, method_name: str | None = None, *, scale: int | None = None, **options):
    """The pipeline of an original checkpoint (what ``sr-diffusion convert`` saves): the converter of the method
    ``method_name``, or of the one :func:`detect_method` finds. ``options`` are the method-specific ``convert`` options
    by attribute name (``preset``, ``vae``, ``base``, ``norm_groups``: :data:`CONVERT_OPTIONS`); one the method does
    not take is a ``ValueError`` naming the methods it is for."""
    from types import SimpleNamespace

    attributes = {attr: flag for flag, attr in CONVERT_OPTIONS.items()}
    unknown = sorted(set(options) - set(attributes))
    if unknown:
        raise TypeError(f"unknown convert option(s) {unknown}; known: {sorted(attributes)}")
    entry = method(method_name) if method_name else detect_method(checkpoint)
    refused = [attributes[a] for a in attributes if options.get(a) and attributes[a] not in entry.cli_options]
    if refused:
        raise ValueError(refused_options_message(refused, entry, checkpoint))
    values = {attr: options.get(attr) for attr in attributes}
    return entry.convert(SimpleNamespace(checkpoint=str(checkpoint), arch=entry.name, scale=scale, **values))


# ---------------------------------------------------------------------------------------------------
# the built-in methods

_CLI = "sr_diffusion.cli"
_PIPES = "sr_diffusion.pipelines"
_TRAIN = "sr_diffusion.training"

for _arch in ("edsr", "rrdbnet", "swinir", "srvgg"):
    register_method(
        Method(
            name=_arch,
            pipeline=f"{_PIPES}.regression:RegressionSRPipeline",
            converter=f"{_CLI}:_regression_pipeline",
            detector=f"{_CLI}:_detect_{_arch}",
            detect_order=40,
            training_task=f"{_TRAIN}.regression:RegressionTask",
            config=f"{_TRAIN}.config:ExperimentConfig",
            config_requires=(("model.arch", _arch),),
            description=f"regression SR ({_arch}; a training config with model.arch={_arch})",
        )
    )
del _arch

register_method(
    Method(
        name="resshift",
        pipeline=f"{_PIPES}.resshift:ResShiftPipeline",
        converter=f"{_CLI}:_resshift_pipeline",
        detector=f"{_CLI}:_detect_resshift",
        detect_order=50,
        training_task=f"{_TRAIN}.resshift:ResShiftTask",
        config=f"{_TRAIN}.resshift:ResShiftExperimentConfig",
        cli_options=("--preset", "--vae"),
        description="ResShift (Yue et al. 2023): residual-shifting diffusion, few steps",
    )
)
register_method(
    Method(
        name="sr3",
        pipeline=f"{_PIPES}.sr3:SR3Pipeline",
        converter=f"{_CLI}:_sr3_pipeline",
        detector=f"{_CLI}:_detect_sr3",
        detect_order=60,
        training_task=f"{_TRAIN}.sr3:SR3Task",
        config=f"{_TRAIN}.sr3:SR3ExperimentConfig",
        cli_options=("--norm-groups",),
        description="SR3 (Saharia et al. 2021): pixel-space DDPM conditioned on the upsampled LR",
    )
)
register_method(
    Method(
        name="srdiff",
        pipeline=f"{_PIPES}.srdiff:SRDiffPipeline",
        converter=f"{_CLI}:_srdiff_pipeline",
        detector=f"{_CLI}:_detect_srdiff",
        detect_order=30,
        training_task=f"{_TRAIN}.srdiff:SRDiffTask",
        config=f"{_TRAIN}.srdiff:SRDiffExperimentConfig",
        description="SRDiff (Li et al. 2022): residual diffusion with an RRDB LR encoder",
    )
)
register_method(
    Method(
        name="stablesr",
        pipeline=f"{_PIPES}.stablesr:StableSRPipeline",
        converter=f"{_CLI}:_stablesr_pipeline",
        detector=f"{_CLI}:_detect_stablesr",
        detect_order=20,
        training_task=f"{_TRAIN}.stablesr:StableSRTask",
        config=f"{_TRAIN}.stablesr:StableSRExperimentConfig",
        cli_options=("--base", "--vae"),
        fidelity_knobs=("fidelity_weight",),
        description="StableSR (Wang et al. 2023): Stable Diffusion with time-aware SFT and CFW",
    )
)
register_method(
    Method(
        name="pasd",
        pipeline=f"{_PIPES}.pasd:PASDPipeline",
        converter=f"{_CLI}:_pasd_pipeline",
        detector=f"{_CLI}:_detect_pasd",
        detect_order=11,
        training_task=f"{_TRAIN}.pasd:PASDTask",
        config=f"{_TRAIN}.pasd:PASDExperimentConfig",
        cli_options=("--base",),
        fidelity_knobs=("added_noise_level", "controlnet_conditioning_scale"),
        description="PASD (Yang et al. 2023): pixel-aware Stable Diffusion",
    )
)
register_method(
    Method(
        name="seesr",
        pipeline=f"{_PIPES}.seesr:SeeSRPipeline",
        converter=f"{_CLI}:_seesr_pipeline",
        detector=f"{_CLI}:_detect_seesr",
        detect_order=10,
        training_task=f"{_TRAIN}.seesr:SeeSRTask",
        config=f"{_TRAIN}.seesr:SeeSRExperimentConfig",
        cli_options=("--base",),
        fidelity_knobs=("controlnet_conditioning_scale",),
        description="SeeSR (Wu et al. 2024): semantics-aware Stable Diffusion SR",
    )
)
register_method(
    Method(
        name="ldm_sr",
        pipeline=f"{_PIPES}.ldm_sr:LDMSRPipeline",
        description="LDM-SR (Rombach et al. 2022): latent diffusion x4 (no original-checkpoint converter)",
    )
)
