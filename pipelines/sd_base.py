"""What the prompt-guided SR pipelines on a Stable Diffusion base share (StableSR, PASD, SeeSR).

Each of them takes any SD 1.x / 2.x diffusers folder (``vae/``, ``text_encoder/``, ``tokenizer/``, ``unet/``,
``scheduler/``) plus its own add-on modules, each a ``ModelMixin`` in its own subfolder, so one base model on disk
serves all three. :class:`StableDiffusionSRMixin` holds what they do alike:

- construction and loading: :meth:`~StableDiffusionSRMixin.register_sd_components` (what every ``__init__`` does),
  :meth:`~StableDiffusionSRMixin.load_sd_base` (the base parts of a folder, with a clear error for a folder of another
  kind), :meth:`~StableDiffusionSRMixin.from_sd_base_parts` (a pipeline on a base folder with its add-ons),
  :meth:`~StableDiffusionSRMixin.check_saved_folder` (a saved pipeline has its add-on subfolders);
- the base's family checks (:meth:`~StableDiffusionSRMixin.check_sd_base`: an SD 1.x/2.x text-to-image UNet, VAE and
  a text encoder of the same width), and the checks of inputs and add-ons the pipelines share (guidance and ControlNet
  scales, one dtype for what runs in one call, a ControlNet made from the UNet, the prompt extractor);
- geometry: ``upscale``, the VAE factor ``f``, the LR multiple, the latent shape;
- text: prompt checks (never truncated silently) and embeddings, negative prompts for classifier-free guidance, the
  user's prompts merged with a prompt extractor's (:meth:`~StableDiffusionSRMixin.resolve_text_prompts`);
- VAE: latent scaling (``scaling_factor`` / ``shift_factor``), encoding an image to a posterior sample, decoding;
- the ControlNet condition (the LR image padded and upsampled to the output size with PIL's bicubic on 8 bits, as
  PASD's and SeeSR's scripts; :meth:`~StableDiffusionSRMixin.upsample_lr`) and classifier-free guidance with a
  condition shared by both halves (:meth:`~StableDiffusionSRMixin.guided_noise_pred`);
- latent tiling with Gaussian-weighted overlap (:func:`gaussian_tile_weights`, :meth:`~StableDiffusionSRMixin.
  blend_latent_tiles`: StableSR's progressive patch aggregation, PASD's and SeeSR's ``latent_tiled_size``), automatic
  above the originals' thresholds for PASD and SeeSR (:meth:`~StableDiffusionSRMixin.latent_tiling`);
- the originals' input-size rules for PASD and SeeSR (``process_size``: :meth:`~StableDiffusionSRMixin.process_steps`,
  :meth:`~StableDiffusionSRMixin.condition_image`), off unless asked for or ``match_original=True``;
- LoRA: diffusers' ``StableDiffusionLoraLoaderMixin`` (``load_lora_weights`` / ``fuse_lora`` / ``unload_lora_weights``
  on the UNet and the text encoder), so SD LoRAs and LoRA-trained add-ons load as in any SD pipeline;
- the optional components every one of them takes: a ``prompt_extractor`` (any
  :class:`~sr_diffusion.prompts.PromptExtractor`, for ``prompt="auto"``) and a ``degradation_estimator`` (a
  :class:`~sr_diffusion.estimation.DegradationEstimator`, for ``fidelity="auto"``; None: the one shipped in the
  package), and :meth:`~StableDiffusionSRMixin.resolve_fidelity`, which sets the fidelity controls of a call.

Fidelity controls
-----------------
The ``__call__`` keywords that trade faithfulness to the LR input against generated detail. A keyword means the same in
every pipeline that takes it ("-": the pipeline has no such control); "auto" marks the controls ``fidelity="auto"`` sets
when the caller leaves them ``None``.

=================================  ===========  =============  ===========  ==========================================
keyword                            StableSR     PASD           SeeSR        more faithful to the LR input with
=================================  ===========  =============  ===========  ==========================================
``guidance_scale``                 1            9              5.5          a lower value (1: no guidance)
``negative_prompt``                ``""``       PASD's         SeeSR's      (what guidance steers away from)
``controlnet_conditioning_scale``  -            1, auto        1, auto      a higher value (0: no ControlNet)
``fidelity_weight``                0.5, auto    -              -            a higher value (0: the plain SD decoder)
``added_noise_level``              -            900, auto      -            a lower value
``start_point``                    - (noise)    ``"lr"``       ``"lr"``     ``"lr"`` rather than ``"noise"``
``fidelity``                       None         None           None         ``"auto"`` adapts the controls marked auto
``color_fix``                      ``"adain"``  ``"wavelet"``  ``"adain"``  ``"adain"`` / ``"wavelet"`` (colours only)
``lr_consistency``                 False        False          False        True (exactly consistent)
=================================  ===========  =============  ===========  ==========================================

Every default is the original code's; a control marked auto defaults to ``None``, which means that default (or, with
``fidelity="auto"``, the value set from the input). StableSR without CFW layers has no ``w`` to set: 0, never auto.
The effect of each, in the words every pipeline's ``__call__`` docstring uses:

- ``guidance_scale``: classifier-free guidance scale ``w`` (``eps_u + w (eps_c - eps_u)``, ``eps_u`` from
  ``negative_prompt``): higher follows the prompt more and the LR image less; 1: no guidance.
- ``negative_prompt``: the unconditional text when ``guidance_scale > 1`` (ignored otherwise); a given one (``""``
  included) is used verbatim.
- ``controlnet_conditioning_scale``: multiplies the ControlNet's residuals: higher holds the output closer to the LR
  image; 0: the ControlNet has no effect.
- ``fidelity_weight``: CFW's ``w`` in [0, 1]: higher is more faithful to the LR image (1: most faithful; 0: the plain
  SD decoder, more generative).
- ``added_noise_level``: the level in ``[0, T)`` the LR start is noised to: lower keeps more of the LR image (more
  faithful), higher generates more; only with ``start_point="lr"``. (PASD's ``None`` used to mean pure noise: that is
  now ``start_point="noise"``.)
- ``start_point``: ``"lr"``: the chain starts from the LR image's latent, noised (more faithful); ``"noise"``: from
  pure noise ``z_T ~ N(0, I)`` (as StableSR always does). A discrete choice: ``fidelity="auto"`` never changes it.
- ``fidelity``: ``"auto"``: set the fidelity controls left ``None`` (those marked auto above) from the input's
  degradation as estimated by the ``degradation_estimator`` component (the one shipped in the package when it is
  None): more faithful for clean inputs, more generative for heavily degraded ones (:mod:`sr_diffusion.fidelity_auto`);
  the LR images must be at least 16 pixels a side. A value given explicitly always wins. ``None`` (default): each
  control's default.
- ``color_fix``: ``"adain"``, ``"wavelet"`` or ``"none"``: correct the output's colours towards the LR image
  (:func:`sr_diffusion.color_fix.color_fix`); changes colours only, not detail.
- ``lr_consistency``: replace the output by its projection onto the images whose MATLAB-bicubic downsampling by
  ``upscale`` is the input (:func:`sr_diffusion.fidelity.project_to_lr`: the minimum-norm change, clamped to [0, 1]),
  so that the output explains its input exactly; after the colour fix, on the whole image when tiling; the alpha
  channel is unaffected.

The prompt (``prompt="auto"`` or ``None`` with a ``prompt_extractor``: its tags after the user's words) is resolved the
same way in all three (:meth:`~StableDiffusionSRMixin.resolve_text_prompts`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils.torch_utils import randn_tensor

from sr_diffusion.estimation import DegradationEstimator
from sr_diffusion.fidelity_auto import check_fidelity, resolve_auto_fidelity
from sr_diffusion.image_processor import SRImageProcessor, pad_to_multiple
from sr_diffusion.models.tiled_vae import tiled_vae
from sr_diffusion.prompts.base import PromptExtractor, ResolvedPrompts, resolve_prompts
from sr_diffusion.resize import pil_resize, resize
from sr_diffusion.tiling import ORIGINALS_GAUSSIAN, TileAccumulator, tile_regions, tile_weights
from sr_diffusion.utils import is_int, is_number

__all__ = ["SD_BASE_PARTS", "START_POINTS", "StableDiffusionSRMixin", "call_default", "gaussian_tile_weights"]

#: the subfolders of a Stable Diffusion diffusers folder every SD-based SR pipeline reads
SD_BASE_PARTS = ("vae", "text_encoder", "tokenizer", "unet")
#: ``start_point``: the LR image's latent, noised (``"lr"``), or pure noise (``"noise"``)
START_POINTS = ("lr", "noise")
#: optional components that run on their own (images in, prompts or an estimate out) and keep their own dtype
_OWN_DTYPE_COMPONENTS = ("prompt_extractor", "degradation_estimator")


def call_default(pipeline: type, keyword: str) -> Any:
    """The value ``pipeline(...)`` uses for ``keyword`` when the caller leaves it out: its ``__call__`` default, or for
    a fidelity control whose default is ``None``, the method's value from ``pipeline.FIDELITY_DEFAULTS`` (the table
    above). The training configs take their validation defaults from here, so they cannot drift from the pipelines'."""
    default = inspect.signature(pipeline.__call__).parameters[keyword].default
    if default is inspect.Parameter.empty:
        raise ValueError(f"{pipeline.__name__}.__call__ has no default for {keyword!r}")
    if default is None:
        return getattr(pipeline, "FIDELITY_DEFAULTS", {}).get(keyword)
    return default


