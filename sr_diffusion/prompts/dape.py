"""DAPE: SeeSR's degradation-aware prompt extractor, on open_clip + peft.

SeeSR (Wu et al., "SeeSR: Towards Semantics-Aware Real-World Image Super-Resolution", CVPR 2024, Sec. 3.1)
fine-tunes the image encoder of a tagging model (RAM) with LoRA so that a *degraded* image yields the
representation its *HR* image has under the frozen original: a feature-alignment loss on the image embeddings plus
an alignment of the tag logits (``basicsr/models/dape_model.py``). The fine-tuned model then gives the SR diffusion
model two prompts:

* hard prompts: the recognised tags as text, for the text encoder;
* soft prompts: the image embeddings (``image_embeds``, RAM's ``image_proj`` output, ``(B, 145, 512)``), attended
  to by extra image cross-attention layers of SeeSR's UNet.

Here the tagging model is an open_clip CLIP (any native open_clip ViT) with a peft LoRA on its image tower:

* ``image_embeds = visual(x)`` is the pooled, projected CLIP image embedding ``(B, E)``; ``image_tokens`` the
  patch tokens after the final LayerNorm ``(B, N, W)`` (``N = (image_size / patch_size)^2``);
* tags: the cosine similarity ``s = <image_embeds / |.|, t_v>`` with every vocabulary tag ``v``, where
  ``t_v`` is the normalised text embedding of ``tag_template.format(v)`` (precomputed once, stored in the model);
  the hard prompt is the ``top_k`` tags with ``s >= threshold``, best first, ``", "``-joined;
* soft prompts: :class:`SoftPromptProjector` maps ``[image_embeds; image_tokens]`` to ``(B, 1 + N,
  cross_attention_dim)``. It is trained with the diffusion model that consumes it (as SeeSR trains its image
  cross-attention in the SR stage); DAPE training leaves it alone.

LoRA (peft, ``B`` initialised to zero so a fresh DAPE equals the original) goes on every block's attention input
projection (q, k, v: open_clip's ``nn.MultiheadAttention.in_proj_weight``, via peft's ``target_parameters``) and MLP
(``mlp.c_fc``, ``mlp.c_proj``); the rest of the tower is frozen. With the adapter disabled the model is the
original tower, the teacher of :mod:`sr_diffusion.training.dape`.

A saved DAPE folder (:meth:`DAPE.save_pretrained`)::

    config.json                  open_clip model config, LoRA settings, vocabulary, top_k, threshold, ...
    lora/adapter_config.json     the peft adapter (standard peft layout; keys as PeftModel.save_pretrained)
    lora/adapter_model.safetensors
    projector/                   SoftPromptProjector (diffusers model folder)
    dape.safetensors             tag_embeddings (V, E), logit_scale
    base_model.safetensors       the frozen image tower; left out when it can be re-read from ``base_checkpoint``

open_clip and peft are imported when a DAPE is built, not when this module is imported.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .base import PromptExtraction, PromptExtractor

__all__ = [
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

#: The tag vocabulary shipped with the package: common objects, scenes, materials and styles, one per line.
DEFAULT_VOCABULARY = Path(__file__).with_name("vocabulary.txt")
#: How a tag becomes a text prompt for the text tower (CLIP's zero-shot convention).
DEFAULT_TAG_TEMPLATE = "a photo of a {}."
# open_clip's OPENAI_DATASET_MEAN / STD (repeated so that the config default needs no open_clip import)
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_BASE_WEIGHTS = "base_model.safetensors"
_BUFFERS = "dape.safetensors"
_LORA_DIR = "lora"
_PROJECTOR_DIR = "projector"


# ----------------------------------------------------------------------------------------------------------------------
# vocabulary and tags
# ----------------------------------------------------------------------------------------------------------------------


def load_vocabulary(source: str | os.PathLike | Sequence[str] | None = None) -> list[str]:
    """The tag list: ``None`` -> :data:`DEFAULT_VOCABULARY`; a path -> its non-empty lines; a list -> as is.

    Tags are stripped; empty tags, duplicates (case-insensitive) and commas (they separate tags in a prompt) are
    errors."""
    if source is None or isinstance(source, (str, os.PathLike)):
        path = Path(DEFAULT_VOCABULARY if source is None else source)
        tags = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        tags = [t for t in tags if t and not t.startswith("#")]
    else:
        tags = [str(t).strip() for t in source]
    if not tags:
        raise ValueError("the tag vocabulary is empty")
    seen: set[str] = set()
    for tag in tags:
        key = tag.lower()
        if not tag or "," in tag:
            raise ValueError(f"bad tag {tag!r}: tags must be non-empty and contain no comma")
        if key in seen:
            raise ValueError(f"duplicate tag {tag!r} in the vocabulary")
        seen.add(key)
    return tags


def select_tags(
    similarities: torch.Tensor, vocabulary: Sequence[str], top_k: int, threshold: float | None
) -> tuple[list[list[str]], list[list[float]]]:
    """Per row of ``similarities`` ``(B, V)``: the (at most) ``top_k`` tags with similarity ``>= threshold``
    (``None``: no threshold), best first, and their similarities."""
    if similarities.ndim != 2 or similarities.shape[1] != len(vocabulary):
        raise ValueError(f"similarities must be (B, {len(vocabulary)}), got {tuple(similarities.shape)}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    k = min(int(top_k), len(vocabulary))
    if k == 0:
        return [[] for _ in range(similarities.shape[0])], [[] for _ in range(similarities.shape[0])]
    scores, index = similarities.detach().float().topk(k, dim=1)
    tags, values = [], []
    for row_scores, row_index in zip(scores.tolist(), index.tolist()):
        keep = [(vocabulary[i], s) for s, i in zip(row_scores, row_index) if threshold is None or s >= threshold]
        tags.append([t for t, _ in keep])
        values.append([s for _, s in keep])
    return tags, values


@torch.no_grad()
def encode_vocabulary(
    clip_model: nn.Module, tokenizer, vocabulary: Sequence[str], template: str = DEFAULT_TAG_TEMPLATE, batch_size=256
) -> torch.Tensor:
    """Normalised text embeddings ``(V, E)`` of ``template.format(tag)`` for every tag, from an open_clip model's
    text tower (``clip_model.encode_text``)."""
    was_training = clip_model.training
    clip_model.eval()
    device = next(clip_model.parameters()).device
    chunks = []
    for start in range(0, len(vocabulary), batch_size):
        texts = [template.format(tag) for tag in vocabulary[start : start + batch_size]]
        chunks.append(clip_model.encode_text(tokenizer(texts).to(device), normalize=True).float())
    clip_model.train(was_training)
    return torch.cat(chunks).cpu()


# ----------------------------------------------------------------------------------------------------------------------
# open_clip helpers
# ----------------------------------------------------------------------------------------------------------------------


def _model_config(model_name: str, model_config: dict | None) -> dict:
    """A checked deep copy of the open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...)."""
    import open_clip

    if model_config is None:
        model_config = open_clip.get_model_config(model_name)
        if model_config is None:
            raise ValueError(
                f"unknown open_clip model {model_name!r}; pass model_config=... or one of open_clip.list_models()"
            )
    cfg = copy.deepcopy(dict(model_config))
    if not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
        raise ValueError(f"an open_clip model config needs embed_dim, vision_cfg and text_cfg; got {sorted(cfg)}")
    vision = cfg["vision_cfg"]
    if vision.get("timm_model_name") or isinstance(vision.get("layers"), (list, tuple)):
        raise ValueError("DAPE needs an open_clip ViT image tower (timm and ResNet towers are not supported)")
    if vision.get("attentional_pool"):
        raise ValueError("DAPE does not support attentional-pool image towers (CoCa)")
    if cfg.get("multimodal_cfg"):
        raise ValueError("DAPE does not support CoCa models")
    return cfg


def _build_visual(cfg: dict) -> nn.Module:
    """The open_clip image tower of ``cfg``, randomly initialised, returning ``(pooled, tokens)``; patch dropout is
    switched off (it would draw from the global RNG)."""
    from open_clip.model import _build_vision_tower

    vision = dict(cfg["vision_cfg"], output_tokens=True, patch_dropout=0.0)
    return _build_vision_tower(cfg["embed_dim"], vision, quick_gelu=bool(cfg.get("quick_gelu", False)))


def _build_clip(cfg: dict) -> nn.Module:
    import open_clip

    cfg = copy.deepcopy(cfg)
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg["text_cfg"]
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    return cls(**cfg)


def _tokenizer(model_name: str, cfg: dict, builtin: bool):
    """open_clip's tokenizer for a built-in model name, else the one ``cfg["text_cfg"]`` describes."""
    import open_clip

    if builtin:
        return open_clip.get_tokenizer(model_name)
    text = cfg["text_cfg"]
    kwargs = dict(text.get("tokenizer_kwargs") or {})
    context_length = text.get("context_length", 77)
    if text.get("hf_tokenizer_name"):
        return open_clip.tokenizer.HFTokenizer(text["hf_tokenizer_name"], context_length=context_length, **kwargs)
    return open_clip.SimpleTokenizer(context_length=context_length, **kwargs)


