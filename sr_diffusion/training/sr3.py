"""SR3 training (Saharia et al., TPAMI 2022, Sec. 2.3-2.4, Eq. 6; the re-implementation's ``p_losses``).

For an HR crop ``y_0`` and its LR image (both in [-1, 1]), with ``x`` the bicubic upsampling of the LR image (PIL's,
on the 8-bit image: the re-implementation's dataset reads the condition from PNGs that ``data/prepare_data.py`` made
with ``Image.BICUBIC``; :func:`~sr_diffusion.pipelines.sr3.pipeline_sr3.sr3_upsample`, as the pipeline) and
``alpha_bar`` the ``DDPMScheduler``'s cumulative product (``alpha_bar_{-1} = 1``):

1. ``t ~ U{0, ..., T-1}`` per sample;
2. ``gamma ~ U(sqrt(alpha_bar_t), sqrt(alpha_bar_{t-1}))``: a continuous noise level between the neighbouring
   steps' values (Sec. 2.4), so that the model learns every level and can be sampled with any schedule;
3. ``eps ~ N(0, I)``, ``y_t = gamma y_0 + sqrt(1 - gamma^2) eps`` (Eq. 4);
4. loss ``= || eps_theta(cat([x, y_t]), c · gamma) - eps ||_p`` with ``c`` the pipeline's ``noise_level_scale``
   (:func:`~sr_diffusion.pipelines.sr3.pipeline_sr3.sr3_model_output`, the pipeline's own conditioning) and
   ``p`` from ``train.loss``: ``l1`` (the default, as the re-implementation; it sums, we average) or ``mse``
   (the paper's ``p in {1, 2}``).

Every random draw (``t``, then ``gamma``'s uniform, then ``eps``) comes from the trainer's generators, one per sample.

Config: the shared sections, plus ``scheduler`` (``DDPMScheduler`` arguments: ``num_train_timesteps``,
``beta_schedule``, ``beta_start``, ``beta_end``, ...) and ``sr3`` (:class:`SR3Config`: ``noise_level_scale``, and the
sampler validation and the exported pipeline use). ``model.arch`` is ``unet2d``: a diffusers ``UNet2DModel`` with
``in_channels`` 6 (``x`` and ``y_t``), ``out_channels`` 3, ``sample_size`` ``data.gt_size`` and plain
``DownBlock2D``/``UpBlock2D`` levels matching ``block_out_channels`` unless the block types are given; or
``sr3unet``: the re-implementation's UNet (:class:`~sr_diffusion.models.sr3_unet.SR3UNet`, its keyword arguments,
``in_channel`` 6, ``out_channel`` 3, ``image_size`` ``data.gt_size``); the re-implementation trains it on the raw
noise level, ``sr3.noise_level_scale=1``.
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
    "SR3_ARCHS",
    "SR3Config",
    "SR3ExperimentConfig",
    "SR3SchedulerConfig",
    "SR3Task",
    "SR3TrainConfig",
    "build_sr3_model",
    "build_sr3_scheduler",
]

SR3_ARCHS = ("unet2d", "sr3unet")


# ----------------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class SR3SchedulerConfig:
    """``scheduler``: ``DDPMScheduler`` arguments (the training noise schedule; ``prediction_type`` stays
    ``epsilon``)."""

    _extra_field = "kwargs"

    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class SR3Config:
    """``sr3``: the noise-level scaling ``c`` and how validation and the exported pipeline sample.

    ``sampler``: ``ddpm`` (the paper's) or ``ddim`` (built from the same schedule); ``num_inference_steps``: None
    for all ``num_train_timesteps``; ``strength``: the pipeline's (1: start from pure noise)."""

    noise_level_scale: float = 1000.0
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    num_inference_steps: int | None = None
    strength: float = 1.0


@dataclass
class SR3TrainConfig(TrainConfig):
    """``train`` with SR3's defaults: L1 loss (as the re-implementation), ``outputs/sr3``."""

    output_dir: str = "outputs/sr3"
    loss: Literal["l1", "mse", "charbonnier"] = "l1"


@dataclass
class SR3ExperimentConfig(ExperimentConfig):
    """:class:`ExperimentConfig` with ``scheduler`` and ``sr3`` sections; ``model.arch``: ``unet2d`` or ``sr3unet``."""

    train: SR3TrainConfig = field(default_factory=SR3TrainConfig)
    scheduler: SR3SchedulerConfig = field(default_factory=SR3SchedulerConfig)
    sr3: SR3Config = field(default_factory=SR3Config)

    def validate(self) -> None:
        super().validate()
        scheduler = build_sr3_scheduler(self)
        s = self.sr3
        if not s.noise_level_scale > 0:
            raise ConfigError(f"sr3.noise_level_scale: must be > 0, got {s.noise_level_scale}")
        num_train = scheduler.config.num_train_timesteps
        if s.num_inference_steps is not None and not 1 <= s.num_inference_steps <= num_train:
            raise ConfigError(
                f"sr3.num_inference_steps: must be in [1, scheduler.num_train_timesteps={num_train}], got "
                f"{s.num_inference_steps}"
            )
        if not 0 < s.strength <= 1:
            raise ConfigError(f"sr3.strength: must be in (0, 1], got {s.strength}")


def build_sr3_scheduler(config: ExperimentConfig):
    """The training ``DDPMScheduler`` of ``config.scheduler`` (diffusers' defaults when the config has none)."""
    from diffusers import DDPMScheduler

    section = getattr(config, "scheduler", None) or SR3SchedulerConfig()
    params = inspect.signature(DDPMScheduler.__init__).parameters
    unknown = sorted(set(section.kwargs) - set(params) - {"self"})
    if unknown:
        valid = ", ".join(name for name in params if name != "self")
        raise ConfigError(f"unknown config key(s) {', '.join('scheduler.' + k for k in unknown)}; valid keys: {valid}")
    if section.kwargs.get("prediction_type", "epsilon") != "epsilon":
        raise ConfigError("scheduler.prediction_type: SR3 predicts the noise, must be 'epsilon'")
    try:
        return DDPMScheduler(**section.kwargs)
    except (TypeError, ValueError, NotImplementedError) as err:
        raise ConfigError(f"scheduler: {err}") from err


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------


def _model_kwargs(config: ExperimentConfig) -> dict[str, Any]:
    """The ``UNet2DModel`` (or ``SR3UNet``) constructor arguments, with SR3's channels filled in and checked."""
    from diffusers import UNet2DModel

    if config.model.arch not in SR3_ARCHS:
        raise ConfigError(f"model.arch: unknown SR3 denoiser {config.model.arch!r}; choose from {', '.join(SR3_ARCHS)}")
    kwargs = dict(config.model.kwargs)
    if config.model.arch == "sr3unet":
        from sr_diffusion.models.sr3_unet import SR3UNet

        check_model_kwargs(SR3UNet, kwargs, config.model.arch)
        kwargs.setdefault("image_size", config.data.gt_size)
        for key, value in {"in_channel": 6, "out_channel": 3}.items():
            if kwargs.setdefault(key, value) != value:
                raise ConfigError(
                    f"model.{key} must be {value} for SR3 (x and y_t concatenated; eps out), got {kwargs[key]}"
                )
        return kwargs
    check_model_kwargs(UNet2DModel, kwargs, config.model.arch)
    kwargs.setdefault("sample_size", config.data.gt_size)
    if "block_out_channels" in kwargs:  # plain (attention-free) blocks, one per level, unless given
        levels = len(kwargs["block_out_channels"])
        kwargs.setdefault("down_block_types", ["DownBlock2D"] * levels)
        kwargs.setdefault("up_block_types", ["UpBlock2D"] * levels)
    for key, value in {"in_channels": 6, "out_channels": 3}.items():
        if kwargs.setdefault(key, value) != value:
            raise ConfigError(
                f"model.{key} must be {value} for SR3 (x and y_t concatenated; eps out), got {kwargs[key]}"
            )
    return kwargs


def build_sr3_model(config: ExperimentConfig) -> torch.nn.Module:
    """The ``UNet2DModel`` (or ``SR3UNet``) of ``config.model``, checked against ``data.gt_size``."""
    from diffusers import UNet2DModel

    from sr_diffusion.models.sr3_unet import SR3UNet

    kwargs = _model_kwargs(config)
    try:
        model = SR3UNet(**kwargs) if config.model.arch == "sr3unet" else UNet2DModel(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model: {err}") from err
    if isinstance(model, SR3UNet):
        multiple = model.input_multiple
    else:
        multiple = 2 ** (len(model.config.block_out_channels) - 1)
    if config.data.gt_size % multiple:
        raise ConfigError(
            f"data.gt_size ({config.data.gt_size}) must be a multiple of the UNet's input multiple ({multiple})"
        )
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Task
# ----------------------------------------------------------------------------------------------------------------------


class SR3Task(TrainingTask):
    """The SR3 objective for the shared :class:`~sr_diffusion.training.Trainer`; validation and export run the
    :class:`~sr_diffusion.pipelines.SR3Pipeline` with the ``sr3`` section's sampler.

    Args:
        scheduler: a ``DDPMScheduler`` to train with; by default built from the config's ``scheduler`` section.
    """

    per_sample_generators = True

    def __init__(self, scheduler=None):
        self.scheduler = scheduler
        self.loss_fn = None
        self.scale: int | None = None
        self.sr3 = SR3Config()

    def check_config(self, config: ExperimentConfig) -> None:
        _model_kwargs(config)
        if self.scheduler is None:
            self.scheduler = build_sr3_scheduler(config)
        self.loss_fn = build_loss(config.train.loss, config.train.charbonnier_eps)
        self.scale = config.scale
        self.sr3 = getattr(config, "sr3", None) or SR3Config()

    def build_model(self, config: ExperimentConfig) -> torch.nn.Module:
        return build_sr3_model(config)

    def compute_loss(self, model, batch, generator) -> torch.Tensor:
        """The loss of steps 1-4 of the module docstring for a batch ``{"lr": (B,3,h,w), "hr": (B,3,s·h,s·w)}``."""
        from sr_diffusion.pipelines.sr3.pipeline_sr3 import sr3_model_output, sr3_upsample

        y0 = batch["hr"].float() * 2.0 - 1.0
        lr = batch["lr"].float() * 2.0 - 1.0
        x = sr3_upsample(lr, self.scale)
        if x.shape != y0.shape:
            raise ValueError(f"HR {tuple(y0.shape)} is not scale={self.scale} x LR {tuple(lr.shape)}")
        n, device = y0.shape[0], y0.device
        alphas_cumprod = self.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        sqrt_ab = alphas_cumprod.sqrt()
        sqrt_ab_prev = torch.cat([torch.ones(1, device=device), sqrt_ab[:-1]])

        # 1. t ~ U{0..T-1}; 2. gamma ~ U(sqrt(alpha_bar_t), sqrt(alpha_bar_{t-1}))
        t = rng.randint(0, len(alphas_cumprod), n, generator, device=device)
        u = rng.rand(n, generator, device=device)
        gamma = sqrt_ab[t] + u * (sqrt_ab_prev[t] - sqrt_ab[t])

        # 3. y_t = gamma y_0 + sqrt(1 - gamma^2) eps
        noise = rng.randn(y0.shape, generator, device=device, dtype=y0.dtype)
        g = gamma.view(-1, 1, 1, 1)
        y_t = g * y0 + (1.0 - g**2).clamp(min=0).sqrt() * noise

        # 4. regress the noise
        eps = sr3_model_output(
            model, sample=y_t, upsampled_lr=x, noise_level=gamma, noise_level_scale=self.sr3.noise_level_scale
        ).float()
        return self.loss_fn(eps, noise)

    def _num_inference_steps(self) -> int:
        return self.sr3.num_inference_steps or int(self.scheduler.config.num_train_timesteps)

    def predict(self, model, lr, generator) -> torch.Tensor:
        pipe = self.build_pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            lr.clamp(0, 1),
            num_inference_steps=self._num_inference_steps(),
            strength=self.sr3.strength,
            generator=generator,
            output_type="pt",
        ).images

    def build_pipeline(self, model):
        from diffusers import DDIMScheduler, DDPMScheduler

        from sr_diffusion.pipelines import SR3Pipeline

        cls = DDIMScheduler if self.sr3.sampler == "ddim" else DDPMScheduler
        scheduler = cls.from_config(self.scheduler.config)  # a copy: sampling sets its timesteps
        return SR3Pipeline(
            unet=getattr(model, "module", model),
            scheduler=scheduler,
            upscale=self.scale,
            noise_level_scale=float(self.sr3.noise_level_scale),
        )