def gaussian_tile_weights(height: int, width: int, device=None) -> torch.Tensor:
    """``(1, 1, height, width)`` Gaussian weights of one latent (or VAE) tile, the originals' ``_gaussian_weights``
    (StableSR, PASD and SeeSR, after Mixture of Diffusers), ``var = 0.01``:

    ``w(y, x) = exp(-(x - (W - 1)/2)² / (2 · 0.01 · W²)) · exp(-(y - H/2)² / (2 · 0.01 · H²))``

    The x centre is the tile's middle and the y centre half a pixel below it (``H/2``, not ``(H - 1)/2``), exactly as
    the originals compute it; the asymmetry is kept so that tiled outputs match theirs. The constant factor
    ``1/sqrt(2π · var)`` cancels in the blend and is left out. This is :func:`sr_diffusion.tiling.tile_weights` with
    :data:`~sr_diffusion.tiling.ORIGINALS_GAUSSIAN`."""
    return tile_weights(height, width, "gaussian", **ORIGINALS_GAUSSIAN, device=device)


class StableDiffusionSRMixin(StableDiffusionLoraLoaderMixin):
    """Shared loading, checks, text, VAE and tiling of the SR pipelines on an SD 1.x/2.x base (module docstring).

    A pipeline using it registers ``vae``, ``text_encoder``, ``tokenizer``, ``unet`` and ``scheduler``, an ``upscale``
    config entry, and names its add-ons in :attr:`ADD_ON_SUBFOLDERS` (``{subfolder: what it is}``), its optional ones in
    :attr:`OPTIONAL_ADD_ONS` (with ``_optional_components``), its method in :attr:`METHOD`, the base it was released on
    in :attr:`BASE_EXAMPLE` and the defaults of the fidelity controls ``fidelity="auto"`` may set in
    :attr:`FIDELITY_DEFAULTS`.
    """

    METHOD = "this method"
    #: an SD base the method was released on, named in the error for a folder that is not an SD base
    BASE_EXAMPLE = "stabilityai/stable-diffusion-2-1-base"
    #: the add-on subfolders a saved pipeline must have (``{name: description}``)
    ADD_ON_SUBFOLDERS: dict[str, str] = {}
    #: optional components a saved pipeline must have a subfolder for when its ``model_index.json`` names them
    OPTIONAL_ADD_ONS: dict[str, str] = {}
    #: ``{keyword: the method's default}`` of the fidelity controls ``fidelity="auto"`` may set (module docstring)
    FIDELITY_DEFAULTS: dict[str, Any] = {}
    #: automatic latent tiling (:meth:`latent_tiling`): the tile side in latent pixels above whose square a latent is
    #: tiled, and the overlap (the originals' ``latent_tiled_size`` / ``latent_tiled_overlap``)
    AUTO_LATENT_TILE = 320
    AUTO_LATENT_TILE_OVERLAP = 8
    #: the original script's ``process_size`` (what ``match_original=True`` uses; :meth:`process_steps`)
    PROCESS_SIZE = 512
    #: automatic VAE tiling (:meth:`vae_tile_sizes`), PASD's and SeeSR's ``_init_tiled_vae``: encoder tiles of 1024
    #: image pixels, decoder tiles of 224 latent pixels, each used only above ``tile + 2 · pad`` a side (pads 32 / 11:
    #: 1088 image pixels, 246 latent pixels; :func:`~sr_diffusion.models.tiled_vae.tiled_vae`)
    AUTO_VAE_TILE: tuple[int, int] = (1024, 224)
    #: the VAE tiling of the current call (``vae_tile_size``, set by ``__call__``; :meth:`vae_tile_sizes`)
    _vae_tile_size: int | tuple[int, int] | None = None

    # ------------------------------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------------------------------

    def register_sd_components(self, upscale: int, **components: Any) -> None:
        """What a pipeline's ``__init__`` does after ``super().__init__()``: ``register_modules(**components)`` (the
        base parts, the scheduler and the add-ons), the ``upscale`` config entry (a positive int), the image processor,
        and :meth:`check_components`."""
        if not is_int(upscale) or upscale < 1:
            raise ValueError(f"upscale must be a positive int, got {upscale!r}")
        self.register_modules(**components)
        self.register_to_config(upscale=upscale)
        self.image_processor = SRImageProcessor()
        self.check_components()

    # ------------------------------------------------------------------------------------------------------------------
    # Loading
    # ------------------------------------------------------------------------------------------------------------------

    @staticmethod
    def base_prediction_type(base: str | Path) -> str:
        """The ``prediction_type`` of the SD diffusers folder ``base`` (``scheduler/scheduler_config.json``;
        ``"epsilon"`` when absent)."""
        config = Path(base) / "scheduler" / "scheduler_config.json"
        if config.is_file():
            return json.loads(config.read_text()).get("prediction_type", "epsilon")
        return "epsilon"

    @classmethod
    def load_sd_base(cls, base: str | Path, torch_dtype: torch.dtype | None = None) -> dict[str, Any]:
        """The base parts of the SD diffusers folder ``base``: ``vae``, ``text_encoder``, ``tokenizer``, ``unet``,
        and ``prediction_type`` (:meth:`base_prediction_type`)."""
        from transformers import CLIPTextModel, CLIPTokenizer

        base = Path(base)
        missing = [name for name in SD_BASE_PARTS if not (base / name).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{base}: not a Stable Diffusion diffusers folder (no {', '.join(f'{m}/' for m in missing)}); "
                f"{cls.METHOD} needs an SD 1.x/2.x base such as {cls.BASE_EXAMPLE}"
            )
        kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        return {
            "vae": AutoencoderKL.from_pretrained(base, subfolder="vae", **kwargs),
            "text_encoder": CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **kwargs),
            "tokenizer": CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
            "unet": UNet2DConditionModel.from_pretrained(base, subfolder="unet", **kwargs),
            "prediction_type": cls.base_prediction_type(base),
        }

    @classmethod
    def from_sd_base_parts(
        cls,
        base: str | Path,
        scheduler: SchedulerMixin,
        upscale: int,
        torch_dtype: torch.dtype | None = None,
        **components: Any,
    ):
        """``cls`` on the base parts of the SD folder ``base`` (:meth:`load_sd_base`) with ``scheduler`` and the other
        ``components``; the add-ons (:attr:`ADD_ON_SUBFOLDERS` and :attr:`OPTIONAL_ADD_ONS`, which run inside the UNet's
        or the VAE's call) are cast to ``torch_dtype`` with the base; the prompt extractor and the degradation
        estimator, which run on their own, keep theirs."""
        parts = cls.load_sd_base(base, torch_dtype)
        parts.pop("prediction_type")
        if torch_dtype is not None:
            add_ons = {*cls.ADD_ON_SUBFOLDERS, *cls.OPTIONAL_ADD_ONS} - set(_OWN_DTYPE_COMPONENTS)
            components = {
                name: module.to(torch_dtype) if name in add_ons and isinstance(module, torch.nn.Module) else module
                for name, module in components.items()
            }
        return cls(**parts, scheduler=scheduler, **components, upscale=upscale)

    @classmethod
    def optional_add_ons(cls, model_index: dict[str, Any]) -> dict[str, str]:
        """The :attr:`OPTIONAL_ADD_ONS` that the saved ``model_index`` names (an unsaved one is ``[null, null]``)."""
        return {
            name: what
            for name, what in cls.OPTIONAL_ADD_ONS.items()
            if isinstance(model_index.get(name), list) and model_index[name] and model_index[name][0] is not None
        }

    @classmethod
    def check_saved_folder(cls, folder: str | Path) -> None:
        """Raise a clear error for a local folder that is not a complete saved pipeline of this class."""
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
                f"{folder} holds a {class_name}, not a {cls.__name__}: a Stable Diffusion base alone lacks "
                f"{cls.METHOD}'s add-ons; build one with {cls.__name__}.from_sd_base(base, ...) or convert the "
                "released weights with `sr-diffusion convert`"
            )
        wanted = {**cls.ADD_ON_SUBFOLDERS, **cls.optional_add_ons(model_index)}
        for name, what in wanted.items():
            if not (folder / name / "config.json").is_file():
                raise FileNotFoundError(
                    f"{folder}: the {cls.METHOD} add-on subfolder {name}/ ({what}) is missing or has no config.json; "
                    "the folder is incomplete (re-save it, or convert the released weights again)"
                )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """``DiffusionPipeline.from_pretrained``, after checking that a local folder has this method's add-ons."""
        if Path(pretrained_model_name_or_path).is_dir():
            cls.check_saved_folder(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # ------------------------------------------------------------------------------------------------------------------
    # Geometry
    # ------------------------------------------------------------------------------------------------------------------

    # (upscale, unet_input_multiple, lr_multiple and latent_shape: SRSamplingMixin's; the UNet and the add-ons that
    # follow its levels need latent H and W to be multiples of 2^(levels - 1))

    @property
    def vae_scale_factor(self) -> int:
        """``f``: the VAE's downsampling factor (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        """``C``: the VAE's latent channels (4 for SD)."""
        return int(self.vae.config.latent_channels)

    # ------------------------------------------------------------------------------------------------------------------
    # Checks
    # ------------------------------------------------------------------------------------------------------------------

    def check_sd_base(self) -> None:
        """Raise a ``ValueError`` unless ``unet``, ``vae`` and ``text_encoder`` are an SD 1.x/2.x base."""
        if not isinstance(self.unet, UNet2DConditionModel):
            raise ValueError(f"unet must be a Stable Diffusion UNet2DConditionModel, got {type(self.unet).__name__}")
        if not isinstance(self.vae, AutoencoderKL):
            raise ValueError(f"vae must be a Stable Diffusion AutoencoderKL, got {type(self.vae).__name__}")
        uc, vc = self.unet.config, self.vae.config
        family = f"{self.METHOD} builds on a Stable Diffusion 1.x/2.x text-to-image base"
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

    def _prompt_list(self, prompt: Any, batch_size: int, name: str, allow_none: bool = False) -> list[str | None]:
        """``prompt`` as one entry per image, after checking its type, count and token length (the user's words are
        never truncated). With ``allow_none``, ``None`` (and ``None`` entries) stand for "no prompt given"."""
        if isinstance(prompt, str) or (allow_none and prompt is None):
            prompts = [prompt] * batch_size
        elif isinstance(prompt, (list, tuple)):
            if not prompt:
                raise ValueError(f"{name} is an empty list: pass a string ('' for no prompt) or one string per image")
            if not all(isinstance(p, str) or (allow_none and p is None) for p in prompt):
                raise ValueError(
                    f"{name} must be a string or a list of strings, got {[type(p).__name__ for p in prompt]}"
                )
            if len(prompt) not in (1, batch_size):
                raise ValueError(
                    f"got {len(prompt)} {name}s for a batch of {batch_size} images: pass one or one per image"
                )
            prompts = list(prompt) * (batch_size if len(prompt) == 1 else 1)
        else:
            raise ValueError(f"{name} must be a string or a list of strings, got {type(prompt).__name__}")
        self._check_token_lengths([text for text in prompts if text], name)
        return prompts

    def _check_token_lengths(self, texts: list[str], name: str) -> None:
        if not texts:
            return
        max_length = int(self.tokenizer.model_max_length)
        for text, ids in zip(texts, self.tokenizer(texts, truncation=False, verbose=False).input_ids):
            length = len(ids)
            if length > max_length:
                shown = text if len(text) <= 60 else text[:57] + "..."
                raise ValueError(
                    f"{name} {shown!r} is {length - 2} tokens long; the text encoder takes at most {max_length - 2} "
                    "(it is not truncated silently): shorten it"
                )

    def check_guidance_scale(self, guidance_scale: float) -> None:
        """Classifier-free guidance's ``w``: a number >= 1 (1: no guidance)."""
        if not is_number(guidance_scale) or not guidance_scale >= 1:
            raise ValueError(
                f"guidance_scale must be a number >= 1 (1: no classifier-free guidance), got {guidance_scale!r}"
            )

    def check_controlnet_conditioning_scale(self, scale: float) -> None:
        """The factor of a ControlNet's residuals: a finite number >= 0 (0: the ControlNet has no effect)."""
        if not is_number(scale) or not math.isfinite(scale) or scale < 0:
            raise ValueError(f"controlnet_conditioning_scale must be a number >= 0, got {scale!r}")

    @staticmethod
    def check_start_point(start_point: str) -> None:
        """``start_point``: one of :data:`START_POINTS`."""
        if start_point not in START_POINTS:
            raise ValueError(f"start_point must be one of {', '.join(map(repr, START_POINTS))}, got {start_point!r}")

    def check_degradation_estimator(self) -> None:
        """The ``degradation_estimator`` component: ``None`` or a
        :class:`~sr_diffusion.estimation.DegradationEstimator`."""
        estimator = getattr(self, "degradation_estimator", None)
        if estimator is not None and not isinstance(estimator, DegradationEstimator):
            raise ValueError(
                f"degradation_estimator must be a DegradationEstimator or None, got {type(estimator).__name__}"
            )

    def check_same_dtype(self, names: Sequence[str]) -> None:
        """Raise a ``ValueError`` unless the components ``names`` (which run in one call) share one dtype."""
        dtypes = {name: getattr(self, name).dtype for name in names}
        if len(set(dtypes.values())) > 1:
            found = ", ".join(f"{k}={v}" for k, v in dtypes.items())
            raise ValueError(
                f"{', '.join(names[:-1])} and {names[-1]} must share one dtype (they run in one call), but have "
                f"different dtypes ({found}): cast them together, e.g. pipe.to(torch.float16)"
            )

    @staticmethod
    def config_mismatch(config: Any, reference: Any, keys: Sequence[str]) -> tuple[str, Any, Any] | None:
        """The first ``(key, value, reference value)`` among ``keys`` where two model configs differ (a value and a
        one-element list of it, lists and tuples compare alike), or ``None``."""

        def as_list(value: Any) -> list:
            return list(value) if isinstance(value, (list, tuple)) else [value]

        for key in keys:
            mine, theirs = getattr(config, key), getattr(reference, key)
            if as_list(mine) != as_list(theirs):
                return key, mine, theirs
        return None

    # ------------------------------------------------------------------------------------------------------------------
    # Text, VAE, latents
    # ------------------------------------------------------------------------------------------------------------------

    def embed_prompts(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """Text embeddings ``(N, L, D)`` of checked prompts (padded to the tokenizer's length), in the UNet's dtype."""
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        return self.text_encoder(ids.to(device))[0].to(self.unet.dtype)

    def embed_for_guidance(
        self, prompts: list[str], negative_prompts: list[str], device: torch.device, do_classifier_free_guidance: bool
    ) -> torch.Tensor:
        """Text embeddings ``(N, L, D)`` of ``prompts``, preceded by those of ``negative_prompts`` (``(2N, L, D)``)
        when guiding."""
        prompt_embeds = self.embed_prompts(prompts, device)
        if do_classifier_free_guidance:
            prompt_embeds = torch.cat([self.embed_prompts(negative_prompts, device), prompt_embeds])
        return prompt_embeds

    def encode_prompt(
        self,
        prompt: str | list[str],
        batch_size: int,
        device: torch.device,
        negative_prompt: str | list[str] | None,
        do_classifier_free_guidance: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text embeddings ``(N, L, D)`` of the prompts (and of the negative prompts, default ``""``, to guide)."""
        prompt_embeds = self.embed_prompts(self._prompt_list(prompt, batch_size, "prompt"), device)
        negative_embeds = None
        if do_classifier_free_guidance:
            negative = "" if negative_prompt is None else negative_prompt
            negative_embeds = self.embed_prompts(self._prompt_list(negative, batch_size, "negative_prompt"), device)
        return prompt_embeds, negative_embeds

    def resolve_text_prompts(
        self,
        rgb: torch.Tensor,
        *,
        prompt: Any,
        negative_prompt: Any,
        added_prompt: str | None,
        default_negative_prompt: str | None,
    ) -> ResolvedPrompts:
        """The prompts for the LR images ``rgb`` ``(N, 3, h, w)`` in [0, 1]: the user's (checked, one per image;
        ``None`` or ``"auto"``: none), then the pipeline's ``prompt_extractor``'s tags when it has one, then
        ``added_prompt``; the negative prompt is the user's, else ``default_negative_prompt``
        (:func:`~sr_diffusion.prompts.resolve_prompts`; the extractor's soft prompts are passed on)."""
        n = rgb.shape[0]
        return resolve_prompts(
            self._prompt_list(prompt, n, "prompt", allow_none=True),
            rgb,
            getattr(self, "prompt_extractor", None),
            self._prompt_list(negative_prompt, n, "negative_prompt", allow_none=True),
            added_prompt=added_prompt or None,
            default_negative_prompt=default_negative_prompt,
        )

    def check_prompt_extractor(self, what: str) -> PromptExtractor | None:
        """The ``prompt_extractor`` component (``None`` or a :class:`~sr_diffusion.prompts.PromptExtractor`, ``what``
        describing it in the error)."""
        extractor = getattr(self, "prompt_extractor", None)
        if extractor is not None and not isinstance(extractor, PromptExtractor):
            raise ValueError(f"prompt_extractor must be a {what} or None, got {type(extractor).__name__}")
        return extractor

    def _latent_scale(self) -> tuple[float, float]:
        """``(shift, scale)``: latents for the UNet are ``(z - shift) · scale``."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return float(shift), float(self.vae.config.scaling_factor)

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """A VAE latent → the UNet's latent space (float32)."""
        shift, scale = self._latent_scale()
        return (z.float() - shift) * scale

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The UNet's latent → the VAE's, in the VAE's dtype."""
        shift, scale = self._latent_scale()
        return (latents.float() / scale + shift).to(self.vae.dtype)

    def encode_image(self, image: torch.Tensor, generator) -> torch.Tensor:
        """``z = E(x) · scaling_factor``: a posterior sample for ``x`` ``(N, 3, H, W)`` in [-1, 1], in the UNet's latent
        space (float32); the encoder tiled as the call's :meth:`vae_tiling` says."""
        with self.vae_tiling():
            posterior = self.vae.encode(image.to(self.vae.dtype)).latent_dist
        return self.scale_latents(posterior.sample(generator=generator))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``z_0`` ``(N, C_z, H/f, W/f)`` → ``(N, 3, H, W)`` in about [-1, 1] (float32); the decoder tiled as the call's
        :meth:`vae_tiling` says."""
        with self.vae_tiling():
            return self.vae.decode(self.unscale_latents(latents)).sample.float()

    def check_vae_tile_size(self, vae_tile_size: Any) -> int | tuple[int, int] | None:
        """``vae_tile_size`` after checking it (:meth:`vae_tile_sizes`; a list pair as a tuple): ``None``, ``0``, a
        positive multiple of the VAE factor ``f``, or a pair of positive ints."""

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        f = self.vae_scale_factor
        if isinstance(vae_tile_size, (tuple, list)):
            if len(vae_tile_size) == 2 and all(is_int(v) and v > 0 for v in vae_tile_size):
                return tuple(vae_tile_size)
        elif vae_tile_size is None or is_int(vae_tile_size) and vae_tile_size >= 0 and vae_tile_size % f == 0:
            return vae_tile_size
        raise ValueError(
            f"vae_tile_size must be None (automatic), 0 (never), a positive multiple of the VAE factor {f} (image "
            f"pixels) or a pair (encoder tile, image pixels; decoder tile, latent pixels), got {vae_tile_size!r}"
        )

    def vae_tile_sizes(self, vae_tile_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
        """``(encoder tile in image pixels, decoder tile in latent pixels)`` of the tiled VAE
        (:func:`~sr_diffusion.models.tiled_vae.tiled_vae`, which tiles a net only when its input is larger than
        ``tile + 2 · pad`` on a side), or ``None`` (never tiled): ``vae_tile_size=None`` (automatic, as the originals):
        :attr:`AUTO_VAE_TILE`; ``0``: never; an int ``n``: ``(n, n / f)``, tiles of ``n`` image pixels for both; a
        pair: the encoder's and decoder's tiles as the originals' ``_init_tiled_vae(encoder_tile_size,
        decoder_tile_size)``."""
        if vae_tile_size is None:
            return self.AUTO_VAE_TILE
        if isinstance(vae_tile_size, tuple):
            return vae_tile_size
        return (vae_tile_size, vae_tile_size // self.vae_scale_factor) if vae_tile_size else None

    def vae_tiling(self) -> contextlib.AbstractContextManager:
        """The context :meth:`encode_image` and :meth:`decode_latents` run the VAE in: tiled by the current (else the
        last) call's ``vae_tile_size`` (:meth:`vae_tile_sizes`; automatic before any call), else nothing."""
        tiles = self.vae_tile_sizes(self._vae_tile_size)
        return contextlib.nullcontext() if tiles is None else tiled_vae(self.vae, *tiles)

    def upsample_lr(self, rgb: torch.Tensor, pil: bool = True) -> torch.Tensor:
        """The ControlNet condition: the LR images ``(N, 3, h, w)`` in [0, 1] padded (reflect, bottom/right) to a
        multiple of :attr:`lr_multiple` and bicubic-upsampled ×``upscale`` to ``(N, 3, s·h', s·w')`` in [0, 1].

        ``pil=True`` (PASD's and SeeSR's default): PIL's bicubic on the 8-bit image, as their scripts upsample the LR
        photo (``Image.resize``; :func:`sr_diffusion.resize.pil_resize`, values ``k / 255``; works on any device);
        ``False``: torch's float bicubic, clamped (keeps more than 8 bits of a 16-bit or float input)."""
        s = self.upscale
        lr, _ = pad_to_multiple(rgb, self.lr_multiple)
        size = (lr.shape[-2] * s, lr.shape[-1] * s)
        if pil:
            return pil_resize(lr, size, "bicubic")
        return resize(lr, size=size, mode="bicubic").clamp(0.0, 1.0)

    # ------------------------------------------------------------------------------------------------------------------
    # The originals' preprocessing (issue 14): process size, automatic tiling
    # ------------------------------------------------------------------------------------------------------------------

    def process_steps(self, height: int, width: int, process_size: int) -> list[tuple[tuple[int, int], str]]:
        """The original script's resizes of an LR image of ``height`` × ``width`` for ``process_size``, as
        ``[((height, width), PIL resample), ...]``, the last being the size it samples at (each pipeline's rule)."""
        raise NotImplementedError(f"{self.METHOD} has no process_size rule")

    def resolve_process_size(self, process_size: int | None, match_original: bool) -> int | None:
        """The process size a call uses: ``None`` (default) is off, or :attr:`PROCESS_SIZE` with ``match_original``;
        ``0`` is off; an int is that size."""
        if process_size is None:
            return self.PROCESS_SIZE if match_original else None
        return process_size or None

    def check_faithfulness_options(
        self, process_size: Any, tile_size: Any, tile_overlap: Any, match_original: Any
    ) -> None:
        """``match_original`` a bool; ``process_size``, ``tile_size`` and ``tile_overlap`` ``None`` or ints >= 0
        (``tile_size`` is further checked by ``check_sampling_inputs``)."""
        if not isinstance(match_original, bool):
            raise ValueError(f"match_original must be a bool, got {match_original!r}")
        for name, value in (("process_size", process_size), ("tile_size", tile_size), ("tile_overlap", tile_overlap)):
            if value is not None and (not is_int(value) or value < 0):
                raise ValueError(f"{name} must be None or an int >= 0 (0: off), got {value!r}")

    def working_size(self, height: int, width: int, process_size: int | None) -> tuple[int, int] | None:
        """The size the condition image and the output are sampled at for an LR image of ``height`` × ``width``
        under ``process_size`` (:meth:`process_steps`), or ``None`` without one (``upscale ×`` the padded LR)."""
        if process_size is None:
            return None
        size = self.process_steps(height, width, process_size)[-1][0]
        if min(size) < self.vae_scale_factor:
            raise ValueError(
                f"process_size={process_size} gives a {size[0]}x{size[1]} image for a {height}x{width} input, smaller "
                f"than one latent pixel ({self.vae_scale_factor})"
            )
        return size

    def working_latent_shape(self, rgb: torch.Tensor, process_size: int | None) -> tuple[int, ...] | None:
        """The shape ``latents`` must have for the LR images ``rgb`` under ``process_size`` (``None``: the default,
        :meth:`latent_shape`)."""
        size = self.working_size(*rgb.shape[-2:], process_size)
        return None if size is None else self.working_shape(rgb.shape[0], *size)

    def condition_image(
        self, rgb: torch.Tensor, process_size: int | None
    ) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """``(condition, working size)``: the LR images ``rgb`` ``(N, 3, h, w)`` upsampled ×``upscale`` (PIL bicubic
        on 8 bits, padded; :meth:`upsample_lr`) and ``None``, or, with ``process_size``, resized by the original's
        rule (:meth:`process_steps`, PIL on 8 bits at every step) and the size it has."""
        if process_size is None:
            return self.upsample_lr(rgb), None
        image = rgb
        for size, resample in self.process_steps(*rgb.shape[-2:], process_size):
            image = pil_resize(image, size, resample)
        return image, tuple(image.shape[-2:])

    def working_shape(self, batch_size: int, height: int, width: int) -> tuple[int, int, int, int]:
        """The latent shape ``(N, C_z, H/f, W/f)`` of a condition image of ``height`` × ``width`` pixels."""
        f = self.vae_scale_factor
        return (batch_size, int(self.vae.config.latent_channels), height // f, width // f)

    def latent_tiling(
        self, latent_size: tuple[int, int], tile_size: int | None, tile_overlap: int | None
    ) -> tuple[int, int] | None:
        """``(tile, overlap)`` in latent pixels for a latent of ``latent_size``, or ``None`` (no tiling).

        ``tile_size=None`` is automatic, as the originals' scripts: tiles of :attr:`AUTO_LATENT_TILE` latent pixels
        only when ``h · w > AUTO_LATENT_TILE²`` (PASD 320, SeeSR 96); ``0``: never; an int: tiles of
        ``tile_size · s / f`` latent pixels (``tile_size`` LR pixels). ``tile_overlap`` is in LR pixels; ``None``:
        :attr:`AUTO_LATENT_TILE_OVERLAP` latent pixels (PASD 8, SeeSR 4). As the originals, a tile is a square of
        side ``min(tile, h, w)``."""
        h, w = latent_size
        s, f = self.upscale, self.vae_scale_factor
        if tile_size == 0:
            return None
        if tile_size is None:
            if h * w <= self.AUTO_LATENT_TILE**2:
                return None
            tile = self.AUTO_LATENT_TILE
        else:
            tile = tile_size * s // f
        overlap = self.AUTO_LATENT_TILE_OVERLAP if tile_overlap is None else tile_overlap * s // f
        return min(tile, h, w), overlap

    def prepare_latents(
        self,
        shape: tuple[int, ...],
        *,
        dtype: torch.dtype,
        device: torch.device,
        generator,
        latents: torch.Tensor | None,
    ) -> torch.Tensor:
        """``z_T``: the given ``latents`` or ``randn`` from ``generator``, times ``init_noise_sigma``."""
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def denoise(
        self,
        latents: torch.Tensor,
        *,
        timesteps: torch.Tensor,
        predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        step_kwargs: dict[str, Any],
        state: dict[str, torch.Tensor],
        callback_on_step_end: Callable[..., dict[str, Any]] | None,
        callback_on_step_end_tensor_inputs: Sequence[str],
    ) -> torch.Tensor:
        """The SD methods' denoising loop from ``latents`` (``z_T``); returns ``z_0``.

        At every step of ``timesteps`` (skipped once :attr:`interrupt` is set): ``predict(latents, t)`` (the method's
        UNet / ControlNet call, guidance and latent tiling) gives the noise prediction, the scheduler steps the whole
        latent (``step_kwargs``), then the step-end callback sees ``"latents"`` and the tensors of ``state`` by name
        and may replace them. ``state`` holds the other tensors a callback may replace (e.g. ``"prompt_embeds"``); it
        is updated in place, so ``predict`` reads them from it and the caller gets the replaced ones back."""
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                noise_pred = predict(latents, t)
                latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]

                tensors = self.step_end_callback(
                    callback_on_step_end,
                    step=i,
                    timestep=t,
                    callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                    tensors={"latents": latents, **state},
                )
                latents = tensors.pop("latents")
                state.update(tensors)
                progress_bar.update()
        return latents

    # ------------------------------------------------------------------------------------------------------------------
    # Latent tiling
    # ------------------------------------------------------------------------------------------------------------------

    @staticmethod
    def blend_latent_tiles(
        predict: Callable[[tuple[slice, ...]], torch.Tensor], latents: torch.Tensor, tile: int, overlap: int
    ) -> torch.Tensor:
        """``predict(region)`` on overlapping latent tiles of ``tile`` pixels (``overlap`` shared; the last tile of a
        row or column shifted back to end at the border), blended with :func:`gaussian_tile_weights`.

        ``predict`` gets the index ``(:, :, ys, xs)`` of a tile and returns the model output for that region of
        ``latents`` (so it can slice the latents and every per-pixel condition alike). One tile covering everything
        is ``predict`` on the whole latent, unweighted."""
        height, width = latents.shape[-2:]
        tile_size, regions = tile_regions(height, width, tile, overlap)
        if len(regions) == 1:
            return predict((slice(None), slice(None), slice(None), slice(None)))
        weight = gaussian_tile_weights(*tile_size, device=latents.device)
        blended = TileAccumulator(latents.shape, dtype=latents.dtype, device=latents.device)
        for region in regions:
            blended.add(region, predict(region), weight)
        return blended.result()

    def pixel_region(self, region: tuple[slice, ...]) -> tuple[slice, ...]:
        """The index of the image-space region (``f`` times larger) under the latent ``region`` that
        :meth:`blend_latent_tiles` hands to ``predict`` (the whole image for the whole latent)."""
        ys, xs = region[2], region[3]
        if ys.start is None:  # one tile covering everything: the whole latent
            return (slice(None), slice(None))
        f = self.vae_scale_factor
        return (slice(None), slice(None), slice(ys.start * f, ys.stop * f), slice(xs.start * f, xs.stop * f))

    # ------------------------------------------------------------------------------------------------------------------
    # Fidelity controls
    # ------------------------------------------------------------------------------------------------------------------

    def fidelity_defaults(self) -> dict[str, Any]:
        """``{keyword: the method's default}`` of the fidelity controls ``fidelity="auto"`` may set on this pipeline
        (:attr:`FIDELITY_DEFAULTS`; a pipeline whose controls depend on its components overrides this)."""
        return dict(self.FIDELITY_DEFAULTS)

    def resolve_fidelity(self, fidelity: str | None, rgb: torch.Tensor, **given: Any) -> dict[str, Any]:
        """The value of each fidelity control in ``given`` (the caller's values, ``None``: unset) for the LR images
        ``rgb`` ``(N, 3, h, w)`` in [0, 1]: the caller's value when given (it always wins); else, with
        ``fidelity="auto"``, the value mapped from the degradation of ``rgb`` estimated by the ``degradation_estimator``
        component (the one shipped in the package when it is None;
        :func:`~sr_diffusion.fidelity_auto.resolve_auto_fidelity`, run only when a control is unset); else the
        method's default (:meth:`fidelity_defaults`).

        A control in ``given`` that :meth:`fidelity_defaults` does not name (one this pipeline's components make moot,
        as StableSR's ``fidelity_weight`` without CFW layers) is returned as given."""
        check_fidelity(fidelity)
        defaults = self.fidelity_defaults()
        settable = {name: value for name, value in given.items() if name in defaults}
        resolved = resolve_auto_fidelity(settable, rgb, getattr(self, "degradation_estimator", None), fidelity)
        return {
            name: (defaults[name] if resolved[name] is None else resolved[name]) if name in defaults else value
            for name, value in given.items()
        }

    # ------------------------------------------------------------------------------------------------------------------
    # Guidance
    # ------------------------------------------------------------------------------------------------------------------

    def guided_noise_pred(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        latents: torch.Tensor,
        t: torch.Tensor,
        condition: torch.Tensor,
        guidance_scale: float,
        repeat_condition: bool = True,
    ) -> torch.Tensor:
        """The (guided) model output for ``z_t`` ``(N, C_z, h, w)`` (or a tile of it): ``model(x, condition)`` on
        ``x = scheduler.scale_model_input(z_t, t)``; with ``guidance_scale`` ``w > 1`` on both halves at once (the text
        embeddings the model uses hold the negative ones first; the condition ``(N, …)`` is repeated for both, as the
        originals do, unless ``repeat_condition`` is False: StableSR's model computes its time-aware encoder's maps once
        for both halves) and ``eps_u + w (eps_c - eps_u)``."""
        do_cfg = guidance_scale > 1
        scaled = self.scheduler.scale_model_input(latents, t)
        if do_cfg:
            scaled = torch.cat([scaled, scaled])
            condition = torch.cat([condition, condition]) if repeat_condition else condition
        out = model(scaled, condition)
        if do_cfg:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        return out
