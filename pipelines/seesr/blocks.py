"""SeeSR's building blocks, shared by :class:`~sr_diffusion.pipelines.SeeSRPipeline` and training
(:mod:`sr_diffusion.training.seesr`): the test script's size rule and prompt string, the scheduler, and the checks
of the image-prompt attention add-ons.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    DDPMScheduler,
)

import sr_diffusion.models  # noqa: F401  (diffusers resolves saved components from sys.modules)
import sr_diffusion.prompts.dape  # noqa: F401  (the DAPE prompt extractor, an optional component)
from sr_diffusion.models.block_attention import BlockAttentions
from sr_diffusion.models.seesr import SEESR_IMAGE_ATTENTIONS

#: ``test_seesr.py``'s ``--process_size``: an LR image with a side under ``process_size // upscale`` is resized up
SEESR_PROCESS_SIZE = 512


def seesr_process_steps(
    height: int, *, width: int, upscale: int, process_size: int, multiple: int = 8
) -> list[tuple[tuple[int, int], str]]:
    """The resizes ``test_seesr.py`` applies to an 8-bit LR image of ``height`` × ``width`` before sampling, as
    ``[((height, width), PIL resample), ...]``, all PIL bicubic (``Image.resize``'s default):

    1. if a side is under ``process_size // upscale``: ``scale = (process_size // upscale) / min(w, h)`` and the LR
       image to ``(int(scale · h), int(scale · w))`` (the script's float arithmetic);
    2. ``×upscale``;
    3. both sides floored to a multiple of ``multiple`` (8: the VAE factor).

    The output is sampled at the last size and resized back to ``upscale ×`` the input (PIL bicubic)."""
    h, w = height, width
    steps = []
    small = process_size // upscale
    if w < small or h < small:
        scale = small / min(w, h)
        h, w = int(scale * h), int(scale * w)
        steps.append(((h, w), "bicubic"))
    h, w = h * upscale, w * upscale
    steps.append(((h, w), "bicubic"))
    steps.append(((h // multiple * multiple, w // multiple * multiple), "bicubic"))
    return steps


def seesr_original_prompt(tags: str | None, prompt: str | None, added_prompt: str | None) -> str:
    """The prompt ``test_seesr.py`` builds: ``f"{tags}, {prompt},"`` (``get_validation_prompt``, RAM/DAPE's
    ``", "``-joined tags, the user's prompt ``""`` by default) followed by ``added_prompt`` with no separator."""
    user = "" if prompt is None or prompt.strip().lower() == "auto" else prompt
    return f"{tags or ''}, {user}," + (added_prompt or "")


# ----------------------------------------------------------------------------------------------------------------------
# Scheduler (shared with training: sr_diffusion.training.seesr) and add-on checks
# ----------------------------------------------------------------------------------------------------------------------


def seesr_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """The original's sampler: ``DDPMScheduler.from_pretrained(<SD 2-base>/scheduler)``, i.e. SD's schedule
    (``scaled_linear`` 0.00085 → 0.012 over 1000 steps), "fixed small" variance, no clipping, "leading" spacing with
    ``steps_offset=1``."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        variance_type="fixed_small",
        clip_sample=False,
        prediction_type=prediction_type,
        timestep_spacing="leading",
        steps_offset=1,
    )


def _cross_attention_positions(model: torch.nn.Module) -> list[str]:
    """``"{block}.image_attentions.{j}"`` for every text cross-attention of ``model``, in execution order."""
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(getattr(model, "down_blocks", None) or [])]
    if getattr(model, "mid_block", None) is not None:
        blocks.append(("mid_block", model.mid_block))
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(getattr(model, "up_blocks", None) or [])]
    return [
        f"{name}.{SEESR_IMAGE_ATTENTIONS}.{j}"
        for name, block in blocks
        for j in range(len(getattr(block, "attentions", None) or []))
    ]


def _check_image_attentions(extra: Any, model: torch.nn.Module, what: str, model_name: str) -> int:
    """Check an image cross-attention add-on against its model; return its soft-prompt width."""
    if not isinstance(extra, BlockAttentions):
        raise ValueError(f"{what} must be a BlockAttentions (image cross-attention layers), got {type(extra).__name__}")
    if extra.config.name != SEESR_IMAGE_ATTENTIONS:
        raise ValueError(f"{what} holds {extra.config.name!r} layers, not SeeSR's {SEESR_IMAGE_ATTENTIONS!r}")
    extra.check_model(model)
    expected = _cross_attention_positions(model)
    if extra.positions != expected:
        raise ValueError(
            f"{what} has layers at {extra.positions}, but the {model_name} has cross-attentions at {expected}: it "
            f"was built for another model (build it with seesr_image_attentions({model_name}, context_dim))"
        )
    dims = {int(layer["cross_attention_dim"]) for layer in extra.config.layers}
    if len(dims) != 1:
        raise ValueError(f"{what} has mixed soft-prompt widths {sorted(dims)}")
    return dims.pop()
