"""What the training tasks of the add-on methods on a frozen Stable Diffusion base share (StableSR, PASD, SeeSR).

Each of them trains its own add-on modules (one ``ModelMixin`` holding them, so that the shared
:class:`~sr_diffusion.training.Trainer` checkpoints and averages only those) on a frozen SD 1.x/2.x diffusers folder
named in its config section (``stablesr.base``, ``pasd.base``, ``seesr.base``), and they regress the frozen UNet's
output, steered by the add-ons, onto the diffusion target. :class:`SDAddOnTask` holds what they do alike:

- the config checks: the base folder (:func:`check_sd_base_folder`), an SD 1.x/2.x text-to-image UNet, its
  ``prediction_type``, crops that are a multiple of the VAE's factor ``f`` times the UNet's input multiple;
- the frozen base (:meth:`~SDAddOnTask.base`: loaded once, eval mode, no gradients) and text embeddings
  (:meth:`~SDAddOnTask.embed_prompts`, the empty prompt cached);
- SD's forward process for a batch of latents (Ho et al. 2020, Eq. 4): ``z_0 = E(x) · s`` a posterior sample of the
  frozen VAE (:meth:`~SDAddOnTask.encode_latents`), then (:meth:`~SDAddOnTask.diffuse`) ``t ~ U{0, ..., T-1}``,
  ``eps ~ N(0, I)``, ``z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps`` and the target ``eps`` (``v`` for a
  v-prediction base), every draw from the trainer's generator;
- validation and export: the method's pipeline on the frozen base with the (EMA) add-ons
  (:meth:`~SDAddOnTask.build_pipeline`, :meth:`~SDAddOnTask.predict`);
- the LoRA option (``{section}.unet_lora_rank``, ``{section}.unet_lora_alpha``, fields of :class:`SDAddOnSection`):
  low-rank adapters (:class:`~sr_diffusion.models.UNetLoRA`, Hu et al. 2022; ``scale = alpha / rank``, peft's
  convention) on the attention projections of the base UNet, trained with the add-ons. They live in the add-on
  model's optional ``unet_lora`` submodule (:meth:`~SDAddOnTask.with_unet_lora`, checkpointed and averaged with it) and
  act through forward hooks in its ``forward`` (:func:`unet_lora_attached`): the base UNet's own weights stay frozen
  and unchanged. Validation and the exported pipeline use a copy of the base UNet with the LoRA fused in (so the
  exported pipeline is self-contained), and the export also writes the LoRA alone, in diffusers' LoRA format
  (``save_lora_weights``), to ``output_dir/pipeline/unet_lora/``: ``pipe.load_lora_weights(".../unet_lora")``
  applies it to a pipeline on the (unchanged) base. Without a rank (the default) the methods train as their papers,
  with the whole base frozen.

A method's task names its config section (:attr:`~SDAddOnTask.section_name`, :attr:`~SDAddOnTask.section_class`) and
gives its noise scheduler (training), its sampler (validation, export), its pipeline class, the pipeline's add-on
components and sampling settings; its objective (``compute_loss``) stays in its own module.
"""

from __future__ import annotations

import contextlib
import copy
import json
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import rng
from .config import ConfigError, ExperimentConfig
from .losses import build_loss
from .rng import GeneratorArg
from .trainer import TrainingTask

__all__ = [
    "BASE_PARTS",
    "SDAddOnSection",
    "SDAddOnTask",
    "check_sd_base_folder",
    "make_unet_lora",
    "public_config",
    "unet_lora_attached",
]

#: the subfolders of the diffusers SD folder a task loads (frozen)
BASE_PARTS = ("vae", "text_encoder", "tokenizer", "unet")


def check_sd_base_folder(base: str | None, section: str, example: str) -> None:
    """A :class:`ConfigError` unless ``base`` (the ``{section}.base`` setting) is a diffusers SD folder (``vae/``,
    ``text_encoder/``, ``tokenizer/``, ``unet/``); ``example`` names the base the method was released on."""
    if not base:
        raise ConfigError(f"{section}.base: required: a diffusers Stable Diffusion folder (e.g. {example})")
    missing = [part for part in BASE_PARTS if not (Path(base) / part).is_dir()]
    if missing:
        raise ConfigError(f"{section}.base: {base} is not a diffusers SD folder (no {', '.join(missing)}/)")


