"""Degradation-estimator training: learn blur, noise level and JPEG quality of LR images from the degradation
pipeline's own parameters (:mod:`sr_diffusion.estimation`).

Each step degrades the HR crops of the batch with the Real-ESRGAN second-order model of ``estimator.degradation``
(:func:`~sr_diffusion.estimation.degrade_with_targets`, drawing from the trainer's per-micro-batch generator, so
resuming is exact) and regresses the LR images' targets: ``train.loss`` (L1 by default) between the estimator's
normalised outputs ``z`` and the normalised targets ``(q - target_mean) / target_std``, i.e. each quantity's absolute
error in units of its training standard deviation. Before training, ``target_mean`` / ``target_std`` (the model's
config) are measured on ``estimator.calibration_samples`` degraded training crops; their mean is also the
"predict the mean" baseline that :func:`evaluate_degradation_estimator` compares against on held-out photos.

Config: the shared sections (``data.degradation`` must stay ``bicubic``: the task degrades the HR crops itself, since
it needs the sampled parameters, and the workers' bicubic LR is not used; ``validation.source`` must be ``none``:
there is no SR output to score), ``model`` (``arch: degradation_estimator`` plus
:class:`~sr_diffusion.estimation.DegradationEstimator`'s ``block_out_channels`` / ``head_channels``) and
``estimator`` (:class:`EstimatorConfig`). The exported ``pipeline/`` folder is a ``DegradationEstimator`` folder
(``DegradationEstimator.from_pretrained``); the training script then scores it on held-out photos
(``evaluation.json``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .config import ConfigError, DataConfig, ExperimentConfig, ModelConfig, TrainConfig, ValidationConfig
from .data import build_train_dataset, make_generator, random_crop_pair
from .losses import build_loss
from .trainer import TrainingTask

__all__ = [
    "DegradationEstimatorExperimentConfig",
    "DegradationEstimatorTask",
    "EstimatorConfig",
    "build_estimator_degradation",
    "calibrate_targets",
    "FINAL_STAGE_GROUPS",
    "evaluate_degradation_estimator",
    "evaluate_on_held_out_photos",
]

logger = logging.getLogger(__name__)

ARCH = "degradation_estimator"
_CALIBRATION, _EVALUATION = 11, 12  # purposes of derived seeds (see data.derive_seed)


# ----------------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------------


def _default_estimator_degradation() -> dict[str, Any]:
    return {"noise_prob": 0.8, "noise_prob2": 0.8, "jpeg_prob": 0.8, "jpeg_prob2": 0.8}


@dataclass
class EstimatorConfig:
    """``estimator``: the training distribution and the calibration / evaluation budgets.

    ``degradation``: options of ``RealESRGANDegradationConfig`` (``scale`` comes from the top-level ``scale``); the
    default is Real-ESRGAN x4plus with each noise and JPEG stage switched off 20% of the time, so that clean and
    lightly degraded inputs are part of the training distribution. ``calibration_samples``: degraded training crops
    that set the model's ``target_mean`` / ``target_std`` (0 keeps the model's own). ``evaluation_samples``: held-out
    crops the training script scores the exported estimator on (0: none), ``evaluation_batch_size`` at a time.
    """

    degradation: dict[str, Any] = field(default_factory=_default_estimator_degradation)
    calibration_samples: int = 512
    evaluation_samples: int = 512
    evaluation_batch_size: int = 32


@dataclass
class DegradationEstimatorModelConfig(ModelConfig):
    """``model``: ``arch: degradation_estimator`` plus ``DegradationEstimator``'s arguments."""

    arch: str = ARCH


@dataclass
class DegradationEstimatorDataConfig(DataConfig):
    """``data`` with the estimator's defaults: 192-pixel HR crops (48-pixel LR) of the bundled photos."""

    gt_size: int = 192
    batch_size: int = 32
    num_workers: int = 0


