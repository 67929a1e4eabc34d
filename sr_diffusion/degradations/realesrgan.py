"""The Real-ESRGAN second-order degradation model (Wang et al., 2021, "Real-ESRGAN: Training Real-World Blind
Super-Resolution with Pure Synthetic Data", Sec. 3, Fig. 2).

Two rounds of ``blur -> random resize -> noise -> JPEG`` followed by a final stage that resizes to the LR size,
applies a sinc filter (ringing / overshoot, Sec. 3.3) and compresses to JPEG, in a random order
(``[resize + sinc] -> JPEG`` or ``JPEG -> [resize + sinc]``, 50/50).

As in BasicSR the work is split in two:

1. :meth:`RealESRGANDegradation.sample_kernels` runs per image in the data workers (CPU) and draws everything
   that may differ between the images of a batch: the three kernels, zero-padded to one fixed ``K x K`` shape
   (21x21 by default), and the per-image noise, JPEG and final-order choices. It returns a dict of tensors that
   ``torch.utils.data.default_collate`` (or :func:`collate_kernels`) stacks into a batch.
2. :meth:`RealESRGANDegradation.apply` degrades a batch on any device. It draws only what one batch must share
   (the resize factors and interpolation modes, which fix the tensor shapes) and the noise itself.

Differences from Real-ESRGAN's code, each on purpose: JPEG is the real codec at integer qualities (not the
differentiable approximation); the Gaussian-vs-Poisson choice, the second-blur choice and the final-stage order
are drawn per image instead of per batch; ``noise_prob`` / ``jpeg_prob`` (default 1) can switch stages off;
the HR image is degraded as given (Real-ESRGAN degrades an unsharp-masked copy: sharpen before calling if you
want that).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from ._rng import bernoulli, categorical, check_generator, randint, uniform
from .config import RealESRGANDegradationConfig
from .jpeg import jpeg_compress
from .kernels import pad_kernel, pulse_kernel, random_mixed_kernels, random_sinc_kernel
from .noise import add_gaussian_noise, add_poisson_noise
from .ops import INTERPOLATION_MODES, filter2d, quantize_8bit, resize

__all__ = ["KERNEL_KEYS", "PARAM_KEYS", "RealESRGANDegradation", "collate_kernels"]

#: Keys of :meth:`RealESRGANDegradation.sample_kernels` holding ``(K, K)`` float32 kernels.
KERNEL_KEYS = ("kernel1", "kernel2", "sinc_kernel")

#: All keys of :meth:`RealESRGANDegradation.sample_kernels`, per image (``s`` is the stage, 1 or 2):
#: ``noise{s}`` (bool, add noise at all), ``gaussian_noise{s}`` (bool, Gaussian else Poisson),
#: ``noise_sigma{s}`` / ``poisson_scale{s}`` (float32), ``gray_noise{s}`` (bool), ``jpeg{s}`` (bool),
#: ``jpeg_quality{s}`` (int64) and ``jpeg_first`` (bool, final stage does JPEG before [resize + sinc]).
PARAM_KEYS = (
    KERNEL_KEYS
    + tuple(
        f"{name}{stage}"
        for stage in (1, 2)
        for name in (
            "noise",
            "gaussian_noise",
            "noise_sigma",
            "poisson_scale",
            "gray_noise",
            "jpeg",
            "jpeg_quality",
        )
    )
    + ("jpeg_first",)
)

_MIN_KERNEL_SIZE = 7


def _random_kernel_size(generator: torch.Generator, max_size: int) -> int:
    """An odd size drawn uniformly from ``7, 9, ..., max_size`` (Real-ESRGAN: 7 to 21)."""
    return _MIN_KERNEL_SIZE + 2 * randint(generator, 0, (max_size - _MIN_KERNEL_SIZE) // 2)


def _scalar(value: bool | float) -> torch.Tensor:
    """0-d tensor: bool -> bool, int -> int64, float -> float32."""
    if isinstance(value, bool):
        return torch.tensor(value)
    return torch.tensor(value, dtype=torch.int64 if isinstance(value, int) else torch.float32)


def collate_kernels(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per-image dicts from :meth:`RealESRGANDegradation.sample_kernels` into one batch dict
    (what ``default_collate`` does too): kernels ``(B, K, K)``, scalars ``(B,)``."""
    if not samples:
        raise ValueError("collate_kernels needs at least one sample")
    return {key: torch.stack([sample[key] for sample in samples]) for key in samples[0]}


