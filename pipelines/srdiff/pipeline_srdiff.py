"""SRDiff: single image super-resolution with a diffusion model of the residual, conditioned on an RRDB LR encoder.

Paper: H. Li, Y. Yang, M. Chang, S. Chen, H. Feng, Z. Xu, Q. Li, Y. Chen, "SRDiff: Single image super-resolution with
diffusion probabilistic models", Neurocomputing 479 (2022) 47-59, Sec. 3, and the authors' code (``LeiaLi/SRDiff``,
``models/diffusion.py``: ``GaussianDiffusion``; facts and names only). Notation:

- ``x_L``: the LR image ``(N, 3, h, w)``; ``up(x_L)``: its MATLAB-bicubic upsampling ×``s`` ``(N, 3, s·h, s·w)``, in
  [-1, 1] (the original's ``img_lr_up``);
- ``x_e = D(x_L)``: the hidden features of the LR encoder ``D``, a pre-trained RRDBNet (``rrdb``; its ``num_block + 1``
  trunk maps, :class:`~sr_diffusion.models.rrdbnet.RRDBNetOutput`);
- the chain runs on the *residual* ``x_0 = clip((x_H - up(x_L)) · res_rescale, -1, 1)`` (``img2res``; ``res_rescale``
  2 and the clip, ``clip_input``, as the released models), ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``;
- ``eps_theta(x_t, t, x_e)``: the conditional noise predictor (:class:`~sr_diffusion.models.SRDiffUNet`, ``unet``);
- sampling: ``x_T ~ N(0, I)``, the scheduler's steps down to ``x_0``, then ``x_H = clip(x_0, -1, 1) / res_rescale +
  up(x_L)`` (``res2img``). ``strength < 1`` (not in the paper; diffusers' img2img) starts instead from ``up(x_L)``
  itself, i.e. the residual ``0`` noised to the timestep ``strength`` of the way into the chain,
  ``x_t = sqrt(1 - alpha_bar_t) eps``, and runs only that part of the steps.

The default scheduler is the original's sampler: a ``DDPMScheduler`` with SRDiff's cosine schedule (``T = 100``;
:func:`srdiff_scheduler`), ``clip_sample=True`` (the original clamps the predicted ``x_0`` to [-1, 1]) and the
posterior variance ``beta~_t`` (``variance_type="fixed_small"``). Any diffusers scheduler with ``alphas_cumprod`` and
``prediction_type="epsilon"`` can replace it (DDIM, DPM-Solver, ... for fewer steps).

``lr_up_gain``: the original data pipeline makes ``up(x_L)`` from 8-bit images divided by 256 instead of 255
(``imresize(img_lr / 256, s)``), so its released models learned residuals against ``255/256 · up(x_L)``;
:mod:`sr_diffusion.conversion.srdiff` sets ``lr_up_gain = 255/256`` to reproduce them, our training uses 1.

Sizes: the LR image is padded on the bottom/right (reflect) so that the HR size is a multiple of the UNet's total
downsampling, and the output is cropped back, never resized: exactly ``s`` × the input size, for any size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, SchedulerMixin
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor

from sr_diffusion.image_processor import ImageInput, SRImageProcessor
from sr_diffusion.models.rrdbnet import RRDBNet
from sr_diffusion.models.srdiff_unet import SRDiffUNet
from sr_diffusion.resize import imresize
from sr_diffusion.utils import is_number

from ..call_docs import shared_call_docs
from ..pipeline_utils import NoiseSchedulerSRMixin

__all__ = [
    "SRDiffPipeline",
    "srdiff_betas",
    "srdiff_encode",
    "srdiff_img2res",
    "srdiff_res2img",
    "srdiff_scheduler",
    "srdiff_upsample",
]

SRDIFF_BETA_SCHEDULES = ("cosine", "linear")


# ----------------------------------------------------------------------------------------------------------------------
# The noise schedule
# ----------------------------------------------------------------------------------------------------------------------


def srdiff_betas(
    num_train_timesteps: int = 100, beta_schedule: str = "cosine", beta_s: float = 0.008, beta_end: float = 0.02
) -> np.ndarray:
    """SRDiff's ``beta_t`` (float64, ``(T,)``), as ``GaussianDiffusion.__init__`` builds them.

    ``"cosine"`` (the default; Nichol & Dhariwal 2021): ``alpha_bar(u) = cos²((u + s) / (1 + s) · π/2)`` at
    ``u = t / T``, normalised by ``alpha_bar(0)``, ``beta_t = 1 - alpha_bar(u_{t+1}) / alpha_bar(u_t)`` clipped to
    ``[0, 0.999]``. ``"linear"``: ``linspace(1e-4, beta_end, T)`` with the last beta set to 0.999 (the original does
    this when diffusing the residual, so that ``x_T`` is pure noise).
    """
    T = int(num_train_timesteps)
    if T < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if beta_schedule == "cosine":
        u = np.arange(T + 1, dtype=np.float64) / T
        alpha_bar = np.cos((u + beta_s) / (1 + beta_s) * np.pi * 0.5) ** 2
        alpha_bar = alpha_bar / alpha_bar[0]
        return np.clip(1 - alpha_bar[1:] / alpha_bar[:-1], 0, 0.999)
    if beta_schedule == "linear":
        betas = np.linspace(1e-4, beta_end, T, dtype=np.float64)
        betas[-1] = 0.999
        return betas
    choices = ", ".join(map(repr, SRDIFF_BETA_SCHEDULES))
    raise ValueError(f"beta_schedule must be one of {choices}, got {beta_schedule!r}")


def srdiff_scheduler(
    num_train_timesteps: int = 100,
    beta_schedule: str = "cosine",
    beta_s: float = 0.008,
    beta_end: float = 0.02,
    **kwargs: Any,
) -> DDPMScheduler:
    """The original sampler as a diffusers ``DDPMScheduler``: SRDiff's betas (:func:`srdiff_betas`), ``x_0`` clipped
    to [-1, 1], posterior variance ``beta~_t``, noise prediction.

    diffusers' ``squaredcos_cap_v2`` is SRDiff's cosine schedule for ``s = 0.008``: the same ``alpha_bar``, the same
    0.999 cap, the same float32 betas (its ``alphas_cumprod`` is a float32 cumulative product, within 3e-7 of the
    original's float64 one). It is used then; other schedules are passed as ``trained_betas``. ``kwargs`` go to
    ``DDPMScheduler`` (e.g. ``timestep_spacing``).
    """
    settings = {"clip_sample": True, "clip_sample_range": 1.0, "variance_type": "fixed_small"}
    settings.update(kwargs)
    settings["prediction_type"] = "epsilon"
    betas = srdiff_betas(num_train_timesteps, beta_schedule, beta_s, beta_end)
    if beta_schedule == "cosine" and beta_s == 0.008:
        scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps, beta_schedule="squaredcos_cap_v2", **settings
        )
        if np.array_equal(scheduler.betas.numpy(), betas.astype(np.float32)):
            return scheduler
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, trained_betas=betas.tolist(), **settings)


# ----------------------------------------------------------------------------------------------------------------------
# Conditioning and the residual, shared with training (sr_diffusion.training.srdiff) so both feed the models alike
# ----------------------------------------------------------------------------------------------------------------------


def srdiff_upsample(lr: torch.Tensor, upscale: int, gain: float = 1.0) -> torch.Tensor:
    """``up(x_L)``: MATLAB-bicubic upsampling (as the original's ``imresize``) of the LR image ``(N, 3, h, w)`` in
    [-1, 1] → ``(N, 3, s·h, s·w)`` in [-1, 1] (not clamped), the [0, 1] image scaled by ``gain`` first."""
    up01 = imresize((lr + 1.0) / 2.0, scale=upscale)
    return up01 * (2.0 * gain) - 1.0


def srdiff_encode(rrdb: torch.nn.Module, lr: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``x_e = D(x_L)``: the ``num_block + 1`` trunk features ``(N, num_feat, h, w)`` of the RRDBNet for the LR image
    ``(N, 3, h, w)`` in [-1, 1] (the RRDBNet takes [0, 1], as the original's ``(x + 1) / 2``)."""
    dtype = getattr(rrdb, "dtype", lr.dtype)
    return rrdb((lr.to(dtype) + 1.0) / 2.0, output_hidden_states=True, return_dict=False)[1]


def srdiff_img2res(hr: torch.Tensor, img_lr_up: torch.Tensor, res_rescale: float, clip_input: bool) -> torch.Tensor:
    """``x_0 = (x_H - up(x_L)) · res_rescale``, clipped to [-1, 1] with ``clip_input`` (the original's ``img2res``)."""
    res = (hr - img_lr_up) * res_rescale
    return res.clamp(-1.0, 1.0) if clip_input else res


def srdiff_res2img(res: torch.Tensor, img_lr_up: torch.Tensor, res_rescale: float, clip_input: bool) -> torch.Tensor:
    """``x_H = x_0 / res_rescale + up(x_L)``, ``x_0`` clipped to [-1, 1] first with ``clip_input`` (``res2img``)."""
    if clip_input:
        res = res.clamp(-1.0, 1.0)
    return res / res_rescale + img_lr_up


class SRDiffPipeline(NoiseSchedulerSRMixin, DiffusionPipeline):
    r"""Super-resolution with SRDiff (Li et al., Neurocomputing 2022).

    Args:
        unet: the conditional noise predictor, an :class:`~sr_diffusion.models.SRDiffUNet`; its ``sr_scale`` is the
            pipeline's ``upscale``.
        rrdb: the LR encoder, an :class:`~sr_diffusion.models.RRDBNet` at the same scale (×4 or ×8: SRDiff conditions
            on features at the LR resolution, so not the pixel-unshuffle ×1/×2 variants) with ``num_feat`` =
            ``unet.cond_dim`` and ``num_block`` = ``unet.rrdb_num_block``.
        scheduler: a diffusers scheduler with ``alphas_cumprod`` that ends at clean samples and takes
            ``prediction_type="epsilon"``; :func:`srdiff_scheduler` is the original's.
        res_rescale: the residual's scale (2 in the released models; registered in the config).
        clip_input: clip the residual to [-1, 1] (registered; True in the released models).
        lr_up_gain: ``up(x_L)`` is made from the LR image times this (registered; see the module docstring).
    """

    model_cpu_offload_seq = "rrdb->unet"
    _latents_name = "x_T"
    _callback_tensor_inputs = ["latents", "img_lr_up"]

    def __init__(
        self,
        unet: SRDiffUNet,
        rrdb: RRDBNet,
        scheduler: SchedulerMixin,
        res_rescale: float = 2.0,
        clip_input: bool = True,
        lr_up_gain: float = 1.0,
    ):
        super().__init__()
        for name, value in (("res_rescale", res_rescale), ("lr_up_gain", lr_up_gain)):
            if not is_number(value) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not isinstance(clip_input, bool):
            raise ValueError(f"clip_input must be a bool, got {clip_input!r}")
        self.register_modules(unet=unet, rrdb=rrdb, scheduler=scheduler)
        self.register_to_config(res_rescale=float(res_rescale), clip_input=clip_input, lr_up_gain=float(lr_up_gain))
        self.image_processor = SRImageProcessor()
        self.check_components()

    # ------------------------------------------------------------------------------------------------------------------
    # Geometry
    # ------------------------------------------------------------------------------------------------------------------

    @property
    def upscale(self) -> int:
        """The SR factor ``s`` (the UNet's ``sr_scale``)."""
        return int(self.unet.config.sr_scale)

    # (lr_multiple and latent_shape: SRSamplingMixin's, in pixel space)

    # ------------------------------------------------------------------------------------------------------------------
    # Checks
    # ------------------------------------------------------------------------------------------------------------------

    def check_components(self) -> None:
        """Raise a ``ValueError`` for components that cannot work together."""
        if not isinstance(self.unet, SRDiffUNet):
            raise ValueError(f"unet must be an SRDiffUNet, got {type(self.unet).__name__}")
        if not isinstance(self.rrdb, RRDBNet):
            raise ValueError(f"rrdb must be an RRDBNet (the LR encoder), got {type(self.rrdb).__name__}")
        u, r = self.unet.config, self.rrdb.config
        if u.out_dim != 3:
            raise ValueError(f"unet has out_dim={u.out_dim}, but SRDiff predicts the RGB noise (3 channels)")
        if self.rrdb.input_multiple != 1:
            raise ValueError(
                f"rrdb is an RRDBNet x{r.scale}, which pixel-unshuffles its input: SRDiff needs its features at the LR "
                "resolution (an RRDBNet x4 or x8)"
            )
        if r.scale != u.sr_scale:
            raise ValueError(f"rrdb is x{r.scale} but unet has sr_scale={u.sr_scale}")
        if (r.num_feat, r.num_block) != (u.cond_dim, u.rrdb_num_block):
            raise ValueError(
                f"rrdb has num_feat={r.num_feat}, num_block={r.num_block}, but unet expects cond_dim={u.cond_dim}, "
                f"rrdb_num_block={u.rrdb_num_block}"
            )
        self.check_noise_scheduler("SRDiff")

    # ------------------------------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------------------------------

    def prepare_latents(
        self,
        shape: tuple[int, ...],
        *,
        dtype: torch.dtype,
        device: torch.device,
        timesteps: torch.Tensor,
        strength: float,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The chain's start ``(N, 3, H, W)``: the noise (the given ``latents``, or ``randn`` from ``generator``: one
        draw per generator of a list) times ``init_noise_sigma`` for ``strength = 1`` (``x_T``); for ``strength < 1``
        the zero residual noised to ``timesteps[0]`` with it (``scheduler.add_noise``)."""
        if latents is None:
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            noise = latents.to(device=device, dtype=dtype)
        if strength >= 1:
            return noise * self.scheduler.init_noise_sigma
        t = timesteps[:1].repeat(shape[0])
        return self.scheduler.add_noise(torch.zeros_like(noise), noise, t)

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
        c = self.config

        # 4. Timesteps (again for every tile: multistep schedulers keep state)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.get_timesteps(num_inference_steps, strength)
        self._num_timesteps = len(timesteps)

        # 5. Condition x_e = D(x_L), up(x_L), and the start of the chain
        cond_features = srdiff_encode(self.rrdb, lr)
        img_lr_up = srdiff_upsample(lr, self.upscale, c.lr_up_gain).to(dtype)
        latents = self.prepare_latents(
            img_lr_up.shape,
            dtype=dtype,
            device=device,
            timesteps=timesteps,
            strength=strength,
            generator=generator,
            latents=latents,
        )

        # 6. Denoising loop on the residual: eps = eps_theta(x_t, t, x_e), x_t -> x_{t-1}
        for i, t in enumerate(timesteps):
            if self.interrupt:
                continue
            model_input = self.scheduler.scale_model_input(latents, t)
            noise_pred = self.unet(model_input, t, cond_features, img_lr_up, return_dict=False)[0]
            latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs).prev_sample

            state = {"latents": latents, "img_lr_up": img_lr_up}
            state = self.step_end_callback(
                callback_on_step_end,
                step=i,
                timestep=t,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                tensors=state,
            )
            latents, img_lr_up = state["latents"], state["img_lr_up"]
            progress_bar.update()

        # 7. x_H = x_0 / res_rescale + up(x_L)
        return srdiff_res2img(latents, img_lr_up, c.res_rescale, c.clip_input).clamp(-1.0, 1.0)

    @torch.no_grad()
    @shared_call_docs
    def __call__(
        self,
        image: ImageInput | Sequence[ImageInput],
        num_inference_steps: int = 100,
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
    ):
        r"""Upscale ``image`` by ``upscale``.

        Args:
            image: {image}
            num_inference_steps: ``1 <= S <=`` the scheduler's ``num_train_timesteps`` (100 by default: the paper
                samples with all ``T = 100`` steps using DDPM; DDIM and the like need fewer).
            strength: in (0, 1]: run the last ``int(S · strength)`` of the ``S`` steps, starting from ``up(x_L)``
                (the zero residual) noised to the first of them (img2img); 1 starts from pure noise, as the paper.
            eta: {eta}
            color_fix: {color_fix}
            lr_consistency: {lr_consistency}
            tile_size: sample the (padded) LR image in tiles of this side (LR pixels, a multiple of
                :attr:`lr_multiple`), blended linearly over ``tile_overlap`` LR pixels. Each tile runs its own encoder
                pass and chain, with noise drawn, in order, from ``generator``.
            tile_overlap: {tile_overlap}
            generator: {generator}
            latents: the starting noise, of shape :meth:`latent_shape`: ``x_T`` before scaling by
                ``init_noise_sigma`` (``strength = 1``), else the noise added to the zero residual; not with
                ``tile_size``.
            output_type: {output_type}
            return_dict: {return_dict}
            callback_on_step_end: called after every step (of every tile) as
                ``callback_on_step_end(self, step, timestep, callback_kwargs)``; the tensors it returns in its dict
                (``"latents"``: the residual ``x_{t-1}``, ``"img_lr_up"``: ``up(x_L)`` in [-1, 1]) replace the
                pipeline's.
            callback_on_step_end_tensor_inputs: {callback_on_step_end_tensor_inputs}

        Returns:
            ``SRPipelineOutput(images)`` or ``(images,)``; images are exactly ``upscale`` × the input size.
        """
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
