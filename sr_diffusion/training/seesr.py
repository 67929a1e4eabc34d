"""SeeSR training: the LR ControlNet and the image cross-attention of UNet and ControlNet learn on a frozen Stable
Diffusion base, prompted by a frozen DAPE.

Wu et al., CVPR 2024, Sec. 3.2-3.3; the released ``train_seesr.py`` and ``dataloaders/paired_dataset.py`` (facts
only). For an HR crop ``y`` in [-1, 1] and its LR image (in [0, 1]):

1. ``x_lr``: the LR image bicubic-upsampled to the HR size, clamped to [0, 1] (the original's ``sr_bicubic`` inputs,
   made with torch's bicubic), the ControlNet's condition; ``z_0 = E(y) · s``, a posterior sample of the frozen VAE;
2. ``t ~ U{0, ..., T-1}``, ``eps ~ N(0, I)``, ``z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps``;
3. prompts, from the frozen DAPE (``seesr.dape``): the hard prompt is the tags of the *HR* image by the original
   tagger (DAPE without its LoRA; the original tags the GT with RAM, ``utils_data/make_tags.py``), replaced by ``""``
   with probability ``null_text_ratio`` (0.5, the original's); the soft prompts are DAPE's (with its LoRA) of the LR
   image (the original's ``RAM.generate_image_embeds`` of the LR). Without a DAPE (tiny configs): the empty prompt
   and :func:`~sr_diffusion.models.seesr.null_image_prompt`, as the pipeline without an extractor;
4. the loss ``|| f(z_t, t, c_text, p_soft, x_lr) - target ||²`` (``target = eps``, ``v`` for a v-prediction base),
   ``f`` the frozen UNet with the ControlNet's residuals and both image cross-attentions
   (:func:`~sr_diffusion.models.seesr.seesr_noise_pred`, the pipeline's own call).

Trainable (and checkpointed, averaged by the EMA): :class:`SeeSRAddOns`, the ControlNet (initialised from the UNet as
the original's ``ControlNetModel.from_unet``) and both image cross-attention add-ons (fresh layers, the ControlNet's
copied from the UNet's, as the original). The SD base and the DAPE are frozen, as in the paper. The run exports a
:class:`~sr_diffusion.pipelines.SeeSRPipeline` with the base, the EMA add-ons and the DAPE. Optionally
(``seesr.unet_lora_rank``, not in the paper) LoRA adapters of the base UNet train with the add-ons, the base itself
staying frozen (:mod:`~sr_diffusion.training.sd_addons`: fused into the exported UNet, also written to
``pipeline/unet_lora/``).

Every random draw (posterior samples, ``t``, ``eps``, the null-text choice) comes from the trainer's generators, one
per sample.

Config: the shared sections, ``model`` (``arch: seesr`` plus :func:`build_seesr_add_ons` arguments) and ``seesr``
(:class:`SeeSRConfig`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import ConfigMixin, ControlNetModel, ModelMixin
from diffusers.configuration_utils import register_to_config

from sr_diffusion.models.block_attention import BlockAttentions
from sr_diffusion.models.seesr import (
    SEESR_IMAGE_CONTEXT_DIM,
    null_image_prompt,
    seesr_controlnet_from_unet,
    seesr_image_attentions,
    seesr_noise_pred,
)
from sr_diffusion.pipelines.sd_base import call_default
from sr_diffusion.pipelines.seesr.pipeline_seesr import SeeSRPipeline

from . import rng
from .config import ConfigError, ExperimentConfig, ModelConfig, TrainConfig
from .rng import GeneratorArg
from .sd_addons import (
    SDAddOnSection,
    SDAddOnTask,
    check_sd_base_folder,
    make_unet_lora,
    public_config,
    unet_lora_attached,
)

__all__ = [
    "SeeSRAddOns",
    "SeeSRConfig",
    "SeeSRExperimentConfig",
    "SeeSRTask",
    "SeeSRTrainConfig",
    "build_seesr_add_ons",
]

# ----------------------------------------------------------------------------------------------------------------------
# The trainable model
# ----------------------------------------------------------------------------------------------------------------------


class SeeSRAddOns(ModelMixin, ConfigMixin):
    """SeeSR's trainable parts as one model: ``controlnet`` (a diffusers ``ControlNetModel``),
    ``unet_image_attentions`` and ``controlnet_image_attentions`` (:class:`BlockAttentions`), from their configs.
    ``forward`` is the conditioned denoiser call, so that data-parallel wrappers see it. With ``unet_lora_config``
    (the LoRA option, ``seesr.unet_lora_rank``) it also holds ``unet_lora``, a :class:`~sr_diffusion.models.UNetLoRA`
    attached to the frozen UNet during ``forward``."""

    @register_to_config
    def __init__(
        self,
        controlnet_config: dict[str, Any] | None = None,
        unet_image_attentions_config: dict[str, Any] | None = None,
        controlnet_image_attentions_config: dict[str, Any] | None = None,
        unet_lora_config: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.controlnet = ControlNetModel.from_config(controlnet_config or {})
        self.unet_image_attentions = BlockAttentions.from_config(unet_image_attentions_config or {})
        self.controlnet_image_attentions = BlockAttentions.from_config(controlnet_image_attentions_config or {})
        self.unet_lora = make_unet_lora(unet_lora_config)

    @classmethod
    def from_parts(
        cls, controlnet: ControlNetModel, unet_image_attentions: BlockAttentions, controlnet_image_attentions
    ) -> SeeSRAddOns:
        """The add-ons holding (copies of) these parts' weights."""
        from accelerate import init_empty_weights

        with init_empty_weights():
            model = cls(
                controlnet_config=public_config(controlnet.config),
                unet_image_attentions_config=public_config(unet_image_attentions.config),
                controlnet_image_attentions_config=public_config(controlnet_image_attentions.config),
            )
        state = {f"controlnet.{k}": v for k, v in controlnet.state_dict().items()}
        state |= {f"unet_image_attentions.{k}": v for k, v in unet_image_attentions.state_dict().items()}
        state |= {f"controlnet_image_attentions.{k}": v for k, v in controlnet_image_attentions.state_dict().items()}
        model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
        return model

    def forward(self, unet, sample, timestep, encoder_hidden_states, controlnet_cond, image_prompt_embeds):
        with unet_lora_attached(self.unet_lora, unet):
            return seesr_noise_pred(
                unet,
                self.controlnet,
                self.unet_image_attentions,
                self.controlnet_image_attentions,
                sample,
                timestep,
                encoder_hidden_states,
                controlnet_cond,
                image_prompt_embeds,
            )


