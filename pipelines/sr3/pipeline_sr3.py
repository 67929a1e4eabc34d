"""SR3: image super-resolution by iterative refinement, a pixel-space DDPM conditioned on the upsampled LR image.

Paper: C. Saharia, J. Ho, W. Chan, T. Salimans, D. J. Fleet, M. Norouzi, "Image Super-Resolution via Iterative
Refinement", TPAMI 2022 (arXiv:2104.07636), Sec. 2 (Eq. 4-6: the objective with a continuous noise level; Eq. 8-10:
the sampler), and the widely used re-implementation (``Janspiry/Image-Super-Resolution-via-Iterative-Refinement``,
``model/sr3_modules/diffusion.py``; facts only). Notation:

- ``x``: the LR image ``(N, 3, h, w)`` bicubic-upsampled ×``upscale`` to ``(N, 3, s·h, s·w)``, in [-1, 1]: with PIL on
  the 8-bit image, as the re-implementation's data pipeline (:func:`sr3_upsample`), for training and sampling alike;
- ``y_t = gamma y_0 + sqrt(1 - gamma^2) eps`` with ``gamma = sqrt(alpha_bar)`` the *noise level* (Eq. 4; the
  paper's ``sqrt(gamma)``), the chain running at the HR size in pixel space;
- the denoiser ``f_theta(cat([x, y_t], dim=1), c · gamma)`` predicts ``eps``: a diffusers ``UNet2DModel`` with
  ``in_channels = 6``, ``out_channels = 3``, or the re-implementation's own UNet
  (:class:`~sr_diffusion.models.sr3_unet.SR3UNet`, ``in_channel = 6``, ``out_channel = 3``; its released weights
  convert with :func:`sr_diffusion.conversion.convert_sr3_pipeline`).

Noise-level conditioning: SR3 conditions the denoiser on ``gamma`` itself, not on the step index, so that one model
serves any number of steps and any schedule (Sec. 2.4). diffusers' sinusoidal ``Timesteps`` embedding is built for
inputs in ``[0, 1000)`` (its highest frequency is 1 / period ``2 pi``): fed ``gamma ∈ [0, 1]`` directly nearly every
channel would be constant. The pipeline passes ``noise_level_scale · gamma`` (registered in the config, 1000 by
default), which spreads ``gamma`` over the range the embedding resolves; the re-implementation feeds ``gamma`` itself
to a positional encoding of its own (``SR3UNet``): its converted weights run with ``noise_level_scale = 1``. At
sampling time ``gamma`` is ``sqrt(alpha_bar_t)`` of the scheduler's current timestep (linearly interpolated for
schedulers with fractional timesteps); in training it is drawn uniformly between the neighbouring steps' values
(:mod:`sr_diffusion.training.sr3`).

The scheduler is any diffusers scheduler that ends at clean samples and has ``alphas_cumprod`` (DDPM, the paper's
sampler, by default; DDIM, DPM-Solver, Euler, ... for fewer steps). ``strength < 1`` starts from the upsampled LR image
noised to the timestep ``strength`` of the way into the chain and runs only that part of the steps (img2img).

Defaults and the re-implementation (``Janspiry/Image-Super-Resolution-via-Iterative-Refinement`` @ ``01d27a7``,
``sr.py`` / ``infer.py`` with ``config/sr_sr3_16_128.json``): the condition is made the same way (PIL bicubic on the
8-bit LR image), and with the converted weights and scheduler (DDPM, 2000 steps) the sampler is the same given the
same noise. One default differs: ``num_inference_steps`` is 100, where the original samples all 2000 of its trained
steps; ``match_original=True`` (or ``num_inference_steps=2000``) runs them all.

Sizes: the LR image is padded on the bottom/right (reflect) so that the HR size is a multiple of the UNet's total
downsampling, and the output is cropped back, never resized: exactly ``upscale`` × the input size, for any size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor

from sr_diffusion.image_processor import ImageInput, SRImageProcessor
from sr_diffusion.resize import pil_resize, resize
from sr_diffusion.utils import is_int, is_number

from ..call_docs import shared_call_docs
from ..pipeline_utils import NoiseSchedulerSRMixin

__all__ = ["SR3_UPSAMPLE_MODES", "SR3Pipeline", "sr3_model_output", "sr3_noise_level", "sr3_upsample"]


# ----------------------------------------------------------------------------------------------------------------------
# Conditioning helpers, shared with training (sr_diffusion.training.sr3) so both feed the denoiser alike
# ----------------------------------------------------------------------------------------------------------------------


SR3_UPSAMPLE_MODES = ("pil", "bicubic")


def sr3_upsample(lr: torch.Tensor, upscale: int, mode: str = "pil") -> torch.Tensor:
    """``x``: the bicubic upsampling of the LR image, ``(N, 3, h, w)`` → ``(N, 3, s·h, s·w)``, both in [-1, 1].

    Args:
        lr: the LR image in [-1, 1], on any device.
        upscale: ``s``.
        mode: ``"pil"`` (default): PIL's bicubic on the 8-bit image (:func:`sr_diffusion.resize.pil_resize`), as the
            re-implementation's data pipeline makes its condition (``data/prepare_data.py`` resizes the 8-bit LR
            image with ``Image.BICUBIC`` and stores it as PNG; ``data/LRHR_dataset.py`` reads it back as
            ``k / 255 · 2 - 1``): the LR image is quantised to 8 bits first (lossless for an image read from an
            8-bit file) and the result is a multiple of ``2 / 255`` in [-1, 1]; not differentiable. ``"bicubic"``:
            torch's float bicubic (``F.interpolate``), not quantised nor clamped: up to 6-8 8-bit levels away from
            PIL's near edges.
    """
    if mode not in SR3_UPSAMPLE_MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, SR3_UPSAMPLE_MODES))}, got {mode!r}")
    h, w = lr.shape[-2:]
    size = (h * upscale, w * upscale)
    if mode == "bicubic":
        return resize(lr, size=size, mode="bicubic")
    return pil_resize((lr + 1.0) / 2.0, size, "bicubic") * 2.0 - 1.0


def sr3_noise_level(alphas_cumprod: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
    """``gamma = sqrt(alpha_bar_t)`` at a (possibly fractional) timestep, linearly interpolating ``alpha_bar``.

    Args:
        alphas_cumprod: the scheduler's ``alpha_bar``, ``(T,)``. timestep: a scalar or ``(N,)``.

    Returns:
        ``gamma`` in float32, the shape of ``timestep``.
    """
    ab = alphas_cumprod.float().cpu()
    t = torch.as_tensor(timestep).float().cpu().clamp(0, len(ab) - 1)
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=len(ab) - 1)
    frac = t - lo.float()
    return ((1 - frac) * ab[lo] + frac * ab[hi]).sqrt()


def sr3_model_output(
    unet: ModelMixin,
    *,
    sample: torch.Tensor,
    upsampled_lr: torch.Tensor,
    noise_level: torch.Tensor,
    noise_level_scale: float,
) -> torch.Tensor:
    """One denoiser evaluation ``eps_theta(cat([x, y_t]), c · gamma)`` (Eq. 6 of the paper).

    Args:
        unet: a ``UNet2DModel`` with ``in_channels = 6`` (possibly inside a ``DistributedDataParallel``), or any
            model called as ``unet(sample, timestep, return_dict=False)``.
        sample: ``y_t`` (after the scheduler's ``scale_model_input``), ``(N, 3, H, W)``.
        upsampled_lr: ``x``, ``(N, 3, H, W)`` in [-1, 1].
        noise_level: ``gamma = sqrt(alpha_bar)``, a scalar or ``(N,)``.
        noise_level_scale: ``c``; the UNet's timestep input is ``c · gamma``.

    Returns:
        The predicted noise ``(N, 3, H, W)`` in ``sample``'s dtype.
    """
    inner = getattr(unet, "module", unet)
    dtype = inner.dtype
    n = sample.shape[0]
    level = torch.as_tensor(noise_level, device=sample.device, dtype=torch.float32)
    if level.ndim == 0:
        level = level.expand(n)
    model_input = torch.cat([upsampled_lr, sample], dim=1).to(dtype)
    out = unet(model_input, level * noise_level_scale, return_dict=False)[0]
    return out.to(sample.dtype)


class SR3Pipeline(NoiseSchedulerSRMixin, DiffusionPipeline):
    r"""Super-resolution with SR3 (Saharia et al., TPAMI 2022).

    Args:
        unet: a diffusers ``UNet2DModel``, an :class:`~sr_diffusion.models.sr3_unet.SR3UNet`, or any ``ModelMixin``
            called as ``unet(sample, t).sample`` with ``in_channels`` / ``out_channels`` (or the re-implementation's
            ``in_channel`` / ``out_channel``) in its config: 6 input channels (the upsampled LR image concatenated
            with ``y_t``) and 3 output channels, predicting the noise ``eps``.
        scheduler: a diffusers scheduler with ``alphas_cumprod`` that ends at clean samples (DDPM, DDIM,
            DPM-Solver, Euler, ...) and ``prediction_type="epsilon"``.
        upscale: the SR factor ``s`` (registered in the config).
        noise_level_scale: ``c``: the UNet's timestep input is ``c · sqrt(alpha_bar)`` (registered; see the module
            docstring).
    """

    model_cpu_offload_seq = "unet"
    default_num_inference_steps = 100  # __call__'s num_inference_steps=None without match_original (at most T)
    _latents_name = "the noise"
    _callback_tensor_inputs = ["latents", "upsampled_lr"]

    def __init__(
        self, unet: ModelMixin, scheduler: SchedulerMixin, upscale: int = 4, noise_level_scale: float = 1000.0
    ):
        super().__init__()
        if not is_int(upscale) or upscale < 1:
            raise ValueError(f"upscale must be a positive int, got {upscale!r}")
        if not is_number(noise_level_scale):
            raise ValueError(f"noise_level_scale must be a positive number, got {noise_level_scale!r}")
        if not noise_level_scale > 0:
            raise ValueError(f"noise_level_scale must be a positive number, got {noise_level_scale!r}")
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(upscale=upscale, noise_level_scale=float(noise_level_scale))
        self.image_processor = SRImageProcessor()
        self.check_components()

    # ------------------------------------------------------------------------------------------------------------------
    # Geometry
    # ------------------------------------------------------------------------------------------------------------------

    @property
    def noise_level_scale(self) -> float:
        """``c``: the UNet sees ``c · sqrt(alpha_bar)`` as its timestep."""
        return float(self.config.noise_level_scale)

    # (upscale, unet_input_multiple, lr_multiple and latent_shape: SRSamplingMixin's, in pixel space)

    # ------------------------------------------------------------------------------------------------------------------
    # Checks
    # ------------------------------------------------------------------------------------------------------------------

    def check_components(self) -> None:
        """Raise a ``ValueError`` for components that cannot work together."""
        if not isinstance(self.unet, ModelMixin):
            raise ValueError(f"unet must be a diffusers ModelMixin, got {type(self.unet).__name__}")
        config = self.unet.config
        in_channels = getattr(config, "in_channels", getattr(config, "in_channel", None))
        out_channels = getattr(config, "out_channels", getattr(config, "out_channel", None))
        if in_channels != 6:
            raise ValueError(
                f"unet has in_channels={in_channels}, but SR3 needs 6 (the upsampled RGB LR image concatenated with "
                "the noisy RGB image y_t)"
            )
        if out_channels != 3:
            raise ValueError(f"unet has out_channels={out_channels}, but SR3 predicts the RGB noise (3 channels)")
        self.check_noise_scheduler("SR3")  # alphas_cumprod also gives the noise level sqrt(alpha_bar_t) the UNet sees

    # ------------------------------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------------------------------

    def prepare_latents(
        self,
        upsampled_lr: torch.Tensor,
        *,
        timesteps: torch.Tensor,
        strength: float,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The chain's start ``(N, 3, H, W)``: the noise (the given ``latents``, or ``randn`` from ``generator``: one
        draw per generator of a list) times ``init_noise_sigma`` for ``strength = 1``; for ``strength < 1`` the
        upsampled LR image noised to ``timesteps[0]`` with it (``scheduler.add_noise``)."""
        if latents is None:
            noise = randn_tensor(
                upsampled_lr.shape, generator=generator, device=upsampled_lr.device, dtype=upsampled_lr.dtype
            )
        else:
            noise = latents.to(device=upsampled_lr.device, dtype=upsampled_lr.dtype)
        if strength >= 1:
            return noise * self.scheduler.init_noise_sigma
        t = timesteps[:1].repeat(upsampled_lr.shape[0])
        return self.scheduler.add_noise(upsampled_lr, noise, t)

    def _sample(
        self,
        lr: torch.Tensor,
        *,
        latents: torch.Tensor | None,
        progress_bar,
        num_inference_steps: int,
        strength: float,
        extra_step_kwargs: dict[str, Any],
        generator: torch.Generator | list[torch.Generator] | None,
        callback_on_step_end: Callable[..., dict[str, Any]] | None,
        callback_on_step_end_tensor_inputs: Sequence[str],
    ) -> torch.Tensor:
        """Run the chain for one (padded) LR image or tile: ``(N, 3, h, w)`` in [-1, 1] → ``(N, 3, s·h, s·w)``."""
        device, dtype = lr.device, self.unet.dtype

        # 4. Timesteps (again for every tile: multistep / PNDM / Euler schedulers keep state)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.get_timesteps(num_inference_steps, strength)
        self._num_timesteps = len(timesteps)

        # 5. Conditioning x (the upsampled LR image) and the start of the chain
        upsampled_lr = sr3_upsample(lr, self.upscale).to(dtype)
        latents = self.prepare_latents(
            upsampled_lr, timesteps=timesteps, strength=strength, generator=generator, latents=latents
        )
        alphas_cumprod = self.scheduler.alphas_cumprod

        # 6. Denoising loop: eps = f([x, y_t], c · sqrt(alpha_bar_t)), y_t -> y_{t-1}
        for i, t in enumerate(timesteps):
            if self.interrupt:
                continue
            scaled = self.scheduler.scale_model_input(latents, t)
            gamma = sr3_noise_level(alphas_cumprod, t).to(device)
            noise_pred = sr3_model_output(
                self.unet,
                sample=scaled,
                upsampled_lr=upsampled_lr,
                noise_level=gamma,
                noise_level_scale=self.noise_level_scale,
            )
            latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs).prev_sample

            state = {"latents": latents, "upsampled_lr": upsampled_lr}
            state = self.step_end_callback(
                callback_on_step_end,
                step=i,
                timestep=t,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                tensors=state,
            )
            latents, upsampled_lr = state["latents"], state["upsampled_lr"]
            progress_bar.update()

        return latents.clamp(-1.0, 1.0)

    @torch.no_grad()
    @shared_call_docs
    def __call__(
        self,
        image: ImageInput | Sequence[ImageInput],
        num_inference_steps: int | None = None,
        strength: float = 1.0,
        eta: float = 0.0,
        color_fix: str = "none",
        lr_consistency: bool = False,
        tile_size: int | None = None,
        tile_overlap: int = 32,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict[str, Any]] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        match_original: bool = False,
    ):
        r"""Upscale ``image`` by ``upscale``.

        Args:
            image: {image}
            num_inference_steps: ``1 <= S <=`` the scheduler's ``num_train_timesteps`` ``T``. None (default): 100 (or
                ``T`` if fewer); with ``match_original=True`` all ``T`` (the paper and the re-implementation sample all
                of their trained steps with DDPM: 2000 for the released models; DDIM and the like need fewer). A
                number is always used as given.
            strength: in (0, 1]: run the last ``int(S · strength)`` of the ``S`` steps, starting from the upsampled LR
                image noised to the first of them (img2img); 1 starts from pure noise, as the paper.
            eta: {eta}
            color_fix: {color_fix}
            lr_consistency: {lr_consistency}
            tile_size: sample the (padded) LR image in tiles of this side (LR pixels, a multiple of
                :attr:`lr_multiple`), blended linearly over ``tile_overlap`` LR pixels. Each tile runs its own chain
                with noise drawn, in order, from ``generator``.
            tile_overlap: {tile_overlap}
            generator: {generator}
            latents: the starting noise, of shape :meth:`latent_shape`: ``y_T`` before scaling by
                ``init_noise_sigma`` (``strength = 1``), else the noise added to the upsampled LR image; not with
                ``tile_size``.
            output_type: {output_type}
            return_dict: {return_dict}
            callback_on_step_end: called after every step (of every tile) as
                ``callback_on_step_end(self, step, timestep, callback_kwargs)``; the tensors it returns in its dict
                (``"latents"``: ``y_{t-1}``, ``"upsampled_lr"``: the condition ``x`` in [-1, 1]) replace the
                pipeline's.
            callback_on_step_end_tensor_inputs: {callback_on_step_end_tensor_inputs}
            match_original: reproduce the re-implementation's ``infer.py``: ``num_inference_steps=None`` runs all of the
                scheduler's trained steps (its only deviating default; the condition is PIL's bicubic on the 8-bit LR
                image either way). Give the converted DDPM scheduler and leave the output options at their defaults.

        Returns:
            ``SRPipelineOutput(images)`` or ``(images,)``; images are exactly ``upscale`` × the input size.
        """
        if not isinstance(match_original, bool):
            raise ValueError(f"match_original must be a bool, got {match_original!r}")
        if num_inference_steps is None:
            num_train = int(self.scheduler.config.num_train_timesteps)
            num_inference_steps = num_train if match_original else min(self.default_num_inference_steps, num_train)
        return self.upscale_with_strength(
            image,
            num_inference_steps=num_inference_steps,
            strength=strength,
            eta=eta,
            color_fix=color_fix,
            lr_consistency=lr_consistency,
            tile_size=tile_size,
            tile_overlap=tile_overlap,
            generator=generator,
            latents=latents,
            output_type=output_type,
            return_dict=return_dict,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
