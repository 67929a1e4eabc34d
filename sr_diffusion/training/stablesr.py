"""StableSR training: the time-aware encoder and the SFT layers learn on a frozen Stable Diffusion base.

Wang et al., IJCV 2024 (arXiv:2305.07015), Sec. 3.1; the released ``LatentDiffusionSRTextWT.forward`` / ``p_losses``
(facts only). For an HR crop ``y`` and its LR image (both in [-1, 1]; the LR bicubic-upsampled to the HR size and
clamped, as the original's ``get_input``):

1. ``z_lr = E(lr_up) · s`` and ``z_0 = E(y) · s``: posterior samples of the frozen VAE (``s`` its scaling factor);
2. ``t ~ U{0, ..., T-1}``, ``eps ~ N(0, I)``, ``z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps``;
3. the loss ``|| f(z_t, t, c_text, E_time(z_lr, t)) - target ||²`` with ``target = eps`` (``v`` for a
   v-prediction base), ``c_text`` the embedding of the empty prompt (the original trains with ``text_cond=['']``)
   and ``f`` the frozen UNet modulated by the SFT layers
   (:func:`~sr_diffusion.pipelines.stablesr.stablesr_noise_pred`, the pipeline's own call).

Only :class:`StableSRAddOns` (the encoder and the SFT layers, one ``ModelMixin`` for the shared trainer) is trained,
checkpointed and averaged (EMA); the base (``stablesr.base``, a diffusers SD folder) is loaded frozen by the task and
exported with the trained add-ons as a :class:`~sr_diffusion.pipelines.StableSRPipeline`. Optionally
(``stablesr.unet_lora_rank``, not in the paper) LoRA adapters of the base UNet train with the add-ons, the base itself
staying frozen (:mod:`~sr_diffusion.training.sd_addons`: fused into the exported UNet, also written to
``pipeline/unet_lora/``). The CFW layers are the
second stage, trained afterwards on this model's outputs (:mod:`sr_diffusion.training.stablesr_cfw`,
``train_stablesr.py --stage cfw``); ``stablesr.cfw`` may name a saved :class:`~sr_diffusion.models.StableSRCFW` folder
to export with the pipeline.

Every random draw (posterior samples, ``t``, ``eps``) comes from the trainer's generators, one per sample.

Config: the shared sections, ``model`` (``arch: stablesr`` plus :class:`~sr_diffusion.models.StableSRTimeAwareEncoder`
arguments; the released ones by default), and ``stablesr`` (:class:`StableSRConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from sr_diffusion.models.stablesr_encoder import StableSRTimeAwareEncoder
from sr_diffusion.models.stablesr_sft import StableSRSFT
from sr_diffusion.pipelines.sd_base import call_default
from sr_diffusion.pipelines.stablesr.pipeline_stablesr import StableSRPipeline

from .config import ConfigError, ExperimentConfig, ModelConfig, TrainConfig, check_model_kwargs
from .sd_addons import SDAddOnSection, SDAddOnTask, check_sd_base_folder, make_unet_lora, unet_lora_attached

__all__ = ["StableSRAddOns", "StableSRConfig", "StableSRExperimentConfig", "StableSRTask", "StableSRTrainConfig"]


# ----------------------------------------------------------------------------------------------------------------------
# The trainable model
# ----------------------------------------------------------------------------------------------------------------------


class StableSRAddOns(ModelMixin, ConfigMixin):
    """StableSR's trainable parts as one model: ``time_aware_encoder`` and ``sft`` (their keyword arguments in
    ``encoder_config`` and ``sft_config``). ``forward`` is the conditioned denoiser call, so that data-parallel
    wrappers see it. With ``unet_lora_config`` (the LoRA option, ``stablesr.unet_lora_rank``) it also holds
    ``unet_lora``, a :class:`~sr_diffusion.models.UNetLoRA` attached to the frozen UNet during ``forward``."""

    @register_to_config
    def __init__(
        self,
        encoder_config: dict[str, Any] | None = None,
        sft_config: dict[str, Any] | None = None,
        unet_lora_config: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.time_aware_encoder = StableSRTimeAwareEncoder(**(encoder_config or {}))
        self.sft = StableSRSFT(**(sft_config or {}))
        self.unet_lora = make_unet_lora(unet_lora_config)

    def forward(self, unet, sample, timestep, lr_latents, encoder_hidden_states) -> torch.Tensor:
        from sr_diffusion.pipelines.stablesr import stablesr_noise_pred

        with unet_lora_attached(self.unet_lora, unet):
            return stablesr_noise_pred(
                unet,
                time_aware_encoder=self.time_aware_encoder,
                sft=self.sft,
                sample=sample,
                timestep=timestep,
                lr_latents=lr_latents,
                encoder_hidden_states=encoder_hidden_states,
            )


# ----------------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class StableSRConfig(SDAddOnSection):
    """``stablesr``: the frozen base and how validation and the exported pipeline sample.

    ``base``: a diffusers Stable Diffusion 1.x/2.x folder (``vae/``, ``text_encoder/``, ``tokenizer/``, ``unet/``;
    the released model: SD 2.1-base); ``unet_lora_rank``, ``unet_lora_alpha``: the LoRA option on the base UNet
    (:class:`~sr_diffusion.training.sd_addons.SDAddOnSection`; not in the paper: default off); ``cfw``: an optional
    saved ``StableSRCFW`` folder for the exported pipeline; ``sft_hidden_channels``: the SFT layers' shared width (the
    original's 128); ``num_inference_steps``, ``color_fix``, ``fidelity_weight``: the pipeline's, for validation."""

    cfw: str | None = None
    sft_hidden_channels: int = 128
    num_inference_steps: int = call_default(StableSRPipeline, "num_inference_steps")
    color_fix: Literal["none", "adain", "wavelet"] = call_default(StableSRPipeline, "color_fix")
    fidelity_weight: float = call_default(StableSRPipeline, "fidelity_weight")


@dataclass
class StableSRTrainConfig(TrainConfig):
    """``train`` with StableSR's defaults: the MSE of SD's objective, ``outputs/stablesr``."""

    output_dir: str = "outputs/stablesr"
    loss: Literal["l1", "mse", "charbonnier"] = "mse"


@dataclass
class StableSRExperimentConfig(ExperimentConfig):
    """:class:`ExperimentConfig` with a ``stablesr`` section; ``model.arch`` is ``stablesr``."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(arch="stablesr"))
    train: StableSRTrainConfig = field(default_factory=StableSRTrainConfig)
    stablesr: StableSRConfig = field(default_factory=StableSRConfig)

    def validate(self) -> None:
        super().validate()
        s = self.stablesr
        if self.model.arch != "stablesr":
            raise ConfigError(f"model.arch: must be 'stablesr', got {self.model.arch!r}")
        check_model_kwargs(StableSRTimeAwareEncoder, self.model.kwargs, "stablesr")
        if "in_channels" in self.model.kwargs:
            raise ConfigError("model.in_channels: set by the base's VAE (its latent channels)")
        check_sd_base_folder(s.base, "stablesr", "SD 2.1-base")
        if s.cfw and not (Path(s.cfw) / "config.json").is_file():
            raise ConfigError(f"stablesr.cfw: {s.cfw} is not a saved StableSRCFW folder (no config.json)")
        if s.sft_hidden_channels < 1:
            raise ConfigError(f"stablesr.sft_hidden_channels: must be >= 1, got {s.sft_hidden_channels}")
        if not 1 <= s.num_inference_steps <= 1000:
            raise ConfigError(f"stablesr.num_inference_steps: must be in [1, 1000], got {s.num_inference_steps}")
        if not 0 <= s.fidelity_weight <= 1:
            raise ConfigError(f"stablesr.fidelity_weight: must be in [0, 1], got {s.fidelity_weight}")


