"""PASD's building blocks, shared by :class:`~sr_diffusion.pipelines.PASDPipeline` and training
(:mod:`sr_diffusion.training.pasd`): the test script's settings and size rule, its prompt string, the scheduler, the
PACA contexts and the conditioned denoiser call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import (
    SchedulerMixin,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)

import sr_diffusion.models  # noqa: F401  (diffusers resolves saved components from sys.modules)
from sr_diffusion.models.block_attention import BlockAttentions

#: ``test_pasd.py``'s ``--added_prompt``: appended after the user's prompt and the extracted tags
PASD_ADDED_PROMPT = "clean, high-resolution, 8k"
#: ``test_pasd.py``'s ``--negative_prompt``
PASD_NEGATIVE_PROMPT = "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed"
#: ``test_pasd.py``'s ``--process_size``: the upsampled image's short side is brought up to this (bilinear)
PASD_PROCESS_SIZE = 768


def pasd_process_steps(
    height: int, *, width: int, upscale: int, process_size: int, multiple: int = 8
) -> list[tuple[tuple[int, int], str]]:
    """The resizes ``test_pasd.py`` applies to an 8-bit LR image of ``height`` × ``width`` before sampling, as
    ``[((height, width), PIL resample), ...]``:

    1. ``×upscale``, PIL bicubic (``Image.resize``'s default);
    2. if the short side is then under ``process_size``: ``transforms.Resize(process_size, BILINEAR)``, the short side
       to ``process_size`` and the long one to ``int(process_size · long / short)``;
    3. both sides floored to a multiple of ``multiple`` (8: the VAE factor), PIL bicubic.

    The output is sampled at the last size and resized back to ``upscale ×`` the input (PIL bicubic)."""
    h, w = height * upscale, width * upscale
    steps = [((h, w), "bicubic")]
    if min(h, w) < process_size:
        if w <= h:
            h, w = int(process_size * h / w), process_size
        else:
            h, w = process_size, int(process_size * w / h)
        steps.append(((h, w), "bilinear"))
    steps.append(((h // multiple * multiple, w // multiple * multiple), "bicubic"))
    return steps


def pasd_original_prompt(extracted: str | None, prompt: str | None, added_prompt: str | None) -> str:
    """The prompt ``test_pasd.py`` builds (``get_validation_prompt`` + ``--added_prompt``): with a caption
    ``extracted`` (``--high_level_info caption``, the default), ``caption`` or ``f"{caption} {prompt}"``; without one,
    ``""`` or ``f"{prompt}, "``; then ``added_prompt`` appended with no separator (the script's ``+=``)."""
    user = "" if prompt is None or prompt.strip().lower() == "auto" else prompt
    if extracted is not None:
        text = extracted if user == "" else f"{extracted} {user}"
    else:
        text = "" if user == "" else f"{user}, "
    return text + (added_prompt or "")


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
    *,
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
