"""PASD: realistic super-resolution with a Stable Diffusion prior, a ControlNet and pixel-aware cross-attention.

Paper: T. Yang, R. Wu, P. Ren, X. Xie, L. Zhang, "Pixel-Aware Stable Diffusion for Realistic Image Super-Resolution and
Personalized Stylization", ECCV 2024 (arXiv:2308.14469). Released code: ``pasd/pipelines/pipeline_pasd.py`` and
``test_pasd.py`` (facts only). Notation and shapes:

- ``y``: the LR image ``(N, 3, h, w)`` in [0, 1], padded (reflect, bottom/right) to a multiple of
  :attr:`~PASDPipeline.lr_multiple` and bicubic-upsampled ×``upscale`` to ``y_up`` ``(N, 3, H, W)``, ``H = s·h``
  (clamped to [0, 1]). ``y_up`` **in [0, 1]** is the ControlNet's condition (the original feeds it unnormalised);
  ``y_up · 2 - 1`` is what the VAE encodes;
- the start (Sec. 4.1, "adjustable noise schedule"; the original's default, ``init_latent_with_noise=False``):
  ``z_lr = E(2·y_up - 1) · scaling_factor`` (a posterior sample), noised to the first timestep ``t_1`` of the sampler,
  then once more to ``added_noise_level`` ``a`` (900):
  ``z = q(q(z_lr, t_1), a)`` with ``q(x, t) = sqrt(abar_t) x + sqrt(1 - abar_t) eps`` (fresh ``eps`` each time);
  ``added_noise_level=None`` starts from pure noise ``z_T ~ N(0, I)`` (``--init_latent_with_noise``). ``q`` uses the
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
- the output: ``D(z_0 / scaling_factor)``, then the colour fix (wavelet by default, as the original's ``test_pasd.py``
  always applies) and the crop to exactly ``s ×`` the input size.

Prompts (:func:`~sr_diffusion.prompts.resolve_prompts`): the user's prompt first, then the optional prompt extractor's
tags (the original captions the image with BLIP / CoCa, or classifies / detects objects: ``--high_level_info``), then
``added_prompt`` (the original's ``"clean, high-resolution, 8k"``); the negative prompt is the user's or the
original's ``"blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed"``. ``guidance_scale`` 9 and 20 UniPC
steps are ``test_pasd.py``'s defaults.

Large images (the original's ``latent_tiled_size`` / ``latent_tiled_overlap``, 320 / 8 latent pixels): with
``tile_size`` every step runs the ControlNet and the UNet on overlapping latent tiles (``tile_size · s / f`` latent
pixels, the condition image cropped to match), blends the tiles' noise predictions with Gaussian weights (StableSR's
``sigma = 0.1 ·`` the tile side, the same as the original's ``_gaussian_weights``) and steps the whole latent.

Not carried over: the VAE's own tiling (``_init_tiled_vae``), the original's automatic resize of small inputs to
``process_size`` (768 px on the short side; call the pipeline at the size you want), personalised/LoRA bases,
``guess_mode``, LCM-LoRA, the grayscale-colourisation variant, PASD-light's UNet.
"""

from __future__ import annotations

import json
import math
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
from sr_diffusion.image_processor import ImageInput, SRImageProcessor, pad_to_multiple
from sr_diffusion.models.block_attention import BlockAttentions
from sr_diffusion.models.pasd_controlnet import PASDControlNetModel
from sr_diffusion.prompts.base import PromptExtractor, resolve_prompts
from sr_diffusion.resize import resize
from sr_diffusion.tiling import tile_grid

from ..pipeline_utils import SRSamplingMixin
from ..stablesr.pipeline_stablesr import stablesr_tile_weights

__all__ = [
    "PASD_ADDED_PROMPT",
    "PASD_NEGATIVE_PROMPT",
    "PASDPipeline",
    "paca_contexts",
    "pasd_noise_pred",
    "pasd_scheduler",
]

