"""Autoencoder training for the latent methods: a diffusers ``VQModel`` (ResShift, LDM-SR) or ``AutoencoderKL``
(StableSR) fitted to HR crops of the shared datasets.

For an HR crop ``x`` (in [-1, 1]; the LR half of the batch is ignored):

* ``model.arch: vq`` (default): ``out = VQModel(x)`` (encode, nearest codebook vector with the straight-through
  estimator, decode) and ``loss = mean|out.sample - x| + vq_weight * out.commit_loss.mean()``, where
  ``commit_loss`` is what diffusers' ``VectorQuantizer`` returns: ``mean((sg[z_q] - z)^2) + 0.25 mean((z_q -
  sg[z])^2)`` (diffusers' ``legacy=True`` form, the one ``VQModel`` uses; ``sg`` = stop-gradient). It trains the
  encoder (commitment) and the codebook.
* ``model.arch: kl``: ``z ~ q(z|x)`` (the reparameterised posterior sample, drawn with the trainer's generator),
  ``loss = mean|decode(z) - x| + kl_weight * KL(q(z|x) || N(0, I))``, the KL summed over the latent elements and
  averaged over the batch (``DiagonalGaussianDistribution.kl()``), as in LDM's ``LPIPSWithDiscriminator``.

No perceptual (LPIPS) or adversarial terms: the LPIPS weights cannot be downloaded in this environment, so this is
the reconstruction-only first stage (blurrier than the released GAN-trained autoencoders, but a working latent
space). Validation is not supported (the trainer's validation scores LR -> SR against bicubic, not
reconstructions): ``validation.source`` must be ``none``. Track ``train/loss`` instead.

Config: the shared sections, plus ``autoencoder`` (:class:`AutoencoderSection`: ``vq_weight``, ``kl_weight``) and
``model``: ``arch`` (``vq`` or ``kl``) plus any ``VQModel`` / ``AutoencoderKL`` constructor argument. Unset VQ
arguments default to the released VQ-f4 of ResShift (:data:`VQ_F4_DEFAULTS`, see
:mod:`sr_diffusion.conversion.vq_f4`); unset block types follow ``block_out_channels`` (plain encoder/decoder
blocks, one per level). ``data.gt_size`` must be a multiple of the downsampling factor ``2^(levels-1)``.

Export: ``pipeline/`` holds the EMA autoencoder itself (``save_pretrained``), loadable with
``VQModel.from_pretrained`` / ``AutoencoderKL.from_pretrained`` and usable as the ``vae=`` of
``ResShiftPipeline`` / ``LDMSuperResolutionPipeline``-style pipelines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .config import ConfigError, ExperimentConfig, TrainConfig, check_model_kwargs
from .trainer import TrainingTask

__all__ = [
    "AUTOENCODER_ARCHS",
    "VQ_F4_DEFAULTS",
    "AutoencoderExperimentConfig",
    "AutoencoderSection",
    "AutoencoderTask",
    "autoencoder_loss",
    "build_autoencoder",
]

AUTOENCODER_ARCHS = ("vq", "kl")

#: ``VQModel`` arguments of ResShift's released ``autoencoder_vq_f4.pth`` (what ``convert_vq_f4`` infers from it).
VQ_F4_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 512],
    "layers_per_block": 2,
    "latent_channels": 3,
    "num_vq_embeddings": 8192,
    "vq_embed_dim": 3,
    "norm_num_groups": 32,
    "scaling_factor": 1.0,
    "mid_block_add_attention": True,
}


@dataclass
class AutoencoderSection:
    """``autoencoder``: weights of the regularisers (``vq_weight`` on the codebook/commitment loss, ``kl_weight``
    on the KL term; LDM's KL-f8 default 1e-6)."""

    vq_weight: float = 1.0
    kl_weight: float = 1e-6


@dataclass
class AutoencoderTrainConfig(TrainConfig):
    """``train`` with the autoencoder's defaults: ``outputs/autoencoder``, no validation."""

    output_dir: str = "outputs/autoencoder"
    validation_steps: int = 0


@dataclass
class AutoencoderExperimentConfig(ExperimentConfig):
    """:class:`ExperimentConfig` with an ``autoencoder`` section; ``model.arch`` is one of :data:`AUTOENCODER_ARCHS`."""

    train: AutoencoderTrainConfig = field(default_factory=AutoencoderTrainConfig)
    autoencoder: AutoencoderSection = field(default_factory=AutoencoderSection)

    def validate(self) -> None:
        super().validate()
        a = self.autoencoder
        if a.vq_weight < 0:
            raise ConfigError(f"autoencoder.vq_weight: must be >= 0, got {a.vq_weight}")
        if a.kl_weight < 0:
            raise ConfigError(f"autoencoder.kl_weight: must be >= 0, got {a.kl_weight}")
        _check_no_validation(self)


def _check_no_validation(config: ExperimentConfig) -> None:
    if config.validation.source != "none":
        raise ConfigError(
            "validation.source: must be 'none' for autoencoder training (the trainer's validation scores "
            f"LR -> SR against bicubic, not reconstructions), got {config.validation.source!r}"
        )


def _model_kwargs(config: ExperimentConfig) -> tuple[type, dict[str, Any]]:
    from diffusers import AutoencoderKL, VQModel

    arch = config.model.arch
    if arch not in AUTOENCODER_ARCHS:
        raise ConfigError(f"model.arch: unknown autoencoder {arch!r}; choose from {', '.join(AUTOENCODER_ARCHS)}")
    cls = VQModel if arch == "vq" else AutoencoderKL
    kwargs = dict(config.model.kwargs)
    check_model_kwargs(cls, kwargs, arch)
    if arch == "vq":
        for key, value in VQ_F4_DEFAULTS.items():
            kwargs.setdefault(key, value)
    kwargs.setdefault("sample_size", config.data.gt_size)
    if "block_out_channels" in kwargs:
        levels = len(kwargs["block_out_channels"])
        kwargs.setdefault("down_block_types", ["DownEncoderBlock2D"] * levels)
        kwargs.setdefault("up_block_types", ["UpDecoderBlock2D"] * levels)
    return cls, kwargs


def build_autoencoder(config: ExperimentConfig) -> torch.nn.Module:
    """The ``VQModel`` / ``AutoencoderKL`` of ``config.model``, checked against ``data.gt_size``."""
    cls, kwargs = _model_kwargs(config)
    try:
        model = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model: {err}") from err
    factor = 2 ** (len(model.config.block_out_channels) - 1)
    if config.data.gt_size % factor:
        raise ConfigError(
            f"data.gt_size ({config.data.gt_size}) must be a multiple of the downsampling factor {factor}"
        )
    return model


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def autoencoder_loss(
    model: torch.nn.Module,
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    vq_weight: float = 1.0,
    kl_weight: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """``{"loss", "rec", "reg"}`` for images ``x`` in [-1, 1] (see the module docstring). The model is called
    through its ``forward`` (so a DistributedDataParallel wrapper syncs the gradients)."""
    from diffusers import VQModel
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    inner = _unwrap(model)
    if isinstance(inner, VQModel):
        out = model(x)
        rec = (out.sample.float() - x).abs().mean()
        reg = out.commit_loss.float().mean()
        return {"loss": rec + vq_weight * reg, "rec": rec, "reg": reg}
    # AutoencoderKL.forward returns no posterior: catch its moments on the way (quant_conv, or the encoder)
    moments: list[torch.Tensor] = []
    source = inner.quant_conv if inner.quant_conv is not None else inner.encoder
    handle = source.register_forward_hook(lambda module, args, output: moments.append(output))
    try:
        out = model(x, sample_posterior=True, generator=generator)
    finally:
        handle.remove()
    posterior = DiagonalGaussianDistribution(moments[0].float())
    rec = (out.sample.float() - x).abs().mean()
    reg = posterior.kl().mean()
    return {"loss": rec + kl_weight * reg, "rec": rec, "reg": reg}


class AutoencoderTask(TrainingTask):
    """Reconstruction training of a latent method's autoencoder for the shared :class:`~sr_diffusion.training.Trainer`;
    the export is the autoencoder itself."""

    def __init__(self):
        self.vq_weight = 1.0
        self.kl_weight = 1e-6

    def check_config(self, config: ExperimentConfig) -> None:
        _model_kwargs(config)
        section = getattr(config, "autoencoder", None) or AutoencoderSection()
        self.vq_weight, self.kl_weight = section.vq_weight, section.kl_weight
        _check_no_validation(config)

    def build_model(self, config: ExperimentConfig) -> torch.nn.Module:
        return build_autoencoder(config)

    def compute_loss(self, model, batch, generator) -> torch.Tensor:
        x = batch["hr"].float() * 2.0 - 1.0
        return autoencoder_loss(model, x, generator, self.vq_weight, self.kl_weight)["loss"]

    @torch.no_grad()
    def reconstruct(self, model, images: torch.Tensor, generator=None) -> torch.Tensor:
        """Reconstructions (posterior mean for KL) of images in [0, 1], in [0, 1]."""
        out = model(images * 2.0 - 1.0).sample
        return ((out.float() + 1.0) / 2.0).clamp(0, 1)

    def predict(self, model, lr, generator) -> torch.Tensor:
        raise NotImplementedError("autoencoder training has no LR -> SR prediction (validation.source must be none)")

    def build_pipeline(self, model):
        """The model itself: ``Trainer`` saves it with ``save_pretrained`` into ``pipeline/``."""
        return model
