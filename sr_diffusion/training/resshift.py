"""ResShift training (Yue et al., NeurIPS 2023, Sec. 2.2; reference ``models/gaussian_diffusion.py``,
``training_losses``), in pixel space.

For an HR crop ``x_0`` and its LR image (both in [-1, 1]), with ``y_0`` the bicubic upsampling of the LR image:

1. ``t ~ U{0, ..., T-1}`` per sample, ``noise ~ N(0, I)``;
2. ``x_t = x_0 + eta_t (y_0 - x_0) + kappa sqrt(eta_t) noise`` (``scheduler.add_noise``, R2);
3. ``out = f_theta(scale_model_input(x_t, t), y_0, t)`` (the pipeline's own conditioning,
   :func:`~sr_diffusion.pipelines.resshift.pipeline_resshift.resshift_model_output`);
4. loss ``= || out - target ||^2`` with ``target = scheduler.get_training_target(x_0, noise, t, y_0)``: ``x_0`` for
   every released model (``prediction_type="sample"``); for ``"epsilon_scale"`` both sides are divided by
   ``kappa sqrt(eta_t)``, the reference's weighting of that target.

Every random draw (``t``, ``noise``) comes from the trainer's generators, one per sample (``t`` then its noise), so
a global batch trains the same however it is split across processes. The released models diffuse in the latent
space of a frozen VQ-f4 autoencoder; this task trains pixel-space models only (the pipeline runs both).

Config: the shared sections, plus ``scheduler`` (``preset``: a name of
:data:`~sr_diffusion.schedulers.RESSHIFT_PRESETS` or an alias, and any ``ResShiftScheduler`` argument, which
overrides the preset) and ``model.arch`` ``resshift_unet`` (:class:`~sr_diffusion.models.ResShiftUNet` kwargs;
``in/out_channels`` 3, ``lq_size = image_size``: in pixel space ``lq`` is ``y_0``) or ``unet2d`` (a diffusers
``UNet2DModel``; ``in_channels`` 6: ``x_t`` and ``y_0`` concatenated, ``out_channels`` 3, ``sample_size``
``data.gt_size``, and plain ``DownBlock2D``/``UpBlock2D`` levels matching ``block_out_channels`` unless the block
types are given) or ``unshuffle_unet`` (:class:`~sr_diffusion.models.PixelUnshuffleUNet`: a ``UNet2DModel`` on the
pixel-unshuffled ``x_t`` and ``y_0``, at 1/``unshuffle_factor`` of the HR size). ``train.loss`` defaults to
``mse``, the paper's.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from . import rng
from .config import ConfigError, ExperimentConfig, TrainConfig, check_model_kwargs
from .losses import build_loss
from .trainer import TrainingTask

__all__ = [
    "RESSHIFT_ARCHS",
    "ResShiftExperimentConfig",
    "ResShiftPipelineDefaults",
    "ResShiftSchedulerConfig",
    "ResShiftTask",
    "ResShiftTrainConfig",
    "build_resshift_model",
    "build_resshift_scheduler",
]

RESSHIFT_ARCHS = ("resshift_unet", "unet2d", "unshuffle_unet")


# ----------------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ResShiftSchedulerConfig:
    """``scheduler``: ``preset`` (optional) plus ``ResShiftScheduler`` arguments (``num_train_timesteps``, ``kappa``,
    ``min_noise_level``, ``input_scaling``, ``clip_sample``, ...), which override the preset's values."""

    _extra_field = "kwargs"

    preset: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ResShiftTrainConfig(TrainConfig):
    """``train`` with ResShift's defaults: MSE loss, ``outputs/resshift``."""

    output_dir: str = "outputs/resshift"
    loss: Literal["l1", "mse", "charbonnier"] = "mse"


@dataclass
class ResShiftPipelineDefaults:
    """``pipeline``: the call defaults registered in the exported ``ResShiftPipeline`` (``lr_consistency``;
    ``num_inference_steps``, None for all ``T`` trained steps). Validation samples with them too, so its numbers are
    those of the pipeline as shipped."""

    lr_consistency: bool = False
    num_inference_steps: int | None = None