def build_seesr_add_ons(
    unet,
    image_prompt_dim: int = SEESR_IMAGE_CONTEXT_DIM,
    conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256),
) -> SeeSRAddOns:
    """Fresh :class:`SeeSRAddOns` for ``unet`` (the ``model`` section's arguments): image cross-attention for
    ``image_prompt_dim``-wide soft prompts (default the released 512; with a DAPE, its ``cross_attention_dim``), and a
    ControlNet from the UNet whose condition encoder has ``conditioning_embedding_out_channels`` (its
    ``2^(len - 1)`` must be the VAE's factor: the released ``(16, 32, 96, 256)`` for SD's 8)."""
    unet_image_attentions = seesr_image_attentions(unet, image_prompt_dim)
    controlnet, controlnet_image_attentions = seesr_controlnet_from_unet(
        unet, unet_image_attentions, conditioning_embedding_out_channels=conditioning_embedding_out_channels
    )
    return SeeSRAddOns.from_parts(controlnet, unet_image_attentions, controlnet_image_attentions)


# ----------------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class SeeSRConfig(SDAddOnSection):
    """``seesr``: the frozen base and prompt extractor, and how validation and the exported pipeline sample.

    ``base``: a diffusers Stable Diffusion 1.x/2.x folder (the released model: SD 2-base); ``unet_lora_rank``,
    ``unet_lora_alpha``: the LoRA option on the base UNet (:class:`~sr_diffusion.training.sd_addons.SDAddOnSection`;
    not in the paper: default off); ``dape``: a saved
    :class:`~sr_diffusion.prompts.DAPE` folder (frozen; ``None``: the empty prompt and the null soft prompt);
    ``null_text_ratio``: the probability of training with the empty prompt instead of the tags (the original's 0.5);
    ``num_inference_steps``, ``guidance_scale``, ``start_point``, ``color_fix``: the pipeline's, for validation."""

    dape: str | None = None
    null_text_ratio: float = 0.5
    num_inference_steps: int = call_default(SeeSRPipeline, "num_inference_steps")
    guidance_scale: float = call_default(SeeSRPipeline, "guidance_scale")
    start_point: Literal["lr", "noise"] = call_default(SeeSRPipeline, "start_point")
    color_fix: Literal["none", "adain", "wavelet"] = call_default(SeeSRPipeline, "color_fix")