def _resolve_checkpoint(model_name: str, pretrained: str | os.PathLike) -> tuple[str, dict]:
    """A local checkpoint file, or an open_clip pretrained tag (downloaded by open_clip): ``(path, tag config)``."""
    import open_clip

    if Path(pretrained).is_file():
        return str(Path(pretrained).resolve()), {}
    tag_cfg = open_clip.get_pretrained_cfg(model_name, str(pretrained))
    if not tag_cfg:
        raise FileNotFoundError(
            f"pretrained={str(pretrained)!r} is neither a checkpoint file nor an open_clip tag of {model_name!r}"
        )
    return open_clip.download_pretrained(tag_cfg), tag_cfg


def default_lora_targets(visual: nn.Module) -> tuple[list[str], list[str]]:
    """``(target_modules, target_parameters)`` for LoRA on an open_clip ViT tower: in every transformer block, the
    MLP linears (``mlp.c_fc``, ``mlp.c_proj``) and the attention's q/k/v input projection (``attn.in_proj_weight``;
    for open_clip's custom attention block, also its ``attn.out_proj`` linear). ``nn.MultiheadAttention`` reads its
    ``out_proj.weight`` directly, so LoRA cannot reach it there and it is left out."""
    modules, parameters = [], []
    for name, module in visual.named_modules():
        parts = name.split(".")
        if "resblocks" not in parts:
            continue
        if isinstance(module, nn.Linear) and parts[-2:] in (["mlp", "c_fc"], ["mlp", "c_proj"]):
            modules.append(name)
        elif parts[-1] == "attn" and isinstance(getattr(module, "in_proj_weight", None), nn.Parameter):
            parameters.append(f"{name}.in_proj_weight")
            if not isinstance(module, nn.MultiheadAttention) and isinstance(
                getattr(module, "out_proj", None), nn.Linear
            ):
                modules.append(f"{name}.out_proj")
    if not modules and not parameters:
        raise ValueError("found no transformer blocks to put LoRA on in this image tower")
    return modules, parameters