# ----------------------------------------------------------------------------------------------------------------------
# Task
# ----------------------------------------------------------------------------------------------------------------------


class StableSRTask(SDAddOnTask):
    """StableSR's objective for the shared :class:`~sr_diffusion.training.Trainer` (see the module docstring; the
    frozen base, the forward process, validation and export: :class:`~sr_diffusion.training.sd_addons.SDAddOnTask`)."""

    section_name = "stablesr"
    section_class = StableSRConfig

    def build_model(self, config: ExperimentConfig) -> StableSRAddOns:
        encoder = {**config.model.kwargs, "in_channels": int(self.vae_config["latent_channels"])}
        try:
            out_channels = StableSRTimeAwareEncoder(**encoder).config.out_channels
            sft = {
                "block_out_channels": list(self.unet_config["block_out_channels"]),
                "layers_per_block": int(self.unet_config["layers_per_block"]),
                "cond_channels": int(out_channels),
                "hidden_channels": int(self.section.sft_hidden_channels),
            }
            return self.with_unet_lora(StableSRAddOns(encoder_config=encoder, sft_config=sft))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model: {err}") from err

    # ------------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, batch, generator) -> torch.Tensor:
        """Steps 1-3 of the module docstring for a batch ``{"lr": (B,3,h,w), "hr": (B,3,s·h,s·w)}`` in [0, 1]."""
        from sr_diffusion.resize import resize

        device = batch["hr"].device
        unet = self.base(device)["unet"]
        hr = batch["hr"].float() * 2.0 - 1.0
        lr = batch["lr"].float() * 2.0 - 1.0
        lr_up = resize(lr, size=tuple(hr.shape[-2:]), mode="bicubic").clamp(-1.0, 1.0)

        # 1. latents (posterior samples, as the original's get_first_stage_encoding)
        z_lr = self.encode_latents(lr_up, generator)
        z_0 = self.encode_latents(hr, generator)

        # 2. t, eps, z_t
        z_t, t, target = self.diffuse(z_0, generator)

        # 3. regress with the SFT-modulated frozen UNet (the empty prompt, as the original)
        text = self.empty_prompt(device).expand(hr.shape[0], -1, -1)
        prediction = model(unet, z_t, t, z_lr, text)
        return self.loss_fn(prediction.float(), target)

    # ------------------------------------------------------------------------------------------------------------------
    # Schedulers, validation, export
    # ------------------------------------------------------------------------------------------------------------------

    def pipeline_class(self) -> type:
        from sr_diffusion.pipelines import StableSRPipeline

        return StableSRPipeline

    def make_noise_scheduler(self):
        from sr_diffusion.pipelines.stablesr import stablesr_scheduler

        return stablesr_scheduler(self.prediction_type)

    def sampling_scheduler(self):
        from sr_diffusion.pipelines.stablesr import stablesr_scheduler

        return stablesr_scheduler(self.prediction_type)

    def add_on_components(self, model, device: torch.device) -> dict[str, Any]:
        from sr_diffusion.models import StableSRCFW

        cfw = StableSRCFW.from_pretrained(self.section.cfw).to(device) if self.section.cfw else None
        return {"time_aware_encoder": model.time_aware_encoder, "sft": model.sft, "cfw": cfw}

    def sampling_kwargs(self, pipe) -> dict[str, Any]:
        s = self.section
        return {
            "num_inference_steps": s.num_inference_steps,
            "color_fix": s.color_fix,
            "fidelity_weight": s.fidelity_weight if pipe.cfw is not None else 0.0,
        }
