"""Regression super-resolution (EDSR, RRDBNet/ESRGAN, SwinIR, SRVGGNetCompact): the fast, deterministic fallback.

One forward pass of a feed-forward network y = f(x), x the LR image, with the shared tiling, the
x8 geometric self-ensemble (Lim et al., EDSR, Sec. 4.4: average of f over the 8 dihedral transforms,
each inverted), and output at any scale via MATLAB bicubic resizing of f's output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ModelMixin

import sr_diffusion.models  # noqa: F401  (diffusers resolves saved components from sys.modules)
from sr_diffusion.image_processor import ImageInput, SRImageProcessor, crop_to_size, pad_to_multiple
from sr_diffusion.resize import resize
from sr_diffusion.tiling import tile_grid, tiled_apply

from ..call_docs import shared_call_docs
from ..pipeline_output import SRPipelineOutput

__all__ = ["RegressionSRPipeline", "MAX_UNTILED_SIDE", "MIN_CONTEXT"]

#: Largest input side processed in one piece; larger inputs need ``tile_size``.
MAX_UNTILED_SIDE = 16384

#: Smallest side the model sees: a shorter side is centred in an edge-replicated frame of this size, then cropped back.
MIN_CONTEXT = 16


def _dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 dihedral transforms (k in 0..7): rotate by 90°·(k % 4), then flip if k ≥ 4."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def _dihedral_inverse(x: torch.Tensor, k: int) -> torch.Tensor:
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, -(k % 4), dims=(-2, -1))


class RegressionSRPipeline(DiffusionPipeline):
    r"""Super-resolution with a feed-forward network.

    Args:
        model: an sr_diffusion regression model (``EDSR``, ``RRDBNet``, ``SwinIR``,
            ``SRVGGNetCompact``, or any ``ModelMixin`` with ``upscale`` and ``input_multiple``
            properties whose forward maps (N,3,h,w) in [0,1] to (N,3,h·upscale,w·upscale)).
    """

    model_cpu_offload_seq = "model"

    def __init__(self, model: ModelMixin):
        super().__init__()
        self.register_modules(model=model)
        self.image_processor = SRImageProcessor()

    @property
    def upscale(self) -> int:
        """The model's native scale factor."""
        return int(self.model.upscale)

    def check_inputs(self, rgb: torch.Tensor, *, outscale, tile_size, tile_overlap, tile_batch_size, tile_blend):
        h, w = rgb.shape[-2:]
        if h < 1 or w < 1:
            raise ValueError(f"image has an empty side: {h}x{w}")
        if outscale is not None and not outscale > 0:
            raise ValueError(f"outscale must be positive, got {outscale}")
        if tile_size is None:
            if max(h, w) > MAX_UNTILED_SIDE:
                raise ValueError(
                    f"image is {w}x{h}: a side over {MAX_UNTILED_SIDE} pixels needs tiling; pass tile_size "
                    "(e.g. 256, or --tile 256 on the command line)"
                )
            return
        multiple = int(self.model.input_multiple)
        if tile_size < multiple or tile_size % multiple:
            raise ValueError(f"tile_size must be a positive multiple of {multiple} for this model, got {tile_size}")
        if not 0 <= tile_overlap < tile_size:
            raise ValueError(f"tile_overlap must be in [0, tile_size), got {tile_overlap}")
        if tile_batch_size < 1:
            raise ValueError(f"tile_batch_size must be >= 1, got {tile_batch_size}")
        if tile_blend not in ("linear", "gaussian"):
            raise ValueError(f"tile_blend must be 'linear' or 'gaussian', got {tile_blend!r}")

    def _model_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.model.dtype)
        if x.device.type == "cpu":
            # oneDNN's convolutions run ~15-20% faster on channels-last activations (BENCHMARKS.md);
            # the weights stay contiguous, so save_pretrained is unaffected.
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x, return_dict=False)[0]

    def _ensemble_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x8 self-ensemble: mean over k of T_k^{-1}(f(T_k(x)))."""
        out = sum(_dihedral_inverse(self._model_forward(_dihedral(x, k)).float(), k) for k in range(8))
        return out / 8

    def upscale_tensor(
        self,
        rgb: torch.Tensor,
        *,
        tile_size: int | None = None,
        tile_overlap: int = 32,
        tile_batch_size: int = 1,
        tile_blend: str = "linear",
        self_ensemble: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Run the model at its native scale on (N,3,H,W) in [0,1]; returns (N,3,H·s,W·s) float32.

        The input is padded (reflect) to the model's ``input_multiple`` and the output cropped back,
        so any size works and nothing is resized.
        """
        forward = self._ensemble_forward if self_ensemble else self._model_forward
        # A side under MIN_CONTEXT pixels is centred in an edge-replicated frame of that size: otherwise the model's
        # zero padding is most of what it sees, and a 1x1 or 300x1 image changes colour (200 -> 115 red)
        full_h, full_w = rgb.shape[-2:]
        pad_h, pad_w = max(0, MIN_CONTEXT - full_h), max(0, MIN_CONTEXT - full_w)
        top, left = pad_h // 2, pad_w // 2
        if pad_h or pad_w:
            rgb = F.pad(rgb, (left, pad_w - left, top, pad_h - top), mode="replicate")
        padded, size = pad_to_multiple(rgb, int(self.model.input_multiple))
        scale = self.upscale
        if tile_size is None:
            out = forward(padded)
            if progress is not None:
                progress(1)
        else:
            out = tiled_apply(
                forward,
                padded,
                scale=scale,
                tile_size=tile_size,
                tile_overlap=tile_overlap,
                blend=tile_blend,
                tile_batch_size=tile_batch_size,
                progress=progress,
            )
        out = crop_to_size(out.float(), (size[0] * scale, size[1] * scale))
        return out[..., top * scale : (top + full_h) * scale, left * scale : (left + full_w) * scale]

    @torch.no_grad()
    @shared_call_docs
    def __call__(
        self,
        image: ImageInput | Sequence[ImageInput],
        outscale: float | None = None,
        tile_size: int | None = None,
        tile_overlap: int = 32,
        tile_batch_size: int = 1,
        tile_blend: str = "linear",
        self_ensemble: bool = False,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        r"""Upscale ``image``.

        Args:
            image: PIL image, path, numpy array, (C,H,W)/(N,C,H,W) tensor in [0,1], or a list of them.
                Grayscale, palette, CMYK and 16-bit inputs become RGB; an alpha channel is carried
                through, upscaled separately with bicubic interpolation.
            outscale: output size / input size. Defaults to the model's native scale; other values
                resize the model output with MATLAB bicubic (antialiased when shrinking).
            tile_size: process the (padded) input in tiles of this side, blended over
                ``tile_overlap`` pixels; required for sides over ``MAX_UNTILED_SIDE``.
            tile_overlap: {tile_overlap}
            tile_batch_size: tiles per forward pass.
            tile_blend: ``"linear"`` or ``"gaussian"`` blending weights.
            self_ensemble: average over the 8 flips/rotations (8× slower, usually +0.1–0.2 dB).
            output_type: {output_type}
            return_dict: {return_dict}

        Returns:
            ``SRPipelineOutput(images)`` or ``(images,)``; images are round(H·outscale) × round(W·outscale).
        """
        # 1. Check and preprocess inputs
        pre = self.image_processor.preprocess(image)
        self.check_inputs(
            pre.rgb,
            outscale=outscale,
            tile_size=tile_size,
            tile_overlap=tile_overlap,
            tile_batch_size=tile_batch_size,
            tile_blend=tile_blend,
        )
        device = self._execution_device
        rgb = pre.rgb.to(device)
        h, w = rgb.shape[-2:]
        outscale = self.upscale if outscale is None else outscale
        out_size = (max(1, round(h * outscale)), max(1, round(w * outscale)))

        # 2. Upscale at the model's native scale
        total = 1
        if tile_size is not None:
            multiple = int(self.model.input_multiple)
            _, _, ys, xs = tile_grid(h + (-h) % multiple, w + (-w) % multiple, tile_size, tile_overlap)
            total = len(ys) * len(xs)
        with self.progress_bar(total=total) as bar:
            sr = self.upscale_tensor(
                rgb,
                tile_size=tile_size,
                tile_overlap=tile_overlap,
                tile_batch_size=tile_batch_size,
                tile_blend=tile_blend,
                self_ensemble=self_ensemble,
                progress=bar.update,
            )

        # 3. Resize to outscale and upscale alpha separately
        if tuple(sr.shape[-2:]) != out_size:
            sr = resize(sr, size=out_size, mode="matlab_bicubic")
        alpha = None
        if pre.alpha is not None:
            alpha = resize(pre.alpha.to(device), size=out_size, mode="bicubic").clamp(0, 1)

        # 4. Postprocess
        images = self.image_processor.postprocess(sr, alpha, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return SRPipelineOutput(images=images)
