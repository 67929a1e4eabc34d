"""StableSR: real-world super-resolution with a frozen Stable Diffusion prior, SFT conditioning and CFW decoding.

Paper: J. Wang, Z. Yue, S. Zhou, K. C. K. Chan, C. C. Loy, "Exploiting Diffusion Prior for Real-World Image
Super-Resolution", IJCV 2024 (arXiv:2305.07015). Released code: ``LatentDiffusionSRTextWT`` and
``scripts/sr_val_ddpm_text_T_vqganfin_old.py`` / ``..._oldcanvas.py`` (facts only). Notation and shapes:

- ``y``: the LR image ``(N, 3, h, w)`` in [-1, 1], padded (reflect, bottom/right) to a multiple of
  :attr:`~StableSRPipeline.lr_multiple` and bicubic-upsampled ×``upscale`` to ``(N, 3, H, W)``, ``H = s·h``
  (clamped to [-1, 1], as the original);
- ``z_lr = (E(y) ~ sample) · scaling_factor``: its VAE latent ``(N, 4, H/f, W/f)`` (``f = 8`` for SD), drawn from the
  posterior as the original's ``get_first_stage_encoding``; the CFW encoder features of ``y`` are kept for decoding;
- the chain starts from pure noise ``z_T ~ N(0, I)`` (Sec. 3.2) and runs the original's DDPM sampler: 200 of the 1000
  trained steps, respaced as its ``space_timesteps(1000, [200])`` (evenly over ``[0, 999]``, both ends included),
  posterior variance "fixed small", no clipping (:func:`stablesr_scheduler`, :func:`space_timesteps`);
- each step: ``C = time_aware_encoder(z_lr, t)`` (one map per UNet level), ``eps = unet(z_t, t, text)`` with every
  residual block modulated by ``C`` through the SFT layers (:class:`~sr_diffusion.models.StableSRSFT`), optionally
  with classifier-free guidance (the time-aware encoder's maps are shared by both halves);
- the output: ``D(z_0 / scaling_factor)`` with CFW (:class:`~sr_diffusion.models.StableSRCFW`): ``fidelity_weight``
  ``w`` (the original's ``dec_w``, 0.5) trades fidelity (1) for realism (0, the plain SD decoder); then the colour fix
  against the LR image (AdaIN by default, as in the paper), the crop back to exactly ``s ×`` the input size.

Prompts: the original samples with an empty prompt (``""``, the default here); an optional prompt extractor (any
:class:`~sr_diffusion.prompts.PromptExtractor`, e.g. DAPE or a BLIP captioner) adds its tags after the user's prompt
(``prompt="auto"`` or ``None``: its tags alone), merged as PASD and SeeSR merge them
(:func:`~sr_diffusion.prompts.resolve_prompts`; the user's prompt and negative prompt always win). The fidelity controls
(``guidance_scale``, ``fidelity_weight``, ``fidelity="auto"``, ``color_fix``, ``lr_consistency``) are the ones every SD
pipeline shares (:mod:`sr_diffusion.pipelines.sd_base`).

Large images (the original's "progressive aggregation sampling", ``p_sample_canvas``): with ``tile_size`` every step
evaluates the time-aware encoder and the UNet on overlapping latent tiles (``tile_size · s / f`` latent pixels, the
last tile of a row or column shifted back to end at the border), blends the tiles' noise predictions with Gaussian
weights (``sigma = 0.1 ·`` the tile side, the original's ``var = 0.01``), and takes one scheduler step on the whole
latent; the VAE still encodes and decodes the whole image unless ``vae_tile_size`` is given.

Tiled VAE with CFW (``vae_tile_size``, ``vae_tile_overlap``; the original's ``vqgantile_size`` 1280 and
``vqgantile_stride`` 1000 of ``sr_val_ddpm_text_T_vqganfin_oldcanvas_tile.py``, i.e. an overlap of 280 pixels): the
upsampled LR image ``y`` is cut into overlapping ``T × T`` pixel tiles (``T`` a multiple of ``f``, the last tile of a
row or column shifted back to end at the border, as the original's ``ImageSpliterTh``); each tile is encoded alone and
its posterior parameters (mean and log-variance, ``T/f`` latent pixels a side) are blended into the whole latent's with
Gaussian weights (:func:`~sr_diffusion.pipelines.sd_base.gaussian_tile_weights`, ``var = 0.01``), then ``z_lr`` is
drawn once from the assembled posterior with the same draws as the whole-image encoding. Decoding, each ``T/f`` latent
tile of ``z_0`` is decoded alone with CFW fed by the encoder features of the *same* region of ``y`` (re-encoded there,
as the original encodes every patch again with its CFW autoencoder, so no whole-image features are kept), and the
decoded tiles are blended in pixel space with Gaussian weights normalised to sum to 1 (the original's
``update_gaussian`` / ``gather``). Unlike the original, which runs the whole chain (encode, sample, decode) on each
1280-pixel patch independently, only the VAE is tiled here: the diffusion runs on the assembled latent (whole, or
with ``tile_size``), so the patches cannot drift apart.

Not carried over: reference-guided sampling and starting from a noised LR latent (the original's ``start_T``
experiments), the face model's variants.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    SchedulerMixin,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import randn_tensor

import sr_diffusion.models  # noqa: F401  (diffusers resolves saved components from sys.modules)
from sr_diffusion.color_fix import color_fix as apply_color_fix
from sr_diffusion.estimation import DegradationEstimator
from sr_diffusion.image_processor import ImageInput, pad_to_multiple
from sr_diffusion.models.stablesr_cfw import StableSRCFW
from sr_diffusion.models.stablesr_encoder import StableSRTimeAwareEncoder
from sr_diffusion.models.stablesr_sft import StableSRSFT
from sr_diffusion.prompts.base import PromptExtractor
from sr_diffusion.resize import resize
from sr_diffusion.tiling import TileAccumulator, tile_regions
from sr_diffusion.utils import is_int, is_number

from ..call_docs import shared_call_docs
from ..pipeline_utils import SRSamplingMixin
from ..sd_base import StableDiffusionSRMixin, gaussian_tile_weights
from .blocks import (
    RandomStateReplay,
    space_timesteps,
    stablesr_noise_pred,
    stablesr_scheduler,
    stablesr_tile_weights,
)

__all__ = [
    "StableSRPipeline",
    "space_timesteps",
    "stablesr_noise_pred",
    "stablesr_scheduler",
    "stablesr_tile_weights",
]


class StableSRPipeline(StableDiffusionSRMixin, SRSamplingMixin, DiffusionPipeline):
    r"""Super-resolution with StableSR (Wang et al., IJCV 2024) on a Stable Diffusion 1.x/2.x base.

    Args:
        vae: the SD ``AutoencoderKL`` (for the released model: the encoder/decoder of the CFW autoencoder, identical to
            SD 2.1's).
        text_encoder: the SD text encoder (``CLIPTextModel``; SD 2.x: OpenCLIP ViT-H as diffusers stores it, whose
            output is the original's ``penultimate`` layer).
        tokenizer: its ``CLIPTokenizer``.
        unet: the frozen SD ``UNet2DConditionModel`` (the released model: SD 2.1-base, 512 px).
        scheduler: :func:`stablesr_scheduler` (DDPM, the original's) or any diffusers scheduler with ``alphas_cumprod``;
            a ``DDPMScheduler`` runs the original's respaced timesteps (:func:`space_timesteps`).
        time_aware_encoder: :class:`~sr_diffusion.models.StableSRTimeAwareEncoder`.
        sft: :class:`~sr_diffusion.models.StableSRSFT`, built for ``unet``.
        cfw: :class:`~sr_diffusion.models.StableSRCFW` for ``vae``, or None (then ``fidelity_weight`` must be 0).
        prompt_extractor: optional, any :class:`~sr_diffusion.prompts.PromptExtractor` (e.g. DAPE): its tags join the
            prompt (``prompt="auto"`` or ``None``: its tags alone). A ``ModelMixin`` extractor is saved with the
            pipeline; any other is not (diffusers cannot): pass it again, ``from_pretrained(dir, prompt_extractor=…)``.
        degradation_estimator: the :class:`~sr_diffusion.estimation.DegradationEstimator` of ``fidelity="auto"``, or
            None for the one shipped in the package.
        upscale: the SR factor ``s`` (registered in the config; the released model was trained at 4, and works at
            others since the LR image is upsampled to the output size first).

    Build one from any SD diffusers folder with :meth:`from_sd_base`, or from the released checkpoints with
    :func:`sr_diffusion.conversion.stablesr.convert_stablesr` (``sr-diffusion convert --arch stablesr``). Loading,
    geometry, the SD-base checks, text, VAE, tiling, the fidelity controls and LoRA loading are
    :class:`~sr_diffusion.pipelines.sd_base.StableDiffusionSRMixin`'s.
    """

    METHOD = "StableSR"
    #: ``tile_size=None`` tiles large inputs automatically, as the original (``tile_size=0``: never)
    AUTO_TILING = True
    #: subfolders a saved StableSR pipeline must have, besides its Stable Diffusion base (vae, text_encoder, ...)
    ADD_ON_SUBFOLDERS = {"time_aware_encoder": "the time-aware encoder", "sft": "the SFT layers"}
    OPTIONAL_ADD_ONS = {
        "cfw": "the CFW layers",
        "prompt_extractor": "the prompt extractor",
        "degradation_estimator": "the degradation estimator",
    }
    #: CFW's ``w``: the original's ``dec_w`` (with CFW layers; without them there is no ``w`` to set: 0)
    FIDELITY_DEFAULTS = {"fidelity_weight": 0.5}
    #: the original's canvas tiles in latent pixels: ``tile_size = input_size / 8`` (512 / 8) and ``--tile_overlap`` 32
    CANVAS_TILE, CANVAS_OVERLAP = 64, 32
    #: the original's VAE patches in output pixels: ``--vqgantile_size`` 1280, overlap 1280 - ``vqgantile_stride`` 1000
    VAE_TILE, VAE_TILE_OVERLAP = 1280, 280
    model_cpu_offload_seq = "prompt_extractor->text_encoder->time_aware_encoder->unet->vae"
    _optional_components = ["cfw", "prompt_extractor", "degradation_estimator"]
    # the SFT and CFW layers run inside the UNet's and the VAE's calls (hooks): they stay on the execution device, as
    # does the (tiny) degradation estimator
    _exclude_from_cpu_offload = ["sft", "cfw", "degradation_estimator"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "lr_latents"]
    _latents_name = "z_T"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        time_aware_encoder: StableSRTimeAwareEncoder,
        sft: StableSRSFT,
        cfw: StableSRCFW | None = None,
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
            time_aware_encoder=time_aware_encoder,
            sft=sft,
            cfw=cfw,
            prompt_extractor=prompt_extractor,
            degradation_estimator=degradation_estimator,
        )

    # ------------------------------------------------------------------------------------------------------------------
    # Loading (check_saved_folder, from_pretrained: StableDiffusionSRMixin)
    # ------------------------------------------------------------------------------------------------------------------

    @classmethod
    def base_scheduler(cls, base: str | Path) -> DDPMScheduler:
        """The original's sampler for the SD base in the diffusers folder ``base``: :func:`stablesr_scheduler` with
        the base's ``prediction_type``."""
        return stablesr_scheduler(cls.base_prediction_type(base))

    @classmethod
    def from_sd_base(
        cls,
        base: str | Path,
        time_aware_encoder: StableSRTimeAwareEncoder,
        sft: StableSRSFT,
        cfw: StableSRCFW | None = None,
        scheduler: SchedulerMixin | None = None,
        prompt_extractor: PromptExtractor | None = None,
        degradation_estimator: DegradationEstimator | None = None,
        upscale: int = 4,
        torch_dtype: torch.dtype | None = None,
    ) -> StableSRPipeline:
        """A StableSR pipeline on the SD base in the diffusers folder ``base`` (``vae/``, ``text_encoder/``,
        ``tokenizer/``, ``unet/``) with the given add-ons (cast to ``torch_dtype`` with the base, the CFW layers
        included); the scheduler defaults to :meth:`base_scheduler` (the original's)."""
        return cls.from_sd_base_parts(
            base,
            scheduler=cls.base_scheduler(base) if scheduler is None else scheduler,
            upscale=upscale,
            torch_dtype=torch_dtype,
            time_aware_encoder=time_aware_encoder,
            sft=sft,
            cfw=cfw,
            prompt_extractor=prompt_extractor,
            degradation_estimator=degradation_estimator,
        )

    # ------------------------------------------------------------------------------------------------------------------
    # Checks
    # ------------------------------------------------------------------------------------------------------------------

    def check_components(self) -> None:
        """Raise a ``ValueError`` for components that cannot work together (or are not an SD 1.x/2.x base)."""
        self.check_sd_base()
        uc, vc = self.unet.config, self.vae.config
        if not isinstance(self.time_aware_encoder, StableSRTimeAwareEncoder):
            raise ValueError(
                f"time_aware_encoder must be a StableSRTimeAwareEncoder, got {type(self.time_aware_encoder).__name__}"
            )
        ec = self.time_aware_encoder.config
        if ec.in_channels != vc.latent_channels:
            raise ValueError(
                f"the time-aware encoder takes {ec.in_channels} channels, the VAE latent has {vc.latent_channels}"
            )
        if len(ec.channel_mult) != len(uc.block_out_channels):
            raise ValueError(
                f"the time-aware encoder has {len(ec.channel_mult)} levels but the UNet has "
                f"{len(uc.block_out_channels)}: the SFT layers need one condition map per UNet level"
            )
        if not isinstance(self.sft, StableSRSFT):
            raise ValueError(f"sft must be a StableSRSFT, got {type(self.sft).__name__}")
        self.sft.check_unet(self.unet)
        if self.sft.config.cond_channels != ec.out_channels:
            raise ValueError(
                f"the SFT layers take {self.sft.config.cond_channels}-channel maps but the time-aware encoder gives "
                f"{ec.out_channels}"
            )
        if self.cfw is not None:
            if not isinstance(self.cfw, StableSRCFW):
                raise ValueError(f"cfw must be a StableSRCFW or None, got {type(self.cfw).__name__}")
            self.cfw.check_vae(self.vae)
        self.check_prompt_extractor("sr_diffusion.prompts.PromptExtractor (images -> PromptExtraction)")
        self.check_degradation_estimator()
        # any prediction_type: SD bases predict epsilon (512) or v (768v), and scheduler.step reads it from its config
        self.check_noise_scheduler("StableSR", epsilon_only=False)

    def fidelity_defaults(self) -> dict[str, Any]:
        """CFW's ``w`` (the original's 0.5) when the pipeline has CFW layers; without them ``fidelity="auto"`` has
        nothing to set (and an unset ``fidelity_weight`` is 0, the plain SD decoder)."""
        return dict(self.FIDELITY_DEFAULTS) if self.cfw is not None else {}

    def check_inputs(
        self,
        rgb: torch.Tensor,
        *,
        prompt: Any,
        num_inference_steps: int,
        guidance_scale: float,
        negative_prompt: Any,
        fidelity_weight: float,
        color_fix: str,
        lr_consistency: bool,
        tile_size: int | None,
        tile_overlap: int | None,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        callback_on_step_end_tensor_inputs: Sequence[str] | None,
        vae_tile_size: int | None = None,
        vae_tile_overlap: int = 280,
        start_point: str = "lr",
    ) -> None:
        self.check_components()
        self.check_num_inference_steps(num_inference_steps)  # no eta, no strength: the original's DDPM from z_T
        self.check_guidance_scale(guidance_scale)
        if not is_number(fidelity_weight):
            raise ValueError(f"fidelity_weight must be a number in [0, 1], got {fidelity_weight!r}")
        if not 0 <= fidelity_weight <= 1:
            raise ValueError(f"fidelity_weight must be in [0, 1], got {fidelity_weight}")
        if fidelity_weight > 0 and self.cfw is None:
            raise ValueError(
                f"fidelity_weight={fidelity_weight} needs the CFW layers, and this pipeline has none (cfw=None): pass "
                "fidelity_weight=0 or add a StableSRCFW"
            )
        # the user's texts (the merged prompt may be truncated: only the extracted tags are cut)
        n = rgb.shape[0]
        self._prompt_list(prompt, n, "prompt", allow_none=True)
        self._prompt_list(negative_prompt, n, "negative_prompt", allow_none=True)
        self.check_output_options(color_fix, lr_consistency)
        self.check_start_point(start_point)
        # one z_T for the whole latent even when tiling (every step blends the tiles on it): the tile checks alone, then
        # the latents' alone
        if tile_overlap is not None and (not is_int(tile_overlap) or tile_overlap < 0):
            raise ValueError(f"tile_overlap must be an int >= 0 or None (the original's), got {tile_overlap!r}")
        tile, overlap = (None if tile_size == 0 else tile_size), (tile_overlap or 0)  # tile_size 0: never tile
        self.check_sampling_inputs(
            rgb,
            tile_size=tile,
            tile_overlap=overlap,
            generator=generator,
            latents=None,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        self.check_sampling_inputs(
            rgb,
            tile_size=None,
            tile_overlap=overlap,
            generator=generator,
            latents=latents,
            callback_on_step_end_tensor_inputs=None,
        )
        self.check_vae_tiling(vae_tile_size or None, vae_tile_overlap)

    def check_vae_tiling(self, vae_tile_size: int | None, vae_tile_overlap: int) -> None:
        """Raise a ``ValueError`` unless the VAE tiles are ``None`` or a positive multiple of ``f`` pixels overlapping
        by a multiple of ``f`` in ``[0, vae_tile_size)``."""
        if vae_tile_size is None:
            return
        f = self.vae_scale_factor
        for name, value in (("vae_tile_size", vae_tile_size), ("vae_tile_overlap", vae_tile_overlap)):
            if not is_int(value):
                raise ValueError(f"{name} must be an integer number of pixels, got {value!r}")
        if vae_tile_size <= 0 or vae_tile_size % f:
            raise ValueError(
                f"vae_tile_size must be a positive multiple of the VAE's downsampling factor {f} (output pixels), got "
                f"{vae_tile_size}"
            )
        if not 0 <= vae_tile_overlap < vae_tile_size or vae_tile_overlap % f:
            raise ValueError(
                f"vae_tile_overlap must be a multiple of {f} in [0, vae_tile_size={vae_tile_size}), got "
                f"{vae_tile_overlap}"
            )

    # ------------------------------------------------------------------------------------------------------------------
    # Text, VAE
    # ------------------------------------------------------------------------------------------------------------------

    def encode_lr(
        self,
        upsampled_lr: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
        cfw_features: dict[int, list[torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """``z_lr``: a posterior sample of the upsampled LR image ``(N, 3, H, W)`` in [-1, 1], times the scaling factor;
        with ``cfw_features`` (a dict) the CFW encoder features are recorded into it."""
        capture = (
            self.cfw.capture_encoder_features(self.vae, cfw_features)
            if cfw_features is not None and self.cfw is not None
            else contextlib.nullcontext()
        )
        with capture:
            posterior = self.vae.encode(upsampled_lr.to(self.vae.dtype)).latent_dist
        return self.scale_latents(posterior.sample(generator=generator))

    def decode_latents(
        self, latents: torch.Tensor, cfw_features: dict[int, torch.Tensor] | None = None, fidelity_weight: float = 0.0
    ) -> torch.Tensor:
        """``z_0`` ``(N, 4, H/f, W/f)`` → ``(N, 3, H, W)`` in about [-1, 1], with CFW at ``fidelity_weight``."""
        z = self.unscale_latents(latents)
        fuse = (
            self.cfw.fuse_decoder(self.vae, cfw_features or {}, fidelity_weight)
            if self.cfw is not None and fidelity_weight > 0
            else contextlib.nullcontext()
        )
        with fuse:
            image = self.vae.decode(z).sample
        return image.float()

    def vae_tiles(self, latent_shape: Sequence[int], tile_size: int, overlap: int) -> list[tuple[slice, ...]]:
        """The latent regions ``(:, :, ys, xs)`` of the VAE tiles of ``tile_size`` output pixels overlapping by
        ``overlap`` (both multiples of ``f``) for a latent of ``latent_shape`` ``(..., H/f, W/f)``; a side shorter
        than a tile gets one tile of that side; the last tile of a row or column ends at the border."""
        f = self.vae_scale_factor
        return tile_regions(latent_shape[-2], latent_shape[-1], tile_size // f, overlap // f)[1]

    def encode_lr_tiled(
        self,
        upsampled_lr: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
        tile_size: int,
        overlap: int,
    ) -> torch.Tensor:
        """``z_lr`` as :meth:`encode_lr`, encoding ``(N, 3, H, W)`` tile by tile (:meth:`vae_tiles`): the tiles'
        posterior parameters (mean, log-variance) are blended with Gaussian weights, then one sample of the assembled
        posterior is drawn (the same draws as the whole-image encoding)."""
        f = self.vae_scale_factor
        n, _, height, width = upsampled_lr.shape
        latent_shape = (n, 2 * self.vae.config.latent_channels, height // f, width // f)
        regions = self.vae_tiles(latent_shape, tile_size, overlap)
        weight = gaussian_tile_weights(*self._region_size(regions[0]), device=upsampled_lr.device)
        parameters = TileAccumulator(latent_shape, dtype=self.vae.dtype, device=upsampled_lr.device)
        for region in regions:
            tile = upsampled_lr[self.pixel_region(region)].to(self.vae.dtype)
            parameters.add(region, self.vae.encode(tile).latent_dist.parameters, weight)
        posterior = DiagonalGaussianDistribution(parameters.result())
        return self.scale_latents(posterior.sample(generator=generator))

    def decode_latents_tiled(
        self,
        latents: torch.Tensor,
        *,
        upsampled_lr: torch.Tensor,
        fidelity_weight: float,
        tile_size: int,
        overlap: int,
    ) -> torch.Tensor:
        """:meth:`decode_latents` tile by tile (:meth:`vae_tiles`): each latent tile of ``z_0`` ``(N, 4, H/f, W/f)``
        is decoded with CFW fed by the encoder features of the same region of the upsampled LR image ``(N, 3, H, W)``
        (encoded again there; not encoded at ``fidelity_weight`` 0), and the decoded tiles are blended with Gaussian
        weights normalised to sum to 1. Returns ``(N, 3, H, W)`` (float32)."""
        regions = self.vae_tiles(latents.shape, tile_size, overlap)
        f = self.vae_scale_factor
        tile_h, tile_w = self._region_size(regions[0])
        weight = gaussian_tile_weights(tile_h * f, tile_w * f, device=latents.device)
        n, _, height, width = upsampled_lr.shape
        image = TileAccumulator((n, 3, height, width), device=latents.device)
        for region in regions:
            pixels = self.pixel_region(region)
            features = None
            if fidelity_weight > 0 and self.cfw is not None:
                store: dict[int, list[torch.Tensor]] = {}
                with self.cfw.capture_encoder_features(self.vae, store):
                    self.vae.encode(upsampled_lr[pixels].to(self.vae.dtype))
                features = {k: torch.cat(v) for k, v in store.items()}
            image.add(pixels, self.decode_latents(latents[region], features, fidelity_weight), weight)
        return image.result()

    @staticmethod
    def _region_size(region: tuple[slice, ...]) -> tuple[int, int]:
        return region[2].stop - region[2].start, region[3].stop - region[3].start

    # ------------------------------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------------------------------

    def canvas_tiles(
        self, latent_size: Sequence[int], tile_size: int | None, tile_overlap: int | None
    ) -> tuple[int, int] | None:
        """The latent tile and overlap of progressive aggregation sampling for a latent of ``latent_size`` ``(h, w)``,
        or ``None`` to sample the whole latent at once.

        ``tile_size`` ``None`` (automatic): the original's canvas, :attr:`CANVAS_TILE` latent pixels a side (its
        ``input_size / 8``), whenever the latent is larger on a side (one tile is the whole latent: the original's
        canvas then gives the untiled result too); ``0``: never; else ``tile_size`` LR pixels (``tile_size · s / f``
        latent pixels). ``tile_overlap`` ``None``: the original's :attr:`CANVAS_OVERLAP` latent pixels, at most half a
        tile; else ``tile_overlap`` LR pixels."""
        s, f = self.upscale, self.vae_scale_factor
        if tile_size == 0 or (tile_size is None and max(latent_size) <= self.CANVAS_TILE):
            return None
        tile = self.CANVAS_TILE if tile_size is None else tile_size * s // f
        overlap = min(self.CANVAS_OVERLAP, tile // 2) if tile_overlap is None else tile_overlap * s // f
        return tile, overlap

    def vae_tile(self, image_size: Sequence[int], vae_tile_size: int | None) -> int | None:
        """The VAE tile side in output pixels for an upsampled image of ``image_size`` ``(H, W)``, or ``None`` for the
        whole image: ``vae_tile_size`` ``None`` (automatic): :attr:`VAE_TILE` (the original's ``vqgantile_size``) when
        the image is larger on a side; ``0``: never; else ``vae_tile_size``."""
        if vae_tile_size is None:
            return self.VAE_TILE if max(image_size) > self.VAE_TILE else None
        return vae_tile_size or None

    def prepare_start_latents(
        self,
        lr_latents: torch.Tensor,
        start_point: str,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
    ) -> torch.Tensor:
        """``z_T`` ``(N, 4, H/f, W/f)``: the given ``latents``; or for ``start_point="noise"`` pure noise
        ``eps ~ N(0, I)`` (the paper, the original's ``sr_val_ddpm_text_T_vqganfin_old.py``); or for ``"lr"`` the LR
        latent noised to the last trained step, ``q(z_lr, T-1) = sqrt(abar_{T-1}) z_lr + sqrt(1 - abar_{T-1}) eps``
        (its ``..._oldcanvas.py`` and ``..._oldcanvas_tile.py``: ``q_sample_respace(init_latent, 999)``, whatever the
        number of steps). ``eps`` is drawn from ``generator`` after ``z_lr``, as the original draws it."""
        if latents is not None or start_point == "noise":
            return self.prepare_latents(
                lr_latents.shape, dtype=lr_latents.dtype, device=lr_latents.device, generator=generator, latents=latents
            )
        noise = randn_tensor(lr_latents.shape, generator=generator, device=lr_latents.device, dtype=lr_latents.dtype)
        last = torch.tensor([self.scheduler.config.num_train_timesteps - 1], device=lr_latents.device)
        return self.scheduler.add_noise(lr_latents, noise, last)

    def set_timesteps(self, num_inference_steps: int, device: torch.device) -> torch.Tensor:
        """The original's respaced steps for a ``DDPMScheduler``; the scheduler's own spacing for any other."""
        if isinstance(self.scheduler, DDPMScheduler):
            steps = space_timesteps(self.scheduler.config.num_train_timesteps, num_inference_steps)
            self.scheduler.set_timesteps(timesteps=steps, device=device)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        return self.scheduler.timesteps

    def predict_noise(
        self,
        latents: torch.Tensor,
        *,
        t: torch.Tensor,
        lr_latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The (guided) model output for ``z_t`` (or a tile of it) and the matching ``z_lr``; ``prompt_embeds``
        holds the negative embeddings first when guiding (the time-aware encoder runs once for both halves)."""

        def model(x: torch.Tensor, z_lr: torch.Tensor) -> torch.Tensor:
            return stablesr_noise_pred(
                self.unet,
                time_aware_encoder=self.time_aware_encoder,
                sft=self.sft,
                sample=x,
                timestep=t,
                lr_latents=z_lr,
                encoder_hidden_states=prompt_embeds,
            )

        return self.guided_noise_pred(
            model, latents=latents, t=t, condition=lr_latents, guidance_scale=guidance_scale, repeat_condition=False
        )

    def predict_noise_tiled(
        self,
        latents: torch.Tensor,
        *,
        t: torch.Tensor,
        lr_latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        guidance_scale: float,
        tile: int,
        overlap: int,
    ) -> torch.Tensor:
        """Progressive patch aggregation: :meth:`predict_noise` on overlapping latent tiles, Gaussian-blended."""

        def predict(region):
            return self.predict_noise(
                latents[region],
                t=t,
                lr_latents=lr_latents[region],
                prompt_embeds=prompt_embeds,
                guidance_scale=guidance_scale,
            )

        return self.blend_latent_tiles(predict, latents, tile, overlap)

    def restore_upsampled(
        self,
        upsampled: torch.Tensor,
        *,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        prompt_embeds: torch.Tensor,
        num_inference_steps: int,
        guidance_scale: float,
        fidelity_weight: float,
        color_fix: str,
        start_point: str,
        tile_size: int | None,
        tile_overlap: int | None,
        vae_tile_size: int | None,
        vae_tile_overlap: int,
        callback_on_step_end: Callable[..., dict[str, Any]] | PipelineCallback | MultiPipelineCallbacks | None,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> torch.Tensor:
        """Steps 3–8 of :meth:`__call__` on the upsampled LR image ``y`` ``(N, 3, H, W)`` in [-1, 1] (padded, clamped):
        encode ``z_lr``, the (canvas-tiled) chain from ``z_T``, the CFW decode (VAE-tiled above :attr:`VAE_TILE`), the
        colour fix against ``y``. Returns the colour-fixed decode ``(N, 3, H, W)``, neither clamped nor cropped."""
        vae_tile_size = self.vae_tile(upsampled.shape[-2:], vae_tile_size)
        device = upsampled.device
        if vae_tile_size is None:
            cfw_store: dict[int, list[torch.Tensor]] | None = {} if fidelity_weight > 0 else None
            lr_latents = self.encode_lr(upsampled, generator, cfw_store).to(self.unet.dtype)
            cfw_features = {k: torch.cat(v) for k, v in (cfw_store or {}).items()}
        else:
            lr_latents = self.encode_lr_tiled(upsampled, generator, vae_tile_size, vae_tile_overlap)
            lr_latents = lr_latents.to(self.unet.dtype)

        # 4. Timesteps
        timesteps = self.set_timesteps(num_inference_steps, device)
        self._num_timesteps = len(timesteps)

        # 5. z_T (pure noise, or z_lr noised to T - 1)
        latents = self.prepare_start_latents(lr_latents, start_point, generator, latents)
        step_kwargs = self.prepare_extra_step_kwargs(generator, eta=None)  # no eta knob: the scheduler's default

        # 6. Denoising loop. Not the mixin's sample_tiles (one chain per LR tile, blended once at the end): tiled, every
        #    step blends the tiles' noise predictions on the latent with Gaussian weights and steps the whole latent
        #    (the original's progressive aggregation sampling), so the tiles cannot drift apart
        tiles = self.canvas_tiles(lr_latents.shape[-2:], tile_size, tile_overlap)
        state = {"prompt_embeds": prompt_embeds, "lr_latents": lr_latents}  # a callback may replace them

        def predict(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            kwargs = dict(t=t, lr_latents=state["lr_latents"], prompt_embeds=state["prompt_embeds"],
                          guidance_scale=guidance_scale)  # fmt: skip
            if tiles is None:
                return self.predict_noise(latents, **kwargs)
            return self.predict_noise_tiled(latents, **kwargs, tile=tiles[0], overlap=tiles[1])

        latents = self.denoise(
            latents,
            timesteps=timesteps,
            predict=predict,
            step_kwargs=step_kwargs,
            state=state,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )

        # 7. Decode with CFW (tiled: each tile with the encoder features of its own region)
        if vae_tile_size is None:
            hr = self.decode_latents(latents, cfw_features, fidelity_weight)
        else:
            hr = self.decode_latents_tiled(
                latents,
                upsampled_lr=upsampled,
                fidelity_weight=fidelity_weight,
                tile_size=vae_tile_size,
                overlap=vae_tile_overlap,
            )

        # 8. Colour fix as the original: in [-1, 1], before clamping and cropping, against y (padded, clamped)
        return apply_color_fix(hr, upsampled.to(hr), color_fix)

    def restore_in_patches(
        self,
        upsampled: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
        patch_size: int,
        patch_overlap: int,
        **restore: Any,
    ) -> torch.Tensor:
        """The original script's path for an image larger than ``vqgantile_size`` (``match_original=True``): ``y`` is
        cut into ``patch_size``-pixel patches (:attr:`VAE_TILE` by default) overlapping by ``patch_overlap`` (its
        ``ImageSpliterTh`` with ``vqgantile_size`` and ``vqgantile_stride = patch_size - patch_overlap``:
        the last patch of a row or column shifted back to end at the border); each patch runs the whole of
        :meth:`restore_upsampled` (encode, chain, decode, colour fix against the patch) from the same random state (the
        script calls ``seed_everything`` before every patch), and the results are blended with Gaussian weights
        (``update_gaussian`` / ``gather``: :func:`gaussian_tile_weights` of the patch, summed, divided by the summed
        weights). Returns ``(N, 3, H, W)``, neither clamped nor cropped."""
        height, width = upsampled.shape[-2:]
        tile_size, regions = tile_regions(height, width, patch_size, patch_overlap, column_major=True)  # ImageSpliterTh
        weight = gaussian_tile_weights(*tile_size, device=upsampled.device)
        image = TileAccumulator(upsampled.shape, device=upsampled.device)
        replay = RandomStateReplay(generator)
        for region in regions:
            replay.rewind()
            patch = self.restore_upsampled(upsampled[region], generator=generator, latents=None, **restore)
            image.add(region, patch, weight)
        return image.result()

    @torch.no_grad()
    @shared_call_docs
    def __call__(
        self,
        image: ImageInput | Sequence[ImageInput],
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 200,
        guidance_scale: float = 1.0,
        fidelity_weight: float | None = None,
        fidelity: str | None = None,
        negative_prompt: str | list[str] | None = None,
        color_fix: str = "adain",
        lr_consistency: bool = False,
        start_point: str = "lr",
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        vae_tile_size: int | None = None,
        vae_tile_overlap: int = 280,
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
                prompt extractor's tags when the pipeline has one, else none (``""``, as the original). The user's
                words come first, then the extracted tags (:func:`~sr_diffusion.prompts.resolve_prompts`); a user
                prompt longer than the tokenizer's limit is an error. ``"auto"`` without an extractor is an error.
            num_inference_steps: ``1 <= S <= 1000``; 200 as the original (its respaced DDPM steps).
            guidance_scale: classifier-free guidance scale ``w`` (``eps_u + w (eps_c - eps_u)``, ``eps_u`` from
                ``negative_prompt``): higher follows the prompt more and the LR image less; 1: no guidance. Default 1,
                as the original's DDPM sampler.
            fidelity_weight: CFW's ``w`` in [0, 1]: higher is more faithful to the LR image (1: most faithful; 0: the
                plain SD decoder, more generative). ``None``: 0.5 (the original's ``dec_w``) with CFW layers, else 0;
                with ``fidelity="auto"`` and CFW layers, set from the input.
            fidelity: ``"auto"``: set the fidelity controls left ``None`` (here: ``fidelity_weight``, with CFW layers)
                from the input's degradation as estimated by the ``degradation_estimator`` component (the one shipped
                in the package when it is None): more faithful for clean inputs, more generative for heavily degraded
                ones (:mod:`sr_diffusion.fidelity_auto`); the LR images must be at least 16 pixels a side. A value
                given explicitly always wins. ``None`` (default): each control's default.
            negative_prompt: the unconditional text when ``guidance_scale > 1`` (ignored otherwise); a given one
                (``""`` included) is used verbatim. Default ``""``.
            color_fix: {color_fix} Default ``"adain"`` (the paper's). As the original, the reference is the upsampled LR
                image ``y`` (padded, clamped to [-1, 1]) and the fix is applied to the decoded image before it is
                clamped and cropped.
            lr_consistency: {lr_consistency} Default False.
            start_point: where the chain starts: ``"lr"`` (default, the original's scripts for images of any size,
                ``..._oldcanvas(_tile).py``): the LR latent noised to the last trained step, ``q(z_lr, T - 1)``;
                ``"noise"``: pure noise (the paper, ``..._old.py``). Ignored when ``latents`` is given.
            tile_size: progressive patch aggregation: every step runs the denoiser on overlapping latent tiles covering
                ``tile_size`` LR pixels (a multiple of :attr:`lr_multiple`; 128 at ×4 is the original's 64-pixel
                latent tile), overlapping by ``tile_overlap`` LR pixels. ``None`` (default): automatic, as the original
                (whose canvas sampler always tiles): tiles of 64 latent pixels when the latent is larger on a side;
                ``0``: never tile (more memory, and the SD UNet sees a larger latent than it was trained on).
            tile_overlap: the tiles' overlap in LR pixels; ``None`` (default): the original's 32 latent pixels (64 LR
                pixels at ×4), at most half a tile.
            vae_tile_size: encode the upsampled LR image and decode the result with the VAE (and CFW) in tiles of
                ``vae_tile_size`` output pixels (a multiple of the VAE factor ``f``, 8 for SD), to bound the VAE's
                memory for large outputs; each decoder tile is fused with the encoder features of its own region
                (module docstring). ``None`` (default): automatic, tiles of 1280 pixels (the original's
                ``vqgantile_size``) when the output is larger on a side; ``0``: the whole image.
            vae_tile_overlap: the overlap of neighbouring VAE tiles in output pixels, a multiple of ``f`` below
                ``vae_tile_size``; default 280 (the original's ``vqgantile_size - vqgantile_stride = 1280 - 1000``).
            match_original: for an output larger than 1280 pixels (``vqgantile_size``) a side, do what the original
                script does there: run the whole chain (encode, sample, decode, colour fix) on each 1280-pixel patch
                (stride 1000) from the same random state and blend the patches with Gaussian weights
                (:meth:`restore_in_patches`), instead of tiling only the VAE; ``latents`` cannot be given then. Below
                that size every default already is the original's. Default False.
            generator: {generator}
            latents: ``z_T`` to start from, of shape :meth:`latent_shape` (before scaling by ``init_noise_sigma``); one
                for the whole latent, tiled or not (as the original: each step is then tiled).
            output_type: {output_type}
            return_dict: {return_dict}
            callback_on_step_end: called after every step as ``callback_on_step_end(self, step, timestep,
                callback_kwargs)``; the tensors it returns in its dict (``"latents"``: ``z_{t-1}``, ``"prompt_embeds"``,
                ``"lr_latents"``: ``z_lr``) replace the pipeline's.
            callback_on_step_end_tensor_inputs: {callback_on_step_end_tensor_inputs}

        Returns:
            ``SRPipelineOutput(images)`` or ``(images,)``; images are exactly ``upscale`` × the input size.
        """
        callback_on_step_end_tensor_inputs = self.callback_tensor_names(
            callback_on_step_end, callback_on_step_end_tensor_inputs
        )

        # 1. Check inputs (fidelity="auto" sets an unset fidelity_weight from the input's estimated degradation;
        #    without CFW layers an unset one is 0)
        pre = self.image_processor.preprocess(image)
        fidelity_weight = self.resolve_fidelity(fidelity, pre.rgb, fidelity_weight=fidelity_weight)["fidelity_weight"]
        fidelity_weight = 0.0 if fidelity_weight is None else fidelity_weight
        self.check_inputs(
            pre.rgb,
            prompt=prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            fidelity_weight=fidelity_weight,
            color_fix=color_fix,
            lr_consistency=lr_consistency,
            tile_size=tile_size,
            tile_overlap=tile_overlap,
            generator=generator,
            latents=latents,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            vae_tile_size=vae_tile_size,
            vae_tile_overlap=vae_tile_overlap,
            start_point=start_point,
        )
        if match_original is not True and match_original is not False:
            raise ValueError(f"match_original must be a bool, got {match_original!r}")
        self._interrupt = False
        device = self._execution_device
        rgb = pre.rgb.to(device)
        s = self.upscale
        do_cfg = guidance_scale > 1

        # 2. Prompts (user's, extracted tags) and their embeddings (negative first when guiding)
        resolved = self.resolve_text_prompts(
            rgb, prompt=prompt, negative_prompt=negative_prompt, added_prompt=None, default_negative_prompt=None
        )
        prompt_embeds = self.embed_for_guidance(resolved.prompts, resolved.negative_prompts, device, do_cfg)

        # 3.–8. LR image: [0, 1] -> [-1, 1], pad (reflect), bicubic-upsample to the output size y; encode, sample,
        #    decode, colour fix (restore_upsampled; with match_original above vqgantile_size, patch by patch)
        lr, _ = pad_to_multiple(rgb * 2.0 - 1.0, self.lr_multiple)
        size = (lr.shape[-2] * s, lr.shape[-1] * s)
        upsampled = resize(lr, size=size, mode="bicubic").clamp(-1.0, 1.0)
        restore = {
            "prompt_embeds": prompt_embeds,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "fidelity_weight": fidelity_weight,
            "color_fix": color_fix,
            "start_point": start_point,
            "tile_size": tile_size,
            "tile_overlap": tile_overlap,
            "vae_tile_size": vae_tile_size,
            "vae_tile_overlap": vae_tile_overlap,
            "callback_on_step_end": callback_on_step_end,
            "callback_on_step_end_tensor_inputs": callback_on_step_end_tensor_inputs,
        }
        patch = self.vae_tile(size, vae_tile_size)
        if match_original and patch is not None:
            if latents is not None:
                raise ValueError(
                    "latents (z_T) cannot be given with match_original=True for an output over "
                    f"{self.VAE_TILE} pixels a side: each {self.VAE_TILE}-pixel patch draws its own, as the original"
                )
            # the original's script above vqgantile_size: the whole chain on each patch, re-seeded, Gaussian-stitched
            restore["vae_tile_size"] = 0  # a patch is one VAE tile
            hr = self.restore_in_patches(upsampled, generator, patch, vae_tile_overlap, **restore)
        else:
            hr = self.restore_upsampled(upsampled, generator=generator, latents=latents, **restore)
        # 9. Crop back, [-1, 1] -> [0, 1], LR consistency, alpha, postprocess
        return self.finish_output(
            hr,
            rgb=rgb,
            alpha=pre.alpha,
            color_fix="none",
            output_type=output_type,
            return_dict=return_dict,
            lr_consistency=lr_consistency,
        )