@dataclass
class DegradationEstimatorValidationConfig(ValidationConfig):
    """``validation``: ``none`` (the shared validation scores SR images; the script scores the estimator instead)."""

    source: Literal["skimage_sklearn", "folder", "paired", "none"] = "none"


@dataclass
class DegradationEstimatorTrainConfig(TrainConfig):
    """``train`` with the estimator's defaults."""

    output_dir: str = "outputs/degradation_estimator"
    validation_steps: int = 0
    ema_decay: float | None = 0.995


@dataclass
class DegradationEstimatorExperimentConfig(ExperimentConfig):
    """:class:`ExperimentConfig` with an ``estimator`` section; ``model.arch`` is ``degradation_estimator``."""

    model: DegradationEstimatorModelConfig = field(default_factory=DegradationEstimatorModelConfig)
    data: DegradationEstimatorDataConfig = field(default_factory=DegradationEstimatorDataConfig)
    validation: DegradationEstimatorValidationConfig = field(default_factory=DegradationEstimatorValidationConfig)
    train: DegradationEstimatorTrainConfig = field(default_factory=DegradationEstimatorTrainConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)

    def validate(self) -> None:
        super().validate()
        _check_sections(self)


def _check_sections(config: ExperimentConfig) -> None:
    if config.validation.source != "none":
        raise ConfigError(
            "validation.source: must be 'none' for the degradation estimator (there is no SR output to score; the "
            "training script scores the estimator on held-out photos instead)"
        )
    if config.data.degradation.type != "bicubic" or config.data.degradation.kwargs:
        raise ConfigError(
            "data.degradation: leave it unset (bicubic) for the degradation estimator; its training degradation is "
            "estimator.degradation (the task degrades the HR crops itself, since it needs the sampled parameters)"
        )
    if config.data.source == "paired":
        raise ConfigError("data.source: the degradation estimator makes its LR images; use skimage_sklearn or folder")
    e = getattr(config, "estimator", None) or EstimatorConfig()
    for key in ("calibration_samples", "evaluation_samples"):
        if getattr(e, key) < 0:
            raise ConfigError(f"estimator.{key}: must be >= 0, got {getattr(e, key)}")
    if e.evaluation_batch_size < 1:
        raise ConfigError(f"estimator.evaluation_batch_size: must be >= 1, got {e.evaluation_batch_size}")
    build_estimator_degradation(config)


def build_estimator_degradation(config: ExperimentConfig):
    """The ``RealESRGANDegradation`` of ``estimator.degradation`` at the top-level ``scale``."""
    from sr_diffusion.degradations import RealESRGANDegradation, RealESRGANDegradationConfig

    e = getattr(config, "estimator", None) or EstimatorConfig()
    options = dict(e.degradation)
    if options.setdefault("scale", config.scale) != config.scale:
        raise ConfigError(f"estimator.degradation.scale={options['scale']} differs from scale={config.scale}")
    try:
        return RealESRGANDegradation(RealESRGANDegradationConfig.from_dict(options))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"estimator.degradation: {err}") from err


# ----------------------------------------------------------------------------------------------------------------------
# Calibration and evaluation
# ----------------------------------------------------------------------------------------------------------------------


def _batches(total: int, batch_size: int):
    start = 0
    while start < total:
        yield min(batch_size, total - start)
        start += batch_size


@torch.no_grad()
def calibrate_targets(
    hr_crops: Sequence[torch.Tensor] | torch.Tensor,
    degradation,
    generator: torch.Generator,
    batch_size: int = 32,
) -> tuple[list[float], list[float]]:
    """Per-quantity mean and standard deviation of the targets of ``hr_crops`` (each ``(3, H, W)`` in [0, 1], equal
    sizes) degraded by ``degradation`` with ``generator``."""
    from sr_diffusion.estimation import degrade_with_targets

    crops = torch.stack(list(hr_crops)) if not isinstance(hr_crops, torch.Tensor) else hr_crops
    if len(crops) < 2:
        raise ValueError("calibration needs at least 2 crops")
    targets = []
    for start in range(0, len(crops), batch_size):
        _, t = degrade_with_targets(degradation, crops[start : start + batch_size].float(), generator)
        targets.append(t.to_tensor())
    values = torch.cat(targets)
    std = values.std(0).clamp_min(1e-3)
    return values.mean(0).tolist(), std.tolist()