#: ``test_pasd.py``'s ``--added_prompt``: appended after the user's prompt and the extracted tags
PASD_ADDED_PROMPT = "clean, high-resolution, 8k"
#: ``test_pasd.py``'s ``--negative_prompt``
PASD_NEGATIVE_PROMPT = "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed"
#: subfolders a saved PASD pipeline must have, besides its Stable Diffusion base (vae, text_encoder, ...)
ADD_ON_SUBFOLDERS = {"controlnet": "PASD's ControlNet", "pixel_attentions": "the pixel-aware cross-attention layers"}


# ----------------------------------------------------------------------------------------------------------------------
# Scheduler and the conditioned denoiser call (shared with training: sr_diffusion.training.pasd)
# ----------------------------------------------------------------------------------------------------------------------


def pasd_scheduler(prediction_type: str = "epsilon", num_train_timesteps: int = 1000) -> UniPCMultistepScheduler:
    """The original's sampler: UniPC (``test_pasd.py``) on SD 1.5's schedule (``scaled_linear``, 0.00085 → 0.012)."""
    return UniPCMultistepScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
    )


def paca_contexts(pixel_attentions: BlockAttentions, residuals: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The ControlNet residual each PACA layer attends to, aligned with ``pixel_attentions.positions``: the ``k``-th
    layer the UNet runs reads ``residuals[-1 - k]`` (the skip its layer consumes; the original pops them in order)."""
    positions = pixel_attentions.positions
    if len(positions) != len(residuals):
        raise ValueError(
            f"the ControlNet gives {len(residuals)} residuals but there are {len(positions)} pixel-aware attention "
            "layers: ControlNet and UNet are of different layouts"
        )
    return [residuals[-1 - k] for k in range(len(positions))]


def pasd_noise_pred(
    unet: UNet2DConditionModel,
    controlnet: torch.nn.Module,
    pixel_attentions: BlockAttentions,
    sample: torch.Tensor,
    timestep: torch.Tensor | int,
    encoder_hidden_states: torch.Tensor,
    cond_image: torch.Tensor,
    conditioning_scale: float = 1.0,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """One conditioned denoiser evaluation: the ControlNet, then the UNet with its residuals on the skips and as PACA
    context.

    Args:
        unet: the frozen SD UNet. controlnet: a :class:`PASDControlNetModel` (possibly wrapped by
            ``DistributedDataParallel``). pixel_attentions: the PACA add-on (unwrapped), built for ``unet``.
        sample: ``z_t`` ``(B, 4, h, w)``, already through ``scheduler.scale_model_input``.
        timestep: in the 1000-step scale, a scalar or ``(B,)``.
        encoder_hidden_states: the text embeddings ``(B, L, D)``.
        cond_image: ``y_up`` ``(B, 3, f·h, f·w)`` in [0, 1].
        conditioning_scale: multiplies every ControlNet residual (skips and PACA context alike, as the original).

    Returns:
        ``(model output (B, 4, h, w) in sample's dtype, the RGB outputs of the degradation-removal module or None)``.
    """
    dtype = unet.dtype
    x, text = sample.to(dtype), encoder_hidden_states.to(dtype)
    down, mid, rgbs = controlnet(
        x,
        timestep,
        encoder_hidden_states=text,
        controlnet_cond=cond_image.to(dtype),
        conditioning_scale=conditioning_scale,
        return_dict=False,
    )
    with pixel_attentions.attach(unet, paca_contexts(pixel_attentions, down)):
        out = unet(
            x,
            timestep,
            encoder_hidden_states=text,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]
    return out.to(sample.dtype), rgbs


def _q_sample(scheduler: SchedulerMixin, x: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
    """``sqrt(abar_t) x + sqrt(1 - abar_t) noise`` on the scheduler's training schedule (any ``t``, not only the
    sampler's grid; UniPC's own ``add_noise`` snaps a level off its grid to its last step)."""
    abar = scheduler.alphas_cumprod[int(t)].to(device=x.device, dtype=torch.float64)
    return (abar.sqrt() * x.double() + (1 - abar).sqrt() * noise.double()).to(x.dtype)


class PASDPipeline(SRSamplingMixin, DiffusionPipeline):
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
        upscale: the SR factor ``s`` (registered in the config; PASD works at any, since the LR image is upsampled to
            the output size first).

    Build one from any SD diffusers folder with :meth:`from_sd_base`, or from the released model with
    :func:`sr_diffusion.conversion.pasd.convert_pasd` (``sr-diffusion convert --arch pasd``).
    """

    model_cpu_offload_seq = "text_encoder->controlnet->unet->vae"
    _optional_components = ["prompt_extractor"]
    # the PACA layers run inside the UNet's call (hooks): they stay on the execution device
    _exclude_from_cpu_offload = ["pixel_attentions"]
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
        upscale: int = 4,
    ):
        super().__init__()
        if isinstance(upscale, bool) or not isinstance(upscale, int) or upscale < 1:
            raise ValueError(f"upscale must be a positive int, got {upscale!r}")
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            controlnet=controlnet,
            pixel_attentions=pixel_attentions,
            prompt_extractor=prompt_extractor,
        )
        self.register_to_config(upscale=upscale)
        self.image_processor = SRImageProcessor()
        self.check_components()

    # ------------------------------------------------------------------------------------------------------------------
    # Loading
    # ------------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_sd_base(
        cls,
        base: str | Path,
        controlnet: PASDControlNetModel,
        pixel_attentions: BlockAttentions,
        scheduler: SchedulerMixin | None = None,
        prompt_extractor: PromptExtractor | None = None,
        upscale: int = 4,
        torch_dtype: torch.dtype | None = None,
    ) -> PASDPipeline:
        """A PASD pipeline on the SD base in the diffusers folder ``base`` (``vae/``, ``text_encoder/``,
        ``tokenizer/``, ``unet/``) with the given add-ons; the scheduler defaults to UniPC on the base's schedule
        (the original's), or :func:`pasd_scheduler` when the base has no ``scheduler/``."""
        from transformers import CLIPTextModel, CLIPTokenizer

        base = Path(base)
        missing = [name for name in ("vae", "text_encoder", "tokenizer", "unet") if not (base / name).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{base}: not a Stable Diffusion diffusers folder (no {', '.join(f'{m}/' for m in missing)}); PASD "
                "needs an SD 1.x/2.x base such as stable-diffusion-v1-5"
            )
        kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        if scheduler is None:
            if (base / "scheduler" / "scheduler_config.json").is_file():
                scheduler = UniPCMultistepScheduler.from_pretrained(base, subfolder="scheduler")
            else:
                scheduler = pasd_scheduler()
        return cls(
            vae=AutoencoderKL.from_pretrained(base, subfolder="vae", **kwargs),
            text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **kwargs),
            tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
            unet=UNet2DConditionModel.from_pretrained(base, subfolder="unet", **kwargs),
            scheduler=scheduler,
            controlnet=controlnet,
            pixel_attentions=pixel_attentions,
            prompt_extractor=prompt_extractor,
            upscale=upscale,
        )

    @classmethod
    def check_saved_folder(cls, folder: str | Path) -> None:
        """Raise a clear error for a local folder that is not a complete saved PASD pipeline."""
        folder = Path(folder)
        index = folder / "model_index.json"
        if not index.is_file():
            return  # diffusers says what is wrong (or it is a Hub id)
        try:
            model_index = json.loads(index.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{index}: corrupt model_index.json ({err})") from err
        class_name = model_index.get("_class_name")
        if class_name != cls.__name__:
            raise ValueError(
                f"{folder} holds a {class_name}, not a {cls.__name__}: the Stable Diffusion base alone lacks PASD's "
                "add-ons; build one with PASDPipeline.from_sd_base(base, controlnet=..., pixel_attentions=...) or "
                "`sr-diffusion convert --arch pasd` (the released checkpoint folder with unet/ and controlnet/)"
            )
        for name, what in ADD_ON_SUBFOLDERS.items():
            if not (folder / name / "config.json").is_file():
                raise FileNotFoundError(
                    f"{folder}: the PASD add-on subfolder {name}/ ({what}) is missing or has no config.json; the "
                    "folder is incomplete (re-save it, or convert the released model again)"
                )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """``DiffusionPipeline.from_pretrained``, after checking that a local folder has PASD's add-ons."""
        if Path(pretrained_model_name_or_path).is_dir():
            cls.check_saved_folder(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # ------------------------------------------------------------------------------------------------------------------
    # Geometry
    # ------------------------------------------------------------------------------------------------------------------

    @property
    def upscale(self) -> int:
        """The SR factor ``s``."""
        return int(self.config.upscale)

    @property
    def vae_scale_factor(self) -> int:
        """``f``: the VAE's downsampling factor (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def unet_input_multiple(self) -> int:
        """The UNet (and the ControlNet) need latent H and W to be multiples of this."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def lr_multiple(self) -> int:
        """The LR image is padded to a multiple of this: ``s·h`` must be a multiple of ``f · unet_input_multiple``."""
        hr_multiple = self.vae_scale_factor * self.unet_input_multiple
        return hr_multiple // math.gcd(hr_multiple, self.upscale)

    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Shape of ``z_T`` (the ``latents`` argument) for an LR image of ``height`` × ``width`` (before padding)."""
        m, s, f = self.lr_multiple, self.upscale, self.vae_scale_factor
        height, width = height + (-height) % m, width + (-width) % m
        return (batch_size, int(self.vae.config.latent_channels), height * s // f, width * s // f)

    # ------------------------------------------------------------------------------------------------------------------
    # Checks
    # ------------------------------------------------------------------------------------------------------------------

    def check_components(self) -> None:
        """Raise a ``ValueError`` for components that cannot work together (or are not an SD 1.x/2.x base)."""
        if not isinstance(self.unet, UNet2DConditionModel):
            raise ValueError(f"unet must be a Stable Diffusion UNet2DConditionModel, got {type(self.unet).__name__}")
        if not isinstance(self.vae, AutoencoderKL):
            raise ValueError(f"vae must be a Stable Diffusion AutoencoderKL, got {type(self.vae).__name__}")
        uc, vc = self.unet.config, self.vae.config
        family = "PASD builds on a Stable Diffusion 1.x/2.x text-to-image base"
        if getattr(uc, "addition_embed_type", None) is not None:
            raise ValueError(f"the UNet has addition_embed_type={uc.addition_embed_type!r} (SDXL-like); {family}")
        if getattr(uc, "class_embed_type", None) is not None or getattr(uc, "num_class_embeds", None) is not None:
            raise ValueError(f"the UNet has class embeddings (e.g. the SD x4 upscaler's noise level); {family}")
        if uc.in_channels != vc.latent_channels or uc.out_channels != vc.latent_channels:
            raise ValueError(
                f"the UNet maps {uc.in_channels} to {uc.out_channels} channels but the VAE latent has "
                f"{vc.latent_channels} (an inpainting or upscaler UNet?); {family}"
            )
        if vc.in_channels != 3 or vc.out_channels != 3:
            raise ValueError(f"vae must map RGB images (in/out_channels 3), got {vc.in_channels}/{vc.out_channels}")
        hidden = getattr(getattr(self.text_encoder, "config", None), "hidden_size", None)
        if hidden is None:
            raise ValueError(
                f"text_encoder must be a transformers CLIPTextModel, got {type(self.text_encoder).__name__}"
            )
        if hidden != uc.cross_attention_dim:
            raise ValueError(
                f"the text encoder gives {hidden}-d embeddings but the UNet's cross-attention takes "
                f"{uc.cross_attention_dim} (SD 1.x: 768, SD 2.x: 1024): text encoder and UNet are of different bases"
            )
        self._check_controlnet()
        self._check_pixel_attentions()
        dtypes = {name: getattr(self, name).dtype for name in ("unet", "controlnet", "pixel_attentions")}
        if len(set(dtypes.values())) > 1:
            raise ValueError(
                f"unet, controlnet and pixel_attentions must share one dtype (they run in one call), got "
                f"{', '.join(f'{k}={v}' for k, v in dtypes.items())}: cast them together, e.g. pipe.to(torch.float16)"
            )
        if self.prompt_extractor is not None and not isinstance(self.prompt_extractor, PromptExtractor):
            raise ValueError(
                "prompt_extractor must be a sr_diffusion.prompts.PromptExtractor (images -> PromptExtraction) or None, "
                f"got {type(self.prompt_extractor).__name__}"
            )
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
        for key in ("block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim"):
            if list(_as_list(getattr(cc, key))) != list(_as_list(getattr(uc, key))):
                raise ValueError(
                    f"the ControlNet was built for a UNet with {key}={getattr(cc, key)!r}, the UNet has "
                    f"{getattr(uc, key)!r}: ControlNet and UNet are of different bases"
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
        specs = extra._ordered_specs()
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

    def _check_prompts(self, prompt: Any, negative_prompt: Any, added_prompt: Any, batch_size: int) -> None:
        """Types, counts and token lengths of the user's texts (the merged prompt may be truncated: only the extracted
        tags and ``added_prompt`` are cut, never the user's words)."""
        for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if value is None or isinstance(value, str):
                texts = [value]
            elif isinstance(value, (list, tuple)):
                if not value:
                    raise ValueError(f"{name} is an empty list: pass a string or one string per image")
                if len(value) not in (1, batch_size):
                    raise ValueError(
                        f"got {len(value)} {name}s for a batch of {batch_size} images: pass one or one per image"
                    )
                texts = list(value)
            else:
                raise ValueError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
            if not all(t is None or isinstance(t, str) for t in texts):
                raise ValueError(
                    f"{name} must be a string or a list of strings, got {[type(t).__name__ for t in texts]}"
                )
            self._check_token_length([t for t in texts if t], name)
        if added_prompt is not None and not isinstance(added_prompt, str):
            raise ValueError(f"added_prompt must be a string or None, got {type(added_prompt).__name__}")

    def _check_token_length(self, texts: list[str], name: str) -> None:
        if not texts:
            return
        max_length = int(self.tokenizer.model_max_length)
        for text, ids in zip(texts, self.tokenizer(texts, truncation=False, verbose=False).input_ids):
            if len(ids) > max_length:
                shown = text if len(text) <= 60 else text[:57] + "..."
                raise ValueError(
                    f"{name} {shown!r} is {len(ids) - 2} tokens long; the text encoder takes at most {max_length - 2} "
                    "(it is not truncated silently): shorten it"
                )

    def check_inputs(
        self,
        rgb: torch.Tensor,
        prompt: Any,
        num_inference_steps: int,
        guidance_scale: float,
        controlnet_conditioning_scale: float,
        added_noise_level: int | None,
        added_prompt: Any,
        negative_prompt: Any,
        color_fix: str,
        lr_consistency: bool,
        tile_size: int | None,
        tile_overlap: int,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        callback_on_step_end_tensor_inputs: Sequence[str] | None,
    ) -> None:
        self.check_components()
        self.check_num_inference_steps(num_inference_steps)
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not guidance_scale >= 1:
            raise ValueError(
                f"guidance_scale must be a number >= 1 (1: no classifier-free guidance), got {guidance_scale!r}"
            )
        scale = controlnet_conditioning_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0:
            raise ValueError(f"controlnet_conditioning_scale must be a number >= 0, got {scale!r}")
        num_train = int(self.scheduler.config.num_train_timesteps)
        if added_noise_level is not None and (
            isinstance(added_noise_level, bool)
            or not isinstance(added_noise_level, int)
            or not 0 <= added_noise_level < num_train
        ):
            raise ValueError(
                f"added_noise_level must be None (start from pure noise) or an int in [0, {num_train}), got "
                f"{added_noise_level!r}"
            )
        self._check_prompts(prompt, negative_prompt, added_prompt, rgb.shape[0])
        self.check_output_options(color_fix, lr_consistency)
        self.check_sampling_inputs(rgb, tile_size, tile_overlap, generator, latents, callback_on_step_end_tensor_inputs)

    # ------------------------------------------------------------------------------------------------------------------
    # Text, VAE
    # ------------------------------------------------------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """Text embeddings ``(N, L, D)`` of one prompt per image (truncated at the tokenizer's limit)."""
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(device))[0].float()

    def _latent_scale(self) -> tuple[float, float]:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return float(shift), float(self.vae.config.scaling_factor)

    def encode_image(self, image: torch.Tensor, generator) -> torch.Tensor:
        """``z = E(x) · scaling_factor``: a posterior sample for ``x`` ``(N, 3, H, W)`` in [-1, 1] (float32)."""
        posterior = self.vae.encode(image.to(self.vae.dtype)).latent_dist
        shift, scale = self._latent_scale()
        return (posterior.sample(generator=generator).float() - shift) * scale

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``z_0`` ``(N, 4, H/f, W/f)`` → ``(N, 3, H, W)`` in about [-1, 1]."""
        shift, scale = self._latent_scale()
        return self.vae.decode((latents.float() / scale + shift).to(self.vae.dtype)).sample.float()

    # ------------------------------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------------------------------

    def prepare_latents(
        self,
        cond_image: torch.Tensor,
        timesteps: torch.Tensor,
        added_noise_level: int | None,
        generator,
        latents: torch.Tensor | None,
    ) -> torch.Tensor:
        """The start of the chain (see the module docstring): the given ``latents``, pure noise
        (``added_noise_level=None``), or ``q(q(z_lr, t_1), added_noise_level)``; times ``init_noise_sigma``."""
        device = cond_image.device
        n, _, height, width = cond_image.shape
        f = self.vae_scale_factor
        shape = (n, int(self.vae.config.latent_channels), height // f, width // f)
        if latents is not None:
            latents = latents.to(device=device, dtype=torch.float32)
        elif added_noise_level is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            z_lr = self.encode_image(cond_image * 2.0 - 1.0, generator)
            noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
            latents = _q_sample(self.scheduler, z_lr, noise, int(timesteps[0]))
            noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
            latents = _q_sample(self.scheduler, latents, noise, added_noise_level)
        return latents * self.scheduler.init_noise_sigma

    def predict_noise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        cond_image: torch.Tensor,
        prompt_embeds: torch.Tensor,
        guidance_scale: float,
        conditioning_scale: float,
    ) -> torch.Tensor:
        """The (guided) model output for ``z_t`` (or a tile of it) and the matching condition image; ``prompt_embeds``
        holds the negative embeddings first when guiding (both halves go through the ControlNet, as the original)."""
        do_cfg = guidance_scale > 1
        scaled = self.scheduler.scale_model_input(latents, t)
        if do_cfg:
            scaled, cond_image = torch.cat([scaled, scaled]), torch.cat([cond_image, cond_image])
        out, _ = pasd_noise_pred(
            self.unet, self.controlnet, self.pixel_attentions, scaled, t, prompt_embeds, cond_image, conditioning_scale
        )
        if do_cfg:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        return out

    def predict_noise_tiled(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        cond_image: torch.Tensor,
        prompt_embeds: torch.Tensor,
        guidance_scale: float,
        conditioning_scale: float,
        tile: int,
        overlap: int,
    ) -> torch.Tensor:
        """:meth:`predict_noise` on overlapping latent tiles (the condition image cropped to each), Gaussian-blended."""
        height, width = latents.shape[-2:]
        tile_h, tile_w, ys, xs = tile_grid(height, width, tile, overlap)
        if len(ys) * len(xs) == 1:
            return self.predict_noise(latents, t, cond_image, prompt_embeds, guidance_scale, conditioning_scale)
        f = self.vae_scale_factor
        weight = stablesr_tile_weights(tile_h, tile_w, device=latents.device)
        total = torch.zeros(latents.shape, dtype=torch.float32, device=latents.device)
        weight_sum = torch.zeros(1, 1, height, width, device=latents.device)
        for y in ys:
            for x in xs:
                region = (slice(None), slice(None), slice(y, y + tile_h), slice(x, x + tile_w))
                pixels = (slice(None), slice(None), slice(y * f, (y + tile_h) * f), slice(x * f, (x + tile_w) * f))
                out = self.predict_noise(
                    latents[region], t, cond_image[pixels], prompt_embeds, guidance_scale, conditioning_scale
                )
                total[region] += out.float() * weight
                weight_sum[region] += weight
        return (total / weight_sum).to(latents.dtype)

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput | Sequence[ImageInput],
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 9.0,
        controlnet_conditioning_scale: float = 1.0,
        added_noise_level: int | None = 900,
        added_prompt: str | None = PASD_ADDED_PROMPT,
        negative_prompt: str | list[str] | None = None,
        color_fix: str = "wavelet",
        lr_consistency: bool = False,
        tile_size: int | None = None,
        tile_overlap: int = 32,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict[str, Any]] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        r"""Upscale ``image`` by ``upscale``.

        Args:
            image: PIL image, path, numpy array, (C,H,W)/(N,C,H,W) tensor in [0,1], or a list of them (equal sizes).
                An alpha channel is carried through, upscaled separately with bicubic interpolation.
            prompt: text for the SD prior, one for all images or one per image. ``None`` (default) or ``"auto"``: the
                prompt extractor's tags when the pipeline has one, else none. The user's words come first, then the
                extracted tags, then ``added_prompt`` (:func:`~sr_diffusion.prompts.resolve_prompts`); a user prompt
                longer than the tokenizer's limit is an error.
            num_inference_steps: sampler steps; 20 as the original (UniPC).
            guidance_scale: classifier-free guidance scale; 9 as ``test_pasd.py`` (1: no guidance).
            controlnet_conditioning_scale: multiplies the ControlNet's residuals, both where they are added to the
                UNet's skips and as the pixel-aware attention's context (0: the ControlNet has no effect); 1 as the
                original.
            added_noise_level: the start: the LR latent noised to the first timestep, then to this level (900, the
                original's); ``None``: pure noise (the original's ``--init_latent_with_noise``).
            added_prompt: appended to every prompt (the original's ``"clean, high-resolution, 8k"``; ``None`` or
                ``""``: nothing).
            negative_prompt: the unconditional text when ``guidance_scale > 1``; default the original's
                :data:`PASD_NEGATIVE_PROMPT`; a given one (``""`` included) is used verbatim.
            color_fix: ``"wavelet"`` (default, the original's), ``"adain"`` or ``"none"``: correct the output's colours
                towards the LR image (:func:`sr_diffusion.color_fix.color_fix`).
            lr_consistency: replace the output by its projection onto the images whose MATLAB-bicubic downsampling
                by ``upscale`` is the input (:func:`sr_diffusion.fidelity.project_to_lr`), after the colour fix, on the
                whole image when tiling; the alpha channel is unaffected.
            tile_size: sample in latent tiles covering ``tile_size`` LR pixels (a multiple of :attr:`lr_multiple`),
                overlapping by ``tile_overlap`` LR pixels, blended at every step; the original's 320-pixel latent
                tiles are ``tile_size = 320 · 8 / upscale``.
            generator: a ``torch.Generator``, or a list with one per image: with a list, image ``i`` is sampled
                with ``generator[i]`` alone, so a batch gives the images it would give one at a time.
            latents: the start ``z_T`` (replaces the noised LR latent), of shape :meth:`latent_shape` (before scaling
                by ``init_noise_sigma``).
            output_type: ``"pil"``, ``"np"`` or ``"pt"``.
            return_dict: return an ``SRPipelineOutput`` rather than a tuple.
            callback_on_step_end: called after every step as ``callback_on_step_end(self, step, timestep,
                callback_kwargs)``; the tensors it returns in its dict (``"latents"``: ``z_{t-1}``,
                ``"prompt_embeds"``) replace the pipeline's.
            callback_on_step_end_tensor_inputs: which tensors ``callback_kwargs`` holds (default ``["latents"]``).

        Returns:
            ``SRPipelineOutput(images)`` or ``(images,)``; images are exactly ``upscale`` × the input size.
        """
        callback_on_step_end_tensor_inputs = self.callback_tensor_names(
            callback_on_step_end, callback_on_step_end_tensor_inputs
        )

        # 1. Check inputs
        pre = self.image_processor.preprocess(image)
        self.check_inputs(
            pre.rgb,
            prompt,
            num_inference_steps,
            guidance_scale,
            controlnet_conditioning_scale,
            added_noise_level,
            added_prompt,
            negative_prompt,
            color_fix,
            lr_consistency,
            tile_size,
            tile_overlap,
            generator,
            latents,
            callback_on_step_end_tensor_inputs,
        )
        self._interrupt = False
        device = self._execution_device
        rgb = pre.rgb.to(device)
        n = rgb.shape[0]
        s, f = self.upscale, self.vae_scale_factor
        do_cfg = guidance_scale > 1

        # 2. Prompts (user's, extracted tags, added prompt) and their embeddings (negative first when guiding)
        resolved = resolve_prompts(
            _broadcast(prompt, n),
            rgb,
            self.prompt_extractor,
            _broadcast(negative_prompt, n),
            added_prompt=added_prompt or None,
            default_negative_prompt=PASD_NEGATIVE_PROMPT,
        )
        prompt_embeds = self.encode_prompt(resolved.prompts, device)
        if do_cfg:
            prompt_embeds = torch.cat([self.encode_prompt(resolved.negative_prompts, device), prompt_embeds])

        # 3. The condition: the LR image padded (reflect) and bicubic-upsampled to the output size, in [0, 1]
        lr, _ = pad_to_multiple(rgb, self.lr_multiple)
        cond_image = resize(lr, size=(lr.shape[-2] * s, lr.shape[-1] * s), mode="bicubic").clamp(0.0, 1.0)

        # 4. Timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)

        # 5. The start: the LR latent noised to t_1, then to added_noise_level (or pure noise, or the given latents)
        latents = self.prepare_latents(cond_image, timesteps, added_noise_level, generator, latents)
        step_kwargs = self.prepare_extra_step_kwargs(generator, eta=None)

        # 6. Denoising loop; tiled, every step blends the tiles' noise predictions and steps the whole latent
        tile = overlap = None
        if tile_size is not None:
            tile, overlap = tile_size * s // f, tile_overlap * s // f
        scale = float(controlnet_conditioning_scale)
        with self.progress_bar(total=self._num_timesteps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                if tile is None:
                    noise_pred = self.predict_noise(latents, t, cond_image, prompt_embeds, guidance_scale, scale)
                else:
                    noise_pred = self.predict_noise_tiled(
                        latents, t, cond_image, prompt_embeds, guidance_scale, scale, tile, overlap
                    )
                latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]

                state = {"latents": latents, "prompt_embeds": prompt_embeds}
                state = self.step_end_callback(callback_on_step_end, i, t, callback_on_step_end_tensor_inputs, state)
                latents, prompt_embeds = state["latents"], state["prompt_embeds"]
                progress_bar.update()

        # 7. Decode, then crop back, [-1, 1] -> [0, 1], colour fix against the LR image, LR consistency, alpha
        hr = self.decode_latents(latents)
        return self.finish_output(hr, rgb, pre.alpha, color_fix, output_type, return_dict, lr_consistency)


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _broadcast(value: Any, batch_size: int) -> Any:
    """A one-element list given for a batch → that element for every image (resolve_prompts wants one or all)."""
    if isinstance(value, (list, tuple)) and len(value) == 1 and batch_size != 1:
        return value[0]
    return value
