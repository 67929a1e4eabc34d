"""PASD: realistic super-resolution with a Stable Diffusion prior, a ControlNet and pixel-aware cross-attention.

Paper: T. Yang, R. Wu, P. Ren, X. Xie, L. Zhang, "Pixel-Aware Stable Diffusion for Realistic Image Super-Resolution and
Personalized Stylization", ECCV 2024 (arXiv:2308.14469). Released code: ``pasd/pipelines/pipeline_pasd.py`` and
``test_pasd.py`` (facts only). Notation and shapes:

- ``y``: the LR image ``(N, 3, h, w)`` in [0, 1], padded (reflect, bottom/right) to a multiple of
  :attr:`~PASDPipeline.lr_multiple` and upsampled ×``upscale`` with PIL's bicubic on 8 bits (as ``test_pasd.py``)
  to ``y_up`` ``(N, 3, H, W)``, ``H = s·h``. ``y_up`` **in [0, 1]** is the ControlNet's condition (the original feeds
  it unnormalised); ``y_up · 2 - 1`` is what the VAE encodes;
- the start (Sec. 4.1, "adjustable noise schedule"; ``start_point="lr"``, the original's default,
  ``init_latent_with_noise=False``): ``z_lr = E(2·y_up - 1) · scaling_factor`` (a posterior sample), noised to the
  first timestep ``t_1`` of the sampler, then once more to ``added_noise_level`` ``a`` (900):
  ``z = q(q(z_lr, t_1), a)`` with ``q(x, t) = sqrt(abar_t) x + sqrt(1 - abar_t) eps`` (fresh ``eps`` each time);
  ``start_point="noise"`` starts from pure noise ``z_T ~ N(0, I)`` (``--init_latent_with_noise``; before the fidelity
  controls were made uniform this was ``added_noise_level=None``, which now means the default 900). ``q`` uses the
  schedule's ``alphas_cumprod`` at any level, the evident intent (the original calls ``scheduler.add_noise``; UniPC's
  in recent diffusers, e.g. 0.42, silently noises a level off the sampler's grid, as 900 is off the 20-step grid, to
  the *last* step's level, t = 50, instead). With ``t_1 = 999`` (UniPC) the LR latent keeps a weight of
  ``sqrt(abar_999 · abar_900) ≈ 0.008``: the start is nearly pure noise with a faint trace of the LR image;
- each step (:func:`pasd_noise_pred`): the ControlNet (:class:`~sr_diffusion.models.PASDControlNetModel`) reads
  ``(z_t, t, c_text, y_up)`` and returns one residual ``r_k`` per skip connection of the UNet encoder (and one for the
  middle block), times ``controlnet_conditioning_scale``; the frozen SD UNet runs with ``r_k`` added to its skips and,
  in every up block, the pixel-aware cross-attention (PACA, Sec. 3.1; the ``pixel_attentions`` add-on,
  :class:`~sr_diffusion.models.block_attention.BlockAttentions`) after each layer, attending to the residual of the
  same skip flattened to ``(N, h_k·w_k, C_k)`` tokens (execution position ``k`` reads ``r_{K-1-k}``, the order the
  skips are popped); classifier-free guidance with the negative prompt, both halves through the ControlNet;
- the output: ``D(z_0 / scaling_factor)`` cropped to exactly ``s ×`` the input size, clamped to [0, 1], then the colour
  fix against ``y_up`` (wavelet by default, as the original's ``test_pasd.py`` always applies, after clamping).

Prompts (:func:`~sr_diffusion.prompts.resolve_prompts`): the user's prompt first, then the optional prompt extractor's
tags (the original captions the image with BLIP / CoCa, or classifies / detects objects: ``--high_level_info``), then
``added_prompt`` (the original's ``"clean, high-resolution, 8k"``); the negative prompt is the user's or the
original's ``"blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed"``. ``guidance_scale`` 9 and 20 UniPC
steps are ``test_pasd.py``'s defaults. The fidelity controls (``guidance_scale``, ``controlnet_conditioning_scale``,
``added_noise_level``, ``start_point``, ``fidelity="auto"``, ``color_fix``, ``lr_consistency``) are the ones every SD
pipeline shares (:mod:`sr_diffusion.pipelines.sd_base`).

Large images (the original's ``latent_tiled_size`` / ``latent_tiled_overlap``, 320 / 8 latent pixels): every step
runs the ControlNet and the UNet on overlapping square latent tiles (the condition image cropped to match), blends the
tiles' noise predictions with Gaussian weights (:func:`~sr_diffusion.pipelines.sd_base.gaussian_tile_weights`, the
original's ``_gaussian_weights``) and steps the whole latent. As in the original this is automatic
(``tile_size=None``): a latent of more than 320² pixels is tiled in tiles of ``min(320, h, w)`` latent pixels
overlapping by 8; ``tile_size=0`` never tiles, an int tiles in ``tile_size · s / f`` latent pixels.

Faithfulness to ``test_pasd.py`` (issue 14; ``match_original=True`` reproduces the script, see
:meth:`PASDPipeline.__call__`): by default the LR image is upsampled with PIL's bicubic on 8 bits and the decode is
clamped to [0, 1] before the colour fix against that upsampled image, as the script does; the script's
``process_size`` rule (:func:`pasd_process_steps`: an upsampled image whose short side is under 768 is resized up,
bilinear, and every size squeezed to a multiple of 8, the output resized back) is ``process_size=768``, off by default
(every input is sampled at exactly ``s ×`` its size, padded), since it changes the scale the model sees and costs up
to ``(768 / (s · h))²`` times the work; ``match_original`` also builds the prompt as the script does
(:func:`pasd_original_prompt`) and rounds and truncates to 8 bits around the colour fix as the script's PIL round
trips.

The VAE tiles as the original's ``_init_tiled_vae`` (``vae_tile_size=None``, automatic;
:mod:`sr_diffusion.models.tiled_vae`): encoder tiles of 1024 pixels for an image above 1088 pixels a side, decoder
tiles of 224 latent pixels for a latent above 246 a side, GroupNorm statistics shared across the tiles.

Not carried over: personalised/LoRA bases, ``guess_mode``, LCM-LoRA, the grayscale-colourisation variant, PASD-light's
UNet.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    SchedulerMixin,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor

import sr_diffusion.models  # noqa: F401  (diffusers resolves saved components from sys.modules)
from sr_diffusion.estimation import DegradationEstimator
from sr_diffusion.image_processor import ImageInput
from sr_diffusion.models.block_attention import BlockAttentions
from sr_diffusion.models.pasd_controlnet import PASDControlNetModel
from sr_diffusion.prompts.base import PromptExtractor

from ..call_docs import shared_call_docs
from ..pipeline_utils import SRSamplingMixin
from ..sd_base import StableDiffusionSRMixin
from .blocks import (
    PASD_ADDED_PROMPT,
    PASD_NEGATIVE_PROMPT,
    PASD_PROCESS_SIZE,
    _q_sample,
    paca_contexts,
    pasd_noise_pred,
    pasd_original_prompt,
    pasd_process_steps,
    pasd_scheduler,
)

__all__ = [
    "PASD_ADDED_PROMPT",
    "PASD_NEGATIVE_PROMPT",
    "PASD_PROCESS_SIZE",
    "PASDPipeline",
    "paca_contexts",
    "pasd_noise_pred",
    "pasd_original_prompt",
    "pasd_process_steps",
    "pasd_scheduler",
]


class PASDPipeline(StableDiffusionSRMixin, SRSamplingMixin, DiffusionPipeline):
    r"""Super-resolution with PASD (Yang et al., ECCV 2024) on a Stable Diffusion 1.x/2.x base.

    Args:
        vae: the SD ``AutoencoderKL``.
        text_encoder: the SD text encoder (``CLIPTextModel``).
        tokenizer: its ``CLIPTokenizer``.
        unet: the frozen SD ``UNet2DConditionModel`` (the released model: SD 1.5).
        scheduler: :func:`pasd_scheduler` (UniPC, the original's) or any diffusers noise scheduler with
            ``alphas_cumprod``; any ``prediction_type``.
        controlnet: :class:`~sr_diffusion.models.PASDControlNetModel` for ``unet``.
        pixel_attentions: the PACA add-on, ``BlockAttentions.pasd_pixel_attentions(unet)``.
        prompt_extractor: optional, any :class:`~sr_diffusion.prompts.PromptExtractor` (e.g. DAPE): its tags join the
            prompt (``prompt="auto"`` or ``None``: its tags alone). A ``ModelMixin`` extractor is saved with the
            pipeline; any other is not (diffusers cannot): pass it again, ``from_pretrained(dir, prompt_extractor=…)``.
        degradation_estimator: the :class:`~sr_diffusion.estimation.DegradationEstimator` of ``fidelity="auto"``, or
            None for the one shipped in the package.
        upscale: the SR factor ``s`` (registered in the config; PASD works at any, since the LR image is upsampled to
            the output size first).

    Build one from any SD diffusers folder with :meth:`from_sd_base`, or from the released model with
    :func:`sr_diffusion.conversion.pasd.convert_pasd` (``sr-diffusion convert --arch pasd``). Loading, geometry, the
    SD-base checks, text, VAE, tiling, the fidelity controls and LoRA loading are :class:`~sr_diffusion.pipelines.
    sd_base.StableDiffusionSRMixin`'s.
    """

    METHOD = "PASD"
    #: ``tile_size=None`` tiles large inputs automatically, as the original (``tile_size=0``: never)
    AUTO_TILING = True
    BASE_EXAMPLE = "stable-diffusion-v1-5"
    #: subfolders a saved PASD pipeline must have, besides its Stable Diffusion base (vae, text_encoder, ...)
    ADD_ON_SUBFOLDERS = {
        "controlnet": "PASD's ControlNet",
        "pixel_attentions": "the pixel-aware cross-attention layers",
    }
    OPTIONAL_ADD_ONS = {
        "prompt_extractor": "the prompt extractor",
        "degradation_estimator": "the degradation estimator",
    }
    #: the original's (``test_pasd.py``) added noise level and ControlNet scale
    FIDELITY_DEFAULTS = {"added_noise_level": 900, "controlnet_conditioning_scale": 1.0}
    #: ``test_pasd.py``'s ``--latent_tiled_size`` / ``--latent_tiled_overlap`` (latent pixels)
    AUTO_LATENT_TILE = 320
    AUTO_LATENT_TILE_OVERLAP = 8
    #: ``test_pasd.py``'s ``--process_size`` (:meth:`process_steps`)
    PROCESS_SIZE = PASD_PROCESS_SIZE
    model_cpu_offload_seq = "prompt_extractor->text_encoder->controlnet->unet->vae"
    _optional_components = ["prompt_extractor", "degradation_estimator"]
    # the PACA layers run inside the UNet's call (hooks): they stay on the execution device, as does the (tiny)
    # degradation estimator
    _exclude_from_cpu_offload = ["pixel_attentions", "degradation_estimator"]
    _callback_tensor_inputs = ["latents", "prompt_embeds"]
    _latents_name = "z_T"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        controlnet: PASDControlNetModel,
        pixel_attentions: BlockAttentions,
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
            pixel_attentions=pixel_attentions,
            prompt_extractor=prompt_extractor,
            degradation_estimator=degradation_estimator,
        )

    # ------------------------------------------------------------------------------------------------------------------
    # Loading (check_saved_folder, from_pretrained: StableDiffusionSRMixin)
    # ------------------------------------------------------------------------------------------------------------------

    @classmethod
    def base_scheduler(cls, base: str | Path) -> UniPCMultistepScheduler:
        """The original's sampler for the SD base in the diffusers folder ``base``: UniPC with the base's
        ``scheduler/`` config (``test_pasd.py``), or :func:`pasd_scheduler` when the base has none."""
        if (Path(base) / "scheduler" / "scheduler_config.json").is_file():
            return UniPCMultistepScheduler.from_pretrained(base, subfolder="scheduler")
        return pasd_scheduler()

    @classmethod
    def from_sd_base(
        cls,
        base: str | Path,
        controlnet: PASDControlNetModel,
        pixel_attentions: BlockAttentions,
        scheduler: SchedulerMixin | None = None,
        prompt_extractor: PromptExtractor | None = None,
        degradation_estimator: DegradationEstimator | None = None,
        upscale: int = 4,
        torch_dtype: torch.dtype | None = None,
    ) -> PASDPipeline:
        """A PASD pipeline on the SD base in the diffusers folder ``base`` (``vae/``, ``text_encoder/``,
        ``tokenizer/``, ``unet/``) with the given add-ons (cast to ``torch_dtype`` with the base); the scheduler
        defaults to :meth:`base_scheduler` (the original's)."""
        return cls.from_sd_base_parts(
            base,
            scheduler=cls.base_scheduler(base) if scheduler is None else scheduler,
            upscale=upscale,
            torch_dtype=torch_dtype,
            controlnet=controlnet,
            pixel_attentions=pixel_attentions,
            prompt_extractor=prompt_extractor,
            degradation_estimator=degradation_estimator,
        )

    def process_steps(self, height: int, width: int, process_size: int) -> list[tuple[tuple[int, int], str]]:
        """``test_pasd.py``'s resizes for ``process_size`` (:func:`pasd_process_steps`, multiples of the VAE
        factor)."""
        return pasd_process_steps(
            height, width=width, upscale=self.upscale, process_size=process_size, multiple=self.vae_scale_factor
        )

    # ------------------------------------------------------------------------------------------------------------------
    # Checks (geometry: upscale, vae_scale_factor, lr_multiple, latent_shape: StableDiffusionSRMixin)
    # ------------------------------------------------------------------------------------------------------------------

    def check_components(self) -> None:
        """Raise a ``ValueError`` for components that cannot work together (or are not an SD 1.x/2.x base)."""
        self.check_sd_base()
        self._check_controlnet()
        self._check_pixel_attentions()
        self.check_same_dtype(["unet", "controlnet", "pixel_attentions"])
        self.check_prompt_extractor("sr_diffusion.prompts.PromptExtractor (images -> PromptExtraction)")
        self.check_degradation_estimator()
        # any prediction_type: SD bases predict epsilon (512) or v (768v), and scheduler.step reads it from its config
        self.check_noise_scheduler("PASD", epsilon_only=False)

    def _check_controlnet(self) -> None:
        controlnet, uc = self.controlnet, self.unet.config
        if not isinstance(controlnet, PASDControlNetModel):
            raise ValueError(
                "controlnet must be PASD's PASDControlNetModel (a ControlNet with the degradation-removal module), "
                f"got {type(controlnet).__name__}: convert a released PASD model with "
                "`sr-diffusion convert --arch pasd`"
            )
        cc = controlnet.config
        keys = ("block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim")
        mismatch = self.config_mismatch(cc, uc, keys)
        if mismatch is not None:
            key, mine, theirs = mismatch
            raise ValueError(
                f"the ControlNet was built for a UNet with {key}={mine!r}, the UNet has {theirs!r}: ControlNet and "
                "UNet are of different bases"
            )
        if cc.in_channels != uc.in_channels:
            raise ValueError(f"the ControlNet takes {cc.in_channels}-channel latents, the UNet {uc.in_channels}")
        factor = 2 ** (len(cc.conditioning_embedding_out_channels) - 1)
        if factor != self.vae_scale_factor:
            raise ValueError(
                f"the ControlNet's degradation-removal module downsamples its image by {factor} but the VAE by "
                f"{self.vae_scale_factor}: conditioning_embedding_out_channels="
                f"{list(cc.conditioning_embedding_out_channels)} does not fit this VAE"
            )

    def _check_pixel_attentions(self) -> None:
        extra = self.pixel_attentions
        if not isinstance(extra, BlockAttentions) or extra.config.name != "pixel_attentions":
            got = type(extra).__name__ if not isinstance(extra, BlockAttentions) else f"{extra.config.name!r} layers"
            raise ValueError(
                f"pixel_attentions must be PASD's BlockAttentions (BlockAttentions.pasd_pixel_attentions(unet)), got "
                f"{got}"
            )
        extra.check_model(self.unet)
        widths = [int(block.out_channels) for block in self.controlnet.controlnet_down_blocks]
        specs = extra.layer_specs
        if len(specs) != len(widths):
            raise ValueError(
                f"the ControlNet gives {len(widths)} residuals but there are {len(specs)} pixel-aware attention layers"
            )
        for k, spec in enumerate(specs):
            if int(spec["cross_attention_dim"]) != widths[-1 - k]:
                raise ValueError(
                    f"{spec['block']}.pixel_attentions.{spec['index']} attends to "
                    f"{spec['cross_attention_dim']}-channel maps but its ControlNet residual has {widths[-1 - k]} "
                    "channels"
                )

    def check_inputs(
        self,
        rgb: torch.Tensor,
        *,
        prompt: Any,
        num_inference_steps: int,
        guidance_scale: float,
        controlnet_conditioning_scale: float,
        added_noise_level: int | None,
        start_point: str,
        added_prompt: Any,
        negative_prompt: Any,
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
        self.check_num_inference_steps(num_inference_steps)
        self.check_guidance_scale(guidance_scale)
        self.check_controlnet_conditioning_scale(controlnet_conditioning_scale)
        self.check_start_point(start_point)
        num_train = int(self.scheduler.config.num_train_timesteps)
        if start_point == "noise":
            if added_noise_level is not None:
                raise ValueError(
                    f"added_noise_level={added_noise_level!r} is the noise level of the LR start, and "
                    "start_point='noise' starts from pure noise: leave added_noise_level unset (None)"
                )
        elif (
            isinstance(added_noise_level, bool)
            or not isinstance(added_noise_level, int)
            or not 0 <= added_noise_level < num_train
        ):
            raise ValueError(
                f"added_noise_level must be None (the default, 900) or an int in [0, {num_train}), got "
                f"{added_noise_level!r} (start from pure noise with start_point='noise')"
            )
        # the user's texts (the merged prompt may be truncated: only the extracted tags and added_prompt are cut)
        n = rgb.shape[0]
        self._prompt_list(prompt, n, "prompt", allow_none=True)
        self._prompt_list(negative_prompt, n, "negative_prompt", allow_none=True)
        if added_prompt is not None and not isinstance(added_prompt, str):
            raise ValueError(f"added_prompt must be a string or None, got {type(added_prompt).__name__}")
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

    # ------------------------------------------------------------------------------------------------------------------
    # Sampling (text, VAE: StableDiffusionSRMixin)
    # ------------------------------------------------------------------------------------------------------------------

    def prepare_start_latents(
        self,
        cond_image: torch.Tensor,
        *,
        timesteps: torch.Tensor,
        start_point: str,
        added_noise_level: int | None,
        generator,
        latents: torch.Tensor | None,
    ) -> torch.Tensor:
        """The start of the chain (see the module docstring) for ``y_up`` ``(N, 3, H, W)`` in [0, 1]: the given
        ``latents``, pure noise (``start_point="noise"``), or ``q(q(z_lr, t_1), added_noise_level)`` (``"lr"``);
        times ``init_noise_sigma``."""
        device = cond_image.device
        n, _, height, width = cond_image.shape
        f = self.vae_scale_factor
        shape = (n, int(self.vae.config.latent_channels), height // f, width // f)
        if latents is not None or start_point == "noise":
            return self.prepare_latents(shape, dtype=torch.float32, device=device, generator=generator, latents=latents)
        z_lr = self.encode_image(cond_image * 2.0 - 1.0, generator)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = _q_sample(self.scheduler, z_lr, noise, int(timesteps[0]))
        noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = _q_sample(self.scheduler, latents, noise, added_noise_level)
        return latents * self.scheduler.init_noise_sigma

    def predict_noise(
        self,
        latents: torch.Tensor,
        *,
        t: torch.Tensor,
        cond_image: torch.Tensor,
        prompt_embeds: torch.Tensor,
        guidance_scale: float,
        conditioning_scale: float,
    ) -> torch.Tensor:
        """The (guided) model output for ``z_t`` (or a tile of it) and the matching condition image; ``prompt_embeds``
        holds the negative embeddings first when guiding (both halves go through the ControlNet, as the original)."""

        def model(scaled: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            return pasd_noise_pred(
                self.unet,
                controlnet=self.controlnet,
                pixel_attentions=self.pixel_attentions,
                sample=scaled,
                timestep=t,
                encoder_hidden_states=prompt_embeds,
                cond_image=cond,
                conditioning_scale=conditioning_scale,
            )[0]

        return self.guided_noise_pred(model, latents=latents, t=t, condition=cond_image, guidance_scale=guidance_scale)

    def predict_noise_tiled(
        self,
        latents: torch.Tensor,
        *,
        t: torch.Tensor,
        cond_image: torch.Tensor,
        prompt_embeds: torch.Tensor,
        guidance_scale: float,
        conditioning_scale: float,
        tile: int,
        overlap: int,
    ) -> torch.Tensor:
        """:meth:`predict_noise` on overlapping latent tiles (the condition image cropped to each), Gaussian-blended."""

        def predict(region):
            cond = cond_image[self.pixel_region(region)]
            return self.predict_noise(
                latents[region],
                t=t,
                cond_image=cond,
                prompt_embeds=prompt_embeds,
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
        num_inference_steps: int = 20,
        guidance_scale: float = 9.0,
        controlnet_conditioning_scale: float | None = None,
        added_noise_level: int | None = None,
        start_point: str = "lr",
        fidelity: str | None = None,
        added_prompt: str | None = PASD_ADDED_PROMPT,
        negative_prompt: str | list[str] | None = None,
        color_fix: str = "wavelet",
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
            prompt: text for the SD prior, one for all images or one per image. ``None`` (default) or ``"auto"``: the
                prompt extractor's tags when the pipeline has one, else none. The user's words come first, then the
                extracted tags, then ``added_prompt`` (:func:`~sr_diffusion.prompts.resolve_prompts`); a user prompt
                longer than the tokenizer's limit is an error.
            num_inference_steps: sampler steps; 20 as the original (UniPC).
            guidance_scale: classifier-free guidance scale ``w`` (``eps_u + w (eps_c - eps_u)``, ``eps_u`` from
                ``negative_prompt``): higher follows the prompt more and the LR image less; 1: no guidance. Default 9,
                as ``test_pasd.py``.
            controlnet_conditioning_scale: multiplies the ControlNet's residuals: higher holds the output closer to
                the LR image; 0: the ControlNet has no effect. Here both where they are added to the UNet's skips and
                as the pixel-aware attention's context. ``None``: 1 (the original's); with ``fidelity="auto"``, set
                from the input.
            added_noise_level: the level in ``[0, T)`` the LR start is noised to: lower keeps more of the LR image
                (more faithful), higher generates more; only with ``start_point="lr"``. ``None``: 900 (the original's);
                with ``fidelity="auto"``, set from the input. (``None`` used to mean pure noise: that is now
                ``start_point="noise"``.)
            start_point: ``"lr"``: the chain starts from the LR image's latent, noised (more faithful; here
                ``q(q(z_lr, t_1), added_noise_level)``); ``"noise"``: from pure noise ``z_T ~ N(0, I)`` (the
                original's ``--init_latent_with_noise``). A discrete choice: ``fidelity="auto"`` never changes it.
                Default ``"lr"`` (the original's).
            fidelity: ``"auto"``: set the fidelity controls left ``None`` (here: ``controlnet_conditioning_scale``, and
                ``added_noise_level`` with ``start_point="lr"``) from the input's degradation as estimated by the
                ``degradation_estimator`` component (the one shipped in the package when it is None): more faithful
                for clean inputs, more generative for heavily degraded ones (:mod:`sr_diffusion.fidelity_auto`); the
                LR images must be at least 16 pixels a side. A value given explicitly always wins. ``None`` (default):
                each control's default.
            added_prompt: appended to every prompt (the original's ``"clean, high-resolution, 8k"``; ``None`` or
                ``""``: nothing).
            negative_prompt: the unconditional text when ``guidance_scale > 1`` (ignored otherwise); a given one
                (``""`` included) is used verbatim. Default the original's :data:`PASD_NEGATIVE_PROMPT`.
            color_fix: {color_fix} Default ``"wavelet"`` (the original's).
            lr_consistency: {lr_consistency} Default False.
            process_size: the original's rule for small inputs (:func:`pasd_process_steps`): the ``×upscale`` image
                (PIL bicubic) whose short side is under ``process_size`` is resized up to it (bilinear), every size is
                squeezed to a multiple of the VAE factor by resizing, and the output is resized back (PIL bicubic).
                ``None`` (default): off, unless ``match_original`` (then 768, the original's); ``0``: off. Off, every
                input is sampled at exactly ``upscale ×`` its size (padded to :attr:`lr_multiple`, cropped back).
            tile_size: latent tiling, blended at every step (Gaussian weights, square tiles of at most the latent's
                shorter side). ``None`` (default): automatic as the original, tiles of 320 latent pixels when the
                latent has more than 320² pixels; ``0``: never; an int (a multiple of :attr:`lr_multiple`): tiles of
                ``tile_size`` LR pixels (``tile_size · upscale / 8`` latent pixels on SD).
            tile_overlap: the tiles' overlap in LR pixels; ``None`` (default): the original's 8 latent pixels.
            vae_tile_size: {vae_tile_size}
            match_original: reproduce ``test_pasd.py`` (yangxy/PASD) where our defaults differ: ``process_size``
                768 unless given; the prompt built as the script does (:func:`pasd_original_prompt`: the caption,
                then the user's words, then ``added_prompt`` with no separator) instead of the user's words first with
                deduplicated tags; the decode rounded to 8 bits before the colour fix and the fixed image truncated
                to 8 bits (``ToPILImage``) after it, as the script's PIL round trips. What is the original's by
                default: PIL-bicubic upsampling of the 8-bit LR image, clamping the decode before the colour fix,
                automatic tiling, the draws from ``generator`` (posterior sample, then the two noises). Default False.
            generator: {generator}
            latents: the start ``z_T`` (replaces the noised LR latent or the noise: ``start_point`` and
                ``added_noise_level`` then have no effect), of shape :meth:`latent_shape` (before scaling by
                ``init_noise_sigma``).
            output_type: {output_type}
            return_dict: {return_dict}
            callback_on_step_end: called after every step as ``callback_on_step_end(self, step, timestep,
                callback_kwargs)``; the tensors it returns in its dict (``"latents"``: ``z_{t-1}``,
                ``"prompt_embeds"``) replace the pipeline's.
            callback_on_step_end_tensor_inputs: {callback_on_step_end_tensor_inputs}

        Returns:
            ``SRPipelineOutput(images)`` or ``(images,)``; images are exactly ``upscale`` × the input size.
        """
        callback_on_step_end_tensor_inputs = self.callback_tensor_names(
            callback_on_step_end, callback_on_step_end_tensor_inputs
        )

        # 1. Check inputs (fidelity="auto" sets the unset fidelity controls from the input's estimated degradation; the
        #    added noise level only matters for the LR start)
        pre = self.image_processor.preprocess(image)
        knobs = {"controlnet_conditioning_scale": controlnet_conditioning_scale}
        if start_point == "lr":
            knobs["added_noise_level"] = added_noise_level
        knobs = self.resolve_fidelity(fidelity, pre.rgb, **knobs)
        controlnet_conditioning_scale = knobs["controlnet_conditioning_scale"]
        added_noise_level = knobs.get("added_noise_level", added_noise_level)
        self.check_inputs(
            pre.rgb,
            prompt=prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            controlnet_conditioning_scale=controlnet_conditioning_scale,
            added_noise_level=added_noise_level,
            start_point=start_point,
            added_prompt=added_prompt,
            negative_prompt=negative_prompt,
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

        # 2. Prompts (user's, extracted tags, added prompt; or the original's string) and their embeddings (negative
        #    first when guiding)
        resolved = self.resolve_text_prompts(
            rgb,
            prompt=prompt,
            negative_prompt=negative_prompt,
            added_prompt=added_prompt,
            default_negative_prompt=PASD_NEGATIVE_PROMPT,
        )
        prompts = resolved.prompts
        if match_original:
            users = self._prompt_list(prompt, rgb.shape[0], "prompt", allow_none=True)
            captions = resolved.extraction.hard_prompts if resolved.extraction is not None else [None] * len(users)
            prompts = [pasd_original_prompt(c, u, added_prompt) for c, u in zip(captions, users)]
        prompt_embeds = self.embed_for_guidance(prompts, resolved.negative_prompts, device, do_cfg)

        # 3. The condition in [0, 1]: the LR image padded (reflect) and upsampled to the output size (PIL bicubic on
        #    8 bits, as the original), or resized by the original's process_size rule
        process_size = self.resolve_process_size(process_size, match_original)
        cond_image, working_size = self.condition_image(rgb, process_size)

        # 4. Timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)

        # 5. The start: the LR latent noised to t_1, then to added_noise_level (or pure noise, or the given latents)
        latents = self.prepare_start_latents(
            cond_image,
            timesteps=timesteps,
            start_point=start_point,
            added_noise_level=added_noise_level,
            generator=generator,
            latents=latents,
        )
        step_kwargs = self.prepare_extra_step_kwargs(generator, eta=None)

        # 6. Denoising loop; tiled (automatically above 320² latent pixels, as the original), every step blends the
        #    tiles' noise predictions and steps the whole latent
        tiling = self.latent_tiling(latents.shape[-2:], tile_size, tile_overlap)
        scale = float(controlnet_conditioning_scale)
        state = {"prompt_embeds": prompt_embeds}  # a callback may replace it

        def predict(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            kwargs = dict(t=t, cond_image=cond_image, prompt_embeds=state["prompt_embeds"],
                          guidance_scale=guidance_scale, conditioning_scale=scale)  # fmt: skip
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

        # 7. Decode, then crop back, [-1, 1] -> [0, 1], clamp (8-bit round trips with match_original), colour fix
        #    against the condition (the original's order), resize back from the working size, LR consistency, alpha
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
