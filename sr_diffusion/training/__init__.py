"""Training plumbing shared by every method's script (imported by scripts and tests only).

``config`` (YAML + dotted overrides → dataclasses), ``data`` (deterministic datasets and sampler),
``losses``, ``optim``, ``ema``, ``checkpointing`` (atomic, pruned checkpoints), ``validation``
(PSNR/SSIM vs bicubic), ``rng`` (a task's random draws, one generator per sample), ``trainer`` (the
accelerate loop with exact resume and data parallelism) and ``regression`` (the regression-SR task).
A method's script is::

    config = parse_args(description="...")
    Trainer(config, MyTask()).train()

and any method registered in :mod:`sr_diffusion.registry` (with its task and config class) trains without a script
of its own: ``python -m sr_diffusion.training --method NAME --config FILE [section.key=value ...]``.
"""

from .checkpointing import CheckpointManager
from .config import (
    ConfigError,
    DataConfig,
    DegradationConfig,
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    ValidationConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_args,
    save_config,
)
from .dape import DAPEExperimentConfig, DAPETask
from .data import SRTrainDataset, StepBatchSampler, build_train_dataset, build_validation_set
from .degradation_estimator import DegradationEstimatorExperimentConfig, DegradationEstimatorTask
from .ema import create_ema
from .losses import CharbonnierLoss, build_loss
from .regression import RegressionTask, build_regression_model
from .resshift import ResShiftExperimentConfig, ResShiftTask
from .sr3 import SR3ExperimentConfig, SR3Task
from .srdiff import SRDiffExperimentConfig, SRDiffTask
from .trainer import Trainer, TrainingTask, TrainResult

__all__ = [
    "CheckpointManager",
    "ConfigError",
    "DataConfig",
    "DegradationConfig",
    "ExperimentConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "ValidationConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_args",
    "save_config",
    "DAPEExperimentConfig",
    "DAPETask",
    "DegradationEstimatorExperimentConfig",
    "DegradationEstimatorTask",
    "SRTrainDataset",
    "StepBatchSampler",
    "build_train_dataset",
    "build_validation_set",
    "create_ema",
    "CharbonnierLoss",
    "build_loss",
    "RegressionTask",
    "build_regression_model",
    "ResShiftExperimentConfig",
    "ResShiftTask",
    "SR3ExperimentConfig",
    "SR3Task",
    "SRDiffExperimentConfig",
    "SRDiffTask",
    "Trainer",
    "TrainingTask",
    "TrainResult",
]
