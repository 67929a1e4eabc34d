"""What every prompt extractor returns, and how its prompts merge with the user's.

A prompt extractor looks at the degraded input of a text-conditioned SR model (StableSR, PASD, SeeSR, ...) and
returns, per image,

* a **hard prompt**: text (tags such as ``"dog, grass, park"``) for the model's text encoder, and
* **soft prompts**: image tokens ``(B, N, D)`` for cross-attention, ``D`` the consumer's ``cross_attention_dim``
  (``None`` for extractors that only make text).

A pipeline that takes a :class:`PromptExtractor` accepts ``prompt="auto"`` and calls :func:`resolve_prompts`.

The merge rule (:func:`merge_prompts`). The user's words always win:

1. **The user's prompt comes first**: ``"{prompt}, {tags}, {added_prompt}"`` (empty parts left out). CLIP text
   encoders truncate at 77 tokens, so what is cut is the extracted tags, never the user's words, and the user's
   words come first in the encoder's causal attention. ``prompt="auto"`` (or ``None`` / ``""``) means "tags only".
2. **An extracted tag is dropped** when the user's prompt already mentions it, when the negative prompt mentions it
   (the user's negative prompt overrules the extractor) or when it repeats an earlier tag. "Mentions" means the tag's
   words appear in that order as whole words, case- and whitespace-insensitively: ``"a dog on grass"`` mentions
   ``"dog"`` and ``"grass"``, not ``"do"``.
3. **The negative prompt is the user's, verbatim**, whenever one is given (``""`` included, meaning "none");
   ``default_negative_prompt`` only fills in when the user gave ``None``. Extraction never adds negative words.

SeeSR (Wu et al., CVPR 2024, ``test_seesr.py``) builds ``f"{tags}, {user prompt}," + added_prompt``; we put the
user's prompt first (rule 1) and keep its defaults as :data:`SEESR_ADDED_PROMPT` / :data:`SEESR_NEGATIVE_PROMPT`.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

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
]

#: The ``prompt`` value that asks a pipeline for the extractor's prompts only.
AUTO_PROMPT = "auto"
#: SeeSR's default quality words appended after the tags (``--added_prompt``).
SEESR_ADDED_PROMPT = "clean, high-resolution, 8k"
#: SeeSR's default negative prompt (``--negative_prompt``).
SEESR_NEGATIVE_PROMPT = "dotted, noise, blur, lowres, smooth"


@dataclass
class PromptExtraction:
    """Output of a :class:`PromptExtractor` for a batch of ``B`` images.

    Args:
        hard_prompts (`list[str]`): one text prompt per image (``", "``-joined tags, best first; may be ``""``).
        soft_prompts (`torch.Tensor` of shape `(B, N, D)` or `None`): image tokens for cross-attention.
        tags (`list[list[str]]`): the tags behind each hard prompt, best first (empty when not tag-based).
        tag_scores (`list[list[float]]`): each tag's score (e.g. cosine similarity), same layout as ``tags``.
    """

    hard_prompts: list[str]
    soft_prompts: torch.Tensor | None = None
    tags: list[list[str]] = field(default_factory=list)
    tag_scores: list[list[float]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.hard_prompts)


class PromptExtractor(ABC):
    """Anything that maps images to prompts: ``extractor(images) -> PromptExtraction``.

    ``images`` is a float ``(B, 3, H, W)`` batch in [0, 1] (any size: the extractor resizes); the result holds
    ``B`` hard prompts and, when the extractor makes them, ``(B, N, D)`` soft prompts on the images' device.
    """

    @abstractmethod
    def __call__(self, images: torch.Tensor) -> PromptExtraction: ...


@dataclass
class ResolvedPrompts:
    """What :func:`resolve_prompts` hands to a pipeline: per-image prompts, negative prompts and soft prompts."""

    prompts: list[str]
    negative_prompts: list[str]
    soft_prompts: torch.Tensor | None = None
    extraction: PromptExtraction | None = None


# ----------------------------------------------------------------------------------------------------------------------
# merging
# ----------------------------------------------------------------------------------------------------------------------


def _norm(phrase: str) -> str:
    return " ".join(phrase.lower().split())


def _mentions(text: str, phrase: str) -> bool:
    """Whether normalised ``text`` holds normalised ``phrase`` as whole words."""
    return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text) is not None


def split_phrases(text: str | None) -> list[str]:
    """``"A red car,  street ,"`` -> ``["A red car", "street"]``: the comma-separated, non-empty phrases."""
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def _per_image(value: str | Sequence[str | None] | None, batch_size: int, name: str) -> list[str | None]:
    if value is None or isinstance(value, str):
        return [value] * batch_size
    value = list(value)
    if len(value) != batch_size:
        raise ValueError(f"{name} has {len(value)} entries for {batch_size} images")
    if not all(v is None or isinstance(v, str) for v in value):
        raise TypeError(f"{name} must be a string, a list of strings or None")
    return value


def merge_prompts(
    hard_prompts: Sequence[str],
    prompt: str | Sequence[str | None] | None = None,
    negative_prompt: str | Sequence[str | None] | None = None,
    *,
    added_prompt: str | None = None,
    default_negative_prompt: str | None = None,
) -> tuple[list[str], list[str]]:
    """Merge extracted prompts with the user's, by the rule in this module's docstring.

    Args:
        hard_prompts: one extracted prompt per image (``", "``-separated tags).
        prompt: the user's prompt, one for all images or one per image; ``"auto"``, ``None`` or ``""``: none.
        negative_prompt: the user's negative prompt (same broadcasting); used verbatim when not ``None``.
        added_prompt: appended after the tags (e.g. :data:`SEESR_ADDED_PROMPT`); its phrases are deduplicated too.
        default_negative_prompt: the negative prompt where the user gave ``None``.

    Returns:
        ``(prompts, negative_prompts)``: two lists of ``len(hard_prompts)`` strings.
    """
    n = len(hard_prompts)
    prompts = _per_image(prompt, n, "prompt")
    negatives = _per_image(negative_prompt, n, "negative_prompt")
    out_prompts, out_negatives = [], []
    for extracted, user, negative in zip(hard_prompts, prompts, negatives):
        if user is not None and user.strip().lower() == AUTO_PROMPT:
            user = None
        negative = default_negative_prompt if negative is None else negative
        user_phrases = split_phrases(user)
        user_text, negative_text = _norm(", ".join(user_phrases)), _norm(", ".join(split_phrases(negative)))
        seen: set[str] = set()
        parts = [user.strip().rstrip(",").strip()] if user_phrases else []
        for phrase in split_phrases(extracted) + split_phrases(added_prompt):
            key = _norm(phrase)
            if key in seen or _mentions(user_text, key) or _mentions(negative_text, key):
                continue
            seen.add(key)
            parts.append(phrase)
        out_prompts.append(", ".join(parts))
        out_negatives.append(negative or "")
    return out_prompts, out_negatives


def resolve_prompts(
    prompt: str | Sequence[str | None] | None,
    images: torch.Tensor,
    extractor: PromptExtractor | None = None,
    negative_prompt: str | Sequence[str | None] | None = None,
    *,
    added_prompt: str | None = None,
    default_negative_prompt: str | None = None,
) -> ResolvedPrompts:
    """The prompts a text-conditioned pipeline runs with, for a batch of ``B`` input images ``(B, 3, H, W)``.

    With an ``extractor``, it is run on ``images`` and its hard prompts are merged with ``prompt`` by
    :func:`merge_prompts` (``prompt="auto"``: the extracted prompts alone); its soft prompts are passed on.
    Without one, ``prompt`` is used as given and ``"auto"`` is an error.
    """
    batch_size = images.shape[0]
    if extractor is None:
        prompts = _per_image(prompt, batch_size, "prompt")
        if any(p is not None and p.strip().lower() == AUTO_PROMPT for p in prompts):
            raise ValueError('prompt="auto" needs a prompt extractor (e.g. sr_diffusion.prompts.DAPE)')
        hard = [""] * batch_size
        merged, negatives = merge_prompts(
            hard, prompts, negative_prompt, added_prompt=added_prompt, default_negative_prompt=default_negative_prompt
        )
        return ResolvedPrompts(merged, negatives)
    extraction = extractor(images)
    if len(extraction.hard_prompts) != batch_size:
        raise ValueError(f"the extractor returned {len(extraction.hard_prompts)} prompts for {batch_size} images")
    merged, negatives = merge_prompts(
        extraction.hard_prompts,
        prompt,
        negative_prompt,
        added_prompt=added_prompt,
        default_negative_prompt=default_negative_prompt,
    )
    return ResolvedPrompts(merged, negatives, extraction.soft_prompts, extraction)
