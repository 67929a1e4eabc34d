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
exported with the trained add-ons as a :class:`~sr_diffusion.pipelines.StableSRPipeline`. The CFW layers are the
second stage, trained afterwards on this model's outputs (:mod:`sr_diffusion.training.stablesr_cfw`,
``train_stablesr.py --stage cfw``); ``stablesr.cfw`` may name a saved :class:`~sr_diffusion.models.StableSRCFW` folder
to export with the pipeline.

Every random draw (posterior samples, ``t``, ``eps``) comes from the trainer's generator.

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

from .config import ConfigError, ExperimentConfig, ModelConfig, TrainConfig, check_model_kwargs
from .losses import build_loss
from .trainer import TrainingTask

__all__ = ["StableSRAddOns", "StableSRConfig", "StableSRExperimentConfig", "StableSRTask", "StableSRTrainConfig"]

BASE_PARTS = ("vae", "text_encoder", "tokenizer", "unet")


# ----------------------------------------------------------------------------------------------------------------------
# The trainable model
# ----------------------------------------------------------------------------------------------------------------------


class StableSRAddOns(ModelMixin, ConfigMixin):
    """StableSR's trainable parts as one model: ``time_aware_encoder`` and ``sft`` (their keyword arguments in
    ``encoder_config`` and ``sft_config``). ``forward`` is the conditioned denoiser call, so that data-parallel
    wrappers see it."""

    @register_to_config
    def __init__(self, encoder_config: dict[str, Any] | None = None, sft_config: dict[str, Any] | None = None):
        super().__init__()
        self.time_aware_encoder = StableSRTimeAwareEncoder(**(encoder_config or {}))
        self.sft = StableSRSFT(**(sft_config or {}))

    def forward(self, unet, sample, timestep, lr_latents, encoder_hidden_states) -> torch.Tensor:
        from sr_diffusion.pipelines.stablesr import stablesr_noise_pred

        return stablesr_noise_pred(
            unet, self.time_aware_encoder, self.sft, sample, timestep, lr_latents, encoder_hidden_states
        )


# ----------------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class StableSRConfig:
    """``stablesr``: the frozen base and how validation and the exported pipeline sample.

    ``base``: a diffusers Stable Diffusion 1.x/2.x folder (``vae/``, ``text_encoder/``, ``tokenizer/``, ``unet/``;
    the released model: SD 2.1-base); ``cfw``: an optional saved ``StableSRCFW`` folder for the exported pipeline;
    ``sft_hidden_channels``: the SFT layers' shared width (the original's 128); ``num_inference_steps``,
    ``color_fix``, ``fidelity_weight``: the pipeline's, for validation."""

    base: str | None = None
    cfw: str | None = None
    sft_hidden_channels: int = 128
    num_inference_steps: int = 200
    color_fix: Literal["none", "adain", "wavelet"] = "adain"
    fidelity_weight: float = 0.5


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
        if not s.base:
            raise ConfigError("stablesr.base: required: a diffusers Stable Diffusion folder (e.g. SD 2.1-base)")
        missing = [p for p in BASE_PARTS if not (Path(s.base) / p).is_dir()]
        if missing:
            raise ConfigError(f"stablesr.base: {s.base} is not a diffusers SD folder (no {', '.join(missing)}/)")
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


