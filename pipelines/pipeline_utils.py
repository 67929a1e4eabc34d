"""What every diffusion SR pipeline shares: the common input checks, the (tiled) sampling frame, the step-end
callback and the assembly of the output (colour fix, LR consistency, alpha).

A pipeline using :class:`SRSamplingMixin` samples an HR image in [-1, 1] for an LR image padded to
``lr_multiple`` (the geometry section: ``upscale``, ``vae_scale_factor``, ``latent_channels``,
``unet_input_multiple``, ``lr_multiple``, ``latent_shape(n, h, w)``; a pipeline overrides what differs); it provides
``image_processor`` and ``_callback_tensor_inputs``, and names its starting tensor in
``_latents_name`` for error messages ("x_T", "z_T", ...). Pipelines driven by a diffusers noise
scheduler (DDPM, DDIM, ...) also use :meth:`~SRSamplingMixin.check_noise_scheduler`,
:meth:`~SRSamplingMixin.check_steps_and_eta`, :meth:`~SRSamplingMixin.check_strength`,
:meth:`~SRSamplingMixin.get_timesteps` and :meth:`~SRSamplingMixin.prepare_extra_step_kwargs`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import SchedulerMixin
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from sr_diffusion.color_fix import COLOR_FIX_METHODS
from sr_diffusion.color_fix import color_fix as apply_color_fix
from sr_diffusion.fidelity import project_to_lr
from sr_diffusion.image_processor import crop_to_size, pad_to_multiple
from sr_diffusion.resize import pil_resize, resize
from sr_diffusion.tiling import tile_grid, tiled_apply
from sr_diffusion.utils import is_int, is_number

from .pipeline_output import SRPipelineOutput

__all__ = ["NoiseSchedulerSRMixin", "SRSamplingMixin", "quantize_8bit"]


class SRSamplingMixin:
    """Geometry, input checks, the sampling frame and output assembly shared by the diffusion SR pipelines."""

    _latents_name = "latents"

    # ------------------------------------------------------------------------------------------------------------------
    # Geometry: an LR image h x w (padded to lr_multiple) -> a chain on (N, C, s·h / f, s·w / f) -> HR s·h x s·w
    # ------------------------------------------------------------------------------------------------------------------

    @property
    def upscale(self) -> int:
        """The SR factor ``s`` (the pipeline's ``upscale`` config entry)."""
        return int(self.config.upscale)

    @property
    def vae_scale_factor(self) -> int:
        """``f``: the autoencoder's downsampling factor (1: the chain runs in pixel space)."""
        return 1

    @property
    def latent_channels(self) -> int:
        """``C``: channels of the chain (3 in pixel space)."""
        return 3

    @property
    def unet_input_multiple(self) -> int:
        """The denoiser needs the chain's H and W to be multiples of this: its own ``input_multiple``, else (diffusers
        UNets) ``2^(levels - 1)``, else 1."""
        multiple = getattr(self.unet, "input_multiple", None)
        if multiple is None:
            levels = getattr(getattr(self.unet, "config", None), "block_out_channels", None)
            return 2 ** (len(levels) - 1) if levels else 1
        return int(multiple)

    @property
    def lr_multiple(self) -> int:
        """The LR image is padded to a multiple of this: ``s·h`` must be a multiple of ``f · unet_input_multiple``."""
        hr_multiple = self.vae_scale_factor * self.unet_input_multiple
        return hr_multiple // math.gcd(hr_multiple, self.upscale)

    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Shape of the chain's start (the ``latents`` argument) for an LR image of ``height`` × ``width`` (before
        padding to :attr:`lr_multiple`): ``(N, C, s·h / f, s·w / f)``."""
        m, s, f = self.lr_multiple, self.upscale, self.vae_scale_factor
        height, width = height + (-height) % m, width + (-width) % m
        return (batch_size, self.latent_channels, height * s // f, width * s // f)

    # ------------------------------------------------------------------------------------------------------------------
    # State of a call (diffusers' properties)
    # ------------------------------------------------------------------------------------------------------------------

    @property
    def num_timesteps(self) -> int:
        """Denoising steps of the last call, per chain (tile)."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` (e.g. from a callback) to skip the remaining steps."""
        return getattr(self, "_interrupt", False)

    @staticmethod
    def callback_tensor_names(
        callback_on_step_end: Callable[..., dict[str, Any]] | PipelineCallback | MultiPipelineCallbacks | None,
        callback_on_step_end_tensor_inputs: Sequence[str] | None,
    ) -> list[str]:
        """The tensors a step-end callback receives: a ``PipelineCallback``'s own ``tensor_inputs``, else the given
        names, else ``["latents"]``."""
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            return list(callback_on_step_end.tensor_inputs)
        if callback_on_step_end_tensor_inputs is None:
            return ["latents"]
        return list(callback_on_step_end_tensor_inputs)

    # ------------------------------------------------------------------------------------------------------------------
    # Checks
    # ------------------------------------------------------------------------------------------------------------------

    def check_noise_scheduler(self, method: str, *, alphas_cumprod: bool = True, epsilon_only: bool = True) -> None:
        """Raise a ``ValueError`` unless ``self.scheduler`` is a diffusers noise scheduler that starts from pure noise
        and ends at clean samples (not ResShift's, whose chain ends at the LR image), has ``alphas_cumprod`` (unless
        ``alphas_cumprod=False``) and takes a noise (``epsilon``) prediction (unless ``epsilon_only=False``: the
        scheduler then reads the model output as its own ``prediction_type`` says)."""
        kind = type(self.scheduler).__name__
        if not isinstance(self.scheduler, SchedulerMixin):
            raise ValueError(f"scheduler must be a diffusers SchedulerMixin, got {kind}")
        if "lr_samples" in inspect.signature(self.scheduler.step).parameters:
            raise ValueError(
                f"{kind} ends its chain at the LR image (ResShift); {method} needs a scheduler that starts from pure "
                "noise and ends at clean samples (DDPM, DDIM, ...)"
            )
        if alphas_cumprod and getattr(self.scheduler, "alphas_cumprod", None) is None:
            raise ValueError(f"{kind} has no alphas_cumprod: {method} needs a variance-preserving noise schedule")
        prediction_type = getattr(self.scheduler.config, "prediction_type", "epsilon")
        if epsilon_only and prediction_type != "epsilon":
            raise ValueError(
                f"{method}'s UNet predicts the noise: the scheduler needs prediction_type='epsilon', got "
                f"{prediction_type!r}"
            )

    def check_num_inference_steps(self, num_inference_steps: int) -> None:
        """``1 <= num_inference_steps <=`` the scheduler's ``num_train_timesteps`` (an int)."""
        num_train = self.scheduler.config.num_train_timesteps
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or not 1 <= num_inference_steps <= num_train
        ):
            raise ValueError(
                f"num_inference_steps must be an int between 1 and the scheduler's num_train_timesteps={num_train}, "
                f"got {num_inference_steps!r}"
            )

    def check_steps_and_eta(self, num_inference_steps: int, eta: float) -> None:
        """:meth:`check_num_inference_steps`, and ``eta >= 0``."""
        self.check_num_inference_steps(num_inference_steps)
        if not is_number(eta) or eta < 0:
            raise ValueError(f"eta must be a non-negative number, got {eta!r}")

    def check_output_options(self, color_fix: str, lr_consistency: bool) -> None:
        """The output options every pipeline takes (:meth:`finish_output`): the colour fix and LR consistency."""
        if color_fix not in COLOR_FIX_METHODS:
            raise ValueError(f"color_fix must be one of {', '.join(map(repr, COLOR_FIX_METHODS))}, got {color_fix!r}")
        if not isinstance(lr_consistency, bool):
            raise ValueError(f"lr_consistency must be a bool, got {lr_consistency!r}")

    def check_sampling_inputs(
        self,
        rgb: torch.Tensor,
        *,
        tile_size: int | None,
        tile_overlap: int,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        callback_on_step_end_tensor_inputs: Sequence[str] | None,
        tiles_share_latents: bool = False,
        latent_shape: tuple[int, ...] | None = None,
    ) -> None:
        """The sampling checks every pipeline makes: image size, tiling, generators, latents, callbacks.

        ``tiles_share_latents``: the pipeline tiles each step of one chain on the whole latent (PASD, SeeSR), so
        ``latents`` may be combined with ``tile_size``. ``latent_shape``: the shape ``latents`` must have when it is
        not :meth:`latent_shape` of the LR size (a pipeline that samples at another working size)."""
        n, _, h, w = rgb.shape
        name = f"latents ({self._latents_name})"
        if h < 1 or w < 1:
            raise ValueError(f"image has an empty side: {h}x{w}")
        if tile_size is not None:
            m = self.lr_multiple
            if not is_int(tile_size) or tile_size < m or tile_size % m:
                raise ValueError(f"tile_size must be a positive multiple of {m} for these components, got {tile_size}")
            if not is_int(tile_overlap) or not 0 <= tile_overlap < tile_size:
                raise ValueError(f"tile_overlap must be an int in [0, tile_size), got {tile_overlap}")
            if latents is not None and not tiles_share_latents:
                raise ValueError(f"{name} cannot be combined with tile_size: each tile draws its own")
        if isinstance(generator, list) and len(generator) != n:
            raise ValueError(f"got a list of {len(generator)} generators for a batch of {n} images; pass one per image")
        if latents is not None:
            expected = self.latent_shape(n, h, w) if latent_shape is None else tuple(latent_shape)
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
                got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                where = (
                    f"(padded to a multiple of {self.lr_multiple})"
                    if latent_shape is None
                    else "(at the working size of process_size)"
                )
                raise ValueError(f"{name} must have shape {expected} for {n} LR image(s) of {h}x{w} {where}, got {got}")
        if callback_on_step_end_tensor_inputs is not None and not all(
            k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(
                f"callback_on_step_end_tensor_inputs must be in {self._callback_tensor_inputs}, got "
                f"{list(callback_on_step_end_tensor_inputs)}"
            )

    def check_strength(self, num_inference_steps: int, strength: float) -> None:
        """``strength`` in (0, 1], and at least one of the ``num_inference_steps`` steps run."""
        if not is_number(strength) or not 0 < strength <= 1:
            raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
        if int(num_inference_steps * strength) < 1:
            raise ValueError(
                f"strength={strength} of num_inference_steps={num_inference_steps} runs no step: raise either so that "
                "int(num_inference_steps * strength) >= 1"
            )

    # ------------------------------------------------------------------------------------------------------------------
    # Sampling frame
    # ------------------------------------------------------------------------------------------------------------------

    def get_timesteps(self, num_inference_steps: int, strength: float) -> torch.Tensor:
        """The timesteps to run (call ``set_timesteps`` first): the last ``int(S · strength)`` of the ``S`` steps,
        as diffusers' img2img pipelines (``strength = 1``: all of them)."""
        init_steps = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = (num_inference_steps - init_steps) * self.scheduler.order
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(t_start)
        return self.scheduler.timesteps[t_start:]

    def prepare_extra_step_kwargs(self, generator, eta: float | None) -> dict[str, Any]:
        """``eta`` (DDIM's η, Song et al. 2021, Eq. 16) and ``generator``, for schedulers whose ``step`` takes them;
        ``eta=None`` leaves ``eta`` to the scheduler's default (pipelines without that knob)."""
        parameters = set(inspect.signature(self.scheduler.step).parameters)
        extra = {}
        if eta is not None and "eta" in parameters:
            extra["eta"] = eta
        if "generator" in parameters:
            extra["generator"] = generator
        return extra

    def sample_tiles(
        self,
        sample: Callable[[torch.Tensor, torch.Tensor | None, Any], torch.Tensor],
        *,
        lr: torch.Tensor,
        latents: torch.Tensor | None,
        tile_size: int | None,
        tile_overlap: int,
        steps_per_chain: int,
    ) -> torch.Tensor:
        """Run one chain ``sample(lr, latents, progress_bar)`` on the padded LR image ``lr`` ``(N, 3, h, w)``, or one
        per tile of ``tile_size`` LR pixels (``latents=None``: each tile draws its own start), blended linearly over
        ``tile_overlap`` (:func:`sr_diffusion.tiling.tiled_apply`), under one progress bar of ``steps_per_chain`` steps
        per chain. Returns ``(N, 3, upscale·h, upscale·w)``."""
        num_tiles = 1
        if tile_size is not None:
            _, _, ys, xs = tile_grid(lr.shape[-2], lr.shape[-1], tile_size, tile_overlap)
            num_tiles = len(ys) * len(xs)
        with self.progress_bar(total=num_tiles * steps_per_chain) as progress_bar:
            if tile_size is None:
                return sample(lr, latents, progress_bar)
            return tiled_apply(
                lambda tile: sample(tile, None, progress_bar),
                lr,
                scale=self.upscale,
                tile_size=tile_size,
                tile_overlap=tile_overlap,
            )

    def step_end_callback(
        self,
        callback_on_step_end: Callable[..., dict[str, Any]] | None,
        *,
        step: int,
        timestep: torch.Tensor,
        callback_on_step_end_tensor_inputs: Sequence[str],
        tensors: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """diffusers' step-end callback: ``callback_on_step_end(self, step, timestep, callback_kwargs)`` with the
        requested ``tensors`` in ``callback_kwargs``. Returns ``tensors`` with those the callback returned replaced
        (``tensors`` itself without a callback)."""
        if callback_on_step_end is None:
            return tensors
        callback_kwargs = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
        callback_outputs = callback_on_step_end(self, step, timestep, callback_kwargs)
        return {k: callback_outputs.pop(k, v) for k, v in tensors.items()}

    # ------------------------------------------------------------------------------------------------------------------
    # Output
    # ------------------------------------------------------------------------------------------------------------------

    def finish_output(
        self,
        hr: torch.Tensor,
        *,
        rgb: torch.Tensor,
        alpha: torch.Tensor | None,
        color_fix: str,
        output_type: str,
        return_dict: bool,
        lr_consistency: bool = False,
        clamp_before_color_fix: bool = False,
        color_fix_reference: torch.Tensor | None = None,
        quantize: bool = False,
        working_size: tuple[int, int] | None = None,
    ):
        """Sampled HR (N, 3, H', W') in [-1, 1] of the padded LR → the pipeline's return value.

        Crops to ``upscale`` × the LR ``rgb`` (N, 3, h, w) size (or to ``working_size``), maps to [0, 1], applies the
        colour fix against ``color_fix_reference`` (default ``rgb``, bicubic-upsampled by the fix); resizes a
        ``working_size`` output to ``upscale`` × the LR size (PIL bicubic on 8 bits with ``quantize``, as PASD's and
        SeeSR's scripts, else antialiased torch bicubic); with ``lr_consistency`` replaces the result by its
        projection onto ``{x : imresize(x, 1 / upscale) = rgb}`` (MATLAB bicubic;
        :func:`sr_diffusion.fidelity.project_to_lr`, the minimum-norm change, clamped to [0, 1]), on the whole image
        whether it was sampled in tiles or not; upscales ``alpha`` (N, 1, h, w) separately (bicubic), postprocesses,
        frees hooks.

        The order of clamping and colour fix is each method's (issue 14, item 2):

        - ``clamp_before_color_fix=False`` (StableSR's script): the colour fix sees the unclamped decode;
        - ``clamp_before_color_fix=True`` (PASD's and SeeSR's scripts, which fix the saved 8-bit image): the decode is
          clamped to [0, 1] before the fix;
        - ``quantize`` (with ``clamp_before_color_fix``: their exact 8-bit round trips): the clamped decode is rounded
          to 8 bits (``round(255 x) / 255``, diffusers' ``numpy_to_pil``) before the fix, and the fixed image clamped
          and truncated to 8 bits (``floor(255 x) / 255``, torchvision's ``ToPILImage``: ``mul(255).byte()``) after it
          (when a fix is applied).
        """
        n, _, h, w = rgb.shape
        size = (h * self.upscale, w * self.upscale)
        crop = size if working_size is None else tuple(working_size)
        sr = (crop_to_size(hr.float(), crop) + 1.0) / 2.0
        reference = rgb if color_fix_reference is None else crop_to_size(color_fix_reference.float(), crop)
        if clamp_before_color_fix:
            sr = quantize_8bit(sr) if quantize else sr.clamp(0, 1)
        sr = apply_color_fix(sr, reference, color_fix)
        if quantize and color_fix != "none":
            sr = torch.floor(sr.clamp(0, 1) * 255) / 255
        if crop != size:
            if quantize:
                sr = pil_resize(sr, size, "bicubic")
            else:
                sr = resize(sr.clamp(0, 1), size=size, mode="bicubic", antialias=True)
        if lr_consistency:
            # from the [0, 1] image the output would be (project_to_lr's domain; the model or the colour fix may
            # overshoot), so that the projection only moves what contradicts the input
            sr = project_to_lr(sr.clamp(0, 1), rgb.to(sr))
        if alpha is not None:
            alpha = resize(alpha.to(sr.device), size=size, mode="bicubic").clamp(0, 1)
        images = self.image_processor.postprocess(sr, alpha, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return SRPipelineOutput(images=images)


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """``round(255 · clamp(x, 0, 1)) / 255``: an image in [0, 1] as its 8-bit file would hold it (diffusers'
    ``numpy_to_pil``, which the originals' pipelines return before their colour fix)."""
    return torch.round(x.clamp(0, 1) * 255) / 255


class NoiseSchedulerSRMixin(SRSamplingMixin):
    """The call of the pixel-space pipelines driven by a diffusers noise scheduler with img2img ``strength`` (SR3,
    SRDiff): checks, padding, timesteps, (tiled) chains, output. A pipeline provides ``check_components`` and
    ``_sample(lr, latents, progress_bar, num_inference_steps, strength, extra_step_kwargs, generator,
    callback_on_step_end, callback_on_step_end_tensor_inputs)``, the chain for one padded LR image or tile."""

    def check_inputs(
        self,
        rgb: torch.Tensor,
        *,
        num_inference_steps: int,
        strength: float,
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
        self.check_strength(num_inference_steps, strength)
        self.check_output_options(color_fix, lr_consistency)
        self.check_sampling_inputs(
            rgb,
            tile_size=tile_size,
            tile_overlap=tile_overlap,
            generator=generator,
            latents=latents,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )

    def upscale_with_strength(
        self,
        image,
        *,
        num_inference_steps: int,
        strength: float,
        eta: float,
        color_fix: str,
        lr_consistency: bool,
        tile_size: int | None,
        tile_overlap: int,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        output_type: str,
        return_dict: bool,
        callback_on_step_end: Callable[..., dict[str, Any]] | PipelineCallback | MultiPipelineCallbacks | None,
        callback_on_step_end_tensor_inputs: list[str] | None,
    ):
        """The body of ``__call__`` (its arguments, in its order; documented there)."""
        callback_on_step_end_tensor_inputs = self.callback_tensor_names(
            callback_on_step_end, callback_on_step_end_tensor_inputs
        )

        # 1. Check inputs
        pre = self.image_processor.preprocess(image)
        self.check_inputs(
            pre.rgb,
            num_inference_steps=num_inference_steps,
            strength=strength,
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
        device = self._execution_device
        rgb = pre.rgb.to(device)

        # 2. Preprocess: [0, 1] -> [-1, 1], pad (reflect) to the multiple the UNet needs
        lr, _ = pad_to_multiple(rgb * 2.0 - 1.0, self.lr_multiple)

        # 3. Scheduler step arguments, and the steps per chain
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._num_timesteps = len(self.get_timesteps(num_inference_steps, strength))

        # 4. Sample (whole image, or tile by tile): the pipeline's chain
        def sample(lr_tile: torch.Tensor, start: torch.Tensor | None, progress_bar) -> torch.Tensor:
            return self._sample(
                lr_tile,
                latents=start,
                progress_bar=progress_bar,
                num_inference_steps=num_inference_steps,
                strength=strength,
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
            steps_per_chain=self._num_timesteps,
        )

        # 5. Crop back, [-1, 1] -> [0, 1], colour fix against the LR image, LR consistency, alpha, postprocess
        return self.finish_output(
            hr,
            rgb=rgb,
            alpha=pre.alpha,
            color_fix=color_fix,
            output_type=output_type,
            return_dict=return_dict,
            lr_consistency=lr_consistency,
        )