def _settle_parameter_order(model: nn.Module) -> None:
    """Re-register every parameter that peft targets directly (``target_parameters``) at the end of its module.

    peft applies such a LoRA by parametrizing the weight during each forward and re-registers it afterwards, which
    moves it behind its siblings (``in_proj_bias`` before ``in_proj_weight``). Doing the same once here keeps
    ``parameters()`` in one order for the model's whole life: the trainer's EMA pairs parameters by position.
    """
    from peft.tuners.lora.layer import ParamWrapper

    for module in list(model.modules()):
        if isinstance(module, ParamWrapper):
            owner = module.get_base_layer()
            param = owner._parameters.pop(module.parameter_name)
            owner.register_parameter(module.parameter_name, param)


# ----------------------------------------------------------------------------------------------------------------------
# soft-prompt projector
# ----------------------------------------------------------------------------------------------------------------------


class SoftPromptProjector(ModelMixin, ConfigMixin):
    """Image tokens -> cross-attention context (SeeSR's ``image_proj`` + the ``image_encoder_hidden_states`` its
    UNet attends to).

    ``forward(image_tokens (B, N, token_dim), image_embeds (B, embed_dim)) -> (B, 1 + N, cross_attention_dim)``:
    the global embedding first, then the patch tokens, each through its own linear map, then a shared LayerNorm.
    """

    @register_to_config
    def __init__(self, token_dim: int, embed_dim: int, cross_attention_dim: int = 1024):
        super().__init__()
        self.global_proj = nn.Linear(embed_dim, cross_attention_dim)
        self.token_proj = nn.Linear(token_dim, cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_tokens: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([self.global_proj(image_embeds)[:, None], self.token_proj(image_tokens)], dim=1)
        return self.norm(tokens)


# ----------------------------------------------------------------------------------------------------------------------
# DAPE
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class DAPEOutput(PromptExtraction):
    """:class:`PromptExtraction` plus the tensors behind it (``B`` images, ``V`` tags).

    Args:
        image_embeds (`(B, E)`): pooled, projected CLIP image embeddings (not normalised).
        image_tokens (`(B, N, W)`): patch tokens after the tower's final LayerNorm.
        similarities (`(B, V)`): cosine similarity of each image with each tag.
        tag_logits (`(B, V)`): ``logit_scale.exp() * similarities`` (CLIP's logits).
    """

    image_embeds: torch.Tensor | None = None
    image_tokens: torch.Tensor | None = None
    similarities: torch.Tensor | None = None
    tag_logits: torch.Tensor | None = None


class DAPE(ModelMixin, ConfigMixin, PromptExtractor):
    r"""Degradation-aware prompt extractor (SeeSR, Sec. 3.1) on an open_clip ViT with LoRA.

    ``dape(images)`` with ``images`` ``(B, 3, H, W)`` in [0, 1] (any size: resized to the tower's ``image_size``
    with antialiased bicubic, then normalised with ``image_mean`` / ``image_std``) returns a :class:`DAPEOutput`:
    ``hard_prompts`` (top-``top_k`` tags with cosine similarity ``>= threshold``), ``soft_prompts`` ``(B, 1 + N,
    cross_attention_dim)`` and the embeddings. Build one with :meth:`from_open_clip` (random weights, a local
    checkpoint file or an open_clip tag) or load one with :meth:`from_pretrained`; the constructor itself makes the
    architecture only (random tower, zero tag embeddings), as ``from_config`` does.

    Args:
        open_clip_config (`dict`): the open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...);
            ``None``: the built-in config of ``open_clip_model``.
        open_clip_model (`str`): the open_clip model name (informative when ``open_clip_config`` is given).
        base_checkpoint (`str`, *optional*): the open_clip checkpoint the frozen tower was read from.
        vocabulary (`list[str]`): the tags; ``tag_embeddings`` has one row per tag.
        tag_template (`str`): how the tags were turned into text for the text tower.
        image_mean / image_std (`tuple[float, float, float]`): input normalisation of the tower.
        lora_rank / lora_alpha: LoRA rank and scale (``alpha / rank``); ``lora_alpha`` ``None``: ``rank``.
        lora_target_modules / lora_target_parameters (`list[str]`, *optional*): peft targets (module names / names
            of weight parameters in the tower); ``None``: :func:`default_lora_targets`.
        cross_attention_dim (`int`): width of the soft prompts.
        top_k (`int`), threshold (`float`, *optional*): default tag selection (cosine similarity; CLIP's matching
            image-text pairs typically score 0.2-0.35).
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        open_clip_config: dict | None = None,
        open_clip_model: str = "ViT-B-16",
        base_checkpoint: str | None = None,
        vocabulary: list[str] | None = None,
        tag_template: str = DEFAULT_TAG_TEMPLATE,
        image_mean: tuple[float, float, float] = _OPENAI_MEAN,
        image_std: tuple[float, float, float] = _OPENAI_STD,
        lora_rank: int = 8,
        lora_alpha: float | None = None,
        lora_target_modules: list[str] | None = None,
        lora_target_parameters: list[str] | None = None,
        cross_attention_dim: int = 1024,
        top_k: int = 8,
        threshold: float | None = 0.2,
    ):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        cfg = _model_config(open_clip_model, open_clip_config)
        if lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {lora_rank}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        vocabulary = load_vocabulary(vocabulary)
        visual = _build_visual(cfg)
        modules, parameters = default_lora_targets(visual)
        modules = modules if lora_target_modules is None else list(lora_target_modules)
        parameters = parameters if lora_target_parameters is None else list(lora_target_parameters)
        lora_config = LoraConfig(
            r=int(lora_rank),
            lora_alpha=float(lora_rank if lora_alpha is None else lora_alpha),
            lora_dropout=0.0,
            target_modules=modules or None,
            target_parameters=parameters or None,
            bias="none",
        )
        self.visual = get_peft_model(visual, lora_config)  # base frozen, LoRA trainable
        _settle_parameter_order(self.visual)
        self.image_size = tuple(visual.image_size)
        self.projector = SoftPromptProjector(
            token_dim=visual.transformer.width, embed_dim=cfg["embed_dim"], cross_attention_dim=cross_attention_dim
        )
        self.register_buffer("tag_embeddings", torch.zeros(len(vocabulary), cfg["embed_dim"]))
        self.register_buffer("logit_scale", torch.zeros(()))  # log of CLIP's temperature, as open_clip stores it
        self.register_buffer("_mean", torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.vocabulary = vocabulary

    # ------------------------------------------------------------------------------------------------ construction

    @classmethod
    def from_open_clip(
        cls,
        model_name: str = "ViT-B-16",
        pretrained: str | os.PathLike | None = None,
        *,
        model_config: dict | None = None,
        vocabulary: str | os.PathLike | Sequence[str] | None = None,
        tag_template: str = DEFAULT_TAG_TEMPLATE,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        lora_rank: int = 8,
        lora_alpha: float | None = None,
        lora_target_modules: Sequence[str] | None = None,
        lora_target_parameters: Sequence[str] | None = None,
        cross_attention_dim: int = 1024,
        top_k: int = 8,
        threshold: float | None = 0.2,
    ) -> DAPE:
        """A fresh DAPE (LoRA at zero, so it equals the original model) from an open_clip model.

        Args:
            model_name: an open_clip model name (``open_clip.list_models()``), or a label when ``model_config``
                is given.
            pretrained: a local open_clip checkpoint file (``.bin``, ``.pt``, ``.safetensors``), an open_clip
                pretrained tag (downloaded by open_clip), or ``None`` for random weights (tests).
            model_config: an explicit open_clip model config (e.g. a tiny ViT for tests) instead of the built-in one.
            vocabulary: tags (a list or a file with one per line); ``None``: :data:`DEFAULT_VOCABULARY`.
            tag_template: the text the text tower embeds for a tag.
            image_mean / image_std: input normalisation; ``None``: the pretrained tag's, else OpenAI CLIP's.
            The rest: as the constructor.
        """
        cfg = _model_config(model_name, model_config)
        checkpoint, tag_cfg = (None, {}) if pretrained is None else _resolve_checkpoint(model_name, pretrained)
        if tag_cfg.get("quick_gelu"):  # weights trained with QuickGELU (open_clip's tag config says so)
            cfg["quick_gelu"] = True
        clip = _build_clip(cfg)
        if checkpoint is not None:
            import open_clip

            open_clip.load_checkpoint(clip, checkpoint)
        tags = load_vocabulary(vocabulary)
        tokenizer = _tokenizer(model_name, cfg, builtin=model_config is None)
        tag_embeddings = encode_vocabulary(clip, tokenizer, tags, tag_template)
        dape = cls(
            open_clip_config=cfg,
            open_clip_model=model_name,
            base_checkpoint=checkpoint,
            vocabulary=tags,
            tag_template=tag_template,
            image_mean=tuple(float(v) for v in (image_mean or tag_cfg.get("mean") or _OPENAI_MEAN)),
            image_std=tuple(float(v) for v in (image_std or tag_cfg.get("std") or _OPENAI_STD)),
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_target_modules=None if lora_target_modules is None else list(lora_target_modules),
            lora_target_parameters=None if lora_target_parameters is None else list(lora_target_parameters),
            cross_attention_dim=cross_attention_dim,
            top_k=top_k,
            threshold=threshold,
        )
        dape.load_base_state_dict(clip.visual.state_dict())
        with torch.no_grad():
            dape.tag_embeddings.copy_(tag_embeddings)
            dape.logit_scale.copy_(clip.logit_scale.detach().reshape(()))
        return dape.eval()

    # ------------------------------------------------------------------------------------------------ weights

    def _base_keys(self) -> dict[str, str]:
        """``{open_clip tower key: key in self.visual's state dict}`` for the frozen (non-LoRA) weights."""
        keys = {}
        for key in self.visual.base_model.model.state_dict():
            if "lora_" not in key:
                keys[key.replace(".base_layer", "")] = key
        return keys

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen image tower's weights under open_clip's own names (``conv1.weight``, ...)."""
        state = self.visual.base_model.model.state_dict()
        return {name: state[key] for name, key in self._base_keys().items()}

    def load_base_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load open_clip image-tower weights (``model.visual.state_dict()`` names) into the frozen tower; every key
        must match."""
        keys = self._base_keys()
        missing, unexpected = sorted(set(keys) - set(state_dict)), sorted(set(state_dict) - set(keys))
        if missing or unexpected:
            raise ValueError(f"image tower weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
        target = self.visual.base_model.model.state_dict()
        with torch.no_grad():
            for name, key in keys.items():
                if target[key].shape != state_dict[name].shape:
                    raise ValueError(
                        f"{name}: shape {tuple(state_dict[name].shape)}, expected {tuple(target[key].shape)}"
                    )
                target[key].copy_(state_dict[name])

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA weights, with peft's adapter-file names (``base_model.model.<module>.lora_A.weight``)."""
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.visual)

    def set_vocabulary(self, vocabulary: Sequence[str], tag_embeddings: torch.Tensor) -> None:
        """Replace the tags and their text embeddings ``(V, E)`` (normalised here), e.g. with
        :func:`encode_vocabulary` of the same CLIP model's text tower."""
        tags = load_vocabulary(list(vocabulary))
        if tag_embeddings.shape != (len(tags), self.tag_embeddings.shape[1]):
            raise ValueError(
                f"tag_embeddings must be ({len(tags)}, {self.tag_embeddings.shape[1]}), "
                f"got {tuple(tag_embeddings.shape)}"
            )
        emb = F.normalize(tag_embeddings.detach().float(), dim=-1)
        self.tag_embeddings = emb.to(device=self.tag_embeddings.device, dtype=self.tag_embeddings.dtype)
        self.vocabulary = tags
        self.register_to_config(vocabulary=tags)

    # ------------------------------------------------------------------------------------------------ save / load

    def save_pretrained(
        self, save_directory: str | os.PathLike, is_main_process: bool = True, save_base: bool | None = None, **kwargs
    ) -> None:
        """Write the folder layout of the module docstring, atomically.

        Args:
            save_base: write the frozen tower (``base_model.safetensors``). ``None``: only when there is no
                ``base_checkpoint`` file to re-read it from (random weights, or the file is gone). Pass ``True`` if
                you changed the tower's weights after loading them from the checkpoint.
            kwargs: accepted for compatibility with diffusers' savers, ignored.
        """
        from safetensors.torch import save_file

        from sr_diffusion.utils import atomic_directory

        if not is_main_process:
            return
        if save_base is None:
            save_base = self.config.base_checkpoint is None or not Path(self.config.base_checkpoint).is_file()
        if not save_base and self.config.base_checkpoint is None:
            raise ValueError("save_base=False needs a base_checkpoint to re-read the frozen tower from")

        def contiguous(state):
            return {k: v.detach().cpu().contiguous() for k, v in state.items()}

        with atomic_directory(save_directory) as tmp:
            self.save_config(tmp)
            lora_dir = tmp / _LORA_DIR
            lora_dir.mkdir()
            self.visual.peft_config["default"].save_pretrained(lora_dir)
            save_file(contiguous(self.lora_state_dict()), lora_dir / "adapter_model.safetensors")
            self.projector.save_pretrained(tmp / _PROJECTOR_DIR)
            buffers = {"tag_embeddings": self.tag_embeddings, "logit_scale": self.logit_scale}
            save_file(contiguous(buffers), tmp / _BUFFERS)
            if save_base:
                save_file(contiguous(self.base_state_dict()), tmp / _BASE_WEIGHTS)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        base_checkpoint: str | os.PathLike | None = None,
        torch_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> DAPE:
        """Load a folder written by :meth:`save_pretrained` (in eval mode).

        Args:
            base_checkpoint: where to read the frozen tower when the folder does not hold it (overrides the path
                recorded in the config, e.g. after moving the checkpoint).
            torch_dtype: cast the model to this dtype.
            kwargs: accepted for compatibility with diffusers' loaders, ignored.
        """
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        directory = Path(pretrained_model_name_or_path)
        if subfolder:
            directory = directory / subfolder
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{directory} is not a DAPE folder (no config.json)")
        config = cls.load_config(directory)
        if base_checkpoint is not None:
            config["base_checkpoint"] = str(Path(base_checkpoint).resolve())
        model = cls.from_config(config)

        # 1. the frozen tower
        if (directory / _BASE_WEIGHTS).is_file():
            model.load_base_state_dict(load_file(directory / _BASE_WEIGHTS))
        elif model.config.base_checkpoint is not None:
            import open_clip

            state = open_clip.factory.load_state_dict(model.config.base_checkpoint)
            model.load_base_state_dict({k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")})
        else:
            raise FileNotFoundError(f"{directory} holds no {_BASE_WEIGHTS} and its config names no base_checkpoint")

        # 2. LoRA, projector, tag embeddings
        lora = load_file(directory / _LORA_DIR / "adapter_model.safetensors")
        result = set_peft_model_state_dict(model.visual, lora)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"unexpected LoRA weights in {directory / _LORA_DIR}: {result.unexpected_keys[:5]}")
        missing = set(model.lora_state_dict()) - set(lora)
        if missing:
            raise ValueError(f"missing LoRA weights in {directory / _LORA_DIR}: {sorted(missing)[:5]}")
        projector = SoftPromptProjector.from_pretrained(directory / _PROJECTOR_DIR)
        model.projector.load_state_dict(projector.state_dict())
        buffers = load_file(directory / _BUFFERS)
        with torch.no_grad():
            model.tag_embeddings.copy_(buffers["tag_embeddings"])
            model.logit_scale.copy_(buffers["logit_scale"])
        if torch_dtype is not None:
            model.to(torch_dtype)
        return model.eval()

    # ------------------------------------------------------------------------------------------------ forward

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> the tower's normalised ``(B, 3, S, S)`` input (antialiased bicubic)."""
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"expected float RGB images (B, 3, H, W) in [0, 1], got {tuple(images.shape)} {images.dtype}"
            )
        x = images.to(device=self._mean.device, dtype=torch.float32)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        x = (x.clamp(0, 1) - self._mean.float()) / self._std.float()
        return x.to(self.dtype)

    def encode(self, images: torch.Tensor, use_lora: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image_embeds (B, E), image_tokens (B, N, W))``; ``use_lora=False``: the original (teacher) tower."""
        x = self.preprocess(images)
        if use_lora:
            return self.visual(x)
        with self.visual.disable_adapter():
            return self.visual(x)

    def forward(
        self,
        images: torch.Tensor,
        top_k: int | None = None,
        threshold: float | None = None,
        *,
        use_lora: bool = True,
        return_prompts: bool = True,
    ) -> DAPEOutput:
        """Prompts and embeddings of ``images`` ``(B, 3, H, W)`` in [0, 1].

        Args:
            top_k / threshold: override the config's tag selection (``None``: the config's; ``threshold=-1`` keeps
                all ``top_k`` tags).
            use_lora: ``False`` runs the original tower (the teacher).
            return_prompts: ``False`` skips the hard and soft prompts (training needs the tensors only).
        """
        image_embeds, image_tokens = self.encode(images, use_lora=use_lora)
        similarities = F.normalize(image_embeds.float(), dim=-1) @ self.tag_embeddings.float().T
        out = DAPEOutput(
            hard_prompts=[],
            image_embeds=image_embeds,
            image_tokens=image_tokens,
            similarities=similarities,
            tag_logits=self.logit_scale.float().exp() * similarities,
        )
        if return_prompts:
            top_k = self.config.top_k if top_k is None else top_k
            threshold = self.config.threshold if threshold is None else threshold
            out.tags, out.tag_scores = select_tags(similarities, self.vocabulary, top_k, threshold)
            out.hard_prompts = [", ".join(tags) for tags in out.tags]
            out.soft_prompts = self.projector(image_tokens, image_embeds)
        return out
