"""StableSR's building blocks, shared by :class:`~sr_diffusion.pipelines.StableSRPipeline` and training
(:mod:`sr_diffusion.training.stablesr`): the original's respacing (``space_timesteps``), the scheduler, the replay
of a random state for per-patch chains, and the conditioned denoiser call.
"""

from __future__ import annotations

import torch
from diffusers import (
    DDPMScheduler,
    UNet2DConditionModel,
)

import sr_diffusion.models  # noqa: F401  (diffusers resolves saved components from sys.modules)
from sr_diffusion.models.stablesr_sft import StableSRSFT

from ..sd_base import gaussian_tile_weights

# ----------------------------------------------------------------------------------------------------------------------
# Schedule, tiling weights, and the conditioned denoiser call (shared with training: sr_diffusion.training.stablesr)
# ----------------------------------------------------------------------------------------------------------------------


def space_timesteps(num_train_timesteps: int, num_steps: int) -> list[int]:
    """The original's respacing (``space_timesteps(T, [S])`` of guided-diffusion, as StableSR's scripts call it): ``S``
    of the ``T`` trained steps, evenly over ``[0, T - 1]`` (both ends included), in descending order.

    The original walks the index up in float, ``x_0 = 0, x_{i+1} = x_i + (T - 1) / (S - 1)``, and keeps ``round(x_i)``
    (Python's round-half-to-even). The accumulated sum is not ``i · (T - 1) / (S - 1)``: where that product lands on
    ``k + 1/2`` the two round differently, so for 278 of the step counts ``S`` in ``1 … 1000`` the direct formula
    would give other steps. This follows the original's walk exactly."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"cannot take {num_steps} steps out of {num_train_timesteps}")
    stride = 1 if num_steps <= 1 else (num_train_timesteps - 1) / (num_steps - 1)
    steps, index = set(), 0.0
    for _ in range(num_steps):
        steps.add(round(index))
        index += stride
    return sorted(steps, reverse=True)


def stablesr_scheduler(prediction_type: str = "epsilon", num_train_timesteps: int = 1000) -> DDPMScheduler:
    """The original's sampler as a diffusers ``DDPMScheduler``: SD's schedule (``linear_start=0.00085,
    linear_end=0.012``, LDM's "linear" = diffusers' ``scaled_linear``), posterior variance "fixed small", no clipping
    of ``x_0``. ``prediction_type``: ``"epsilon"`` (the 512 model, SD 2.1-base) or ``"v_prediction"`` (768v)."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        variance_type="fixed_small",
        clip_sample=False,
        prediction_type=prediction_type,
    )


class RandomStateReplay:
    """Rewinds the random state a chain draws from to where it was when this was made: the given generator(s), or,
    with ``generator=None``, torch's global CPU (and CUDA) generators, as the original's ``seed_everything`` before
    every patch does."""

    def __init__(self, generator: torch.Generator | list[torch.Generator] | None):
        self.generators = [] if generator is None else generator if isinstance(generator, list) else [generator]
        self.states = [g.get_state() for g in self.generators]
        self.global_state = torch.get_rng_state() if generator is None else None
        self.cuda_states = torch.cuda.get_rng_state_all() if generator is None and torch.cuda.is_available() else None

    def rewind(self) -> None:
        for g, state in zip(self.generators, self.states):
            g.set_state(state)
        if self.global_state is not None:
            torch.set_rng_state(self.global_state)
        if self.cuda_states is not None:
            torch.cuda.set_rng_state_all(self.cuda_states)


#: StableSR's ``_gaussian_weights`` (``var = 0.01``), shared with PASD and SeeSR
stablesr_tile_weights = gaussian_tile_weights


def stablesr_noise_pred(
    unet: UNet2DConditionModel,
    *,
    time_aware_encoder: torch.nn.Module,
    sft: StableSRSFT,
    sample: torch.Tensor,
    timestep: torch.Tensor | int,
    lr_latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
) -> torch.Tensor:
    """One conditioned denoiser evaluation: ``unet(sample, t, text)`` with SFT modulation by ``E_time(z_lr, t)``.

    Args:
        unet: the frozen SD UNet. time_aware_encoder: a :class:`StableSRTimeAwareEncoder` (possibly wrapped by
            ``DistributedDataParallel``). sft: the SFT layers (unwrapped).
        sample: ``(B, 4, h, w)``, already through ``scheduler.scale_model_input``; ``B`` is a multiple of the LR
            batch ``N`` (``2N`` for classifier-free guidance: the encoder's maps are repeated).
        timestep: in the 1000-step scale, a scalar or ``(N,)``.
        lr_latents: ``z_lr`` ``(N, 4, h, w)``.
        encoder_hidden_states: the text embeddings ``(B, L, D)``.

    Returns:
        The UNet output ``(B, 4, h, w)`` in ``sample``'s dtype.
    """
    n, repeats = lr_latents.shape[0], sample.shape[0] // lr_latents.shape[0]
    t = torch.as_tensor(timestep, device=sample.device)
    t_lr = t.expand(n) if t.ndim == 0 else t[:n]
    features = time_aware_encoder(lr_latents, t_lr, return_dict=False)[0]
    if repeats > 1:
        features = [f.repeat(repeats, 1, 1, 1) for f in features]
    dtype = unet.dtype
    with sft.attach(unet, features):
        out = unet(sample.to(dtype), t, encoder_hidden_states=encoder_hidden_states.to(dtype), return_dict=False)[0]
    return out.to(sample.dtype)