@dataclass
class ResShiftExperimentConfig(ExperimentConfig):
    """:class:`ExperimentConfig` with ``scheduler`` and ``pipeline`` sections; ``model.arch`` is one of
    :data:`RESSHIFT_ARCHS`."""

    train: ResShiftTrainConfig = field(default_factory=ResShiftTrainConfig)
    scheduler: ResShiftSchedulerConfig = field(default_factory=ResShiftSchedulerConfig)
    pipeline: ResShiftPipelineDefaults = field(default_factory=ResShiftPipelineDefaults)

    def validate(self) -> None:
        super().validate()
        scheduler = build_resshift_scheduler(self)
        steps = self.pipeline.num_inference_steps
        if steps is not None and not 1 <= steps <= scheduler.config.num_train_timesteps:
            raise ConfigError(
                f"pipeline.num_inference_steps must be between 1 and scheduler.num_train_timesteps "
                f"({scheduler.config.num_train_timesteps}), got {steps}"
            )


def build_resshift_scheduler(config: ExperimentConfig):
    """The ``ResShiftScheduler`` of ``config.scheduler`` (defaults when the config has no such section)."""
    from sr_diffusion.schedulers import ResShiftScheduler

    section = getattr(config, "scheduler", None) or ResShiftSchedulerConfig()
    params = inspect.signature(ResShiftScheduler.__init__).parameters
    unknown = sorted(set(section.kwargs) - set(params) - {"self"})
    if unknown:
        valid = ", ".join(name for name in params if name != "self")
        raise ConfigError(
            f"unknown config key(s) {', '.join('scheduler.' + k for k in unknown)}; valid keys: preset, {valid}"
        )
    try:
        if section.preset is not None:
            return ResShiftScheduler.from_preset(section.preset, **section.kwargs)
        return ResShiftScheduler(**section.kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"scheduler: {err}") from err


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------


def _arch_class(arch: str) -> type:
    if arch == "resshift_unet":
        from sr_diffusion.models import ResShiftUNet

        return ResShiftUNet
    if arch == "unet2d":
        from diffusers import UNet2DModel

        return UNet2DModel
    if arch == "unshuffle_unet":
        from sr_diffusion.models import PixelUnshuffleUNet

        return PixelUnshuffleUNet
    raise ConfigError(f"model.arch: unknown ResShift denoiser {arch!r}; choose from {', '.join(RESSHIFT_ARCHS)}")


def _model_kwargs(config: ExperimentConfig) -> tuple[type, dict[str, Any]]:
    """The denoiser class and its constructor arguments, with the pixel-space channels filled in and checked."""
    cls = _arch_class(config.model.arch)
    kwargs = dict(config.model.kwargs)
    check_model_kwargs(cls, kwargs, config.model.arch)
    # pixel space: x_t has 3 channels; a UNet2DModel also gets y_0 concatenated
    fixed = {"in_channels": 3, "out_channels": 3}
    if config.model.arch == "unet2d":
        fixed["in_channels"] = 6
        kwargs.setdefault("sample_size", config.data.gt_size)
        if "block_out_channels" in kwargs:  # plain (attention-free) blocks, one per level, unless given
            levels = len(kwargs["block_out_channels"])
            kwargs.setdefault("down_block_types", ["DownBlock2D"] * levels)
            kwargs.setdefault("up_block_types", ["UpBlock2D"] * levels)
    elif config.model.arch == "unshuffle_unet":
        kwargs.setdefault("sample_size", config.data.gt_size)
        fixed["lq_channels"] = 3
    else:
        default_size = inspect.signature(cls.__init__).parameters["image_size"].default
        kwargs.setdefault("lq_size", kwargs.get("image_size", default_size))
        if kwargs.get("cond_mask"):
            raise ConfigError("model.cond_mask: ResShift SR training takes no inpainting mask")
    for key, value in fixed.items():
        if kwargs.setdefault(key, value) != value:
            raise ConfigError(f"model.{key} must be {value} for a pixel-space {config.model.arch}, got {kwargs[key]}")
    return cls, kwargs


