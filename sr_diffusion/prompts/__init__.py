"""Prompt extraction for text-conditioned SR diffusion models: the common interface and SeeSR's DAPE.

* :class:`PromptExtractor` / :class:`PromptExtraction`: ``extractor(images) -> (hard_prompts, soft_prompts)``;
  :func:`merge_prompts` / :func:`resolve_prompts`: how the extracted prompts merge with the user's (the user's
  prompt comes first, the user's negative prompt is used verbatim; see :mod:`sr_diffusion.prompts.base`).
* :class:`DAPE`: the degradation-aware prompt extractor of SeeSR on an open_clip ViT with a peft LoRA, trained by
  ``training/train_dape.py``.
* :class:`BlipCaptioner`: PASD's high-level information, a BLIP caption as the hard prompt (transformers).

Importing this package loads torch and diffusers; open_clip and peft are imported when a DAPE is built.
"""

from .base import (
    AUTO_PROMPT,
    SEESR_ADDED_PROMPT,
    SEESR_NEGATIVE_PROMPT,
    PromptExtraction,
    PromptExtractor,
    ResolvedPrompts,
    merge_prompts,
    resolve_prompts,
    split_phrases,
)
from .captioner import PASD_CAPTION_REPLACEMENTS, BlipCaptioner
from .dape import (
    DAPE,
    DEFAULT_TAG_TEMPLATE,
    DEFAULT_VOCABULARY,
    DAPEOutput,
    SoftPromptProjector,
    default_lora_targets,
    encode_vocabulary,
    load_vocabulary,
    select_tags,
)

__all__ = [
    "AUTO_PROMPT",
    "SEESR_ADDED_PROMPT",
    "SEESR_NEGATIVE_PROMPT",
    "PromptExtraction",
    "PromptExtractor",
    "ResolvedPrompts",
    "merge_prompts",
    "resolve_prompts",
    "split_phrases",
    "BlipCaptioner",
    "PASD_CAPTION_REPLACEMENTS",
    "DAPE",
    "DAPEOutput",
    "DEFAULT_TAG_TEMPLATE",
    "DEFAULT_VOCABULARY",
    "SoftPromptProjector",
    "default_lora_targets",
    "encode_vocabulary",
    "load_vocabulary",
    "select_tags",
]