class RealESRGANDegradation:
    """Synthesises LR images from HR ones with Real-ESRGAN's second-order model.

    Args:
        config: every parameter; defaults to Real-ESRGAN x4plus (``RealESRGANDegradationConfig()``).

    Example::

        degradation = RealESRGANDegradation()
        lr = degradation(hr, generator=torch.Generator().manual_seed(0))  # (B, 3, H, W) -> (B, 3, H//4, W//4)
    """

    def __init__(self, config: RealESRGANDegradationConfig | None = None):
        if config is None:
            config = RealESRGANDegradationConfig()
        if not isinstance(config, RealESRGANDegradationConfig):
            raise TypeError(f"config must be a RealESRGANDegradationConfig, got {type(config).__name__}")
        self.config = config

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> RealESRGANDegradation:
        return cls(RealESRGANDegradationConfig.from_yaml(path))

    @property
    def scale(self) -> int:
        return self.config.scale

    @property
    def kernel_size(self) -> int:
        """``K``: every kernel of :meth:`sample_kernels` is ``(K, K)``."""
        return self.config.kernel_pad_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    # --------------------------------------------------------------------------------------------------------
    # 1. Per-image sampling (CPU data workers)
    # --------------------------------------------------------------------------------------------------------

    def _sample_blur_kernel(self, generator: torch.Generator, suffix: str) -> torch.Tensor:
        """One first- (``suffix=""``) or second-order (``"2"``) blur kernel, ``(K, K)`` float64 (Sec. 3.1, 3.3)."""
        cfg = self.config
        max_size = getattr(cfg, f"blur_kernel_size{suffix}")
        size = _random_kernel_size(generator, max_size)
        if bernoulli(generator, getattr(cfg, f"sinc_prob{suffix}")):
            # small kernels get a cut-off of at least pi / 3, larger ones of at least pi / 5
            cutoff_range = (math.pi / 3, math.pi) if size < 13 else (math.pi / 5, math.pi)
            kernel = random_sinc_kernel(size, cutoff_range, generator=generator)
        else:
            sigma = getattr(cfg, f"blur_sigma{suffix}")
            kernel = random_mixed_kernels(
                getattr(cfg, f"kernel_list{suffix}"),
                getattr(cfg, f"kernel_prob{suffix}"),
                size,
                sigma,
                sigma,
                (-math.pi, math.pi),
                getattr(cfg, f"betag_range{suffix}"),
                getattr(cfg, f"betap_range{suffix}"),
                generator=generator,
            )
        return pad_kernel(kernel, self.kernel_size)

    def _sample_final_sinc(self, generator: torch.Generator) -> torch.Tensor:
        if not bernoulli(generator, self.config.final_sinc_prob):
            return pulse_kernel(self.kernel_size)
        size = _random_kernel_size(generator, self.config.blur_kernel_size2)
        return random_sinc_kernel(size, (math.pi / 3, math.pi), pad_to=self.kernel_size, generator=generator)

    def sample_kernels(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw the per-image part of one degradation (run it in the data workers).

        Args:
            generator: source of every draw (a CPU generator in a worker; any device works).

        Returns:
            Dict with the keys :data:`PARAM_KEYS`: ``kernel1`` / ``kernel2`` / ``sinc_kernel`` as ``(K, K)``
            float32 kernels summing to 1 (``kernel2`` is the identity pulse when the second blur is skipped,
            probability ``1 - second_blur_prob``; ``sinc_kernel`` is the pulse with ``1 - final_sinc_prob``),
            and 0-d tensors for the per-image noise / JPEG / order choices.
        """
        check_generator(generator)
        cfg = self.config
        out: dict[str, torch.Tensor] = {"kernel1": self._sample_blur_kernel(generator, "")}
        kernel2 = self._sample_blur_kernel(generator, "2")
        out["kernel2"] = kernel2 if bernoulli(generator, cfg.second_blur_prob) else pulse_kernel(self.kernel_size)
        out["sinc_kernel"] = self._sample_final_sinc(generator)
        out = {key: kernel.to(torch.float32) for key, kernel in out.items()}
        for stage, suffix in ((1, ""), (2, "2")):
            jpeg_low, jpeg_high = getattr(cfg, f"jpeg_range{suffix}")
            draws = {
                "noise": bernoulli(generator, getattr(cfg, f"noise_prob{suffix}")),
                "gaussian_noise": bernoulli(generator, getattr(cfg, f"gaussian_noise_prob{suffix}")),
                "noise_sigma": uniform(generator, *getattr(cfg, f"noise_range{suffix}")),
                "poisson_scale": uniform(generator, *getattr(cfg, f"poisson_scale_range{suffix}")),
                "gray_noise": bernoulli(generator, getattr(cfg, f"gray_noise_prob{suffix}")),
                "jpeg": bernoulli(generator, getattr(cfg, f"jpeg_prob{suffix}")),
                "jpeg_quality": randint(generator, math.ceil(jpeg_low), math.floor(jpeg_high)),
            }
            out.update({f"{name}{stage}": _scalar(value) for name, value in draws.items()})
        out["jpeg_first"] = torch.tensor(bernoulli(generator, 0.5))
        return out

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """:meth:`sample_kernels` for ``batch_size`` images, collated (kernels ``(B, K, K)``, scalars ``(B,)``)."""
        return collate_kernels([self.sample_kernels(generator) for _ in range(batch_size)])

    # --------------------------------------------------------------------------------------------------------
    # 2. Batched application (any device)
    # --------------------------------------------------------------------------------------------------------

    @staticmethod
    def _draw_resize(generator: torch.Generator, probs: Sequence[float], scale_range: Sequence[float]):
        """Batch-wide ``(factor, mode)``: up ``U(1, high)``, down ``U(low, 1)`` or keep, with ``probs``."""
        updown = categorical(generator, probs)
        factor = (uniform(generator, 1.0, scale_range[1]), uniform(generator, scale_range[0], 1.0), 1.0)[updown]
        mode = INTERPOLATION_MODES[randint(generator, 0, len(INTERPOLATION_MODES) - 1)]
        return factor, mode

    def _check_params(self, params: dict, batch: int, device) -> dict[str, torch.Tensor]:
        missing = [key for key in PARAM_KEYS if key not in params]
        if missing:
            raise ValueError(
                f"kernels dict is missing {missing}; build it with RealESRGANDegradation.sample_kernels / "
                "sample_batch (keys: PARAM_KEYS)"
            )
        out = {}
        for key in PARAM_KEYS:
            value = torch.as_tensor(params[key])
            per_image_ndim = 2 if key in KERNEL_KEYS else 0
            if value.ndim == per_image_ndim:  # one sample's value, shared by the batch
                value = value.expand(batch, *value.shape)
            if value.ndim != per_image_ndim + 1 or value.shape[0] != batch:
                raise ValueError(f"kernels[{key!r}] has shape {tuple(value.shape)}; expected a batch of {batch}")
            out[key] = value if key.startswith("jpeg_quality") else value.to(device)
        return out

    def _noise(self, img: torch.Tensor, params: dict, stage: int, generator: torch.Generator) -> torch.Tensor:
        """Per-image Gaussian or Poisson noise, colour or grey, clamped to [0, 1] (Sec. 3.1 "Noise")."""
        apply, gaussian = params[f"noise{stage}"], params[f"gaussian_noise{stage}"]
        gray = params[f"gray_noise{stage}"]
        for use_gaussian in (True, False):
            idx = (apply & (gaussian == use_gaussian)).nonzero(as_tuple=True)[0]
            if idx.numel() == 0:
                continue
            if use_gaussian:
                sigma = params[f"noise_sigma{stage}"][idx]
                noisy = add_gaussian_noise(img[idx], sigma, gray[idx], generator=generator)
            else:
                scale = params[f"poisson_scale{stage}"][idx]
                noisy = add_poisson_noise(img[idx], scale, gray[idx], generator=generator)
            img = img.index_copy(0, idx, noisy)
        return img

    def _jpeg(self, img: torch.Tensor, params: dict, stage: int, rows: torch.Tensor) -> torch.Tensor:
        """JPEG for the images whose ``jpeg{stage}`` flag is set; ``rows`` maps ``img``'s rows to the batch."""
        keep = params[f"jpeg{stage}"][rows]
        idx = keep.nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            return img
        quality = params[f"jpeg_quality{stage}"][rows.cpu()][idx.cpu()]
        return img.index_copy(0, idx, jpeg_compress(img[idx], quality))

    @torch.no_grad()
    def apply(self, hr: torch.Tensor, kernels: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """Degrade a batch with per-image parameters from :meth:`sample_kernels` (Sec. 3, Fig. 2).

        Args:
            hr: ``(B, C, H, W)`` float in [0, 1], RGB (``C = 3``) or grey (``C = 1``), on any device.
            kernels: the dict of :meth:`sample_batch` (or one :meth:`sample_kernels` dict, shared by the batch).
            generator: draws the batch-wide resize factors and modes, then the noise. Noise is drawn on
                ``generator.device``, so a generator on ``hr.device`` avoids copies.

        Returns:
            ``(B, C, H // scale, W // scale)`` LR on ``hr``'s device and dtype, clamped and rounded to 8-bit
            levels (``clamp(round(x * 255), 0, 255) / 255``).
        """
        # 1. Check inputs
        check_generator(generator)
        if not isinstance(hr, torch.Tensor) or hr.ndim != 4 or not hr.is_floating_point():
            raise ValueError("hr must be a float (B, C, H, W) tensor in [0, 1]")
        b, c, h, w = hr.shape
        if c not in (1, 3):
            raise ValueError(f"hr must have 3 (RGB) or 1 channels, got {c}")
        scale = self.config.scale
        if h < scale or w < scale:
            raise ValueError(f"hr of size {h}x{w} is smaller than the scale factor {scale}")
        params = self._check_params(kernels, b, hr.device)
        cfg = self.config
        rows = torch.arange(b, device=hr.device)

        # 2. Batch-wide choices, drawn before any noise so they do not depend on the batch size
        factor1, mode1 = self._draw_resize(generator, cfg.resize_prob, cfg.resize_range)
        factor2, mode2 = self._draw_resize(generator, cfg.resize_prob2, cfg.resize_range2)
        final_mode = INTERPOLATION_MODES[randint(generator, 0, len(INTERPOLATION_MODES) - 1)]

        # 3. First degradation: blur -> resize -> noise -> JPEG
        out = filter2d(hr, params["kernel1"])
        out = resize(out, (int(h * factor1), int(w * factor1)), mode1)
        out = self._noise(out, params, 1, generator)
        out = self._jpeg(out, params, 1, rows)

        # 4. Second degradation: blur (kernel2 is a pulse when skipped) -> resize -> noise
        out = filter2d(out, params["kernel2"])
        out = resize(out, (int(h / scale * factor2), int(w / scale * factor2)), mode2)
        out = self._noise(out, params, 2, generator)

        # 5. Final stage: [resize to LR + sinc] and JPEG, in a per-image random order
        size = (h // scale, w // scale)
        lr = hr.new_empty(b, c, *size)
        for jpeg_first in (False, True):
            idx = (params["jpeg_first"] == jpeg_first).nonzero(as_tuple=True)[0]
            if idx.numel() == 0:
                continue
            x = out[idx]
            if jpeg_first:
                x = self._jpeg(x, params, 2, idx)
            x = filter2d(resize(x, size, final_mode), params["sinc_kernel"][idx])
            if not jpeg_first:
                x = self._jpeg(x, params, 2, idx)
            lr[idx] = x

        # 6. Clamp and round to 8-bit levels
        return quantize_8bit(lr)

    def degrade(self, hr: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Sample per-image parameters (:meth:`sample_batch`) and :meth:`apply` them, with one generator.

        ``hr`` is ``(B, C, H, W)`` in [0, 1]; returns ``(B, C, H // scale, W // scale)`` on the 8-bit grid.
        """
        check_generator(generator)
        return self.apply(hr, self.sample_batch(hr.shape[0], generator), generator)

    __call__ = degrade
