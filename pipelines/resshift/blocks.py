"""ResShift's building blocks, shared by :class:`~sr_diffusion.pipelines.ResShiftPipeline` and training
(:mod:`sr_diffusion.training.resshift`): the reference's chop (tile) settings, the LR conditioning and the denoiser
call.
"""

from __future__ import annotations

import torch
from diffusers import ModelMixin, UNet2DModel

import sr_diffusion.models  # noqa: F401  (diffusers resolves saved components from sys.modules)
import sr_diffusion.schedulers  # noqa: F401
from sr_diffusion.resize import resize

#: The reference ``inference_resshift.py``'s ``--chop_size`` default (LR pixels, for ×4; ×``4 // sf`` for ``sf < 4``):
#: an LR image with a side above it is sampled in tiles of this size (``sampler.py``, ``ImageSpliterTh``)
ORIGINAL_CHOP_SIZE = 512

#: The stride of those tiles: ``--chop_stride -1`` gives ``(512 - 64) · (4 // sf)`` (64 LR pixels of overlap at ×4)
ORIGINAL_CHOP_STRIDE = 448


# ----------------------------------------------------------------------------------------------------------------------
# Conditioning helpers, shared with training (sr_diffusion.training.resshift) so both feed the denoiser alike
# ----------------------------------------------------------------------------------------------------------------------


def upsample_lr(lr: torch.Tensor, upscale: int) -> torch.Tensor:
    """``y_0`` in pixel space: bicubic upsampling (torch's, as the reference ``F.interpolate``) of the LR image.

    Args:
        lr: ``(N, 3, h, w)`` in [-1, 1]. upscale: ``s``.

    Returns:
        ``(N, 3, s·h, s·w)``, not clamped.
    """
    h, w = lr.shape[-2:]
    return resize(lr, size=(h * upscale, w * upscale), mode="bicubic")


def resshift_lq(unet: ModelMixin, lr: torch.Tensor, sample_size: tuple[int, int]) -> torch.Tensor | None:
    """The ``lq`` input of a ResShift-style denoiser: the LR image at ``lq_scale`` × the chain's size.

    The LR image itself when it already has that size (the released latent ×4 models), else its bicubic resize
    (pixel space: the upsampled LR image, i.e. ``y_0``). None for models without LR conditioning (``cond_lq=False``)
    and for ``UNet2DModel`` (conditioned by concatenation instead).

    Args:
        unet: the denoiser. lr: ``(N, 3, h, w)`` in [-1, 1]. sample_size: ``(H_s, W_s)`` of ``x_t``.
    """
    if isinstance(unet, UNet2DModel) or not getattr(unet.config, "cond_lq", True):
        return None
    r = int(getattr(unet, "lq_scale", 1))
    size = (sample_size[0] * r, sample_size[1] * r)
    if tuple(lr.shape[-2:]) == size:
        return lr
    shrink = size[0] < lr.shape[-2] or size[1] < lr.shape[-1]
    return resize(lr, size=size, mode="bicubic", antialias=shrink)


def resshift_model_output(
    unet: ModelMixin,
    *,
    scaled_sample: torch.Tensor,
    timestep: torch.Tensor | int,
    lr_latents: torch.Tensor,
    lq: torch.Tensor | None,
) -> torch.Tensor:
    """One denoiser evaluation ``f_theta(x_t, y_0, t)``.

    Args:
        unet: a ``ResShiftUNet`` (or any model with its call ``unet(sample, timestep, lq=..., return_dict=False)``),
            or a ``UNet2DModel`` with ``in_channels = 2·C`` (either possibly inside a ``DistributedDataParallel``).
        scaled_sample: ``scheduler.scale_model_input(x_t, t)``, ``(N, C, H_s, W_s)``.
        timestep: the integer timestep ``t`` (0-based), a scalar or ``(N,)``.
        lr_latents: ``y_0``, ``(N, C, H_s, W_s)``: concatenated for a ``UNet2DModel``, unused otherwise.
        lq: from :func:`resshift_lq` (None for a ``UNet2DModel``).

    Returns:
        The model output ``(N, C, H_s, W_s)`` in the chain's dtype (what ``scheduler.prediction_type`` says).
    """
    inner = getattr(unet, "module", unet)  # a DistributedDataParallel-wrapped model in training
    dtype = inner.dtype
    timesteps = torch.as_tensor(timestep, device=scaled_sample.device)
    if timesteps.ndim == 0:
        timesteps = timesteps.expand(scaled_sample.shape[0])
    if isinstance(inner, UNet2DModel):
        model_input = torch.cat([scaled_sample, lr_latents], dim=1).to(dtype)
        out = unet(model_input, timesteps, return_dict=False)[0]
    else:
        lq = None if lq is None else lq.to(dtype)
        out = unet(scaled_sample.to(dtype), timesteps, lq=lq, return_dict=False)[0]
    return out.to(scaled_sample.dtype)


def original_chop(upscale: int) -> tuple[int, int]:
    """``(chop_size, chop_stride)`` of the reference ``inference_resshift.py`` (``ResShift@3ce1d81``) at its defaults
    for an SR factor ``upscale``: ``(512, 448)`` LR pixels, times ``4 // upscale`` below ×4 (times 1 above ×4,
    where the reference would give 0)."""
    factor = max(1, 4 // upscale)
    return ORIGINAL_CHOP_SIZE * factor, ORIGINAL_CHOP_STRIDE * factor


def original_chop_starts(length: int, chop_size: int, chop_stride: int) -> list[int]:
    """Where the reference's tiles start along a side of ``length`` LR pixels (``utils/util_image.py``,
    ``ImageSpliterTh.extract_starts``): ``[0]`` when the side fits in one tile, else every ``chop_stride`` from 0,
    each start past ``length - chop_size`` moved back to it, duplicates dropped (order kept)."""
    if length <= chop_size:
        return [0]
    starts = []
    for start in range(0, length, chop_stride):
        start = min(start, length - chop_size)
        if start not in starts:
            starts.append(start)
    return starts