@dataclass
class SeeSRTrainConfig(TrainConfig):
    """``train`` with SeeSR's defaults: the MSE of SD's objective, ``outputs/seesr``."""

    output_dir: str = "outputs/seesr"
    loss: Literal["l1", "mse", "charbonnier"] = "mse"


@dataclass
class SeeSRExperimentConfig(ExperimentConfig):
    """:class:`ExperimentConfig` with a ``seesr`` section; ``model.arch`` is ``seesr``."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(arch="seesr"))
    train: SeeSRTrainConfig = field(default_factory=SeeSRTrainConfig)
    seesr: SeeSRConfig = field(default_factory=SeeSRConfig)

    def validate(self) -> None:
        super().validate()
        s = self.seesr
        if self.model.arch != "seesr":
            raise ConfigError(f"model.arch: must be 'seesr', got {self.model.arch!r}")
        valid = [name for name in inspect.signature(build_seesr_add_ons).parameters if name != "unet"]
        unknown = sorted(set(self.model.kwargs) - set(valid))
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {', '.join('model.' + k for k in unknown)} for arch 'seesr'; valid keys: "
                f"arch, {', '.join(valid)} (the UNet is the base's: seesr.base)"
            )
        check_sd_base_folder(s.base, "seesr", "SD 2-base")
        if s.dape and not (Path(s.dape) / "config.json").is_file():
            raise ConfigError(f"seesr.dape: {s.dape} is not a saved DAPE folder (no config.json)")
        if not 0 <= s.null_text_ratio <= 1:
            raise ConfigError(f"seesr.null_text_ratio: must be in [0, 1], got {s.null_text_ratio}")
        if not 1 <= s.num_inference_steps <= 1000:
            raise ConfigError(f"seesr.num_inference_steps: must be in [1, 1000], got {s.num_inference_steps}")
        if s.guidance_scale < 1:
            raise ConfigError(f"seesr.guidance_scale: must be >= 1 (1: no guidance), got {s.guidance_scale}")


# ----------------------------------------------------------------------------------------------------------------------
# Task
# ----------------------------------------------------------------------------------------------------------------------


class SeeSRTask(SDAddOnTask):
    """SeeSR's objective for the shared :class:`~sr_diffusion.training.Trainer` (see the module docstring; the frozen
    base, the forward process, validation and export: :class:`~sr_diffusion.training.sd_addons.SDAddOnTask`)."""

    section_name = "seesr"
    section_class = SeeSRConfig

    def __init__(self):
        super().__init__()
        self.model_kwargs: dict[str, Any] = {}
        self._dape = None

    def check_config(self, config: ExperimentConfig) -> None:
        import json

        super().check_config(config)
        vae_factor = self.vae_factor
        kwargs = dict(config.model.kwargs)
        channels = kwargs.get("conditioning_embedding_out_channels", (16, 32, 96, 256))
        if 2 ** (len(channels) - 1) != vae_factor:
            raise ConfigError(
                f"model.conditioning_embedding_out_channels: {list(channels)} downsamples by {2 ** (len(channels) - 1)}"
                f" but the base's VAE by {vae_factor}: give {int(vae_factor).bit_length()} widths"
            )
        if self.section.dape:
            dape_dim = int(json.loads((Path(self.section.dape) / "config.json").read_text())["cross_attention_dim"])
            if kwargs.setdefault("image_prompt_dim", dape_dim) != dape_dim:
                raise ConfigError(
                    f"model.image_prompt_dim: {kwargs['image_prompt_dim']}, but the DAPE of seesr.dape makes "
                    f"{dape_dim}-d soft prompts"
                )
        self.model_kwargs = kwargs

    def build_model(self, config: ExperimentConfig) -> SeeSRAddOns:
        try:
            return self.with_unet_lora(build_seesr_add_ons(self.base()["unet"], **self.model_kwargs))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model: {err}") from err

    # ------------------------------------------------------------------------------------------------------------------
    # The frozen prompt extractor (the frozen base: SDAddOnTask)
    # ------------------------------------------------------------------------------------------------------------------

    def dape(self, device: torch.device | None = None):
        """The frozen DAPE of ``seesr.dape`` (``None`` without one)."""
        if not self.section.dape:
            return None
        if self._dape is None:
            from sr_diffusion.prompts import DAPE

            self._dape = DAPE.from_pretrained(self.section.dape).eval().requires_grad_(False)
        if device is not None:
            self._dape.to(device)
        return self._dape

    def prompts(
        self, hr: torch.Tensor, condition: torch.Tensor, generator: GeneratorArg
    ) -> tuple[list[str], torch.Tensor]:
        """Step 3 of the module docstring: ``(hard prompts, soft prompts (N, L, D_img))`` for HR images and the
        upsampled LR images, both ``(N, 3, H, W)`` in [0, 1]."""
        n, device = hr.shape[0], hr.device
        dape = self.dape(device)
        if dape is None:
            dim = int(self.model_kwargs.get("image_prompt_dim", SEESR_IMAGE_CONTEXT_DIM))
            return [""] * n, null_image_prompt(n, dim, device=device)
        with torch.no_grad():
            tags = dape(hr, use_lora=False).hard_prompts
            soft = dape(condition).soft_prompts.float()
        dape.requires_grad_(False)  # peft's disable_adapter() marks the LoRA trainable again on exit
        keep = rng.rand(n, generator, device=device) >= self.section.null_text_ratio
        return [t if k else "" for t, k in zip(tags, keep.tolist())], soft

    # ------------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, batch, generator) -> torch.Tensor:
        """Steps 1-4 of the module docstring for a batch ``{"lr": (B,3,h,w), "hr": (B,3,s·h,s·w)}`` in [0, 1]."""
        from sr_diffusion.resize import resize

        device = batch["hr"].device
        unet = self.base(device)["unet"]
        hr01 = batch["hr"].float()
        condition = resize(batch["lr"].float(), size=tuple(hr01.shape[-2:]), mode="bicubic").clamp(0.0, 1.0)

        # 1. z_0 (a posterior sample, as the original's latent_dist.sample()); 2. t, eps, z_t
        z_t, t, target = self.diffuse(self.encode_latents(hr01 * 2.0 - 1.0, generator), generator)

        # 3. prompts; 4. regress with the ControlNet-conditioned frozen UNet
        prompts, soft = self.prompts(hr01, condition, generator)
        text = self.embed_prompts(prompts, device)
        prediction = model(unet, z_t, t, text, condition, soft)
        return self.loss_fn(prediction.float(), target)

    # ------------------------------------------------------------------------------------------------------------------
    # Schedulers, validation, export
    # ------------------------------------------------------------------------------------------------------------------

    def pipeline_class(self) -> type:
        from sr_diffusion.pipelines import SeeSRPipeline

        return SeeSRPipeline

    def make_noise_scheduler(self):
        from sr_diffusion.pipelines.seesr import seesr_scheduler

        return seesr_scheduler(self.prediction_type)

    def sampling_scheduler(self):
        return self.pipeline_class().base_scheduler(self.section.base)

    def add_on_components(self, model, device: torch.device) -> dict[str, Any]:
        return {
            "controlnet": model.controlnet,
            "unet_image_attentions": model.unet_image_attentions,
            "controlnet_image_attentions": model.controlnet_image_attentions,
            "prompt_extractor": self.dape(device),
        }

    def sampling_kwargs(self, pipe) -> dict[str, Any]:
        s = self.section
        return {
            "num_inference_steps": s.num_inference_steps,
            "guidance_scale": s.guidance_scale,
            "start_point": s.start_point,
            "color_fix": s.color_fix,
        }
