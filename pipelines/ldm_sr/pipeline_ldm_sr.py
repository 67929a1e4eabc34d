"""LDM-SR: ×4 super-resolution with a latent diffusion model conditioned on the LR image by concatenation.

Paper: R. Rombach, A. Blattmann, D. Lorenz, P. Esser, B. Ommer, "High-Resolution Image Synthesis with Latent
Diffusion Models", CVPR 2022 (arXiv:2112.10752), Sec. 4.4 (super-resolution: "concatenating the low-resolution
conditioning y directly to the inputs of the UNet"); the released model is
``CompVis/ldm-super-resolution-4x-openimages`` (a VQ-f4 autoencoder, so the latent of the HR image has the LR
image's size). The same flow as diffusers' ``LDMSuperResolutionPipeline``, with the same components ``vqvae``,
``unet``, ``scheduler`` (a folder saved by either loads with ``LDMSRPipeline.from_pretrained``):

- ``z_T ~ N(0, I) · init_noise_sigma``, ``(N, C, h, w)`` at the LR size ``h × w`` (``C`` the latent channels);
- each step: ``eps = unet(cat([scale_model_input(z_t), y], dim=1), t)`` with ``y`` the LR image in [-1, 1]
  (``(N, 3, h, w)``; ``unet.in_channels = C + 3``), then ``z_{t-1} = scheduler.step(eps, t, z_t, eta=...)``;
- ``x = clamp(D(z_0), -1, 1)``, ``(N, 3, f·h, f·w)`` with ``f = 2^(len(vqvae.block_out_channels) - 1)`` the
  autoencoder's downsampling factor, which is the SR factor (4 for the released model); ``D`` quantises first.

Where it differs from diffusers' pipeline:

- sizes: diffusers resizes a PIL input (Lanczos) down to a multiple of 32; here the LR image is padded on the
  bottom/right (reflect) to the multiple the UNet needs, ``2^(len(unet.block_out_channels) - 1)``, and the output is
  cropped back, never resized: exactly ``f`` × the input size, for any size;
- ``scale_model_input`` is applied to ``z_t`` alone, not to the concatenation with ``y``: the LR image is a
  condition, not a noisy sample. For DDIM / DDPM / PNDM / DPM-Solver (scaling is the identity) both agree to float
  rounding; for Euler / LMS diffusers' pipeline also divides ``y`` by ``sqrt(sigma^2 + 1)``;
- the generator (or a list of one per image) also drives the scheduler's step noise (DDIM with ``eta > 0``, DDPM,
  ancestral samplers); diffusers' pipeline draws that noise from the global RNG.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin, VQModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor

from sr_diffusion.image_processor import ImageInput, SRImageProcessor, pad_to_multiple

from ..call_docs import shared_call_docs
from ..pipeline_utils import SRSamplingMixin

__all__ = ["LDMSRPipeline"]


class LDMSRPipeline(SRSamplingMixin, DiffusionPipeline):
    r"""Super-resolution with a latent diffusion model (Rombach et al., CVPR 2022, Sec. 4.4).

    Args:
        vqvae: the ``VQModel`` autoencoder (VQ-f4 in the released model); only its decoder is used. Its downsampling
            factor ``f`` is the SR factor.
        unet: a diffusers ``UNet2DModel`` (or any ``ModelMixin`` called as ``unet(sample, t).sample`` with
            ``in_channels`` / ``out_channels`` in its config) with ``in_channels = C + 3`` (the noisy latent
            concatenated with the LR image) and ``out_channels = C``, ``C = vqvae.config.latent_channels``.
        scheduler: a diffusers scheduler whose chain ends at clean latents: DDIM, DDPM, PNDM, LMS, Euler, Euler
            ancestral, DPM-Solver, ...
    """

    model_cpu_offload_seq = "unet->vqvae"  # the loop, then decoding (diffusers' LDM text-to-image: bert->unet->vqvae)
    _latents_name = "z_T"
    _callback_tensor_inputs = ["latents", "lr_image"]

    def __init__(self, vqvae: VQModel, unet: ModelMixin, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(vqvae=vqvae, unet=unet, scheduler=scheduler)
        self.image_processor = SRImageProcessor()
        self.check_components()

    # ------------------------------------------------------------------------------------------------------------------
    # Geometry
    # ------------------------------------------------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        """``f``: the autoencoder's downsampling factor."""
        return 2 ** (len(self.vqvae.config.block_out_channels) - 1)

    @property
    def upscale(self) -> int:
        """The SR factor: ``f`` (the latent has the LR image's size)."""
        return self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        """``C``: channels of the latent chain."""
        return int(self.vqvae.config.latent_channels)

    # (unet_input_multiple, lr_multiple and latent_shape: SRSamplingMixin's; with s = f the LR image is padded to the
    # UNet's total downsampling and z_T has its padded size)

    # ------------------------------------------------------------------------------------------------------------------
    # Checks
    # ------------------------------------------------------------------------------------------------------------------

    def check_components(self) -> None:
        """Raise a ``ValueError`` for components that cannot work together."""
        if not isinstance(self.vqvae, VQModel):
            raise ValueError(f"vqvae must be a diffusers VQModel, got {type(self.vqvae).__name__}")
        if self.vqvae.config.out_channels != 3:
            raise ValueError(f"vqvae must decode RGB images (out_channels 3), got {self.vqvae.config.out_channels}")
        if not isinstance(self.unet, ModelMixin):
            raise ValueError(f"unet must be a diffusers ModelMixin, got {type(self.unet).__name__}")
        c = self.latent_channels
        in_channels = getattr(self.unet.config, "in_channels", None)
        out_channels = getattr(self.unet.config, "out_channels", None)
        if in_channels != c + 3:
            raise ValueError(
                f"unet has in_channels={in_channels}, but LDM-SR needs vqvae latent channels + 3 = {c} + 3 = {c + 3} "
                "(the noisy latent concatenated with the RGB LR image)"
            )
        if out_channels != c:
            raise ValueError(f"unet has out_channels={out_channels}, but the vqvae latent has {c} channels")
        # as diffusers' LDMSuperResolutionPipeline: any scheduler whose chain ends at clean latents, whatever its
        # prediction_type (the UNet output goes to scheduler.step as is), alphas_cumprod or not
        self.check_noise_scheduler("LDM-SR", alphas_cumprod=False, epsilon_only=False)

    def check_inputs(
        self,
        rgb: torch.Tensor,
        *,
        num_inference_steps: int,
        eta: float,
        color_fix: str,
        lr_consistency: bool,
        tile_size: int | None,
        tile_overlap: int,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        callback_on_step_end_tensor_inputs: Sequence[str] | None,
    ) -> None:
        self.check_components()
        self.check_steps_and_eta(num_inference_steps, eta)
        self.check_output_options(color_fix, lr_consistency)
        self.check_sampling_inputs(
            rgb,
            tile_size=tile_size,
            tile_overlap=tile_overlap,
            generator=generator,
            latents=latents,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )

    # ------------------------------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------------------------------

    def prepare_latents(
        self,
        shape: tuple[int, int, int, int],
        *,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``z_T``: the given ``latents`` or ``randn(shape)`` (diffusers' ``randn_tensor``: one draw per generator
        of a list), times the scheduler's ``init_noise_sigma`` (call ``set_timesteps`` first)."""
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``(N, C, h, w)`` → ``(N, 3, f·h, f·w)`` in [-1, 1]: quantise and decode with the VQ model, clamp."""
        image = self.vqvae.decode(latents.to(self.vqvae.dtype)).sample
        return image.clamp(-1.0, 1.0)

    def _sample(
        self,
        lr_image: torch.Tensor,
        *,
        latents: torch.Tensor | None,
        progress_bar,
        num_inference_steps: int,
        extra_step_kwargs: dict[str, Any],
        generator: torch.Generator | list[torch.Generator] | None,
        callback_on_step_end: Callable[..., dict[str, Any]] | None,
        callback_on_step_end_tensor_inputs: Sequence[str],
    ) -> torch.Tensor:
        """Run the chain for one (padded) LR image or tile: ``(N, 3, h, w)`` in [-1, 1] → ``(N, 3, f·h, f·w)``."""
        device, dtype = lr_image.device, self.unet.dtype
        lr_image = lr_image.to(dtype)

        # 4. Timesteps (again for every tile: multistep / PNDM / Euler schedulers keep state). All of them, without
        #    the mixin's get_timesteps: no strength, and no set_begin_index, so that the scheduler's state follows
        #    diffusers' LDMSuperResolutionPipeline step for step (bit-identical images)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._num_timesteps = len(self.scheduler.timesteps)

        # 5. z_T
        n, _, h, w = lr_image.shape
        latents = self.prepare_latents(
            (n, self.latent_channels, h, w), dtype=dtype, device=device, generator=generator, latents=latents
        )

        # 6. Denoising loop: eps = unet([z_t, y], t), z_t -> z_{t-1}
        for i, t in enumerate(self.scheduler.timesteps):
            if self.interrupt:
                continue
            model_input = torch.cat([self.scheduler.scale_model_input(latents, t), lr_image], dim=1)
            noise_pred = self.unet(model_input, t).sample
            latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs).prev_sample

            state = {"latents": latents, "lr_image": lr_image}
            state = self.step_end_callback(
                callback_on_step_end,
                step=i,
                timestep=t,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                tensors=state,
            )
            latents, lr_image = state["latents"], state["lr_image"]
            progress_bar.update()

        # 7. Decode
        return self.decode_latents(latents)

    @torch.no_grad()
    @shared_call_docs
    def __call__(
        self,
        image: ImageInput | Sequence[ImageInput],
        num_inference_steps: int = 100,
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
        r"""Upscale ``image`` by :attr:`upscale` (the VQ model's factor ``f``, 4 for the released model).

        Args:
            image: {image}
            num_inference_steps: ``1 <= S <=`` the scheduler's ``num_train_timesteps`` (100 as diffusers).
            eta: {eta}
            color_fix: {color_fix}
            lr_consistency: {lr_consistency}
            tile_size: sample the (padded) LR image in tiles of this side (LR pixels, a multiple of
                :attr:`lr_multiple`), blended linearly over ``tile_overlap`` LR pixels (in the output). Each tile runs
                its own chain with noise drawn, in order, from ``generator``.
            tile_overlap: {tile_overlap}
            generator: {generator}
            latents: ``z_T`` before scaling by ``init_noise_sigma``, of shape :meth:`latent_shape`; not with
                ``tile_size``.
            output_type: {output_type}
            return_dict: {return_dict}
            callback_on_step_end: called after every step (of every tile) as
                ``callback_on_step_end(self, step, timestep, callback_kwargs)``; the tensors it returns in its dict
                (``"latents"``: ``z_{t-1}``, ``"lr_image"``: the LR condition in [-1, 1]) replace the pipeline's.
            callback_on_step_end_tensor_inputs: {callback_on_step_end_tensor_inputs}

        Returns:
            ``SRPipelineOutput(images)`` or ``(images,)``; images are exactly ``upscale`` × the input size.
        """
        callback_on_step_end_tensor_inputs = self.callback_tensor_names(
            callback_on_step_end, callback_on_step_end_tensor_inputs
        )

        # 1. Check inputs
        pre = self.image_processor.preprocess(image)
        self.check_inputs(
            pre.rgb,
            num_inference_steps=num_inference_steps,
            eta=eta,
            color_fix=color_fix,
            lr_consistency=lr_consistency,
            tile_size=tile_size,
            tile_overlap=tile_overlap,
            generator=generator,
            latents=latents,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        self._interrupt = False
        self._num_timesteps = num_inference_steps
        device = self._execution_device
        rgb = pre.rgb.to(device)

        # 2. Preprocess: [0, 1] -> [-1, 1], pad (reflect) to the multiple the UNet needs
        lr, _ = pad_to_multiple(rgb * 2.0 - 1.0, self.lr_multiple)

        # 3. Scheduler step arguments
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 4.-7. Sample (whole image, or tile by tile)
        def sample(lr_tile: torch.Tensor, z_T: torch.Tensor | None, progress_bar) -> torch.Tensor:
            return self._sample(
                lr_tile,
                latents=z_T,
                progress_bar=progress_bar,
                num_inference_steps=num_inference_steps,
                extra_step_kwargs=extra_step_kwargs,
                generator=generator,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            )

        hr = self.sample_tiles(
            sample,
            lr=lr,
            latents=latents,
            tile_size=tile_size,
            tile_overlap=tile_overlap,
            steps_per_chain=num_inference_steps,
        )

        # 8. Crop back, [-1, 1] -> [0, 1], colour fix against the LR image, LR consistency, alpha, postprocess
        return self.finish_output(
            hr,
            rgb=rgb,
            alpha=pre.alpha,
            color_fix=color_fix,
            output_type=output_type,
            return_dict=return_dict,
            lr_consistency=lr_consistency,
        )
