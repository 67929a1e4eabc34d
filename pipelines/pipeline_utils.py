"""What every diffusion SR pipeline shares: the common input checks and the assembly of the output.

A pipeline using :class:`SRSamplingMixin` samples an HR image in [-1, 1] for an LR image padded to
``lr_multiple``; it provides ``upscale``, ``lr_multiple``, ``latent_shape(n, h, w)``,
``image_processor`` and ``_callback_tensor_inputs``, and names its starting tensor in
``_latents_name`` for error messages ("x_T", "z_T", ...).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sr_diffusion.color_fix import COLOR_FIX_METHODS
from sr_diffusion.color_fix import color_fix as apply_color_fix
from sr_diffusion.image_processor import crop_to_size
from sr_diffusion.resize import resize

from .pipeline_output import SRPipelineOutput

__all__ = ["SRSamplingMixin"]


class SRSamplingMixin:
    """Input checks and output assembly shared by the diffusion SR pipelines."""

    _latents_name = "latents"

    def check_sampling_inputs(
        self,
        rgb: torch.Tensor,
        color_fix: str,
        tile_size: int | None,
        tile_overlap: int,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        callback_on_step_end_tensor_inputs: Sequence[str] | None,
    ) -> None:
        """The checks every pipeline makes: image size, colour fix, tiling, generators, latents, callbacks."""
        n, _, h, w = rgb.shape
        name = f"latents ({self._latents_name})"
        if h < 1 or w < 1:
            raise ValueError(f"image has an empty side: {h}x{w}")
        if color_fix not in COLOR_FIX_METHODS:
            raise ValueError(f"color_fix must be one of {', '.join(map(repr, COLOR_FIX_METHODS))}, got {color_fix!r}")
        if tile_size is not None:
            m = self.lr_multiple
            if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < m or tile_size % m:
                raise ValueError(f"tile_size must be a positive multiple of {m} for these components, got {tile_size}")
            if isinstance(tile_overlap, bool) or not isinstance(tile_overlap, int) or not 0 <= tile_overlap < tile_size:
                raise ValueError(f"tile_overlap must be an int in [0, tile_size), got {tile_overlap}")
            if latents is not None:
                raise ValueError(f"{name} cannot be combined with tile_size: each tile draws its own")
        if isinstance(generator, list) and len(generator) != n:
            raise ValueError(f"got a list of {len(generator)} generators for a batch of {n} images; pass one per image")
        if latents is not None:
            expected = self.latent_shape(n, h, w)
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
                got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise ValueError(
                    f"{name} must have shape {expected} for {n} LR image(s) of {h}x{w} (padded to a multiple "
                    f"of {self.lr_multiple}), got {got}"
                )
        if callback_on_step_end_tensor_inputs is not None and not all(
            k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(
                f"callback_on_step_end_tensor_inputs must be in {self._callback_tensor_inputs}, got "
                f"{list(callback_on_step_end_tensor_inputs)}"
            )

    def finish_output(
        self,
        hr: torch.Tensor,
        rgb: torch.Tensor,
        alpha: torch.Tensor | None,
        color_fix: str,
        output_type: str,
        return_dict: bool,
    ):
        """Sampled HR (N, 3, H', W') in [-1, 1] of the padded LR → the pipeline's return value.

        Crops to ``upscale`` × the LR ``rgb`` (N, 3, h, w) size, maps to [0, 1], applies the colour fix
        against ``rgb``, upscales ``alpha`` (N, 1, h, w) separately (bicubic), postprocesses, frees hooks.
        """
        n, _, h, w = rgb.shape
        size = (h * self.upscale, w * self.upscale)
        sr = (crop_to_size(hr.float(), size) + 1.0) / 2.0
        sr = apply_color_fix(sr, rgb, color_fix)
        if alpha is not None:
            alpha = resize(alpha.to(sr.device), size=size, mode="bicubic").clamp(0, 1)
        images = self.image_processor.postprocess(sr, alpha, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return SRPipelineOutput(images=images)
