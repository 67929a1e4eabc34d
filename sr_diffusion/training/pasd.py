"""PASD training: the ControlNet (with its degradation-removal module) and the pixel-aware cross-attention learn on a
frozen Stable Diffusion base.

Yang et al., ECCV 2024, Sec. 3 and 4.1; the released ``train_pasd.py`` and ``pasd/dataloader/localdatasets.py``
(facts only). For an HR crop ``x`` in [-1, 1] and its LR image (in [0, 1]):

1. ``y_up``: the LR image bicubic-upsampled to the HR size, clamped to [0, 1] (the original's ``resize_bak=True``
   condition, unnormalised), the ControlNet's condition; ``z_0 = E(x) · s``, a posterior sample of the frozen VAE;
2. ``t ~ U{0, ..., T-1}``, ``eps ~ N(0, I)``, ``z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps`` (the base's DDPM
   schedule, ``DDPMScheduler.from_pretrained(base, subfolder="scheduler")`` as the original);
3. ``(pred, I_1..I_{K-1}) = f(z_t, t, c_text, y_up)``: the frozen UNet with the ControlNet's residuals on its skips and
   as PACA context (:func:`~sr_diffusion.pipelines.pasd.pasd_noise_pred`, the pipeline's own call), ``c_text`` the
   embedding of the empty prompt (our data has no captions; the original trains on captions, dropped to ``""`` with
   probability 0.5);
4. the loss ``|| pred - target ||² + w · sum_k || I_k - bilinear(x, size(I_k)) ||_1`` with ``target = eps`` (``v`` for a
   v-prediction base) and ``w = 1`` (``rgb_loss_weight``; the original adds each scale's L1 with weight 1; its
   bilinear resize of ``x`` has no antialiasing, as here).

Trainable (checkpointed, averaged by the EMA): :class:`PASDAddOns`, the ControlNet (initialised from the UNet, the
original's ``ControlNetModel.from_unet``) and the ``pixel_attentions`` layers (fresh, diffusers' default
initialisation, as the original's ``strict=False`` load leaves them). The SD base is frozen, as in the paper
(``trainable_modules = ["pixel_attentions"]`` of the UNet). The run exports a
:class:`~sr_diffusion.pipelines.PASDPipeline` with the base and the EMA add-ons. Optionally (``pasd.unet_lora_rank``,
not in the paper) LoRA adapters of the base UNet train with the add-ons, the base itself staying frozen
(:mod:`~sr_diffusion.training.sd_addons`: fused into the exported UNet, also written to ``pipeline/unet_lora/``).

Every random draw (posterior samples, ``t``, ``eps``) comes from the trainer's generators, one per sample.

Config: the shared sections, ``model`` (``arch: pasd`` plus ``conditioning_embedding_out_channels`` and ``use_rrdb``
of the degradation-removal module) and ``pasd`` (:class:`PASDConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from sr_diffusion.models.block_attention import BlockAttentions
from sr_diffusion.models.pasd_controlnet import PASDControlNetModel
from sr_diffusion.pipelines.pasd.pipeline_pasd import PASDPipeline
from sr_diffusion.pipelines.sd_base import call_default

from .config import ConfigError, ExperimentConfig, ModelConfig, TrainConfig
from .sd_addons import (
    SDAddOnSection,
    SDAddOnTask,
    check_sd_base_folder,
    make_unet_lora,
    public_config,
    unet_lora_attached,
)

__all__ = [
    "PASDAddOns",
    "PASDConfig",
    "PASDExperimentConfig",
    "PASDTask",
    "PASDTrainConfig",
    "degradation_removal_loss",
]

#: the ``model.*`` keys: the degradation-removal module's (everything else of the ControlNet comes from the UNet)
MODEL_KEYS = ("conditioning_embedding_out_channels", "use_rrdb")


# ----------------------------------------------------------------------------------------------------------------------
# The trainable model, the extra loss
# ----------------------------------------------------------------------------------------------------------------------


class PASDAddOns(ModelMixin, ConfigMixin):
    """PASD's trainable parts as one model: ``controlnet`` (a :class:`PASDControlNetModel` of ``controlnet_config``)
    and ``pixel_attentions`` (a :class:`BlockAttentions` of ``pixel_attentions_config``). ``forward`` is the conditioned
    denoiser call, so that data-parallel wrappers see it; build a fresh one for a UNet with :meth:`from_unet`. With
    ``unet_lora_config`` (the LoRA option, ``pasd.unet_lora_rank``) it also holds ``unet_lora``, a
    :class:`~sr_diffusion.models.UNetLoRA` attached to the frozen UNet during ``forward``."""

    @register_to_config
    def __init__(
        self,
        controlnet_config: dict[str, Any] | None = None,
        pixel_attentions_config: dict[str, Any] | None = None,
        unet_lora_config: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.controlnet = PASDControlNetModel(**(controlnet_config or {}))
        self.pixel_attentions = BlockAttentions(**(pixel_attentions_config or {}))
        self.unet_lora = make_unet_lora(unet_lora_config)

    @classmethod
    def from_unet(
        cls, unet, conditioning_embedding_out_channels=(16, 32, 96, 256), use_rrdb: bool = False
    ) -> PASDAddOns:
        """The ControlNet copied from ``unet``'s encoder and middle block, fresh PACA layers for ``unet``."""
        controlnet = PASDControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels), use_rrdb=use_rrdb
        )
        pixel_attentions = BlockAttentions.pasd_pixel_attentions(unet)
        model = cls(
            controlnet_config=public_config(controlnet.config),
            pixel_attentions_config=public_config(pixel_attentions.config),
        )
        model.controlnet.load_state_dict(controlnet.state_dict())
        model.pixel_attentions.load_state_dict(pixel_attentions.state_dict())
        return model

    def forward(self, unet, sample, timestep, encoder_hidden_states, cond_image):
        from sr_diffusion.pipelines.pasd import pasd_noise_pred

        with unet_lora_attached(self.unet_lora, unet):
            return pasd_noise_pred(
                unet,
                controlnet=self.controlnet,
                pixel_attentions=self.pixel_attentions,
                sample=sample,
                timestep=timestep,
                encoder_hidden_states=encoder_hidden_states,
                cond_image=cond_image,
            )