def public_config(config) -> dict[str, Any]:
    """A model config as plain JSON values (lists for tuples), without diffusers' bookkeeping keys (``_*``): what
    the config of a model that holds it records."""
    return {k: v for k, v in json.loads(json.dumps(dict(config))).items() if not k.startswith("_")}


@dataclass
class SDAddOnSection:
    """What the config sections of the add-on methods share (``stablesr``, ``pasd``, ``seesr`` derive from it).

    ``base``: a diffusers Stable Diffusion 1.x/2.x folder (``vae/``, ``text_encoder/``, ``tokenizer/``, ``unet/``),
    frozen; ``unet_lora_rank``: train LoRA adapters of this rank ``r`` on the base UNet's attention projections
    (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) with the add-ons (``None``, the default: no LoRA, the papers' frozen
    base); ``unet_lora_alpha``: their ``alpha`` (scale ``alpha / r``; ``None``: ``r``, scale 1)."""

    base: str | None = None
    unet_lora_rank: int | None = None
    unet_lora_alpha: float | None = None

    def check_unet_lora(self, section: str) -> None:
        """A :class:`ConfigError` for a rank < 1 or an alpha <= 0, or an alpha without a rank."""
        if self.unet_lora_rank is not None and self.unet_lora_rank < 1:
            raise ConfigError(f"{section}.unet_lora_rank: must be >= 1 (or null: no LoRA), got {self.unet_lora_rank}")
        if self.unet_lora_alpha is not None:
            if self.unet_lora_rank is None:
                raise ConfigError(f"{section}.unet_lora_alpha: set, but {section}.unet_lora_rank is null (no LoRA)")
            if self.unet_lora_alpha <= 0:
                raise ConfigError(f"{section}.unet_lora_alpha: must be > 0, got {self.unet_lora_alpha}")


def make_unet_lora(config: dict[str, Any] | None):
    """The add-on model's ``unet_lora`` submodule from its ``unet_lora_config`` (``None`` without one)."""
    from sr_diffusion.models.unet_lora import UNetLoRA

    return UNetLoRA(**config) if config else None


def unet_lora_attached(unet_lora, unet):
    """``unet_lora.attach(unet)``, or a no-op context without a LoRA (``unet_lora`` None)."""
    return contextlib.nullcontext() if unet_lora is None else unet_lora.attach(unet)


