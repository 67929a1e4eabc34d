"""SeeSR: semantics-aware real-world super-resolution with a Stable Diffusion prior, an LR ControlNet and soft prompts.

Paper: R. Wu, T. Yang, L. Sun, Z. Zhang, S. Li, L. Zhang, "SeeSR: Towards Semantics-Aware Real-World Image
Super-Resolution", CVPR 2024. Released code: ``pipelines/pipeline_seesr.py`` and ``test_seesr.py`` (facts only).
Notation and shapes (``N`` images, ``s`` the SR factor, ``f`` the VAE factor):

- ``y``: the LR image ``(N, 3, h, w)`` in [0, 1], padded (reflect, bottom/right) to a multiple of
  :attr:`~SeeSRPipeline.lr_multiple`; ``x_lr = up_s(y)``: upsampled to the output size ``(N, 3, s·h, s·w)``
  with PIL's bicubic on 8 bits (as ``test_seesr.py``) — the ControlNet's condition (the original upsamples first,
  Sec. 3.2);
- prompts (Sec. 3.1): a prompt extractor (DAPE) looks at ``y`` and gives *hard prompts* (tags, merged with the user's
  prompt and SeeSR's quality words by :func:`~sr_diffusion.prompts.resolve_prompts`, encoded by the text encoder into
  ``c_text``) and *soft prompts* ``p_soft`` ``(N, L, D_img)``, attended to by the image cross-attention layers of the
  UNet and the ControlNet (:mod:`sr_diffusion.models.seesr`);
- start (Sec. 3.3, "LR embedding", ``start_point="lr"``, the released default): ``z_T = sqrt(abar_T') z_lr +
  sqrt(1 - abar_T') eps`` with ``z_lr = E(2 x_lr - 1) · scaling_factor`` (a posterior sample) and ``T' = 999`` (the
  original's ``start_steps``), instead of pure noise (``start_point="noise"``: ``z_T = eps``);
- each step: ``eps_hat = UNet(z_t, t, c_text, p_soft; ControlNet(z_t, t, c_text, p_soft, x_lr) · scale)``; with
  classifier-free guidance (``guidance_scale > 1``, 5.5 as released) the unconditional half uses the negative prompt's
  text embedding, the *same* soft prompts and the *same* ControlNet condition (the original duplicates both), and
  ``eps_hat = eps_u + w (eps_c - eps_u)``;
- the scheduler: the original's ``DDPMScheduler`` with SD 2-base's schedule (:func:`seesr_scheduler`, "leading"
  spacing with ``steps_offset=1``: 981, 961, …, 1 for 50 steps), 50 steps;
- the output: ``D(z_0 / scaling_factor)``, cropped to ``s ×`` the input, clamped to [0, 1], then the colour fix against
  ``x_lr`` (AdaIN, the original's default ``align_method``, after clamping as the original), optionally LR
  consistency.

The fidelity controls (``guidance_scale``, ``controlnet_conditioning_scale``, ``start_point``, ``fidelity="auto"``,
``color_fix``, ``lr_consistency``) are the ones every SD pipeline shares (:mod:`sr_diffusion.pipelines.sd_base`).
``fidelity="auto"`` sets the ControlNet scale only: ``start_point`` is a discrete choice of the start, and the
released model was trained and is always run from the LR embedding (``"lr"``), so it is left to the caller.

Large images (the original's "tiled latent", ``latent_tiled_size`` 96 / ``latent_tiled_overlap`` 4 latent pixels in
``test_seesr.py``): every step evaluates ControlNet and UNet on overlapping square latent tiles (the condition cropped
alike, the soft prompts of the whole image), blends the tiles' noise predictions with Gaussian weights
(:func:`~sr_diffusion.pipelines.sd_base.gaussian_tile_weights`, the original's ``_gaussian_weights``) and takes one
scheduler step on the whole latent. As in the original this is automatic (``tile_size=None``): a latent of more than
96² pixels is tiled in tiles of ``min(96, h, w)`` latent pixels overlapping by 4; ``tile_size=0`` never tiles.

Faithfulness to ``test_seesr.py`` (issue 14; ``match_original=True`` reproduces the script, see
:meth:`SeeSRPipeline.__call__`): by default the LR image is upsampled with PIL's bicubic on 8 bits and the decode is
clamped to [0, 1] before the AdaIN fix against that upsampled image, as the script does; the script's
size rule (:func:`seesr_process_steps`: an LR image whose short side is under ``512 / s`` is first resized up to it,
PIL bicubic, sizes squeezed to a multiple of 8, the output resized back) is ``process_size=512``, off by default
(every input is sampled at exactly ``s ×`` its size, padded); ``match_original`` also builds the prompt as the script
(:func:`seesr_original_prompt`) and draws the LR latent's posterior sample from torch's global RNG, as the script's
``latent_dist.sample()`` without a generator (seed it with ``torch.manual_seed`` for the original's draws).

The VAE tiles as the original's ``_init_tiled_vae`` (``vae_tile_size=None``, automatic;
:mod:`sr_diffusion.models.tiled_vae`): encoder tiles of 1024 pixels for an image above 1088 pixels a side, decoder
tiles of 224 latent pixels for a latent above 246 a side, GroupNorm statistics shared across the tiles.

Not carried over: guess mode and multi-ControlNets (unused by SeeSR).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDPMScheduler,
    DiffusionPipeline,
    SchedulerMixin,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

import sr_diffusion.models  # noqa: F401  (diffusers resolves saved components from sys.modules)
import sr_diffusion.prompts.dape  # noqa: F401  (the DAPE prompt extractor, an optional component)
from sr_diffusion.estimation import DegradationEstimator
from sr_diffusion.image_processor import ImageInput
from sr_diffusion.models.block_attention import BlockAttentions
from sr_diffusion.models.seesr import null_image_prompt, seesr_noise_pred
from sr_diffusion.prompts import SEESR_ADDED_PROMPT, SEESR_NEGATIVE_PROMPT, PromptExtractor

from ..call_docs import shared_call_docs
from ..pipeline_utils import SRSamplingMixin
from ..sd_base import StableDiffusionSRMixin
from .blocks import (
    SEESR_PROCESS_SIZE,
    _check_image_attentions,
    seesr_original_prompt,
    seesr_process_steps,
    seesr_scheduler,
)

__all__ = ["SEESR_PROCESS_SIZE", "SeeSRPipeline", "seesr_original_prompt", "seesr_process_steps", "seesr_scheduler"]


class SeeSRPipeline(StableDiffusionSRMixin, SRSamplingMixin, DiffusionPipeline):
    r"""Super-resolution with SeeSR (Wu et al., CVPR 2024) on a Stable Diffusion 1.x/2.x base.

    Args:
        vae: the SD ``AutoencoderKL``.
        text_encoder: the SD text encoder (``CLIPTextModel``).
        tokenizer: its ``CLIPTokenizer``.
        unet: the frozen SD ``UNet2DConditionModel`` (the released model: SD 2-base).
        scheduler: :func:`seesr_scheduler` (DDPM, the original's) or another diffusers noise scheduler.
        controlnet: a diffusers ``ControlNetModel`` made from ``unet`` (its condition encoder must downsample by the
            VAE's factor), taking the upsampled LR image in [0, 1].
        unet_image_attentions / controlnet_image_attentions: the image cross-attention layers of the UNet and of the
            ControlNet (:func:`~sr_diffusion.models.seesr.seesr_image_attentions`), both of one soft-prompt width.
        prompt_extractor: optional: a :class:`~sr_diffusion.prompts.DAPE` (or any
            :class:`~sr_diffusion.prompts.PromptExtractor`) giving tags and soft prompts of the soft-prompt width.
        degradation_estimator: the :class:`~sr_diffusion.estimation.DegradationEstimator` of ``fidelity="auto"``, or
            None for the one shipped in the package.
        upscale: the SR factor ``s`` (the released model: 4; others work since the LR image is upsampled first).

    Build one from any SD diffusers folder with :meth:`from_sd_base`, from the released folders with
    :func:`sr_diffusion.conversion.seesr.convert_seesr` (``sr-diffusion convert --arch seesr``), or train one with
    ``training/train_seesr.py``. Loading, geometry, the SD-base checks, text, VAE, tiling, the fidelity controls and
    LoRA loading are :class:`~sr_diffusion.pipelines.sd_base.StableDiffusionSRMixin`'s.
    """

    METHOD = "SeeSR"
    #: ``tile_size=None`` tiles large inputs automatically, as the original (``tile_size=0``: never)
    AUTO_TILING = True
    BASE_EXAMPLE = "stabilityai/stable-diffusion-2-base"
    #: subfolders a saved SeeSR pipeline must have, besides its Stable Diffusion base (vae, text_encoder, ...)
    ADD_ON_SUBFOLDERS = {
        "controlnet": "the LR ControlNet",
        "unet_image_attentions": "the UNet's image cross-attention layers",
        "controlnet_image_attentions": "the ControlNet's image cross-attention layers",
    }
    OPTIONAL_ADD_ONS = {
        "prompt_extractor": "the prompt extractor (DAPE)",
        "degradation_estimator": "the degradation estimator",
    }
    #: the original's ControlNet scale (``test_seesr.py``'s ``conditioning_scale``)
    FIDELITY_DEFAULTS = {"controlnet_conditioning_scale": 1.0}
    #: ``test_seesr.py``'s ``--latent_tiled_size`` / ``--latent_tiled_overlap`` (latent pixels)
    AUTO_LATENT_TILE = 96
    AUTO_LATENT_TILE_OVERLAP = 4
    #: ``test_seesr.py``'s ``--process_size`` (:meth:`process_steps`)
    PROCESS_SIZE = SEESR_PROCESS_SIZE
    model_cpu_offload_seq = "prompt_extractor->text_encoder->controlnet->unet->vae"
    _optional_components = ["prompt_extractor", "degradation_estimator"]
    # the image cross-attention layers run inside the UNet's and the ControlNet's calls (hooks), and the (tiny)
    # degradation estimator: they stay on the execution device
    _exclude_from_cpu_offload = ["unet_image_attentions", "controlnet_image_attentions", "degradation_estimator"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "image_prompt_embeds"]
    _latents_name = "z_T"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        controlnet: ControlNetModel,
        unet_image_attentions: BlockAttentions,
        controlnet_image_attentions: BlockAttentions,
        prompt_extractor: PromptExtractor | None = None,
        degradation_estimator: DegradationEstimator | None = None,
        upscale: int = 4,
    ):
        super().__init__()
        self.register_sd_components(
            upscale,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            controlnet=controlnet,
            unet_image_attentions=unet_image_attentions,
            controlnet_image_attentions=controlnet_image_attentions,
            prompt_extractor=prompt_extractor,
            degradation_estimator=degradation_estimator,
        )

    # ------------------------------------------------------------------------------------------------------------------
    # Loading
    # ------------------------------------------------------------------------------------------------------------------

    @classmethod
    def base_scheduler(cls, base: str | Path) -> DDPMScheduler:
        """The original's sampler for the SD base in the diffusers folder ``base``: a ``DDPMScheduler`` with the base's
        ``scheduler/`` config (``test_seesr.py``), or :func:`seesr_scheduler` when the base has none."""
        if (Path(base) / "scheduler" / "scheduler_config.json").is_file():
            return DDPMScheduler.from_pretrained(base, subfolder="scheduler")
        return seesr_scheduler()

    @classmethod
    def from_sd_base(
        cls,
        base: str | Path,
        controlnet: ControlNetModel,
        unet_image_attentions: BlockAttentions,
        controlnet_image_attentions: BlockAttentions,
        prompt_extractor: PromptExtractor | None = None,
        scheduler: SchedulerMixin | None = None,
        degradation_estimator: DegradationEstimator | None = None,
        upscale: int = 4,
        torch_dtype: torch.dtype | None = None,
    ) -> SeeSRPipeline:
        """A SeeSR pipeline on the SD base in the diffusers folder ``base`` (``vae/``, ``text_encoder/``,
        ``tokenizer/``, ``unet/``) with the given add-ons (cast to ``torch_dtype`` with the base); the scheduler
        defaults to :meth:`base_scheduler` (the original's)."""
        return cls.from_sd_base_parts(
            base,
            scheduler=cls.base_scheduler(base) if scheduler is None else scheduler,
            upscale=upscale,
            torch_dtype=torch_dtype,
            controlnet=controlnet,
            unet_image_attentions=unet_image_attentions,
            controlnet_image_attentions=controlnet_image_attentions,
            prompt_extractor=prompt_extractor,
            degradation_estimator=degradation_estimator,
        )

    # ------------------------------------------------------------------------------------------------------------------
    # Geometry (upscale, vae_scale_factor, lr_multiple, latent_shape: StableDiffusionSRMixin)
    # ------------------------------------------------------------------------------------------------------------------

    def process_steps(self, height: int, width: int, process_size: int) -> list[tuple[tuple[int, int], str]]:
        """``test_seesr.py``'s resizes for ``process_size`` (:func:`seesr_process_steps`, multiples of the VAE
        factor)."""
        return seesr_process_steps(
            height, width=width, upscale=self.upscale, process_size=process_size, multiple=self.vae_scale_factor
        )

    @property
    def image_prompt_dim(self) -> int:
        """``D_img``: the width of the soft prompts the image cross-attention takes."""
        return int(self.unet_image_attentions.config.layers[0]["cross_attention_dim"])

    # ------------------------------------------------------------------------------------------------------------------
    # Checks
    # ------------------------------------------------------------------------------------------------------------------

    def check_components(self) -> None:
        """Raise a ``ValueError`` for components that cannot work together (or are not an SD 1.x/2.x base)."""
        self.check_sd_base()
        uc = self.unet.config
        if not isinstance(self.controlnet, ControlNetModel):
            raise ValueError(f"controlnet must be a diffusers ControlNetModel, got {type(self.controlnet).__name__}")
        cc = self.controlnet.config
        keys = ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim", "down_block_types")
        mismatch = self.config_mismatch(cc, uc, keys)
        if mismatch is not None:
            key, mine, theirs = mismatch
            raise ValueError(
                f"the ControlNet has {key}={mine!r} but the UNet {theirs!r}: it was made from another UNet "
                "(SeeSR's ControlNet is ControlNetModel.from_unet(unet))"
            )
        if cc.conditioning_channels != 3:
            raise ValueError(f"the ControlNet must take the RGB LR image (conditioning_channels 3), got {cc}")
        factor = 2 ** (len(cc.conditioning_embedding_out_channels) - 1)
        if factor != self.vae_scale_factor:
            raise ValueError(
                f"the ControlNet's condition encoder downsamples by {factor} but the VAE by {self.vae_scale_factor}: "
                "the condition would not match the latent size"
            )
        dim = _check_image_attentions(self.unet_image_attentions, self.unet, "unet_image_attentions", "unet")
        cdim = _check_image_attentions(
            self.controlnet_image_attentions, self.controlnet, "controlnet_image_attentions", "controlnet"
        )
        if dim != cdim:
            raise ValueError(
                f"the UNet's image cross-attention takes {dim}-d soft prompts, the ControlNet's {cdim}-d: they must "
                "attend to the same soft prompts"
            )
        self.check_same_dtype(["unet", "controlnet", "unet_image_attentions", "controlnet_image_attentions"])
        extractor = self.check_prompt_extractor("PromptExtractor (e.g. DAPE)")
        width = getattr(getattr(extractor, "config", None), "cross_attention_dim", None)
        if width is not None and int(width) != dim:
            raise ValueError(
                f"the prompt extractor makes {width}-d soft prompts but the image cross-attention takes {dim}-d "
                "ones: build the DAPE with cross_attention_dim={dim}"
            )
        self.check_degradation_estimator()
        # any prediction_type: SD bases predict epsilon (512) or v (768v), and scheduler.step reads it from its config
        self.check_noise_scheduler("SeeSR", epsilon_only=False)

    def check_inputs(
        self,
        rgb: torch.Tensor,
        *,
        prompt: Any,
        num_inference_steps: int,
        guidance_scale: float,
        controlnet_conditioning_scale: float,
        start_point: str,
        image_prompt_embeds: torch.Tensor | None,
        negative_prompt: Any,
        eta: float,
        color_fix: str,
        lr_consistency: bool,
        process_size: int | None,
        tile_size: int | None,
        tile_overlap: int | None,
        match_original: bool,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        callback_on_step_end_tensor_inputs: Sequence[str] | None,
    ) -> None:
        self.check_components()
        self.check_faithfulness_options(process_size, tile_size, tile_overlap, match_original)
        self.check_steps_and_eta(num_inference_steps, eta)
        self.check_guidance_scale(guidance_scale)
        self.check_controlnet_conditioning_scale(controlnet_conditioning_scale)
        self.check_start_point(start_point)
        n = rgb.shape[0]
        self._prompt_list(prompt, n, "prompt", allow_none=True)
        self._prompt_list(negative_prompt, n, "negative_prompt", allow_none=True)
        if image_prompt_embeds is not None:
            self._check_image_prompt_embeds(image_prompt_embeds, n, "image_prompt_embeds")
        self.check_output_options(color_fix, lr_consistency)
        self.check_sampling_inputs(
            rgb,
            tile_size=tile_size or None,
            tile_overlap=0 if tile_overlap is None else tile_overlap,
            generator=generator,
            latents=latents,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            tiles_share_latents=True,
            latent_shape=self.working_latent_shape(rgb, self.resolve_process_size(process_size, match_original)),
        )

    def _check_image_prompt_embeds(self, embeds: Any, batch_size: int, name: str) -> None:
        dim = self.image_prompt_dim
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or not embeds.is_floating_point():
            got = f"{tuple(embeds.shape)} {embeds.dtype}" if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(f"{name} must be a float tensor (N, L, {dim}) of soft prompts, got {got}")
        if embeds.shape[-1] != dim:
            raise ValueError(
                f"{name} are {embeds.shape[-1]}-d but the image cross-attention takes {dim}-d soft prompts"
            )
        if embeds.shape[0] not in (1, batch_size) or embeds.shape[1] < 1:
            raise ValueError(
                f"{name} has shape {tuple(embeds.shape)}: pass one (1, L, {dim}) for all images or one per image "
                f"({batch_size}, L, {dim}), L >= 1"
            )

    # ------------------------------------------------------------------------------------------------------------------
    # Prompts, VAE
    # ------------------------------------------------------------------------------------------------------------------

    def resolve_prompts(
        self,
        rgb: torch.Tensor,
        *,
        prompt: Any,
        negative_prompt: Any,
        added_prompt: str | None,
        image_prompt_embeds: torch.Tensor | None,
        return_tags: bool = False,
    ) -> tuple:
        """``(prompts, negative_prompts, soft_prompts (N, L, D_img))`` for the LR images ``rgb`` ``(N, 3, h, w)``
        (with ``return_tags``, then the extractor's hard prompts, ``None`` each without an extractor).

        Hard prompts: the user's prompt first, then the extractor's tags (when there is an extractor), then
        ``added_prompt`` (:func:`~sr_diffusion.prompts.merge_prompts`); the negative prompt is the user's, else
        SeeSR's. Soft prompts: ``image_prompt_embeds`` when given (the caller's win), else the extractor's, else
        :func:`~sr_diffusion.models.seesr.null_image_prompt`."""
        n = rgb.shape[0]
        resolved = self.resolve_text_prompts(
            rgb,
            prompt=prompt,
            negative_prompt=negative_prompt,
            added_prompt=added_prompt,
            default_negative_prompt=SEESR_NEGATIVE_PROMPT,
        )
        soft = image_prompt_embeds
        if soft is None and resolved.soft_prompts is not None:
            soft = resolved.soft_prompts
            self._check_image_prompt_embeds(soft, n, "the prompt extractor's soft prompts")
        if soft is None:
            soft = null_image_prompt(n, self.image_prompt_dim)
        soft = soft.to(device=rgb.device, dtype=self.unet.dtype)
        if soft.shape[0] != n:
            soft = soft.expand(n, -1, -1)
        if return_tags:
            tags = resolved.extraction.hard_prompts if resolved.extraction is not None else [None] * n
            return resolved.prompts, resolved.negative_prompts, soft, tags
        return resolved.prompts, resolved.negative_prompts, soft

    def encode_lr(self, condition: torch.Tensor, generator) -> torch.Tensor:
        """``z_lr``: a posterior sample of ``2 x_lr - 1`` (``x_lr`` ``(N, 3, H, W)`` in [0, 1]), times the scaling
        factor (the original's LR embedding)."""
        return self.encode_image(condition * 2.0 - 1.0, generator)

    # ------------------------------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------------------------------

    def prepare_start_latents(
        self,
        shape: tuple[int, ...],
        *,
        device: torch.device,
        generator,
        latents: torch.Tensor | None,
        start_point: str,
        condition: torch.Tensor,
        timesteps: torch.Tensor,
        global_rng_posterior: bool = False,
    ) -> torch.Tensor:
        """``z_T``: the noise ``eps`` (the given ``latents`` or ``randn`` from ``generator``) times ``init_noise_sigma``
        (``start_point="noise"``), or the LR latent noised with it to step 999 (``"lr"``; to the first step of the
        schedule for schedulers that noise by ``sigmas``). The LR latent is a posterior sample drawn (after ``eps``)
        from ``generator``, or with ``global_rng_posterior`` from torch's global RNG (the original's
        ``latent_dist.sample()``, which takes no generator)."""
        latents = self.prepare_latents(shape, dtype=torch.float32, device=device, generator=generator, latents=latents)
        if start_point == "noise":
            return latents
        lr_latents = self.encode_lr(condition, None if global_rng_posterior else generator)
        if getattr(self.scheduler, "sigmas", None) is not None and not isinstance(self.scheduler, DDPMScheduler):
            t_start = timesteps[:1]
        else:
            t_start = torch.tensor([self.scheduler.config.num_train_timesteps - 1], device=device)
        return self.scheduler.add_noise(lr_latents, latents, t_start.expand(shape[0]))

    def predict_noise(
        self,
        latents: torch.Tensor,
        *,
        t: torch.Tensor,
        condition: torch.Tensor,
        prompt_embeds: torch.Tensor,
        image_prompt_embeds: torch.Tensor,
        guidance_scale: float,
        conditioning_scale: float,
    ) -> torch.Tensor:
        """The (guided) model output for ``z_t`` (or a tile of it) and the matching ``x_lr``; ``prompt_embeds`` holds
        the negative embeddings first when guiding; both halves share the soft prompts and the condition."""

        def model(scaled: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            return seesr_noise_pred(
                self.unet,
                self.controlnet,
                self.unet_image_attentions,
                self.controlnet_image_attentions,
                scaled,
                t,
                prompt_embeds,
                cond,
                image_prompt_embeds,
                conditioning_scale,
            )

        return self.guided_noise_pred(model, latents=latents, t=t, condition=condition, guidance_scale=guidance_scale)

    def predict_noise_tiled(
        self,
        latents: torch.Tensor,
        *,
        t: torch.Tensor,
        condition: torch.Tensor,
        prompt_embeds: torch.Tensor,
        image_prompt_embeds: torch.Tensor,
        guidance_scale: float,
        conditioning_scale: float,
        tile: int,
        overlap: int,
    ) -> torch.Tensor:
        """:meth:`predict_noise` on overlapping latent tiles (the condition cropped alike), Gaussian-blended."""

        def predict(region):
            return self.predict_noise(
                latents[region],
                t=t,
                condition=condition[self.pixel_region(region)],
                prompt_embeds=prompt_embeds,
                image_prompt_embeds=image_prompt_embeds,
                guidance_scale=guidance_scale,
                conditioning_scale=conditioning_scale,
            )

        return self.blend_latent_tiles(predict, latents, tile, overlap)

    @torch.no_grad()
    @shared_call_docs
    def __call__(
        self,
        image: ImageInput | Sequence[ImageInput],
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.5,
        controlnet_conditioning_scale: float | None = None,
        start_point: str = "lr",
        fidelity: str | None = None,
        added_prompt: str | None = SEESR_ADDED_PROMPT,
        image_prompt_embeds: torch.Tensor | None = None,
        negative_prompt: str | list[str] | None = None,
        eta: float = 0.0,
        color_fix: str = "adain",
        lr_consistency: bool = False,
        process_size: int | None = None,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        vae_tile_size: int | tuple[int, int] | None = None,
        match_original: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict[str, Any]] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        r"""Upscale ``image`` by ``upscale``.

        Args:
            image: {image}
            prompt: the user's prompt, one for all images or one per image; with a prompt extractor its tags follow
                it (``None`` / ``"auto"``: the tags alone). ``"auto"`` without an extractor is an error. The user's
                words are never truncated (a prompt over the tokenizer's limit is an error).
            num_inference_steps: 50 as released.
            guidance_scale: classifier-free guidance scale ``w`` (``eps_u + w (eps_c - eps_u)``, ``eps_u`` from
                ``negative_prompt``): higher follows the prompt more and the LR image less; 1: no guidance. Default
                5.5, as released.
            controlnet_conditioning_scale: multiplies the ControlNet's residuals: higher holds the output closer to
                the LR image; 0: the ControlNet has no effect. ``None``: 1 (the original's ``conditioning_scale``);
                with ``fidelity="auto"``, set from the input.
            start_point: ``"lr"``: the chain starts from the LR image's latent, noised (more faithful; here the
                released LR embedding, the LR latent noised to step 999); ``"noise"``: from pure noise
                ``z_T ~ N(0, I)``. A discrete choice: ``fidelity="auto"`` never changes it. Default ``"lr"`` (the
                original's).
            fidelity: ``"auto"``: set the fidelity controls left ``None`` (here: ``controlnet_conditioning_scale``)
                from the input's degradation as estimated by the ``degradation_estimator`` component (the one shipped
                in the package when it is None): more faithful for clean inputs, more generative for heavily degraded
                ones (:mod:`sr_diffusion.fidelity_auto`); the LR images must be at least 16 pixels a side. A value
                given explicitly always wins. ``None`` (default): each control's default.
            added_prompt: words after the tags (SeeSR's ``"clean, high-resolution, 8k"``; ``None`` or ``""``: none).
            image_prompt_embeds: soft prompts ``(1 or N, L, D_img)`` to use instead of the extractor's (the caller's
                win); without both, one zero token (:func:`~sr_diffusion.models.seesr.null_image_prompt`).
            negative_prompt: the unconditional text when ``guidance_scale > 1`` (ignored otherwise); a given one
                (``""`` included) is used verbatim. Default SeeSR's ``"dotted, noise, blur, lowres, smooth"``.
            eta: DDIM's η for a DDIM scheduler (ignored by others).
            color_fix: {color_fix} Default ``"adain"`` (the original's ``align_method``).
            lr_consistency: {lr_consistency} Default False.
            process_size: the original's rule for small inputs (:func:`seesr_process_steps`): an LR image with a side
                under ``process_size // upscale`` is resized up (PIL bicubic) so that its short side is that, every
                size is squeezed to a multiple of the VAE factor by resizing, and the output is resized back (PIL
                bicubic). ``None`` (default): off, unless ``match_original`` (then 512, the original's); ``0``: off.
                Off, every input is sampled at exactly ``upscale ×`` its size (padded to :attr:`lr_multiple`, cropped
                back).
            tile_size: latent tiling, blended at every step (Gaussian weights, square tiles of at most the latent's
                shorter side). ``None`` (default): automatic as the original, tiles of 96 latent pixels when the
                latent has more than 96² pixels; ``0``: never; an int (a multiple of :attr:`lr_multiple`): tiles of
                ``tile_size`` LR pixels (``tile_size · upscale / 8`` latent pixels on SD; 192 is the original's 96 at
                ×4).
            tile_overlap: the tiles' overlap in LR pixels; ``None`` (default): the original's 4 latent pixels.
            vae_tile_size: {vae_tile_size}
            match_original: reproduce ``test_seesr.py`` (cswry/SeeSR) where our defaults differ: ``process_size``
                512 unless given; the prompt built as the script does (:func:`seesr_original_prompt`:
                ``f"{tags}, {prompt},"`` then ``added_prompt``) instead of the user's words first with deduplicated
                tags; the LR latent's posterior sample drawn from torch's global RNG (the script's
                ``latent_dist.sample()``: call ``torch.manual_seed(seed)`` first, as its ``set_seed``) instead of from
                ``generator``; the decode rounded to 8 bits before the colour fix and the fixed image truncated to 8
                bits (``ToPILImage``) after it, as the script's PIL round trips. What is the original's by default:
                PIL-bicubic upsampling of the 8-bit LR image, clamping the decode before the colour fix, automatic
                tiling, the noise from ``generator``. Default False.
            generator: a ``torch.Generator``, or a list with one per image (image ``i`` then is what it would be
                alone with ``generator[i]``). It draws the start's noise, then (unless ``match_original``) the LR
                latent's posterior sample.
            latents: the noise ``eps`` of shape :meth:`latent_shape` (``z_T`` itself for ``start_point="noise"``).
            output_type: {output_type}
            return_dict: {return_dict}
            callback_on_step_end: called after every step as ``callback_on_step_end(self, step, timestep,
                callback_kwargs)``; the tensors it returns (``"latents"``, ``"prompt_embeds"``,
                ``"image_prompt_embeds"``) replace the pipeline's.
            callback_on_step_end_tensor_inputs: {callback_on_step_end_tensor_inputs}

        Returns:
            ``SRPipelineOutput(images)`` or ``(images,)``; images are exactly ``upscale`` × the input size.
        """
        callback_on_step_end_tensor_inputs = self.callback_tensor_names(
            callback_on_step_end, callback_on_step_end_tensor_inputs
        )

        # 1. Check inputs (fidelity="auto" sets an unset ControlNet scale from the input's estimated degradation)
        pre = self.image_processor.preprocess(image)
        knobs = self.resolve_fidelity(fidelity, pre.rgb, controlnet_conditioning_scale=controlnet_conditioning_scale)
        controlnet_conditioning_scale = knobs["controlnet_conditioning_scale"]
        self.check_inputs(
            pre.rgb,
            prompt=prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            controlnet_conditioning_scale=controlnet_conditioning_scale,
            start_point=start_point,
            image_prompt_embeds=image_prompt_embeds,
            negative_prompt=negative_prompt,
            eta=eta,
            color_fix=color_fix,
            lr_consistency=lr_consistency,
            process_size=process_size,
            tile_size=tile_size,
            tile_overlap=tile_overlap,
            match_original=match_original,
            generator=generator,
            latents=latents,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        self._interrupt = False
        self._vae_tile_size = self.check_vae_tile_size(vae_tile_size)  # encode_image / decode_latents
        device = self._execution_device
        rgb = pre.rgb.to(device)
        do_cfg = guidance_scale > 1

        # 2. Prompts: hard prompts (tags) -> text embeddings (negative first when guiding), soft prompts
        prompts, negatives, soft_prompts, tags = self.resolve_prompts(
            rgb,
            prompt=prompt,
            negative_prompt=negative_prompt,
            added_prompt=added_prompt,
            image_prompt_embeds=image_prompt_embeds,
            return_tags=True,
        )
        if match_original:
            users = self._prompt_list(prompt, rgb.shape[0], "prompt", allow_none=True)
            prompts = [seesr_original_prompt(t, u, added_prompt) for t, u in zip(tags, users)]
        prompt_embeds = self.embed_for_guidance(prompts, negatives, device, do_cfg)

        # 3. The ControlNet condition in [0, 1]: the LR image padded (reflect) and upsampled to the output size (PIL
        #    bicubic on 8 bits, as the original), or resized by the original's process_size rule
        process_size = self.resolve_process_size(process_size, match_original)
        cond_image, working_size = self.condition_image(rgb, process_size)
        condition = cond_image.to(self.controlnet.dtype)

        # 4. Timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)

        # 5. z_T: noise, or the LR latent noised to the last training step
        shape = self.working_shape(rgb.shape[0], *condition.shape[-2:])
        latents = self.prepare_start_latents(
            shape,
            device=device,
            generator=generator,
            latents=latents,
            start_point=start_point,
            condition=condition,
            timesteps=timesteps,
            global_rng_posterior=match_original,
        )
        step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 6. Denoising loop (tiled, automatically above 96² latent pixels as the original: every step blends the
        #    tiles' noise predictions and steps the whole latent)
        tiling = self.latent_tiling(shape[-2:], tile_size, tile_overlap)
        state = {"prompt_embeds": prompt_embeds, "image_prompt_embeds": soft_prompts}  # a callback may replace them

        def predict(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            kwargs = dict(t=t, condition=condition, prompt_embeds=state["prompt_embeds"],
                          image_prompt_embeds=state["image_prompt_embeds"], guidance_scale=guidance_scale,
                          conditioning_scale=controlnet_conditioning_scale)  # fmt: skip
            if tiling is None:
                return self.predict_noise(latents, **kwargs)
            return self.predict_noise_tiled(latents, **kwargs, tile=tiling[0], overlap=tiling[1])

        latents = self.denoise(
            latents,
            timesteps=timesteps,
            predict=predict,
            step_kwargs=step_kwargs,
            state=state,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )

        # 7. Decode; crop back, [-1, 1] -> [0, 1], clamp (8-bit round trips with match_original), colour fix against
        #    the condition (the original's order), resize back from the working size, LR consistency, alpha
        hr = self.decode_latents(latents)
        return self.finish_output(
            hr,
            rgb=rgb,
            alpha=pre.alpha,
            color_fix=color_fix,
            output_type=output_type,
            return_dict=return_dict,
            lr_consistency=lr_consistency,
            clamp_before_color_fix=True,
            color_fix_reference=cond_image,
            quantize=match_original,
            working_size=working_size,
        )
