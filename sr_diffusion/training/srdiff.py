"""SRDiff training (Li et al., Neurocomputing 2022, Sec. 3; the authors' ``GaussianDiffusion.forward`` / ``p_losses``).

For an HR crop ``x_H`` and its LR image ``x_L`` (both in [-1, 1]), with ``up(x_L)`` the MATLAB-bicubic upsampling and
``alpha_bar`` the cumulative product of SRDiff's schedule (cosine, ``T = 100`` by default):

1. the condition: ``x_e = D(x_L)``, the RRDB encoder's ``num_block + 1`` hidden feature maps; the encoder is
   pre-trained as a regression model and frozen (``srdiff.fix_rrdb: true``, the paper's default: run without
   gradients), or trained jointly (``fix_rrdb: false``, then with the original's auxiliary loss
   ``|| clip(D_out(x_L), 0, 1) - x_H ||_1`` in [-1, 1] when ``aux_l1_loss``);
2. the residual ``x_0 = clip((x_H - up(x_L)) · res_rescale, -1, 1)`` (``img2res``; ``res_rescale`` 2);
3. ``t ~ U{0, ..., T-1}``, ``eps ~ N(0, I)``, ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``;
4. loss ``= || eps_theta(x_t, t, x_e) - eps ||`` with ``train.loss`` (``l1``, the original's ``loss_type`` default;
   ``mse`` its ``l2``), plus the auxiliary loss of step 1.

Every random draw (``t``, then ``eps``) comes from the trainer's generators, one per sample. The conditioning helpers
are the pipeline's own (:mod:`sr_diffusion.pipelines.srdiff.pipeline_srdiff`), so training and sampling see the same
inputs.

The trainable model is :class:`SRDiffModel`: the original ``GaussianDiffusion``'s two networks, ``denoise_fn`` (an
:class:`~sr_diffusion.models.SRDiffUNet`) and ``rrdb`` (an :class:`~sr_diffusion.models.RRDBNet`); the exported
pipeline holds them as ``unet`` and ``rrdb``.

Config: the shared sections, plus ``srdiff`` (:class:`SRDiffConfig`: the schedule, the residual, where the pre-trained
encoder comes from, and the sampler validation and the exported pipeline use). ``model.arch`` is ``srdiff_unet``,
with :class:`~sr_diffusion.models.SRDiffUNet`'s keyword arguments (``dim``, ``dim_mults``, ``use_attn``,
``up_input``, ...); ``sr_scale`` is the top-level ``scale``, ``cond_dim`` / ``rrdb_num_block`` are the encoder's.

The encoder (``srdiff.rrdb_path``): a pipeline folder written by ``training/train_regression.py`` with an ``rrdbnet``
model (its ``model/``), an SRDiff pipeline folder (its ``rrdb/``), an RRDBNet model folder, or an RRDBNet checkpoint
file in any layout :func:`sr_diffusion.checkpoints.load_regression_model` reads (BasicSR, ESRGAN, or the original
SRDiff ``tasks/rrdb.py`` checkpoints). Without one, a fresh ``RRDBNet(num_feat=cond_dim, num_block=rrdb_num_block,
num_grow_ch=cond_dim // 2)`` (the original's widths) is trained jointly; ``fix_rrdb`` must then be false.

One difference from the original code: its optimizer leaves out the ``rrdb`` parameters exactly when ``fix_rrdb`` is
false (``tasks/srdiff.py``, ``build_optimizer``), so its encoder never changes either way; here ``fix_rrdb: false``
does train it.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from . import rng
from .config import ConfigError, ExperimentConfig, TrainConfig, check_model_kwargs
from .losses import build_loss
from .trainer import TrainingTask

__all__ = [
    "SRDIFF_ARCHS",
    "SRDiffConfig",
    "SRDiffExperimentConfig",
    "SRDiffModel",
    "SRDiffTask",
    "SRDiffTrainConfig",
    "build_srdiff_scheduler",
    "load_srdiff_rrdb",
]

SRDIFF_ARCHS = ("srdiff_unet",)


# ----------------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class SRDiffConfig:
    """``srdiff``: SRDiff's settings (the original's hparams names where it has one).

    ``timesteps``, ``beta_schedule`` (``cosine`` with ``beta_s``; or ``linear`` to ``beta_end``): the noise schedule.
    ``res_rescale``, ``clip_input``: the residual ``x_0 = clip((x_H - up(x_L)) · res_rescale)``. ``rrdb_path``: the
    pre-trained encoder (see the module docstring); ``fix_rrdb``: keep it frozen; ``aux_l1_loss``: the auxiliary L1
    loss of a jointly trained encoder. ``sampler``: ``ddpm`` (the original's, all ``timesteps``) or ``ddim``, with
    ``num_inference_steps`` (None: all) and ``eta``, for validation and the exported pipeline's scheduler.
    """

    timesteps: int = 100
    beta_schedule: Literal["cosine", "linear"] = "cosine"
    beta_s: float = 0.008
    beta_end: float = 0.02
    res_rescale: float = 2.0
    clip_input: bool = True
    rrdb_path: str | None = None
    fix_rrdb: bool = True
    aux_l1_loss: bool = True
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    num_inference_steps: int | None = None
    eta: float = 0.0


@dataclass
class SRDiffTrainConfig(TrainConfig):
    """``train`` with SRDiff's defaults: L1 loss (the original's ``loss_type``), ``outputs/srdiff``."""

    output_dir: str = "outputs/srdiff"
    loss: Literal["l1", "mse", "charbonnier"] = "l1"


@dataclass
class SRDiffExperimentConfig(ExperimentConfig):
    """:class:`ExperimentConfig` with an ``srdiff`` section; ``model.arch`` is ``srdiff_unet``."""

    train: SRDiffTrainConfig = field(default_factory=SRDiffTrainConfig)
    srdiff: SRDiffConfig = field(default_factory=SRDiffConfig)

    def validate(self) -> None:
        super().validate()
        s = self.srdiff
        if s.timesteps < 1:
            raise ConfigError(f"srdiff.timesteps: must be >= 1, got {s.timesteps}")
        if not 0 <= s.beta_s < 1:
            raise ConfigError(f"srdiff.beta_s: must be in [0, 1), got {s.beta_s}")
        if not 1e-4 < s.beta_end < 1:
            raise ConfigError(f"srdiff.beta_end: must be in (1e-4, 1), got {s.beta_end}")
        if not s.res_rescale > 0:
            raise ConfigError(f"srdiff.res_rescale: must be > 0, got {s.res_rescale}")
        if s.num_inference_steps is not None and not 1 <= s.num_inference_steps <= s.timesteps:
            raise ConfigError(
                f"srdiff.num_inference_steps: must be in [1, srdiff.timesteps={s.timesteps}], got "
                f"{s.num_inference_steps}"
            )
        if s.eta < 0:
            raise ConfigError(f"srdiff.eta: must be >= 0, got {s.eta}")
        if s.fix_rrdb and s.rrdb_path is None:
            raise ConfigError(
                "srdiff.fix_rrdb: a frozen encoder needs srdiff.rrdb_path (a pre-trained RRDBNet: run "
                "training/train_regression.py with an rrdbnet config first); or set srdiff.fix_rrdb=false to train "
                "it jointly"
            )


def build_srdiff_scheduler(config: ExperimentConfig):
    """The training ``DDPMScheduler`` of ``config.srdiff`` (:func:`~sr_diffusion.pipelines.srdiff.pipeline_srdiff.
    srdiff_scheduler`: the original's schedule and sampler)."""
    from sr_diffusion.pipelines.srdiff.pipeline_srdiff import srdiff_scheduler

    s = getattr(config, "srdiff", None) or SRDiffConfig()
    return srdiff_scheduler(s.timesteps, s.beta_schedule, s.beta_s, s.beta_end)


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------


class SRDiffModel(ModelMixin, ConfigMixin):
    """The trainable pair of the original ``GaussianDiffusion``: ``denoise_fn`` (``SRDiffUNet(**unet_config)``) and
    ``rrdb`` (``RRDBNet(**rrdb_config)``, without gradients when ``fix_rrdb``)."""

    @register_to_config
    def __init__(
        self,
        unet_config: dict[str, Any] | None = None,
        rrdb_config: dict[str, Any] | None = None,
        fix_rrdb: bool = True,
    ):
        from sr_diffusion.models.rrdbnet import RRDBNet
        from sr_diffusion.models.srdiff_unet import SRDiffUNet

        super().__init__()
        self.denoise_fn = SRDiffUNet(**(unet_config or {}))
        self.rrdb = RRDBNet(**(rrdb_config or {}))
        if fix_rrdb:
            self.rrdb.requires_grad_(False)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, lr: torch.Tensor, img_lr_up: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(eps_theta(x_t, t, D(x_L)), D_out(x_L))``: the predicted noise ``(N, 3, H, W)`` and the encoder's own SR
        output ``(N, 3, H, W)`` in [0, 1], for ``x_t`` ``(N, 3, H, W)``, ``t`` ``(N,)``, the LR image ``(N, 3, h, w)``
        and ``up(x_L)`` in [-1, 1]. One forward, so that a ``DistributedDataParallel`` wrapper sees every gradient."""
        lr01 = (lr.to(self.rrdb.dtype) + 1.0) / 2.0
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.fix_rrdb):
            rrdb_out, features = self.rrdb(lr01, output_hidden_states=True, return_dict=False)
        eps = self.denoise_fn(sample, timestep, features, img_lr_up, return_dict=False)[0]
        return eps, rrdb_out


def load_srdiff_rrdb(path: str | Path, scale: int | None = None):
    """The pre-trained RRDBNet encoder at ``path`` (see the module docstring for the forms accepted), checked to work
    at the LR resolution (×4 or ×8) and, when given, at ``scale``.

    Raises:
        ConfigError: the path does not exist, holds something else, or the RRDBNet does not fit.
    """
    from sr_diffusion.checkpoints import CheckpointError, load_regression_model
    from sr_diffusion.models.rrdbnet import RRDBNet

    path = Path(path)
    key = "srdiff.rrdb_path"
    if path.is_dir():
        index = path / "model_index.json"
        if index.is_file():
            components = json.loads(index.read_text())
            names = [k for k, v in components.items() if isinstance(v, list) and len(v) == 2 and v[1] == "RRDBNet"]
            if not names:
                found = {k: v[1] for k, v in components.items() if isinstance(v, list) and len(v) == 2}
                raise ConfigError(f"{key}: the pipeline at {path} holds no RRDBNet (its components: {found})")
            folder = path / names[0]
        elif (path / "config.json").is_file():
            folder = path
        else:
            raise ConfigError(f"{key}: {path} is neither a pipeline folder nor a model folder")
        try:
            rrdb = RRDBNet.from_pretrained(folder)
        except (OSError, ValueError, TypeError) as err:
            raise ConfigError(f"{key}: cannot load an RRDBNet from {folder}: {err}") from err
    elif path.is_file():
        try:
            rrdb = load_regression_model(path, arch="rrdbnet")
        except (CheckpointError, ValueError) as err:
            raise ConfigError(f"{key}: {err}") from err
    else:
        raise ConfigError(
            f"{key}: {path} does not exist (train the encoder first: training/train_regression.py with an rrdbnet "
            "config, e.g. configs/srdiff_rrdb_tiny.yaml)"
        )
    if rrdb.input_multiple != 1:
        raise ConfigError(f"{key}: an RRDBNet x{rrdb.upscale} pixel-unshuffles its input; SRDiff needs x4 or x8")
    if scale is not None and rrdb.upscale != scale:
        raise ConfigError(f"{key}: the RRDBNet is x{rrdb.upscale}, but scale={scale}")
    return rrdb.eval()


def _unet_kwargs(config: ExperimentConfig, rrdb=None) -> dict[str, Any]:
    """The ``SRDiffUNet`` arguments: ``model.*``, ``sr_scale`` from ``scale``, the encoder's widths; checked."""
    from sr_diffusion.models.srdiff_unet import SRDiffUNet

    if config.model.arch not in SRDIFF_ARCHS:
        raise ConfigError(
            f"model.arch: unknown SRDiff denoiser {config.model.arch!r}; choose from {', '.join(SRDIFF_ARCHS)}"
        )
    kwargs = dict(config.model.kwargs)
    check_model_kwargs(SRDiffUNet, kwargs, config.model.arch)
    fixed = {"sr_scale": config.scale, "out_dim": 3}
    if rrdb is not None:
        fixed.update(cond_dim=int(rrdb.config.num_feat), rrdb_num_block=int(rrdb.config.num_block))
    for key, value in fixed.items():
        if kwargs.setdefault(key, value) != value:
            source = "the encoder at srdiff.rrdb_path" if key in ("cond_dim", "rrdb_num_block") else "SRDiff"
            raise ConfigError(f"model.{key}={kwargs[key]} does not fit {source}, which needs {value}")
    return kwargs


def _rrdb_kwargs(unet_kwargs: dict[str, Any], scale: int, rrdb=None) -> dict[str, Any]:
    if rrdb is not None:  # its constructor arguments, without diffusers' bookkeeping (_name_or_path, ...)
        return {key: value for key, value in rrdb.config.items() if not key.startswith("_")}
    from sr_diffusion.models.srdiff_unet import SRDiffUNet

    defaults = inspect.signature(SRDiffUNet.__init__).parameters
    width = int(unet_kwargs.get("cond_dim", defaults["cond_dim"].default))
    blocks = int(unet_kwargs.get("rrdb_num_block", defaults["rrdb_num_block"].default))
    return {
        "num_in_ch": 3,
        "num_out_ch": 3,
        "scale": scale,
        "num_feat": width,
        "num_block": blocks,
        "num_grow_ch": max(1, width // 2),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Task
# ----------------------------------------------------------------------------------------------------------------------


class SRDiffTask(TrainingTask):
    """The SRDiff objective for the shared :class:`~sr_diffusion.training.Trainer`; validation and export run the
    :class:`~sr_diffusion.pipelines.SRDiffPipeline` with the ``srdiff`` section's sampler.

    Args:
        scheduler: a ``DDPMScheduler`` to train with; by default built from the ``srdiff`` section.
    """

    per_sample_generators = True

    def __init__(self, scheduler=None):
        self.scheduler = scheduler
        self.loss_fn = None
        self.scale: int | None = None
        self.srdiff = SRDiffConfig()
        self._rrdb = None  # the pre-trained encoder, loaded once

    def check_config(self, config: ExperimentConfig) -> None:
        self.srdiff = getattr(config, "srdiff", None) or SRDiffConfig()
        self.scale = config.scale
        if self.srdiff.rrdb_path is not None:
            self._rrdb = load_srdiff_rrdb(self.srdiff.rrdb_path, config.scale)
        unet_kwargs = _unet_kwargs(config, self._rrdb)
        multiple = 2 ** (len(unet_kwargs.get("dim_mults", (1, 2, 2, 4))) - 1)
        if config.data.gt_size % multiple:
            raise ConfigError(
                f"data.gt_size ({config.data.gt_size}) must be a multiple of the UNet's input multiple ({multiple})"
            )
        if self.scheduler is None:
            self.scheduler = build_srdiff_scheduler(config)
        self.loss_fn = build_loss(config.train.loss, config.train.charbonnier_eps)

    def build_model(self, config: ExperimentConfig) -> torch.nn.Module:
        unet_kwargs = _unet_kwargs(config, self._rrdb)
        try:
            model = SRDiffModel(
                unet_config=unet_kwargs,
                rrdb_config=_rrdb_kwargs(unet_kwargs, config.scale, self._rrdb),
                fix_rrdb=self.srdiff.fix_rrdb,
            )
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model: {err}") from err
        if self._rrdb is not None:
            model.rrdb.load_state_dict(self._rrdb.state_dict())
        return model

    def compute_loss(self, model, batch, generator) -> torch.Tensor:
        """The loss of steps 1-4 of the module docstring for a batch ``{"lr": (B,3,h,w), "hr": (B,3,s·h,s·w)}``."""
        import torch.nn.functional as F

        from sr_diffusion.pipelines.srdiff.pipeline_srdiff import srdiff_img2res, srdiff_upsample

        s = self.srdiff
        hr = batch["hr"].float() * 2.0 - 1.0
        lr = batch["lr"].float() * 2.0 - 1.0
        img_lr_up = srdiff_upsample(lr, self.scale)
        if img_lr_up.shape != hr.shape:
            raise ValueError(f"HR {tuple(hr.shape)} is not scale={self.scale} x LR {tuple(lr.shape)}")
        n, device = hr.shape[0], hr.device

        # 2. the residual x_0; 3. t, eps, x_t
        x0 = srdiff_img2res(hr, img_lr_up, s.res_rescale, s.clip_input)
        t = rng.randint(0, self.scheduler.config.num_train_timesteps, n, generator, device=device)
        noise = rng.randn(x0.shape, generator, device=device, dtype=x0.dtype)
        x_t = self.scheduler.add_noise(x0, noise, t)

        # 1. + 4. x_e = D(x_L), eps_theta(x_t, t, x_e), regress the noise (+ the encoder's auxiliary L1)
        eps, rrdb_out = model(x_t, t, lr, img_lr_up)
        loss = self.loss_fn(eps.float(), noise)
        if not s.fix_rrdb:
            if s.aux_l1_loss:
                loss = loss + F.l1_loss(rrdb_out.float().clamp(0, 1) * 2.0 - 1.0, hr)
            else:  # the encoder's upsampling tail takes no part: keep it in the graph for DistributedDataParallel
                loss = loss + 0.0 * rrdb_out.float().mean()
        return loss

    def _num_inference_steps(self) -> int:
        return self.srdiff.num_inference_steps or int(self.scheduler.config.num_train_timesteps)

    def predict(self, model, lr, generator) -> torch.Tensor:
        pipe = self.build_pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            lr.clamp(0, 1),
            num_inference_steps=self._num_inference_steps(),
            eta=self.srdiff.eta,
            generator=generator,
            output_type="pt",
        ).images

    def build_pipeline(self, model):
        from diffusers import DDIMScheduler, DDPMScheduler

        from sr_diffusion.pipelines import SRDiffPipeline

        inner = getattr(model, "module", model)
        cls = DDIMScheduler if self.srdiff.sampler == "ddim" else DDPMScheduler
        return SRDiffPipeline(
            unet=inner.denoise_fn,
            rrdb=inner.rrdb,
            scheduler=cls.from_config(self.scheduler.config),  # a copy: sampling sets its timesteps
            res_rescale=float(self.srdiff.res_rescale),
            clip_input=self.srdiff.clip_input,
        )
