"""A captioner as a prompt extractor: PASD's "high-level information" from a BLIP image-captioning model.

PASD (Yang et al., ECCV 2024, Sec. 3.3; ``test_pasd.py --high_level_info caption``) captions the LR input with BLIP
(Li et al., ICML 2022; LAVIS ``blip_caption`` / ``base_coco``: beam search with 3 beams, 10 to 30 tokens, the text
prompt ``"a picture of "`` stripped from the caption) and feeds the caption to the SD text encoder, after replacing
the words that describe the degradation rather than the content (``"blurry" → "clear"``, ``"noisy" → "clean"``) so
the prior is not asked for a blurry, noisy picture.

:class:`BlipCaptioner` wraps transformers' ``BlipForConditionalGeneration`` (any BLIP captioning config; weights from
a local transformers folder such as a downloaded ``Salesforce/blip-image-captioning-base`` via :meth:`from_blip`)
as a :class:`~sr_diffusion.prompts.PromptExtractor`: ``captioner(images)`` with ``images`` ``(B, 3, H, W)`` in [0, 1]
returns one caption per image as its hard prompt (no soft prompts), which :func:`~sr_diffusion.prompts.
resolve_prompts` merges after the user's own prompt. It is a ``ModelMixin``, so a pipeline saves and loads it as a
component (``blip/``: the transformers model, ``tokenizer/``: its tokenizer).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from sr_diffusion.utils import is_int

from .base import PromptExtraction, PromptExtractor

__all__ = ["PASD_CAPTION_REPLACEMENTS", "BlipCaptioner"]

#: PASD's replacements of degradation words in the caption (``test_pasd.py``).
PASD_CAPTION_REPLACEMENTS = {"blurry": "clear", "noisy": "clean"}
_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_TOKENIZER_DIR = "tokenizer"
_MODEL_DIR = "blip"


class BlipCaptioner(ModelMixin, ConfigMixin, PromptExtractor):
    r"""BLIP captions as hard prompts (PASD's high-level information).

    Args:
        blip_config (`dict`): a transformers ``BlipConfig`` as a dict (``BlipConfig().to_dict()``); ``None``: the
            default BLIP-base configuration.
        image_size (`int`): the side the images are resized to (antialiased bicubic; BLIP base: 384).
        image_mean / image_std (`tuple[float, float, float]`): input normalisation (BLIP: OpenAI CLIP's).
        text_prompt (`str`, *optional*): the text the caption continues (LAVIS ``base_coco``: ``"a picture of"``),
            stripped from the result; ``None``: unconditional captioning.
        num_beams / min_new_tokens / max_new_tokens: beam search settings (LAVIS: 3, 10 - len(prompt), 30).
        replacements (`dict[str, str]`): whole-word, case-insensitive replacements in the caption (default
            :data:`PASD_CAPTION_REPLACEMENTS`; ``{}`` for none).
    """

    @register_to_config
    def __init__(
        self,
        blip_config: Mapping[str, Any] | None = None,
        image_size: int = 384,
        image_mean: Sequence[float] = _OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = _OPENAI_CLIP_STD,
        text_prompt: str | None = "a picture of",
        num_beams: int = 3,
        min_new_tokens: int = 5,
        max_new_tokens: int = 30,
        replacements: Mapping[str, str] | None = None,
    ):
        super().__init__()
        from transformers import BlipConfig, BlipForConditionalGeneration

        if not is_int(image_size) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if not 1 <= min_new_tokens <= max_new_tokens:
            raise ValueError(f"need 1 <= min_new_tokens <= max_new_tokens, got {min_new_tokens}, {max_new_tokens}")
        config = BlipConfig(**dict(blip_config)) if blip_config is not None else BlipConfig()
        self.model = BlipForConditionalGeneration(config)
        self.register_buffer("_mean", torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.tokenizer = None  # set by from_blip / from_pretrained / set_tokenizer

    # ------------------------------------------------------------------------------------------------ construction

    def set_tokenizer(self, tokenizer: Any) -> None:
        """The (BERT) tokenizer of the BLIP text decoder, for the text prompt and for decoding captions."""
        vocab = getattr(tokenizer, "vocab_size", None)
        expected = self.model.config.text_config.vocab_size
        if vocab is None or len(tokenizer) > expected:
            raise ValueError(
                f"the tokenizer has {len(tokenizer) if vocab is not None else '?'} tokens but the BLIP text decoder "
                f"has {expected}: they belong to different models"
            )
        self.tokenizer = tokenizer

    @classmethod
    def from_blip(cls, folder: str | os.PathLike, **config_overrides: Any) -> BlipCaptioner:
        """A captioner from a local transformers BLIP captioning folder (``config.json``, weights, tokenizer files
        and ``preprocessor_config.json``, e.g. a downloaded ``Salesforce/blip-image-captioning-base``)."""
        import json

        from transformers import AutoTokenizer, BlipForConditionalGeneration

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: not a transformers BLIP folder (no config.json)")
        blip = BlipForConditionalGeneration.from_pretrained(folder, local_files_only=True)
        kwargs: dict[str, Any] = {"blip_config": blip.config.to_dict()}
        processor = folder / "preprocessor_config.json"
        if processor.is_file():
            pre = json.loads(processor.read_text())
            size = pre.get("size", {})
            kwargs["image_size"] = int(size.get("height", 384) if isinstance(size, dict) else size)
            kwargs["image_mean"] = tuple(pre.get("image_mean", _OPENAI_CLIP_MEAN))
            kwargs["image_std"] = tuple(pre.get("image_std", _OPENAI_CLIP_STD))
        captioner = cls(**{**kwargs, **config_overrides})
        captioner.model.load_state_dict(blip.state_dict())
        captioner.set_tokenizer(AutoTokenizer.from_pretrained(folder, local_files_only=True))
        return captioner.eval()

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True, **kwargs: Any) -> None:
        """Our ``config.json``, the BLIP model as transformers saves it (``blip/``, tied weights kept tied) and the
        tokenizer (``tokenizer/``), written atomically; ``kwargs`` (diffusers' saver options) are ignored."""
        from sr_diffusion.utils import atomic_directory

        if not is_main_process:
            return
        if self.tokenizer is None:
            raise ValueError("this captioner has no tokenizer (set_tokenizer): a saved copy could not decode captions")
        with atomic_directory(save_directory) as tmp:
            self.save_config(tmp)
            self.model.save_pretrained(tmp / _MODEL_DIR)
            self.tokenizer.save_pretrained(tmp / _TOKENIZER_DIR)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> BlipCaptioner:
        """Load a folder written by :meth:`save_pretrained` (in eval mode; of diffusers' loader options only
        ``subfolder`` and ``torch_dtype`` are used)."""
        from transformers import AutoTokenizer, BlipForConditionalGeneration

        folder = Path(pretrained_model_name_or_path)
        if kwargs.get("subfolder"):
            folder = folder / kwargs["subfolder"]
        missing = [n for n in ("config.json", _MODEL_DIR, _TOKENIZER_DIR) if not (folder / n).exists()]
        if missing:
            raise FileNotFoundError(f"{folder}: not a saved BlipCaptioner (no {', '.join(missing)})")
        captioner = cls.from_config(cls.load_config(folder))
        blip = BlipForConditionalGeneration.from_pretrained(folder / _MODEL_DIR, local_files_only=True)
        captioner.model.load_state_dict(blip.state_dict())
        captioner.set_tokenizer(AutoTokenizer.from_pretrained(folder / _TOKENIZER_DIR, local_files_only=True))
        if kwargs.get("torch_dtype") is not None:
            captioner.to(kwargs["torch_dtype"])
        return captioner.eval()

    # ------------------------------------------------------------------------------------------------ captions

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] → BLIP's normalised ``(B, 3, S, S)`` input."""
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"expected float RGB images (B, 3, H, W) in [0, 1], got {tuple(images.shape)} {images.dtype}"
            )
        if not torch.isfinite(images).all():
            raise ValueError("the images contain NaN or infinite values")
        size = self.config.image_size
        x = images.to(device=self._mean.device, dtype=torch.float32).clamp(0, 1)
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        return ((x.clamp(0, 1) - self._mean) / self._std).to(self.dtype)

    def clean(self, caption: str) -> str:
        """Strip the text prompt and apply :attr:`replacements` (whole words, case-insensitive)."""
        text = " ".join(caption.split())
        prompt = (self.config.text_prompt or "").strip()
        if prompt and text.lower().startswith(prompt.lower()):
            text = text[len(prompt) :].strip()
        replacements = PASD_CAPTION_REPLACEMENTS if self.config.replacements is None else self.config.replacements
        for word, new in replacements.items():
            text = re.sub(rf"\b{re.escape(word)}\b", new, text, flags=re.IGNORECASE)
        return text.strip(" ,")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> PromptExtraction:
        """One caption per image of ``images`` ``(B, 3, H, W)`` in [0, 1], as the hard prompts."""
        if self.tokenizer is None:
            raise ValueError("this captioner has no tokenizer: build it with from_blip / from_pretrained")
        pixel_values = self.preprocess(images)
        batch = pixel_values.shape[0]
        kwargs: dict[str, Any] = {
            "num_beams": self.config.num_beams,
            "min_new_tokens": self.config.min_new_tokens,
            "max_new_tokens": self.config.max_new_tokens,
        }
        if self.config.text_prompt:
            ids = self.tokenizer([self.config.text_prompt] * batch, return_tensors="pt").input_ids
            kwargs["input_ids"] = ids.to(pixel_values.device)
        generated = self.model.generate(pixel_values=pixel_values, **kwargs)
        captions = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return PromptExtraction(hard_prompts=[self.clean(c) for c in captions])