def build_resshift_model(config: ExperimentConfig) -> torch.nn.Module:
    """The denoiser of ``config.model``, checked against ``data.gt_size`` (the chain runs at the HR crop size)."""
    cls, kwargs = _model_kwargs(config)
    try:
        model = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model: {err}") from err
    if config.model.arch == "unet2d":
        multiple = 2 ** (len(model.config.block_out_channels) - 1)
    else:
        multiple = int(model.input_multiple)
    if config.data.gt_size % multiple:
        raise ConfigError(
            f"data.gt_size ({config.data.gt_size}) must be a multiple of the denoiser's input multiple ({multiple})"
        )
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Task
# ----------------------------------------------------------------------------------------------------------------------


class ResShiftTask(TrainingTask):
    """The ResShift objective for the shared :class:`~sr_diffusion.training.Trainer`; validation and export run the
    :class:`~sr_diffusion.pipelines.ResShiftPipeline` (all ``T`` steps).

    Args:
        scheduler: a ``ResShiftScheduler`` to train with; by default built from the config's ``scheduler`` section.
    """

    supports_phase_bias = True
    per_sample_generators = True

    def __init__(self, scheduler=None):
        self.scheduler = scheduler
        self.loss_fn = None
        self.scale: int | None = None
        self.pipeline_defaults = ResShiftPipelineDefaults()

    def check_config(self, config: ExperimentConfig) -> None:
        _model_kwargs(config)
        if self.scheduler is None:
            self.scheduler = build_resshift_scheduler(config)
        self.loss_fn = build_loss(
            config.train.loss, config.train.charbonnier_eps, config.train.phase_bias_weight, config.scale
        )
        self.scale = config.scale
        self.pipeline_defaults = getattr(config, "pipeline", None) or ResShiftPipelineDefaults()

    def build_model(self, config: ExperimentConfig) -> torch.nn.Module:
        return build_resshift_model(config)

    def compute_loss(self, model, batch, generator) -> torch.Tensor:
        """The loss of steps 1-4 of the module docstring for a batch ``{"lr": (B,3,h,w), "hr": (B,3,s·h,s·w)}``."""
        from sr_diffusion.pipelines.resshift.pipeline_resshift import (
            resshift_lq,
            resshift_model_output,
            upsample_lr,
        )

        scheduler = self.scheduler
        x0 = batch["hr"].float() * 2.0 - 1.0
        lr = batch["lr"].float() * 2.0 - 1.0
        y0 = upsample_lr(lr, self.scale)
        if y0.shape != x0.shape:
            raise ValueError(f"HR {tuple(x0.shape)} is not scale={self.scale} x LR {tuple(lr.shape)}")
        n = x0.shape[0]

        # 1. t ~ U{0..T-1}, noise ~ N(0, I)
        t = rng.randint(0, scheduler.config.num_train_timesteps, n, generator, device=x0.device)
        noise = rng.randn(x0.shape, generator, device=x0.device, dtype=x0.dtype)

        # 2. x_t ~ q(x_t | x_0, y_0); 3. the denoiser's output
        x_t = scheduler.add_noise(x0, noise, t, y0)
        lq = resshift_lq(_unwrap(model), lr, tuple(x0.shape[-2:]))
        output = resshift_model_output(
            model, scaled_sample=scheduler.scale_model_input(x_t, t), timestep=t, lr_latents=y0, lq=lq
        ).float()

        # 4. regression on the target
        target = scheduler.get_training_target(x0, noise, t, y0)
        if scheduler.config.prediction_type == "epsilon_scale":
            std = (scheduler.config.kappa * scheduler.sqrt_etas[t.cpu()]).to(x0).view(-1, 1, 1, 1)
            output, target = output / std, target / std
        return self.loss_fn(output, target)

    def predict(self, model, lr, generator) -> torch.Tensor:
        pipe = self.build_pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        return pipe(lr.clamp(0, 1), generator=generator, output_type="pt").images

    def build_pipeline(self, model):
        from sr_diffusion.pipelines import ResShiftPipeline
        from sr_diffusion.schedulers import ResShiftScheduler

        scheduler = ResShiftScheduler.from_config(self.scheduler.config)  # a copy: sampling sets its timesteps
        defaults = self.pipeline_defaults
        return ResShiftPipeline(
            unet=model,
            scheduler=scheduler,
            upscale=self.scale,
            lr_consistency=defaults.lr_consistency,
            num_inference_steps=defaults.num_inference_steps,
        )


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (type and config checks need it; the forward does not)."""
    return getattr(model, "module", model)