class StableSRTask(TrainingTask):
    """StableSR's objective for the shared :class:`~sr_diffusion.training.Trainer` (see the module docstring)."""

    def __init__(self):
        self.section = StableSRConfig()
        self.scale: int | None = None
        self.loss_fn = None
        self.unet_config: dict[str, Any] = {}
        self.vae_config: dict[str, Any] = {}
        self.prediction_type = "epsilon"
        self._base: dict[str, Any] | None = None
        self._empty_prompt: torch.Tensor | None = None
        self._scheduler = None

    def check_config(self, config: ExperimentConfig) -> None:
        import json

        from diffusers import AutoencoderKL, UNet2DConditionModel

        self.section = getattr(config, "stablesr", None) or StableSRConfig()
        if not self.section.base:
            raise ConfigError("stablesr.base: required: a diffusers Stable Diffusion folder")
        base = Path(self.section.base)
        self.unet_config = dict(UNet2DConditionModel.load_config(base, subfolder="unet"))
        self.vae_config = dict(AutoencoderKL.load_config(base, subfolder="vae"))
        if self.unet_config.get("addition_embed_type") or self.unet_config.get("class_embed_type"):
            raise ConfigError(f"stablesr.base: {base} is not an SD 1.x/2.x text-to-image base (SDXL, upscaler, ...)")
        scheduler_config = base / "scheduler" / "scheduler_config.json"
        if scheduler_config.is_file():
            self.prediction_type = json.loads(scheduler_config.read_text()).get("prediction_type", "epsilon")
        multiple = 2 ** (len(self.vae_config["block_out_channels"]) - 1) * 2 ** (
            len(self.unet_config["block_out_channels"]) - 1
        )
        if config.data.gt_size % multiple:
            raise ConfigError(
                f"data.gt_size ({config.data.gt_size}) must be a multiple of {multiple} (the VAE's factor times the "
                "UNet's input multiple)"
            )
        self.scale = config.scale
        self.loss_fn = build_loss(config.train.loss, config.train.charbonnier_eps)

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
            return StableSRAddOns(encoder_config=encoder, sft_config=sft)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model: {err}") from err

    # ------------------------------------------------------------------------------------------------------------------
    # The frozen base
    # ------------------------------------------------------------------------------------------------------------------

    def base(self, device: torch.device | None = None) -> dict[str, Any]:
        """The frozen SD components (loaded once, eval mode, no gradients), moved to ``device`` when given."""
        if self._base is None:
            from diffusers import AutoencoderKL, UNet2DConditionModel
            from transformers import CLIPTextModel, CLIPTokenizer

            folder = Path(self.section.base)
            self._base = {
                "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae"),
                "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
                "tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
                "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
            }
            for name in ("vae", "text_encoder", "unet"):
                self._base[name].eval().requires_grad_(False)
        if device is not None:
            for name in ("vae", "text_encoder", "unet"):
                self._base[name].to(device)
        return self._base

    def empty_prompt(self, device: torch.device) -> torch.Tensor:
        """The text embedding ``(1, L, D)`` of ``""`` (what the original trains with)."""
        if self._empty_prompt is None or self._empty_prompt.device != device:
            base = self.base(device)
            tokenizer = base["tokenizer"]
            ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
            with torch.no_grad():
                self._empty_prompt = base["text_encoder"](ids.input_ids.to(device))[0]
        return self._empty_prompt

    # ------------------------------------------------------------------------------------------------------------------
    # Loss, validation, export
    # ------------------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, batch, generator) -> torch.Tensor:
        """Steps 1-3 of the module docstring for a batch ``{"lr": (B,3,h,w), "hr": (B,3,s·h,s·w)}`` in [0, 1]."""
        from sr_diffusion.resize import resize

        device = batch["hr"].device
        base = self.base(device)
        vae, unet = base["vae"], base["unet"]
        hr = batch["hr"].float() * 2.0 - 1.0
        lr = batch["lr"].float() * 2.0 - 1.0
        lr_up = resize(lr, size=tuple(hr.shape[-2:]), mode="bicubic").clamp(-1.0, 1.0)
        n = hr.shape[0]
        scaling = float(vae.config.scaling_factor)

        # 1. latents (posterior samples, as the original's get_first_stage_encoding)
        with torch.no_grad():
            z_lr = vae.encode(lr_up.to(vae.dtype)).latent_dist.sample(generator).float() * scaling
            z_0 = vae.encode(hr.to(vae.dtype)).latent_dist.sample(generator).float() * scaling

        # 2. t, eps, z_t
        scheduler = self._noise_scheduler()
        t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator, device=device)
        noise = torch.randn(z_0.shape, generator=generator, device=device, dtype=z_0.dtype)
        z_t = scheduler.add_noise(z_0, noise, t)
        target = scheduler.get_velocity(z_0, noise, t) if self.prediction_type == "v_prediction" else noise

        # 3. regress with the SFT-modulated frozen UNet
        text = self.empty_prompt(device).expand(n, -1, -1)
        prediction = model(unet, z_t, t, z_lr, text)
        return self.loss_fn(prediction.float(), target)

    def _noise_scheduler(self):
        from sr_diffusion.pipelines.stablesr import stablesr_scheduler

        if self._scheduler is None:
            self._scheduler = stablesr_scheduler(self.prediction_type)
        return self._scheduler

    def predict(self, model, lr, generator) -> torch.Tensor:
        pipe = self.build_pipeline(model, device=lr.device)
        pipe.set_progress_bar_config(disable=True)
        fidelity = self.section.fidelity_weight if pipe.cfw is not None else 0.0
        return pipe(
            lr.clamp(0, 1),
            num_inference_steps=self.section.num_inference_steps,
            color_fix=self.section.color_fix,
            fidelity_weight=fidelity,
            generator=generator,
            output_type="pt",
        ).images

    def build_pipeline(self, model, device: torch.device | None = None):
        from sr_diffusion.models import StableSRCFW
        from sr_diffusion.pipelines import StableSRPipeline
        from sr_diffusion.pipelines.stablesr import stablesr_scheduler

        model = getattr(model, "module", model)
        device = device or next(model.parameters()).device
        base = self.base(device)
        cfw = StableSRCFW.from_pretrained(self.section.cfw).to(device) if self.section.cfw else None
        return StableSRPipeline(
            vae=base["vae"],
            text_encoder=base["text_encoder"],
            tokenizer=base["tokenizer"],
            unet=base["unet"],
            scheduler=stablesr_scheduler(self.prediction_type),
            time_aware_encoder=model.time_aware_encoder,
            sft=model.sft,
            cfw=cfw,
            upscale=self.scale,
        )