def degradation_removal_loss(rgbs, hr: torch.Tensor) -> torch.Tensor:
    """``sum_k || I_k - bilinear(x, size(I_k)) ||_1`` (mean absolute error per scale) for the RGB outputs ``I_k``
    ``(B, 3, H_k, W_k)`` and the HR image ``x`` ``(B, 3, H, W)`` in [-1, 1]."""
    if not rgbs:
        raise ValueError("the ControlNet returned no RGB outputs: it needs return_rgbs=True for the PASD objective")
    return sum(F.l1_loss(rgb.float(), F.interpolate(hr.float(), size=rgb.shape[-2:], mode="bilinear")) for rgb in rgbs)


# ----------------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class PASDConfig(SDAddOnSection):
    """``pasd``: the frozen base, the extra loss's weight and how validation and the exported pipeline sample.

    ``base``: a diffusers Stable Diffusion 1.x/2.x folder (``vae/``, ``text_encoder/``, ``tokenizer/``, ``unet/``;
    the released model: SD 1.5); ``unet_lora_rank``, ``unet_lora_alpha``: the LoRA option on the base UNet
    (:class:`~sr_diffusion.training.sd_addons.SDAddOnSection`; not in the paper: default off); ``rgb_loss_weight``:
    ``w`` of the degradation-removal loss (the original's 1);
    ``num_inference_steps``, ``guidance_scale``, ``added_noise_level``, ``start_point``, ``color_fix``: the pipeline's,
    for validation (defaults: the original's inference settings; pure noise is ``start_point: noise``)."""

    rgb_loss_weight: float = 1.0
    num_inference_steps: int = call_default(PASDPipeline, "num_inference_steps")
    guidance_scale: float = call_default(PASDPipeline, "guidance_scale")
    added_noise_level: int = call_default(PASDPipeline, "added_noise_level")
    start_point: Literal["lr", "noise"] = call_default(PASDPipeline, "start_point")
    color_fix: Literal["none", "adain", "wavelet"] = call_default(PASDPipeline, "color_fix")


@dataclass
class PASDTrainConfig(TrainConfig):
    """``train`` with PASD's defaults: the MSE of SD's objective, ``outputs/pasd``."""

    output_dir: str = "outputs/pasd"
    loss: Literal["l1", "mse", "charbonnier"] = "mse"