class SDAddOnTask(TrainingTask):
    """The shared part of a task that trains add-ons on a frozen SD base (see the module docstring).

    Subclasses set :attr:`section_name` and :attr:`section_class` and implement ``build_model``, ``compute_loss``,
    :meth:`pipeline_class`, :meth:`make_noise_scheduler`, :meth:`sampling_scheduler`, :meth:`add_on_components` and
    :meth:`sampling_kwargs`.
    """

    per_sample_generators = True
    #: the config section holding ``base`` and the sampling settings (``stablesr``, ``pasd``, ``seesr``)
    section_name: str = ""
    #: its dataclass
    section_class: type = type(None)

    def __init__(self):
        self.section = self.section_class()
        self.scale: int | None = None
        self.loss_fn = None
        self.unet_config: dict[str, Any] = {}
        self.vae_config: dict[str, Any] = {}
        self.prediction_type = "epsilon"
        self._base: dict[str, Any] | None = None
        self._empty_prompt: torch.Tensor | None = None
        self._scheduler = None

    # ------------------------------------------------------------------------------------------------------------------
    # What a method gives
    # ------------------------------------------------------------------------------------------------------------------

    @abstractmethod
    def pipeline_class(self) -> type:
        """The method's pipeline class (a :class:`~sr_diffusion.pipelines.sd_base.StableDiffusionSRMixin`)."""

    @abstractmethod
    def make_noise_scheduler(self):
        """The diffusers scheduler whose schedule the forward process follows in training."""

    @abstractmethod
    def sampling_scheduler(self):
        """The scheduler of the validation and exported pipeline."""

    @abstractmethod
    def add_on_components(self, model, device: torch.device) -> dict[str, Any]:
        """The pipeline's components besides the base and the scheduler, from the (unwrapped) trained ``model``."""

    @abstractmethod
    def sampling_kwargs(self, pipe) -> dict[str, Any]:
        """The pipeline's ``__call__`` settings for validation (the section's)."""

    # ------------------------------------------------------------------------------------------------------------------
    # Config
    # ------------------------------------------------------------------------------------------------------------------

    def check_config(self, config: ExperimentConfig) -> None:
        """Reads the section and the base's UNet / VAE configs and ``prediction_type``; raises a :class:`ConfigError`
        for a base that is not an SD 1.x/2.x text-to-image model or crops the UNet cannot take. Sets ``scale`` and
        the loss."""
        from diffusers import AutoencoderKL, UNet2DConditionModel

        name = self.section_name
        self.section = getattr(config, name, None) or self.section_class()
        self.section.check_unet_lora(name)
        if not self.section.base:
            raise ConfigError(f"{name}.base: required: a diffusers Stable Diffusion folder")
        base = Path(self.section.base)
        self.unet_config = dict(UNet2DConditionModel.load_config(base, subfolder="unet"))
        self.vae_config = dict(AutoencoderKL.load_config(base, subfolder="vae"))
        if self.unet_config.get("addition_embed_type") or self.unet_config.get("class_embed_type"):
            raise ConfigError(f"{name}.base: {base} is not an SD 1.x/2.x text-to-image base (SDXL, upscaler, ...)")
        scheduler_config = base / "scheduler" / "scheduler_config.json"
        if scheduler_config.is_file():
            self.prediction_type = json.loads(scheduler_config.read_text()).get("prediction_type", "epsilon")
        multiple = self.vae_factor * 2 ** (len(self.unet_config["block_out_channels"]) - 1)
        if config.data.gt_size % multiple:
            raise ConfigError(
                f"data.gt_size ({config.data.gt_size}) must be a multiple of {multiple} (the VAE's factor times the "
                "UNet's input multiple)"
            )
        self.scale = config.scale
        self.loss_fn = build_loss(config.train.loss, config.train.charbonnier_eps)

    @property
    def vae_factor(self) -> int:
        """``f``: the base VAE's downsampling factor (after :meth:`check_config`)."""
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    # ------------------------------------------------------------------------------------------------------------------
    # The frozen base
    # ------------------------------------------------------------------------------------------------------------------

    def base(self, device: torch.device | None = None) -> dict[str, Any]:
        """The frozen SD components ``vae``, ``text_encoder``, ``tokenizer``, ``unet`` (loaded once, eval mode, no
        gradients), moved to ``device`` when given."""
        if self._base is None:
            parts = self.pipeline_class().load_sd_base(self.section.base)
            self._base = {name: parts[name] for name in BASE_PARTS}
            for name in ("vae", "text_encoder", "unet"):
                self._base[name].eval().requires_grad_(False)
        if device is not None:
            for name in ("vae", "text_encoder", "unet"):
                self._base[name].to(device)
        return self._base

    def with_unet_lora(self, model):
        """``model`` (a method's fresh add-ons) with a fresh ``unet_lora`` for the base UNet when the section sets
        ``unet_lora_rank`` (recorded in its config as ``unet_lora_config``: checkpoints and EMA copies rebuild it)."""
        if self.section.unet_lora_rank is None:
            return model
        from sr_diffusion.models.unet_lora import UNetLoRA

        lora = UNetLoRA.for_unet(self.base()["unet"], self.section.unet_lora_rank, self.section.unet_lora_alpha)
        model.unet_lora = lora
        # no longer a default value: from_config (the EMA copy) drops the keys listed in _use_default_values
        defaults = [k for k in model.config.get("_use_default_values", []) if k != "unet_lora_config"]
        model.register_to_config(unet_lora_config=public_config(lora.config), _use_default_values=defaults)
        return model

    def empty_prompt(self, device: torch.device) -> torch.Tensor:
        """The text embedding ``(1, L, D)`` of ``""`` (computed once per device)."""
        if self._empty_prompt is None or self._empty_prompt.device != device:
            self._empty_prompt = self._embed([""], device)
        return self._empty_prompt

    def embed_prompts(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """Text embeddings ``(N, L, D)`` of the prompts (truncated to the tokenizer's length, as the originals'
        datasets); all empty: the cached :meth:`empty_prompt`, expanded."""
        if not any(prompts):
            return self.empty_prompt(device).expand(len(prompts), -1, -1)
        return self._embed(prompts, device, truncation=True)

    def _embed(self, prompts: list[str], device: torch.device, **kwargs: Any) -> torch.Tensor:
        base = self.base(device)
        tokenizer = base["tokenizer"]
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt", **kwargs
        )
        with torch.no_grad():
            return base["text_encoder"](ids.input_ids.to(device))[0]

    # ------------------------------------------------------------------------------------------------------------------
    # The forward process
    # ------------------------------------------------------------------------------------------------------------------

    def noise_scheduler(self):
        """:meth:`make_noise_scheduler`, built once."""
        if self._scheduler is None:
            self._scheduler = self.make_noise_scheduler()
        return self._scheduler

    def encode_latents(self, image: torch.Tensor, generator: GeneratorArg) -> torch.Tensor:
        """``z = E(x) · s``: a posterior sample of the frozen VAE for ``x`` ``(B, 3, H, W)`` in [-1, 1], times its
        scaling factor ``s`` (float32, no gradients); ``generator``: one, or one per sample (diffusers'
        ``randn_tensor`` takes either)."""
        vae = self.base(image.device)["vae"]
        with torch.no_grad():
            z = vae.encode(image.to(vae.dtype)).latent_dist.sample(generator)
        return z.float() * float(vae.config.scaling_factor)

    def diffuse(self, z_0: torch.Tensor, generator: GeneratorArg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z_t, t, target)`` for clean latents ``z_0`` ``(B, C, h, w)``: ``t ~ U{0, ..., T-1}`` ``(B,)``,
        ``eps ~ N(0, I)``, ``z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps``; the target is ``eps``, or
        ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0`` for a v-prediction schedule."""
        scheduler = self.noise_scheduler()
        n, device = z_0.shape[0], z_0.device
        t = rng.randint(0, scheduler.config.num_train_timesteps, n, generator, device=device)
        noise = rng.randn(z_0.shape, generator, device=device, dtype=z_0.dtype)
        z_t = scheduler.add_noise(z_0, noise, t)
        v_prediction = scheduler.config.prediction_type == "v_prediction"
        target = scheduler.get_velocity(z_0, noise, t) if v_prediction else noise
        return z_t, t, target

    # ------------------------------------------------------------------------------------------------------------------
    # Validation, export
    # ------------------------------------------------------------------------------------------------------------------

    def predict(self, model, lr, generator) -> torch.Tensor:
        pipe = self.build_pipeline(model, device=lr.device)
        pipe.set_progress_bar_config(disable=True)
        kwargs = self.sampling_kwargs(pipe)
        return pipe(lr.clamp(0, 1), generator=generator, output_type="pt", **kwargs).images

    def build_pipeline(self, model, device: torch.device | None = None):
        """The method's pipeline on the frozen base with ``model``'s add-ons (on ``model``'s device by default); with
        a ``unet_lora``, its UNet is a copy of the base UNet with the LoRA fused in (the base is left unchanged)."""
        model = getattr(model, "module", model)
        device = device or next(model.parameters()).device
        parts = {name: self.base(device)[name] for name in BASE_PARTS}
        unet_lora = getattr(model, "unet_lora", None)
        if unet_lora is not None:
            parts["unet"] = unet_lora.fuse_into(copy.deepcopy(parts["unet"]))
        return self.pipeline_class()(
            **parts,
            scheduler=self.sampling_scheduler(),
            **self.add_on_components(model, device),
            upscale=self.scale,
        )

    def export_extras(self, model, directory: Path) -> None:
        """With a ``unet_lora``: the LoRA alone in diffusers' LoRA format (``save_lora_weights``, the scale folded into
        ``lora_B``) in ``directory/unet_lora/``, for ``pipe.load_lora_weights`` on a pipeline of the base."""
        unet_lora = getattr(getattr(model, "module", model), "unet_lora", None)
        if unet_lora is not None:
            self.pipeline_class().save_lora_weights(
                Path(directory) / "unet_lora", unet_lora_layers=unet_lora.peft_state_dict()
            )
