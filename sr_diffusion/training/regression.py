"""Regression SR training (EDSR, RRDBNet, SwinIR, SRVGGNetCompact): ``sr = f(lr)``, a pixel loss against HR."""

from __future__ import annotations

import torch

from .config import ConfigError, ExperimentConfig, check_model_kwargs
from .losses import build_loss
from .trainer import TrainingTask

__all__ = ["RegressionTask", "build_regression_model"]

# The constructor argument that holds the scale factor, per architecture.
_SCALE_ARGS = ("upscale", "scale")


def _model_classes():
    from sr_diffusion.models import REGRESSION_MODELS

    return REGRESSION_MODELS


def _model_kwargs(config: ExperimentConfig) -> tuple[type, dict]:
    """The architecture class and its constructor arguments (checked; scale filled from ``scale``)."""
    classes = _model_classes()
    arch = config.model.arch
    if arch not in classes:
        raise ConfigError(f"model.arch: unknown regression architecture {arch!r}; choose from {', '.join(classes)}")
    cls = classes[arch]
    kwargs = dict(config.model.kwargs)
    valid = check_model_kwargs(cls, kwargs, arch)
    scale_arg = next((name for name in _SCALE_ARGS if name in valid), None)
    if scale_arg is None:
        raise ConfigError(f"model.arch: {arch!r} has no scale argument ({' or '.join(_SCALE_ARGS)})")
    if kwargs.setdefault(scale_arg, config.scale) != config.scale:
        raise ConfigError(f"model.{scale_arg}={kwargs[scale_arg]} differs from scale={config.scale}")
    return cls, kwargs


def build_regression_model(config: ExperimentConfig) -> torch.nn.Module:
    """``REGRESSION_MODELS[model.arch](**model.<kwargs>)``, checked against ``scale`` and ``data.gt_size``."""
    cls, kwargs = _model_kwargs(config)
    model = cls(**kwargs)
    lr_size = config.data.gt_size // config.scale
    if lr_size % int(model.input_multiple):
        raise ConfigError(
            f"data.gt_size: the LR crop ({lr_size} = gt_size / scale) must be a multiple of the model's "
            f"input_multiple ({model.input_multiple})"
        )
    return model


class RegressionTask(TrainingTask):
    """One forward pass, ``train.loss`` (l1/mse/charbonnier) between the SR output and the HR crop.
    Validation pads the LR image to the model's ``input_multiple`` and crops the output back; the export
    is a ``RegressionSRPipeline``."""

    supports_phase_bias = True

    def __init__(self):
        self.loss_fn = None

    def check_config(self, config: ExperimentConfig) -> None:
        _model_kwargs(config)
        self.loss_fn = build_loss(
            config.train.loss, config.train.charbonnier_eps, config.train.phase_bias_weight, config.scale
        )

    def build_model(self, config: ExperimentConfig) -> torch.nn.Module:
        return build_regression_model(config)

    def compute_loss(self, model, batch, generator) -> torch.Tensor:
        sr = model(batch["lr"], return_dict=False)[0]
        return self.loss_fn(sr.float(), batch["hr"].float())

    def predict(self, model, lr, generator) -> torch.Tensor:
        from sr_diffusion.image_processor import crop_to_size, pad_to_multiple

        padded, (h, w) = pad_to_multiple(lr, int(model.input_multiple))
        sr = model(padded, return_dict=False)[0]
        return crop_to_size(sr, (h * model.upscale, w * model.upscale))

    def build_pipeline(self, model):
        from sr_diffusion.pipelines import RegressionSRPipeline

        return RegressionSRPipeline(model=model)
