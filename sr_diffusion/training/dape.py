"""DAPE training: SeeSR's degradation-aware prompt extractor (Wu et al., CVPR 2024, Sec. 3.1, Eq. 1; the reference's
``basicsr/models/dape_model.py``), on an open_clip ViT with a peft LoRA (:class:`~sr_diffusion.prompts.DAPE`).

For an HR crop ``x`` and its degraded LR image ``y`` (the Real-ESRGAN second-order degradation by default), both
resized to the tower's input size:

* teacher: the original tower (LoRA disabled, no gradient) on ``x``: embedding ``e_T``, patch tokens ``h_T``, tag
  logits ``l_T = logit_scale · cos(e_T, t_v)`` over the vocabulary ``v``;
* student: the LoRA tower on ``y``: ``e_S``, ``h_S``, ``l_S``;
* loss ``= w_feat (MSE(h_S, h_T) + MSE(e_S, e_T)) + w_cos (1 - cos(e_S, e_T)) + w_kl τ² KL(softmax(l_T / τ) ||
  softmax(l_S / τ))``, averaged over the batch.

The reference aligns RAM's ``image_embeds`` with an MSE (our feature term) and its multi-label tag probabilities with
a binary cross-entropy between ``sigmoid`` outputs; CLIP scores tags by softmax over the vocabulary, so the tag term
here is the KL between the two tag distributions (plus a cosine term on the embedding that tags are read from). Only
the LoRA weights train; the tower, the tag embeddings and the soft-prompt projector stay as they are (the projector is
trained with the diffusion model that consumes it). Nothing here draws random numbers: the degradation draws from the
trainer's generators.

Config: the shared sections (``validation.source`` must be ``none``: there is no SR output to score), ``model``
(``arch: dape`` plus the arguments of :meth:`DAPE.from_open_clip <sr_diffusion.prompts.DAPE.from_open_clip>`:
``model_name``, ``pretrained`` (a local open_clip checkpoint file), ``model_config``, ``vocabulary``, ``lora_rank``,
...) and ``dape`` (:class:`DAPELossConfig`: the loss weights). The exported ``pipeline/`` folder is a DAPE folder
(``DAPE.from_pretrained``).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from .config import ConfigError, DataConfig, DegradationConfig, ExperimentConfig, TrainConfig, ValidationConfig
from .trainer import TrainingTask

__all__ = [
    "DAPE_ARCHS",
    "DAPEDataConfig",
    "DAPEExperimentConfig",
    "DAPELossConfig",
    "DAPETask",
    "DAPETrainConfig",
    "DAPEValidationConfig",
    "build_dape_model",
    "dape_alignment_loss",
]

DAPE_ARCHS = ("dape",)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class DAPELossConfig:
    """``dape``: the weights of the alignment loss (module docstring); ``kl_temperature`` is ``τ``."""

    feature_weight: float = 1.0
    cosine_weight: float = 1.0
    kl_weight: float = 1.0
    kl_temperature: float = 1.0


@dataclass
class DAPEDataConfig(DataConfig):
    """``data`` with DAPE's defaults: Real-ESRGAN degradation of 256-pixel HR crops."""

    degradation: DegradationConfig = field(default_factory=lambda: DegradationConfig(type="realesrgan"))
    gt_size: int = 256


@dataclass
class DAPEValidationConfig(ValidationConfig):
    """``validation``: ``none`` (the shared validation scores SR images, which DAPE does not make)."""

    source: Literal["skimage_sklearn", "folder", "paired", "none"] = "none"


@dataclass
class DAPETrainConfig(TrainConfig):
    """``train`` with DAPE's defaults: ``outputs/dape``, no EMA (the reference's ``ema_decay: 0``)."""

    output_dir: str = "outputs/dape"
    ema_decay: float | None = None
    validation_steps: int = 0


@dataclass
class DAPEExperimentConfig(ExperimentConfig):
    """:class:`ExperimentConfig` with a ``dape`` section; ``model.arch`` is ``dape``."""

    data: DAPEDataConfig = field(default_factory=DAPEDataConfig)
    validation: DAPEValidationConfig = field(default_factory=DAPEValidationConfig)
    train: DAPETrainConfig = field(default_factory=DAPETrainConfig)
    dape: DAPELossConfig = field(default_factory=DAPELossConfig)

    def validate(self) -> None:
        super().validate()
        if self.validation.source != "none":
            raise ConfigError("validation.source: must be 'none' for DAPE (there is no SR output to score)")
        d = self.dape
        for key in ("feature_weight", "cosine_weight", "kl_weight"):
            if getattr(d, key) < 0:
                raise ConfigError(f"dape.{key}: must be >= 0, got {getattr(d, key)}")
        if d.feature_weight + d.cosine_weight + d.kl_weight <= 0:
            raise ConfigError("dape: at least one loss weight must be > 0")
        if not d.kl_temperature > 0:
            raise ConfigError(f"dape.kl_temperature: must be > 0, got {d.kl_temperature}")