@dataclass
class PASDExperimentConfig(ExperimentConfig):
    """:class:`ExperimentConfig` with a ``pasd`` section; ``model.arch`` is ``pasd``."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(arch="pasd"))
    train: PASDTrainConfig = field(default_factory=PASDTrainConfig)
    pasd: PASDConfig = field(default_factory=PASDConfig)

    def validate(self) -> None:
        super().validate()
        p = self.pasd
        if self.model.arch != "pasd":
            raise ConfigError(f"model.arch: must be 'pasd', got {self.model.arch!r}")
        unknown = sorted(set(self.model.kwargs) - set(MODEL_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {', '.join('model.' + k for k in unknown)} for arch 'pasd'; valid keys: arch, "
                f"{', '.join(MODEL_KEYS)} (the rest of the ControlNet is copied from the base's UNet)"
            )
        check_sd_base_folder(p.base, "pasd", "stable-diffusion-v1-5")
        if p.rgb_loss_weight < 0:
            raise ConfigError(f"pasd.rgb_loss_weight: must be >= 0, got {p.rgb_loss_weight}")
        if not 1 <= p.num_inference_steps <= 1000:
            raise ConfigError(f"pasd.num_inference_steps: must be in [1, 1000], got {p.num_inference_steps}")
        if p.guidance_scale < 1:
            raise ConfigError(f"pasd.guidance_scale: must be >= 1, got {p.guidance_scale}")
        if p.added_noise_level is None or not 0 <= p.added_noise_level < 1000:
            raise ConfigError(
                f"pasd.added_noise_level: must be in [0, 1000) (pure noise: pasd.start_point=noise), got "
                f"{p.added_noise_level}"
            )


# ----------------------------------------------------------------------------------------------------------------------
# Task
# ----------------------------------------------------------------------------------------------------------------------


class PASDTask(SDAddOnTask):
    """PASD's objective for the shared :class:`~sr_diffusion.training.Trainer` (see the module docstring; the frozen
    base, the forward process, validation and export: :class:`~sr_diffusion.training.sd_addons.SDAddOnTask`)."""

    section_name = "pasd"
    section_class = PASDConfig

    def check_config(self, config: ExperimentConfig) -> None:
        super().check_config(config)
        f = self.vae_factor
        widths = config.model.kwargs.get("conditioning_embedding_out_channels", (16, 32, 96, 256))
        if 2 ** (len(widths) - 1) != f:
            raise ConfigError(
                f"model.conditioning_embedding_out_channels: {len(widths)} widths downsample the image by "
                f"{2 ** (len(widths) - 1)}, the base's VAE by {f}: give {f.bit_length()} widths"
            )

    def build_model(self, config: ExperimentConfig) -> PASDAddOns:
        unet = self.base()["unet"]
        try:
            return self.with_unet_lora(PASDAddOns.from_unet(unet, **config.model.kwargs))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model: {err}") from err

    # ------------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, batch, generator) -> torch.Tensor:
        """Steps 1-4 of the module docstring for a batch ``{"lr": (B,3,h,w), "hr": (B,3,s·h,s·w)}`` in [0, 1]."""
        from sr_diffusion.resize import resize

        device = batch["hr"].device
        unet = self.base(device)["unet"]
        hr = batch["hr"].float() * 2.0 - 1.0
        cond = resize(batch["lr"].float(), size=tuple(hr.shape[-2:]), mode="bicubic").clamp(0.0, 1.0)

        # 1-2. z_0 (a posterior sample), t, eps, z_t
        z_t, t, target = self.diffuse(self.encode_latents(hr, generator), generator)

        # 3-4. the conditioned frozen UNet, the noise-prediction loss and the degradation-removal loss
        text = self.empty_prompt(device).expand(hr.shape[0], -1, -1)
        prediction, rgbs = model(unet, z_t, t, text, cond)
        loss = self.loss_fn(prediction.float(), target)
        if self.section.rgb_loss_weight:
            loss = loss + self.section.rgb_loss_weight * degradation_removal_loss(rgbs, hr)
        return loss

    # ------------------------------------------------------------------------------------------------------------------
    # Schedulers, validation, export
    # ------------------------------------------------------------------------------------------------------------------

    def pipeline_class(self) -> type:
        from sr_diffusion.pipelines import PASDPipeline

        return PASDPipeline

    def make_noise_scheduler(self):
        """The base's training schedule as a ``DDPMScheduler`` (the original's; SD 1.5's when the base has no
        ``scheduler/``)."""
        from diffusers import DDPMScheduler

        folder = Path(self.section.base) / "scheduler"
        if (folder / "scheduler_config.json").is_file():
            return DDPMScheduler.from_pretrained(folder)
        return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

    def sampling_scheduler(self):
        return self.pipeline_class().base_scheduler(self.section.base)

    def add_on_components(self, model, device: torch.device) -> dict[str, Any]:
        return {"controlnet": model.controlnet, "pixel_attentions": model.pixel_attentions}

    def sampling_kwargs(self, pipe) -> dict[str, Any]:
        s = self.section
        return {
            "num_inference_steps": s.num_inference_steps,
            "guidance_scale": s.guidance_scale,
            "added_noise_level": s.added_noise_level if s.start_point == "lr" else None,
            "start_point": s.start_point,
            "color_fix": s.color_fix,
        }
