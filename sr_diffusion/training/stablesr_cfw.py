"""StableSR's second stage: the CFW layers learn to decode faithfully, on a frozen VAE.

Wang et al., IJCV 2024 (arXiv:2305.07015), Sec. 3.3, Eq. 4; the released ``AutoencoderKLResi`` (``ldm/models/
autoencoder.py``), ``configs/autoencoder/autoencoder_kl_64x64x4_resi.yaml`` and ``scripts/generate_vqgan_data.py``
(facts only). For an HR crop ``y`` and its LR image (both in [-1, 1]; the LR bicubic-upsampled to the HR size and
clamped, as in the first stage, :mod:`sr_diffusion.training.stablesr`):

1. ``F_e = E(lr_up)``'s features at the CFW levels (:meth:`~sr_diffusion.models.StableSRCFW.capture_encoder_features`;
   the frozen SD encoder);
2. a latent ``z_0`` ``(B, 4, H/f, W/f)`` of the image, from ``cfw.latents``:

   * ``generated`` (the original): sampled by the trained first stage (a saved
     :class:`~sr_diffusion.pipelines.StableSRPipeline`, ``cfw.pipeline``) from the LR image, as
     ``generate_vqgan_data.py``: ``z_lr = E(lr_up) · s`` (a posterior sample), ``z_T = q_sample(z_lr, T-1)``, then
     ``cfw.num_inference_steps`` respaced DDPM steps with the empty prompt (the README's command: 200), no
     gradients; divided by the scaling factor ``s`` (0.18215 for SD) before decoding. The CFW then learns to correct
     what the diffusion model gets wrong (colour shifts, hallucinated detail) from the LR features;
   * ``hr`` (a cheap proxy): ``z_0`` is the posterior mean of ``E(y)``, the latent a perfect diffusion model would
     produce. No diffusion model is needed (tests, CPU runs, a first stage not trained yet), but the CFW only sees
     the VAE's own reconstruction error, not the sampler's (colour shifts, invented detail), so it is not trained to
     correct what it must correct at inference: a stand-in, not the method;
3. ``x = D(z_0; F_e, w)``, the frozen decoder with ``F_d + w · C(F_e, F_d)`` at every CFW level (``w =
   cfw.fidelity_weight``, the original's ``fusion_w``: 1 in training), and the loss ``L(x, y)`` with ``L`` the shared
   pixel loss (``train.loss``, L1 by default, the pixel term of the original's loss).

Only the fusion layers are trained (the original's ``freeze_dec: True``: parameters named ``fusion_layer``); the VAE
is loaded frozen by the task. Adam with betas (0.5, 0.9) and lr 5e-5 (the original's, not scaled) are the defaults.

Not carried over: the original's loss is ``LPIPSWithDiscriminator`` (``kl_weight`` 0, ``disc_weight`` 0.025,
``disc_start`` 501): L1 + LPIPS + a PatchGAN hinge term. LPIPS needs pretrained VGG weights that cannot be downloaded
here, and the shared training loop has no discriminator (one optimizer, one model), so this stage trains the L1 term
alone: expect blurrier outputs than the released CFW's. (With the decoder frozen, the original's adaptive GAN weight
cannot be computed — its ``last_layer`` has no gradient — and falls back to the constant 0.025.) The original also
pre-generates its latents once (about 5000 samples saved as ``.npy``, with their LR inputs and GTs); here they are
generated on the fly for every batch, which costs ``num_inference_steps`` UNet calls per micro-batch (use few steps).

Every random draw (the posterior sample, ``z_T``'s noise, the sampler's noise) comes from the trainer's generator.

Config: the shared sections, ``model`` (``arch: stablesr_cfw`` plus :class:`~sr_diffusion.models.StableSRCFW`
arguments but ``block_out_channels``, which the VAE sets; the released ones by default), and ``cfw``
(:class:`StableSRCFWConfig`). Export (``train.output_dir/pipeline``): with ``cfw.pipeline``, that pipeline with the
trained CFW layers (in its ``cfw/`` subfolder); without, the :class:`~sr_diffusion.models.StableSRCFW` folder itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from sr_diffusion.models.stablesr_cfw import StableSRCFW
from sr_diffusion.pipelines.sd_base import call_default
from sr_diffusion.pipelines.stablesr.pipeline_stablesr import StableSRPipeline

from .config import ConfigError, ExperimentConfig, ModelConfig, OptimConfig, TrainConfig, check_model_kwargs
from .losses import build_loss
from .trainer import TrainingTask

__all__ = [
    "StableSRCFWConfig",
    "StableSRCFWExperimentConfig",
    "StableSRCFWOptimConfig",
    "StableSRCFWTask",
    "StableSRCFWTrainConfig",
    "StableSRCFWTrainable",
]


# ----------------------------------------------------------------------------------------------------------------------
# The trainable model
# ----------------------------------------------------------------------------------------------------------------------


class StableSRCFWTrainable(ModelMixin, ConfigMixin):
    """The CFW layers (``cfw``, a :class:`~sr_diffusion.models.StableSRCFW` built from ``cfw_config``) with the fused
    decoder call as ``forward``, so that data-parallel wrappers see it. Checkpoints hold this model; the export is its
    ``cfw``."""

    @register_to_config
    def __init__(self, cfw_config: dict[str, Any] | None = None):
        super().__init__()
        self.cfw = StableSRCFW(**(cfw_config or {}))

    def forward(self, vae, z: torch.Tensor, features: dict[int, torch.Tensor], weight: float) -> torch.Tensor:
        """``D(z; F_e, w)``: the VAE latent ``z`` ``(B, C_z, H/f, W/f)`` (unscaled: the decoder's input) decoded to
        ``(B, 3, H, W)`` with the CFW fusion of the encoder features ``features[l]`` ``(B, C_l, H_l, W_l)``."""
        with self.cfw.fuse_decoder(vae, features, weight):
            return vae.decode(z.to(vae.dtype)).sample


# ----------------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------------

LATENT_SOURCES = ("generated", "hr")


@dataclass
class StableSRCFWConfig:
    """``cfw``: the frozen parts and where the latents come from.

    ``pipeline``: a saved :class:`~sr_diffusion.pipelines.StableSRPipeline` (the trained first stage): its VAE is the
    one the CFW is trained for, it generates the latents (``latents: generated``), validation samples with it, and it
    is exported with the trained CFW. ``base``: without a pipeline, a diffusers SD folder whose ``vae/`` is used
    (``latents: hr`` only; no validation). ``latents``: ``generated`` (the original) or ``hr`` (see the module
    docstring). ``num_inference_steps``: DDPM steps of the latent generation and of validation sampling (the original
    generates with 200). ``fidelity_weight``: ``w`` in training and validation (the original's ``fusion_w``: 1).
    ``color_fix``: validation's colour correction."""

    pipeline: str | None = None
    base: str | None = None
    latents: Literal["generated", "hr"] = "generated"
    num_inference_steps: int = call_default(StableSRPipeline, "num_inference_steps")
    fidelity_weight: float = 1.0
    color_fix: Literal["none", "adain", "wavelet"] = call_default(StableSRPipeline, "color_fix")


@dataclass
class StableSRCFWOptimConfig(OptimConfig):
    """``optim`` with the original's CFW settings: Adam, lr 5e-5, betas (0.5, 0.9)."""

    lr: float = 5e-5
    betas: tuple[float, float] = (0.5, 0.9)


@dataclass
class StableSRCFWTrainConfig(TrainConfig):
    """``train`` with the CFW stage's defaults: the L1 loss, ``outputs/stablesr_cfw``."""

    output_dir: str = "outputs/stablesr_cfw"
    loss: Literal["l1", "mse", "charbonnier"] = "l1"


@dataclass
class StableSRCFWExperimentConfig(ExperimentConfig):
    """:class:`ExperimentConfig` with a ``cfw`` section; ``model.arch`` is ``stablesr_cfw``."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(arch="stablesr_cfw"))
    optim: StableSRCFWOptimConfig = field(default_factory=StableSRCFWOptimConfig)
    train: StableSRCFWTrainConfig = field(default_factory=StableSRCFWTrainConfig)
    cfw: StableSRCFWConfig = field(default_factory=StableSRCFWConfig)

    def validate(self) -> None:
        super().validate()
        c = self.cfw
        if self.model.arch != "stablesr_cfw":
            raise ConfigError(f"model.arch: must be 'stablesr_cfw', got {self.model.arch!r}")
        check_model_kwargs(StableSRCFW, self.model.kwargs, "stablesr_cfw")
        if "block_out_channels" in self.model.kwargs:
            raise ConfigError("model.block_out_channels: set by the VAE (its block_out_channels)")
        if c.pipeline and c.base:
            raise ConfigError("cfw.base: give cfw.pipeline or cfw.base, not both (the pipeline holds its own VAE)")
        if not c.pipeline and not c.base:
            raise ConfigError(
                "cfw.pipeline: required: a saved StableSRPipeline (the trained first stage); or, with "
                "cfw.latents=hr, cfw.base: a diffusers SD folder"
            )
        if c.pipeline:
            _check_pipeline_folder(Path(c.pipeline))
        else:
            if not (Path(c.base) / "vae" / "config.json").is_file():
                raise ConfigError(f"cfw.base: {c.base} is not a diffusers SD folder (no vae/config.json)")
            if c.latents == "generated":
                raise ConfigError(
                    "cfw.latents: 'generated' samples the latents with the trained first stage: give cfw.pipeline "
                    "(or use cfw.latents=hr)"
                )
            if self.validation.source != "none":
                raise ConfigError(
                    "validation.source: must be 'none' without cfw.pipeline (validation samples LR -> SR with the "
                    f"trained first stage), got {self.validation.source!r}"
                )
        if not 1 <= c.num_inference_steps <= 1000:
            raise ConfigError(f"cfw.num_inference_steps: must be in [1, 1000], got {c.num_inference_steps}")
        if not 0 < c.fidelity_weight <= 1:
            raise ConfigError(f"cfw.fidelity_weight: must be in (0, 1] (0 bypasses the CFW), got {c.fidelity_weight}")


def _check_pipeline_folder(folder: Path) -> None:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ConfigError(f"cfw.pipeline: {folder} is not a saved pipeline (no model_index.json)")
    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except json.JSONDecodeError as err:
        raise ConfigError(f"cfw.pipeline: {index} is corrupt ({err})") from err
    if class_name != "StableSRPipeline":
        raise ConfigError(f"cfw.pipeline: {folder} holds a {class_name}, not a StableSRPipeline")


# ----------------------------------------------------------------------------------------------------------------------
# Task
# ----------------------------------------------------------------------------------------------------------------------


class StableSRCFWTask(TrainingTask):
    """StableSR's CFW objective for the shared :class:`~sr_diffusion.training.Trainer` (see the module docstring)."""

    def __init__(self):
        self.section = StableSRCFWConfig()
        self.vae_config: dict[str, Any] = {}
        self.loss_fn = None
        self._pipeline = None
        self._vae = None
        self._empty_prompt: torch.Tensor | None = None

    def check_config(self, config: ExperimentConfig) -> None:
        from diffusers import AutoencoderKL

        self.section = getattr(config, "cfw", None) or StableSRCFWConfig()
        s = self.section
        if not (s.pipeline or s.base):
            raise ConfigError("cfw.pipeline: required (or cfw.base with cfw.latents=hr)")
        self.vae_config = dict(AutoencoderKL.load_config(s.pipeline or s.base, subfolder="vae"))
        widths = list(self.vae_config["block_out_channels"])
        if len(widths) < 3:
            raise ConfigError(f"the VAE has {len(widths)} levels (block_out_channels={widths}): CFW needs at least 3")
        multiple = 2 ** (len(widths) - 1)
        if s.pipeline:  # the pipeline samples at the UNet's input multiple too
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.load_config(s.pipeline, subfolder="unet")
            multiple *= 2 ** (len(unet["block_out_channels"]) - 1)
        if config.data.gt_size % multiple:
            raise ConfigError(f"data.gt_size ({config.data.gt_size}) must be a multiple of {multiple}")
        self.loss_fn = build_loss(config.train.loss, config.train.charbonnier_eps)

    def build_model(self, config: ExperimentConfig) -> StableSRCFWTrainable:
        kwargs = {**config.model.kwargs, "block_out_channels": list(self.vae_config["block_out_channels"])}
        try:
            return StableSRCFWTrainable(cfw_config=kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model: {err}") from err

    # ------------------------------------------------------------------------------------------------------------------
    # The frozen parts
    # ------------------------------------------------------------------------------------------------------------------

    def pipeline(self, device: torch.device | None = None):
        """The trained first stage (``cfw.pipeline``: loaded once, eval mode, no gradients), or None without one."""
        if self.section.pipeline is None:
            return None
        if self._pipeline is None:
            from sr_diffusion.pipelines import StableSRPipeline

            pipe = StableSRPipeline.from_pretrained(self.section.pipeline)
            for module in pipe.components.values():
                if isinstance(module, torch.nn.Module):
                    module.eval().requires_grad_(False)
            pipe.set_progress_bar_config(disable=True)
            self._pipeline = pipe
        if device is not None and self._pipeline.device != device:
            self._pipeline.to(device)
        return self._pipeline

    def vae(self, device: torch.device | None = None):
        """The frozen ``AutoencoderKL`` the CFW is trained for: the pipeline's, or ``cfw.base``'s ``vae/``."""
        pipe = self.pipeline(device)
        if pipe is not None:
            return pipe.vae
        if self._vae is None:
            from diffusers import AutoencoderKL

            self._vae = AutoencoderKL.from_pretrained(self.section.base, subfolder="vae").eval().requires_grad_(False)
        if device is not None:
            self._vae.to(device)
        return self._vae

    # ------------------------------------------------------------------------------------------------------------------
    # Inputs of the decoder: F_e and z_0
    # ------------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def decoder_inputs(
        self, model, lr: torch.Tensor, hr: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Steps 1-2 of the module docstring for ``lr`` ``(B, 3, h, w)`` and ``hr`` ``(B, 3, H, W)`` in [-1, 1]: the
        decoder's input ``z_0 / s`` ``(B, C_z, H/f, W/f)`` and ``F_e`` (one ``(B, C_l, H_l, W_l)`` per CFW level)."""
        from sr_diffusion.resize import resize

        cfw = getattr(model, "module", model).cfw
        vae = self.vae(hr.device)
        lr_up = resize(lr, size=tuple(hr.shape[-2:]), mode="bicubic").clamp(-1.0, 1.0)
        store: dict[int, list[torch.Tensor]] = {}
        with cfw.capture_encoder_features(vae, store):
            posterior = vae.encode(lr_up.to(vae.dtype)).latent_dist
        features = {level: torch.cat(parts) for level, parts in store.items()}
        if self.section.latents == "hr":
            z = vae.encode(hr.to(vae.dtype)).latent_dist.mode()
        else:
            z = self.generate_latents(posterior.sample(generator=generator), generator)
        return z, features

    @torch.no_grad()
    def generate_latents(self, z_lr: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``z_0 / s`` sampled by the first stage from ``z_lr = E(lr_up)`` (a posterior sample, unscaled), as the
        original's ``generate_vqgan_data.py``: ``z_T = q_sample(z_lr · s, T-1)``, the respaced DDPM steps with the
        empty prompt, no guidance (in the VAE's dtype)."""
        pipe = self.pipeline(z_lr.device)
        scheduler = pipe.scheduler
        lr_latents = pipe.scale_latents(z_lr).to(pipe.unet.dtype)
        n, device = z_lr.shape[0], z_lr.device
        text = self.empty_prompt(device).expand(n, -1, -1)

        last = torch.full((n,), scheduler.config.num_train_timesteps - 1, device=device, dtype=torch.long)
        noise = torch.randn(lr_latents.shape, generator=generator, device=device, dtype=lr_latents.dtype)
        latents = scheduler.add_noise(lr_latents, noise, last)
        for t in pipe.set_timesteps(self.section.num_inference_steps, device):
            noise_pred = pipe.predict_noise(latents, t=t, lr_latents=lr_latents, prompt_embeds=text, guidance_scale=1.0)
            latents = scheduler.step(noise_pred, t, latents, generator=generator, return_dict=False)[0]
        return pipe.unscale_latents(latents)

    def empty_prompt(self, device: torch.device) -> torch.Tensor:
        """The first stage's text embedding ``(1, L, D)`` of ``""`` (what the original generates with)."""
        if self._empty_prompt is None or self._empty_prompt.device != device:
            self._empty_prompt = self.pipeline(device).encode_prompt("", 1, device, None, False)[0]
        return self._empty_prompt

    # ------------------------------------------------------------------------------------------------------------------
    # Loss, validation, export
    # ------------------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, batch, generator) -> torch.Tensor:
        """Steps 1-3 of the module docstring for a batch ``{"lr": (B,3,h,w), "hr": (B,3,s·h,s·w)}`` in [0, 1]."""
        hr = batch["hr"].float() * 2.0 - 1.0
        lr = batch["lr"].float() * 2.0 - 1.0
        z, features = self.decoder_inputs(model, lr, hr, generator)
        image = model(self.vae(hr.device), z, features, self.section.fidelity_weight)
        return self.loss_fn(image.float(), hr)

    @torch.no_grad()
    def decode(self, model, lr: torch.Tensor, hr: torch.Tensor, generator: torch.Generator, weight: float):
        """``D(z_0; F_e, w)`` in [0, 1] for ``lr``, ``hr`` in [0, 1] (``weight`` 0: the plain decoder); evaluation."""
        z, features = self.decoder_inputs(model, lr * 2.0 - 1.0, hr * 2.0 - 1.0, generator)
        vae = self.vae(hr.device)
        if weight == 0:
            image = vae.decode(z.to(vae.dtype)).sample
        else:
            image = model(vae, z, features, weight)
        return ((image.float() + 1.0) / 2.0).clamp(0, 1)

    def predict(self, model, lr, generator) -> torch.Tensor:
        if self.section.pipeline is None:
            raise NotImplementedError("CFW validation samples with the first stage: set cfw.pipeline")
        pipe = self.build_pipeline(model)
        return pipe(
            lr.clamp(0, 1),
            num_inference_steps=self.section.num_inference_steps,
            fidelity_weight=self.section.fidelity_weight,
            color_fix=self.section.color_fix,
            generator=generator,
            output_type="pt",
        ).images

    def build_pipeline(self, model):
        """With ``cfw.pipeline``: that pipeline with ``model``'s CFW layers; without: the CFW layers alone (a
        :class:`~sr_diffusion.models.StableSRCFW`, saved as such by ``Trainer``)."""
        cfw = getattr(model, "module", model).cfw
        pipe = self.pipeline()
        if pipe is None:
            return cfw
        from sr_diffusion.pipelines import StableSRPipeline

        components = {name: module for name, module in pipe.components.items() if name != "cfw"}
        out = StableSRPipeline(**components, cfw=cfw.to(pipe.device), upscale=pipe.upscale)
        out.set_progress_bar_config(disable=True)
        return out
