"""ResShift: diffusion super-resolution by residual shifting, in a few steps.

Paper: Z. Yue, J. Wang, C. C. Loy, "ResShift: Efficient Diffusion Model for Image Super-resolution by Residual
Shifting", NeurIPS 2023 (arXiv:2307.12348), and "Efficient Diffusion Model for Image Restoration by Residual
Shifting", TPAMI 2024 (arXiv:2403.07319). Notation of :mod:`sr_diffusion.schedulers.scheduling_resshift`:

- ``y_0``: the LR image, bicubic-upsampled ×``upscale`` to the HR size, in [-1, 1] (pixel space) or its
  autoencoder latent (latent space, the released models: VQ-f4);
- ``x_T = y_0 + kappa sqrt(eta_T) noise`` (R4); each step predicts ``x_0`` from ``x_t`` and draws
  ``x_{t-1} ~ q(x_{t-1} | x_t, x0_pred)`` (R3); the last step returns the posterior mean, ``x0_pred``;
- shapes: the LR image ``(N, 3, h, w)``, the HR image ``(N, 3, s·h, s·w)`` with ``s = upscale``, the chain
  ``(N, C, s·h/f, s·w/f)`` with ``f`` the autoencoder's downsampling factor (``f = 1``, ``C = 3`` in pixel space).

How the denoiser sees the LR image (the reference ``sampler.py`` and ``models/gaussian_diffusion.py``, facts only):

- a :class:`~sr_diffusion.models.ResShiftUNet` gets ``scale_model_input(x_t)`` and, as ``lq``, the LR image in
  [-1, 1] at ``lq_scale`` × the chain's size (``lq_size / image_size``): the LR image itself for the released
  ×4 latent models (a 64×64 LR next to the 64×64 latent of the 256×256 HR image), its bicubic upsampling
  otherwise (in pixel space, ``lq = y_0``);
- a diffusers ``UNet2DModel`` with ``in_channels = 2·C`` gets the channel concatenation
  ``[scale_model_input(x_t), y_0]`` (``y_0`` unscaled: the upsampled LR image, or its latent), the SR3-style
  conditioning. Its ``out_channels`` must be ``C``.

Sizes: the LR image is padded on the bottom/right (reflect) so that the HR size is a multiple of
``f · input_multiple`` of the UNet (the reference pads the LR image to 64 for the released models), and the
output is cropped back, never resized: ``upscale`` × the input size, for any input size.

Defaults and the reference script (``zsyOAOA/ResShift`` @ ``3ce1d81``, ``inference_resshift.py`` and ``sampler.py``):
with the converted weights and scheduler the chain is the reference's given the same noise, and so is the tiling: an
LR image with a side above 512 pixels (at ×4) is sampled, as there, in 512-pixel tiles at a stride of 448, each
padded, sampled with its own noise, clamped to [-1, 1] and averaged uniformly where tiles overlap
(:func:`original_chop`, :func:`original_chop_starts`); ``tile_size=0`` turns that off. ``match_original=True`` also
makes the reference's choices where our defaults differ: all ``T`` trained steps whatever the pipeline's configured
``num_inference_steps``, the reference's respacing (``"leading"``, ``models/respace.py``) for fewer steps, no LR
consistency, and its tiling for an explicit ``tile_size``. The reference runs under fp16 autocast
(``use_amp=True``): ``with torch.autocast("cuda", dtype=torch.float16): pipe(...)`` does the same here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ModelMixin, SchedulerMixin, UNet2DModel, VQModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

import sr_diffusion.models  # noqa: F401  (diffusers resolves saved components from sys.modules)
import sr_diffusion.schedulers  # noqa: F401
from sr_diffusion.image_processor import ImageInput, SRImageProcessor, pad_to_multiple
from sr_diffusion.schedulers import ResShiftScheduler, resshift_spaced_timesteps
from sr_diffusion.tiling import TileAccumulator
from sr_diffusion.utils import is_int

from ..call_docs import shared_call_docs
from ..pipeline_utils import SRSamplingMixin
from .blocks import (
    ORIGINAL_CHOP_SIZE,
    ORIGINAL_CHOP_STRIDE,
    original_chop,
    original_chop_starts,
    resshift_lq,
    resshift_model_output,
    upsample_lr,
)

__all__ = [
    "ORIGINAL_CHOP_SIZE",
    "ORIGINAL_CHOP_STRIDE",
    "ResShiftPipeline",
    "original_chop",
    "original_chop_starts",
    "resshift_lq",
    "resshift_model_output",
    "upsample_lr",
]


class ResShiftPipeline(SRSamplingMixin, DiffusionPipeline):
    r"""Super-resolution with ResShift (Yue et al., NeurIPS 2023 / TPAMI 2024).

    Args:
        unet: the denoiser: a :class:`~sr_diffusion.models.ResShiftUNet` (LR image through its ``lq`` input), or a
            diffusers ``UNet2DModel`` whose ``in_channels`` is twice the chain's channels (LR image as ``y_0``
            concatenated to the scaled ``x_t``; see the module docstring). Any other ``ModelMixin`` is called like
            a ``ResShiftUNet`` and must have ``in_channels`` / ``out_channels`` in its config.
        scheduler: a :class:`~sr_diffusion.schedulers.ResShiftScheduler` (any other scheduler is refused: the
            chain ends at ``y_0``, not at pure noise).
        vae: optional ``VQModel`` (the released ResShift models: VQ-f4) or ``AutoencoderKL``; None runs the chain in
            pixel space. Latents are ``(E(x) - shift_factor) · scaling_factor · scheduler.latent_scale_factor``
            (every factor 1 for the released models); ``E`` is the VQ encoder before quantisation, or the KL
            posterior's mode; decoding undoes the scaling, and a ``VQModel`` quantises, as the reference.
        upscale: the SR factor ``s`` (registered in the config; 4 for the released models).
        lr_consistency: the default of ``__call__``'s ``lr_consistency`` (registered in the config): True for a model
            trained on MATLAB-bicubic LR images, such as the embedded generative default, whose outputs should explain
            their input exactly; False (the released real-world models) leaves outputs as sampled.
        num_inference_steps: the default of ``__call__``'s ``num_inference_steps`` (registered in the config); None
            runs all ``T`` trained steps, as the reference.
    """

    #: ``tile_size=None`` tiles large inputs automatically, as the original (``tile_size=0``: never)
    AUTO_TILING = True
    model_cpu_offload_seq = "vae->unet"  # encode y_0, then the loop; decoding moves the VAE back to the device
    _latents_name = "x_T"
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents", "lr_latents"]

    def __init__(
        self,
        unet: ModelMixin,
        scheduler: ResShiftScheduler,
        vae: VQModel | AutoencoderKL | None = None,
        upscale: int = 4,
        lr_consistency: bool = False,
        num_inference_steps: int | None = None,
    ):
        super().__init__()
        if not is_int(upscale) or upscale < 1:
            raise ValueError(f"upscale must be a positive int, got {upscale!r}")
        if not isinstance(lr_consistency, bool):
            raise ValueError(f"lr_consistency must be a bool, got {lr_consistency!r}")
        if num_inference_steps is not None and (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or not 1 <= num_inference_steps <= scheduler.config.num_train_timesteps
        ):
            raise ValueError(
                f"num_inference_steps must be None or an int in [1, {scheduler.config.num_train_timesteps}] (the "
                f"scheduler's trained steps), got {num_inference_steps!r}"
            )
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler)
        self.register_to_config(upscale=upscale, lr_consistency=lr_consistency, num_inference_steps=num_inference_steps)
        self.image_processor = SRImageProcessor()
        self.check_components()

    # ------------------------------------------------------------------------------------------------------------------
    # Geometry
    # ------------------------------------------------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        """``f``: the autoencoder's downsampling factor (1 in pixel space)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        """``C``: channels of the chain (3 in pixel space)."""
        return 3 if self.vae is None else int(self.vae.config.latent_channels)

    # (upscale, unet_input_multiple, lr_multiple and latent_shape: SRSamplingMixin's)

    # ------------------------------------------------------------------------------------------------------------------
    # Autoencoder
    # ------------------------------------------------------------------------------------------------------------------

    def _latent_scale(self) -> tuple[float, float]:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        scale = float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)
        return float(shift), scale * float(self.scheduler.config.latent_scale_factor)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in [-1, 1] → chain space ``(N, C, H/f, W/f)`` (the identity in pixel space)."""
        if self.vae is None:
            return images
        x = images.to(self.vae.dtype)
        if isinstance(self.vae, AutoencoderKL):
            z = self.vae.encode(x).latent_dist.mode()
        else:
            z = self.vae.encode(x).latents
        shift, scale = self._latent_scale()
        return ((z.float() - shift) * scale).to(images.dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Chain space ``(N, C, H/f, W/f)`` → ``(N, 3, H, W)`` in about [-1, 1] (the identity in pixel space)."""
        if self.vae is None:
            return latents
        shift, scale = self._latent_scale()
        z = (latents.float() / scale + shift).to(self.vae.dtype)
        return self.vae.decode(z).sample.to(latents.dtype)

    # ------------------------------------------------------------------------------------------------------------------
    # Checks
    # ------------------------------------------------------------------------------------------------------------------

    def check_components(self) -> None:
        """Raise a ``ValueError`` for components that cannot work together."""
        if not isinstance(self.scheduler, ResShiftScheduler):
            kind = type(self.scheduler).__name__
            hint = (
                " (a diffusers scheduler ends at pure noise, ResShift's chain at y_0)"
                if isinstance(self.scheduler, SchedulerMixin)
                else ""
            )
            raise ValueError(f"ResShiftPipeline needs a ResShiftScheduler, got {kind}{hint}")
        if self.vae is not None:
            if not isinstance(self.vae, (VQModel, AutoencoderKL)):
                raise ValueError(f"vae must be a VQModel, an AutoencoderKL or None, got {type(self.vae).__name__}")
            if self.vae.config.in_channels != 3 or self.vae.config.out_channels != 3:
                raise ValueError(
                    f"vae must map RGB images (in/out_channels 3), got {self.vae.config.in_channels}/"
                    f"{self.vae.config.out_channels}"
                )
        if not isinstance(self.unet, ModelMixin):
            raise ValueError(f"unet must be a diffusers ModelMixin, got {type(self.unet).__name__}")
        c = self.latent_channels
        space = "latent" if self.vae is not None else "pixel"
        in_channels = getattr(self.unet.config, "in_channels", None)
        out_channels = getattr(self.unet.config, "out_channels", None)
        expected_in = 2 * c if isinstance(self.unet, UNet2DModel) else c
        if in_channels != expected_in:
            how = f"2 x {c}: x_t concatenated with y_0" if isinstance(self.unet, UNet2DModel) else f"{c}: x_t"
            raise ValueError(
                f"{type(self.unet).__name__} has in_channels={in_channels}, but the {space}-space chain needs {how}"
            )
        if out_channels != c:
            raise ValueError(
                f"{type(self.unet).__name__} has out_channels={out_channels}, but the {space}-space chain has {c} "
                "channels"
            )
        if getattr(self.unet.config, "cond_mask", False):
            raise ValueError("this unet takes an inpainting mask (cond_mask=True); ResShiftPipeline does SR only")

    def check_inputs(
        self,
        rgb: torch.Tensor,
        *,
        num_inference_steps: int | None,
        timesteps: Sequence[int] | None,
        color_fix: str,
        lr_consistency: bool,
        tile_size: int | None,
        tile_overlap: int,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        callback_on_step_end_tensor_inputs: Sequence[str] | None,
    ) -> None:
        self.check_components()
        # ResShiftScheduler is no noise scheduler: no eta, no strength (the chain starts at the LR image already), and
        # num_inference_steps=None means all of its T trained steps
        if num_inference_steps is not None:
            self.check_num_inference_steps(num_inference_steps)
        if timesteps is not None:
            self.scheduler.check_timesteps(timesteps)
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
        lr_latents: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x_T``: the given ``latents``, or ``y_0 + kappa sqrt(eta_T) noise`` with noise from ``generator`` (R4)."""
        if latents is not None:
            return latents.to(device=lr_latents.device, dtype=lr_latents.dtype)
        return self.scheduler.prior_sample(lr_latents, generator=generator)

    def _sample(
        self,
        lr: torch.Tensor,
        *,
        latents: torch.Tensor | None,
        progress_bar,
        generator: torch.Generator | list[torch.Generator] | None,
        callback_on_step_end: Callable[..., dict[str, Any]] | None,
        callback_on_step_end_tensor_inputs: Sequence[str],
    ) -> torch.Tensor:
        """Run the chain for one (padded) LR image or tile: ``(N, 3, h, w)`` in [-1, 1] → ``(N, 3, s·h, s·w)``."""
        # 4. Conditioning: y_0 (upsampled LR image, encoded in latent space) and the denoiser's lq
        lr_latents = self.encode_images(upsample_lr(lr, self.upscale))
        lq = resshift_lq(self.unet, lr, tuple(lr_latents.shape[-2:]))

        # 5. x_T
        latents = self.prepare_latents(lr_latents, generator, latents)

        # 6. Denoising loop: x_t -> x_{t-1} with the predicted x_0
        for i, t in enumerate(self.scheduler.timesteps):
            if self.interrupt:
                continue
            scaled = self.scheduler.scale_model_input(latents, t)
            model_output = resshift_model_output(
                self.unet, scaled_sample=scaled, timestep=t, lr_latents=lr_latents, lq=lq
            )
            latents = self.scheduler.step(model_output, t, latents, lr_samples=lr_latents, generator=generator)[0]

            state = {"latents": latents, "lr_latents": lr_latents}
            state = self.step_end_callback(
                callback_on_step_end,
                step=i,
                timestep=t,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                tensors=state,
            )
            latents, lr_latents = state["latents"], state["lr_latents"]
            progress_bar.update()

        # 7. Decode
        return self.decode_latents(latents)

    def sample_original_tiles(
        self,
        sample: Callable[[torch.Tensor, torch.Tensor | None, Any], torch.Tensor],
        *,
        lr: torch.Tensor,
        chop_size: int,
        chop_stride: int,
        steps_per_chain: int,
    ) -> torch.Tensor:
        """The reference's tiled sampling (``sampler.py``, ``ResShiftSampler.inference`` with ``ImageSpliterTh``):
        tiles of ``chop_size`` LR pixels starting at :func:`original_chop_starts` of the unpadded LR image ``lr``
        ``(N, 3, h, w)`` in [-1, 1], row by row; each padded (reflect) to :attr:`lr_multiple`, sampled with
        ``sample(tile, None, progress_bar)`` (its own noise), cropped back and clamped to [-1, 1] (``sample_func``);
        the HR tiles summed and divided by how many cover each pixel. Returns ``(N, 3, s·h, s·w)`` in float32."""
        n, _, h, w = lr.shape
        s = self.upscale
        rows = original_chop_starts(h, chop_size, chop_stride)
        columns = original_chop_starts(w, chop_size, chop_stride)
        hr_tiles = TileAccumulator((n, 3, h * s, w * s), device=lr.device)  # uniform weights: an average
        with self.progress_bar(total=len(rows) * len(columns) * steps_per_chain) as progress_bar:
            for top in rows:
                for left in columns:
                    tile = lr[..., top : top + chop_size, left : left + chop_size]
                    th, tw = tile.shape[-2:]
                    padded, _ = pad_to_multiple(tile, self.lr_multiple)
                    hr = sample(padded, None, progress_bar)[..., : th * s, : tw * s].clamp(-1.0, 1.0)
                    region = (..., slice(top * s, (top + th) * s), slice(left * s, (left + tw) * s))
                    hr_tiles.add(region, hr)
        return hr_tiles.result()

    @torch.no_grad()
    @shared_call_docs
    def __call__(
        self,
        image: ImageInput | Sequence[ImageInput],
        num_inference_steps: int | None = None,
        timesteps: Sequence[int] | None = None,
        color_fix: str = "none",
        lr_consistency: bool | None = None,
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
            num_inference_steps: ``S``, ``1 <= S <= T``; default (None) the pipeline's configured default
                (``config.num_inference_steps``), else the scheduler's ``T`` trained steps, as the reference (with
                ``match_original=True`` always ``T``). Fewer steps keep a subset of the trained timesteps
                (``ResShiftScheduler.set_timesteps``, with the scheduler's ``timestep_spacing``; with
                ``match_original=True`` the reference's ``space_timesteps``, ``"leading"``).
            timesteps: the chain itself instead of ``num_inference_steps``: a strictly decreasing subset of the trained
                timesteps, e.g. ``[3, 1]`` of 4 (``num_inference_steps=3`` of 4 is ``[3, 2, 0]``).
            color_fix: {color_fix}
            lr_consistency: {lr_consistency} None: the pipeline's configured default (``config.lr_consistency``); False
                with ``match_original=True``.
            tile_size: None (default): automatic, as the reference: an LR image with a side above
                :func:`original_chop` (512 pixels at ×4, unless ``latents`` is given) is sampled in 512-pixel tiles at a
                stride of 448 (:func:`original_chop_starts`), each padded on its own and clamped, averaged uniformly
                over overlaps; smaller images whole. ``0``: never tile. A number: sample the (padded) LR image in tiles
                of this side (LR pixels, a multiple of :attr:`lr_multiple`), blended linearly over ``tile_overlap`` LR
                pixels; with ``match_original=True`` tiled as the reference's ``--chop_size tile_size --chop_stride
                (tile_size - tile_overlap)`` instead. Each tile runs its own chain with noise drawn, in order (rows,
                then columns), from ``generator``.
            tile_overlap: see ``tile_size``.
            generator: {generator}
            latents: ``x_T`` to start from, of shape :meth:`latent_shape` (e.g. ``y_0`` plus your own noise); not with
                ``tile_size``.
            output_type: {output_type}
            return_dict: {return_dict}
            callback_on_step_end: called after every step (of every tile) as
                ``callback_on_step_end(self, step, timestep, callback_kwargs)``; the tensors it returns in its dict
                (``"latents"``: ``x_{t-1}``, ``"lr_latents"``: ``y_0``) replace the pipeline's.
            callback_on_step_end_tensor_inputs: {callback_on_step_end_tensor_inputs}
            match_original: make the reference script's choices where the defaults differ (see the module docstring):
                all ``T`` steps unless told, its ``"leading"`` respacing for fewer, no LR consistency unless told, and
                its tiling for an explicit ``tile_size``. Keep ``color_fix="none"``; for its fp16 run, call under
                ``torch.autocast("cuda", dtype=torch.float16)``.

        Returns:
            ``SRPipelineOutput(images)`` or ``(images,)``; images are exactly ``upscale`` × the input size.
        """
        callback_on_step_end_tensor_inputs = self.callback_tensor_names(
            callback_on_step_end, callback_on_step_end_tensor_inputs
        )

        # 1. Check inputs
        if not isinstance(match_original, bool):
            raise ValueError(f"match_original must be a bool, got {match_original!r}")
        if lr_consistency is None:
            lr_consistency = False if match_original else bool(self.config.get("lr_consistency", False))
        if timesteps is not None and num_inference_steps is not None:
            raise ValueError("Give either num_inference_steps or timesteps, not both.")
        if num_inference_steps is None and timesteps is None and not match_original:
            num_inference_steps = self.config.get("num_inference_steps")
        automatic_tiling = tile_size is None and latents is None
        if isinstance(tile_size, int) and not isinstance(tile_size, bool) and tile_size == 0:
            tile_size = None  # explicitly whole
        pre = self.image_processor.preprocess(image)
        self.check_inputs(
            pre.rgb,
            num_inference_steps=num_inference_steps,
            timesteps=timesteps,
            color_fix=color_fix,
            lr_consistency=lr_consistency,
            tile_size=tile_size,
            tile_overlap=tile_overlap,
            generator=generator,
            latents=latents,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        self._interrupt = False
        device = self._execution_device
        rgb = pre.rgb.to(device)

        # 2. Timesteps: once for all tiles (ResShiftScheduler's steps keep no state), all of them (no strength); the
        # reference's respacing of fewer steps with match_original
        if match_original and num_inference_steps is not None:
            num_train = self.scheduler.config.num_train_timesteps
            timesteps = resshift_spaced_timesteps(num_train, num_inference_steps, "leading").tolist()
            num_inference_steps = None
        self.scheduler.set_timesteps(num_inference_steps, device=device, timesteps=timesteps)
        self._num_timesteps = len(self.scheduler.timesteps)

        # 3.-7. Sample (whole image, or tile by tile)
        def sample(lr_tile: torch.Tensor, x_T: torch.Tensor | None, progress_bar) -> torch.Tensor:
            return self._sample(
                lr_tile,
                latents=x_T,
                progress_bar=progress_bar,
                generator=generator,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            )

        chop = None  # (size, stride) of the reference's tiling
        if automatic_tiling and max(rgb.shape[-2:]) > original_chop(self.upscale)[0]:
            chop = original_chop(self.upscale)
        elif tile_size is not None and match_original:
            chop = (tile_size, tile_size - tile_overlap)
        if chop is not None:
            hr = self.sample_original_tiles(
                sample, lr=rgb * 2.0 - 1.0, chop_size=chop[0], chop_stride=chop[1], steps_per_chain=self._num_timesteps
            )
        else:
            # [0, 1] -> [-1, 1], pad (reflect) to the multiple the UNet and the VAE need
            lr, _ = pad_to_multiple(rgb * 2.0 - 1.0, self.lr_multiple)
            hr = self.sample_tiles(
                sample,
                lr=lr,
                latents=latents,
                tile_size=tile_size,
                tile_overlap=tile_overlap,
                steps_per_chain=self._num_timesteps,
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