# ----------------------------------------------------------------------------------------------------------------------
# Model and loss
# ----------------------------------------------------------------------------------------------------------------------


def _model_kwargs(config: ExperimentConfig) -> dict:
    """The :meth:`DAPE.from_open_clip` arguments of ``config.model`` (checked)."""
    from sr_diffusion.prompts import DAPE

    if config.model.arch not in DAPE_ARCHS:
        raise ConfigError(f"model.arch: must be one of {', '.join(DAPE_ARCHS)} for DAPE, got {config.model.arch!r}")
    params = inspect.signature(DAPE.from_open_clip).parameters
    valid = [name for name in params if name != "cls"]
    unknown = sorted(set(config.model.kwargs) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join('model.' + k for k in unknown)} for arch 'dape'; "
            f"valid keys: arch, {', '.join(valid)}"
        )
    return dict(config.model.kwargs)


def build_dape_model(config: ExperimentConfig) -> torch.nn.Module:
    """``DAPE.from_open_clip(**model.<kwargs>)`` with only the LoRA weights trainable (projector frozen)."""
    from sr_diffusion.prompts import DAPE

    kwargs = _model_kwargs(config)
    if kwargs.get("pretrained") is None and kwargs.get("model_config") is None:
        logger.warning(
            "model.pretrained is not set: DAPE starts from a randomly initialised %s", kwargs.get("model_name")
        )
    try:
        model = DAPE.from_open_clip(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model: {err}") from err
    model.requires_grad_(False)
    for name, param in model.visual.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
    return model


def dape_alignment_loss(student, teacher, weights: DAPELossConfig | None = None) -> dict[str, torch.Tensor]:
    """The terms of the module docstring's loss for two :class:`~sr_diffusion.prompts.DAPEOutput` (``student`` on LR,
    ``teacher`` on HR): ``{"feature", "cosine", "kl", "loss"}`` (``loss`` the weighted sum), float32 scalars."""
    w = weights or DAPELossConfig()
    e_s, e_t = student.image_embeds.float(), teacher.image_embeds.float().detach()
    h_s, h_t = student.image_tokens.float(), teacher.image_tokens.float().detach()
    feature = F.mse_loss(h_s, h_t) + F.mse_loss(e_s, e_t)
    cosine = (1.0 - F.cosine_similarity(e_s, e_t, dim=-1)).mean()
    tau = w.kl_temperature
    log_p_s = F.log_softmax(student.tag_logits.float() / tau, dim=-1)
    log_p_t = F.log_softmax(teacher.tag_logits.float().detach() / tau, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * tau**2
    loss = w.feature_weight * feature + w.cosine_weight * cosine + w.kl_weight * kl
    return {"feature": feature, "cosine": cosine, "kl": kl, "loss": loss}


# ----------------------------------------------------------------------------------------------------------------------
# Task
# ----------------------------------------------------------------------------------------------------------------------


class DAPETask(TrainingTask):
    """The DAPE objective for the shared :class:`~sr_diffusion.training.Trainer`; the export is the DAPE itself."""

    def __init__(self):
        self.weights = DAPELossConfig()

    def check_config(self, config: ExperimentConfig) -> None:
        _model_kwargs(config)
        if getattr(config, "validation", None) is not None and config.validation.source != "none":
            raise ConfigError("validation.source: must be 'none' for DAPE (there is no SR output to score)")
        self.weights = getattr(config, "dape", None) or DAPELossConfig()

    def build_model(self, config: ExperimentConfig) -> torch.nn.Module:
        return build_dape_model(config)

    def compute_loss(self, model, batch, generator) -> torch.Tensor:
        """The alignment loss of a batch ``{"lr": degraded (B,3,h,w), "hr": (B,3,H,W)}``; ``generator`` is unused."""
        dape = getattr(model, "module", model)  # the teacher pass runs outside DDP's forward: no gradient to sync
        with torch.no_grad():
            teacher = dape(batch["hr"], use_lora=False, return_prompts=False)
        student = model(batch["lr"], return_prompts=False)
        return dape_alignment_loss(student, teacher, self.weights)["loss"]

    def predict(self, model, lr, generator) -> torch.Tensor:
        raise NotImplementedError("DAPE makes prompts, not SR images; train it with validation.source=none")

    def build_pipeline(self, model):
        return getattr(model, "module", model)