#: Groups of :func:`evaluate_degradation_estimator`'s breakdown, by what the degradation's final stage did.
FINAL_STAGE_GROUPS = ("jpeg_last", "jpeg_before_resize", "no_final_jpeg")


def _final_stage_group(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per image, the index in :data:`FINAL_STAGE_GROUPS`: the final JPEG is the last operation, it is followed by
    the final [resize + sinc] (which blurs and resamples its 8x8 blocks), or there is no final JPEG."""
    jpeg = params["jpeg2"].bool().flatten()
    first = params["jpeg_first"].bool().flatten()
    return torch.where(jpeg, torch.where(first, 1, 0), 2)


def _scores(errors: torch.Tensor, baseline_errors: torch.Tensor) -> dict[str, Any]:
    from sr_diffusion.estimation import QUANTITIES

    mae, base = errors.mean(0), baseline_errors.mean(0)
    return {
        "mae": dict(zip(QUANTITIES, mae.tolist())),
        "baseline_mae": dict(zip(QUANTITIES, base.tolist())),
        "ratio": dict(zip(QUANTITIES, (mae / base.clamp_min(1e-12)).tolist())),
        "num_samples": len(errors),
    }


@torch.no_grad()
def evaluate_degradation_estimator(
    model,
    photos: Sequence[torch.Tensor],
    degradation,
    *,
    num_samples: int,
    crop_size: int,
    seed: int = 0,
    batch_size: int = 32,
    baseline=None,
) -> dict[str, Any]:
    """Score ``model`` on ``num_samples`` random ``crop_size`` crops of ``photos`` (uint8 or float ``(3, H, W)``),
    degraded by ``degradation``; the crops and degradations are a function of ``seed`` alone.

    Args:
        baseline: a one-image :class:`~sr_diffusion.estimation.DegradationEstimate` predicted for every sample; by
            default the model's training mean (``model.mean_estimate()``): the "predict the mean" baseline.

    Returns:
        ``{"mae": {quantity: float}, "baseline_mae": {...}, "ratio": {...}, "num_samples": int, "by_final_stage":
        {group: {the same keys}}}`` with ``ratio = mae / baseline_mae`` (below 1: better than the baseline) and the
        groups of :data:`FINAL_STAGE_GROUPS` that occurred (a JPEG whose blocks the final resize blurred and
        resampled leaves little trace of its quality in the LR image).
    """
    from sr_diffusion.estimation import degrade_with_targets

    if not photos:
        raise ValueError("no photos to evaluate on")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = make_generator(seed, _EVALUATION)
    baseline = (model.mean_estimate() if baseline is None else baseline).to_tensor().cpu()
    errors, baseline_errors, groups = [], [], []
    for n in _batches(num_samples, batch_size):
        index = torch.randint(0, len(photos), (n,), generator=generator).tolist()
        crops = [random_crop_pair(photos[i], None, crop_size, 1, generator)[0] for i in index]
        hr = torch.stack([c.float() / 255.0 if c.dtype == torch.uint8 else c.float() for c in crops])
        lr, targets, params = degrade_with_targets(degradation, hr, generator, return_params=True)
        predicted = model(lr.to(device)).estimate.to_tensor().cpu()
        truth = targets.to_tensor().cpu()
        errors.append((predicted - truth).abs())
        baseline_errors.append((baseline - truth).abs())
        groups.append(_final_stage_group(params).cpu())
    model.train(was_training)
    errors, baseline_errors, groups = torch.cat(errors), torch.cat(baseline_errors), torch.cat(groups)
    result = _scores(errors, baseline_errors)
    result["by_final_stage"] = {
        name: _scores(errors[groups == g], baseline_errors[groups == g])
        for g, name in enumerate(FINAL_STAGE_GROUPS)
        if bool((groups == g).any())
    }
    return result


def evaluate_on_held_out_photos(model, config: ExperimentConfig, crop_size: int | None = None) -> dict[str, Any]:
    """:func:`evaluate_degradation_estimator` with the settings of ``config`` (its ``estimator`` section, degradation,
    seed and ``data.gt_size`` crops unless ``crop_size`` is given) on the held-out bundled photos."""
    from .data import load_skimage_sklearn

    e = config.estimator
    result = evaluate_degradation_estimator(
        model,
        [img for _, img in load_skimage_sklearn("val")],
        build_estimator_degradation(config),
        num_samples=e.evaluation_samples,
        crop_size=crop_size or config.data.gt_size,
        seed=config.train.seed,
        batch_size=e.evaluation_batch_size,
    )
    result["photos"] = "held-out skimage_sklearn photos (chelsea, coffee, rocket, flower)"
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Task
# ----------------------------------------------------------------------------------------------------------------------


def _model_kwargs(config: ExperimentConfig) -> dict[str, Any]:
    from sr_diffusion.estimation import DegradationEstimator

    from .config import check_model_kwargs

    if config.model.arch != ARCH:
        raise ConfigError(f"model.arch: must be {ARCH!r} for the degradation estimator, got {config.model.arch!r}")
    kwargs = dict(config.model.kwargs)
    check_model_kwargs(DegradationEstimator, kwargs, ARCH)
    return kwargs


class DegradationEstimatorTask(TrainingTask):
    """The estimator objective for the shared :class:`~sr_diffusion.training.Trainer` (module docstring); the export
    is the estimator itself."""

    def __init__(self):
        self.degradation = None
        self.loss_fn = None

    def check_config(self, config: ExperimentConfig) -> None:
        _check_sections(config)
        _model_kwargs(config)
        self.degradation = build_estimator_degradation(config)
        self.loss_fn = build_loss(config.train.loss, config.train.charbonnier_eps)

    def build_model(self, config: ExperimentConfig) -> torch.nn.Module:
        """A fresh :class:`~sr_diffusion.estimation.DegradationEstimator`, its target statistics calibrated on the
        first ``estimator.calibration_samples`` training crops (unless ``model.target_mean`` / ``target_std`` are
        given)."""
        from sr_diffusion.estimation import DegradationEstimator

        kwargs = _model_kwargs(config)
        e = getattr(config, "estimator", None) or EstimatorConfig()
        if e.calibration_samples and not ({"target_mean", "target_std"} & set(kwargs)):
            dataset = build_train_dataset(config)
            crops = [dataset[p]["hr"] for p in range(e.calibration_samples)]
            mean, std = calibrate_targets(
                crops, self.degradation, make_generator(config.train.seed, _CALIBRATION), config.data.batch_size
            )
            logger.info("calibrated target mean %s, std %s on %d crops", mean, std, len(crops))
            kwargs.update(target_mean=mean, target_std=std)
        try:
            return DegradationEstimator(**kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model: {err}") from err

    def compute_loss(self, model, batch, generator) -> torch.Tensor:
        """Degrade ``batch["hr"]`` with ``generator`` (``batch["lr"]`` is not used), then the loss between predicted and
        target normalised quantities."""
        from sr_diffusion.estimation import degrade_with_targets

        lr, targets = degrade_with_targets(self.degradation, batch["hr"], generator)
        predicted = model(lr).normalized
        target = getattr(model, "module", model).normalize(targets)
        return self.loss_fn(predicted, target.to(predicted))

    def predict(self, model, lr, generator) -> torch.Tensor:
        raise NotImplementedError("the degradation estimator makes no SR images; train it with validation.source=none")

    def build_pipeline(self, model):
        return getattr(model, "module", model)
