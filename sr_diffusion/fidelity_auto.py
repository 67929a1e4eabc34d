"""``fidelity="auto"``: set a pipeline's fidelity knobs from how degraded its input is.

The SR pipelines trade faithfulness to the LR input against generated detail with a few knobs, each with one default
tuned by its authors on Real-ESRGAN-degraded inputs. A clean input deserves more faithfulness than that default (the
LR image is trustworthy), a heavily degraded one less (the faithful path copies its artefacts). ``fidelity="auto"``
estimates the degradation of the input with a :class:`~sr_diffusion.estimation.DegradationEstimator` and sets every
knob the caller left unset (``None``) from it; a value the caller gives always wins.

The mapping, documented and monotone:

1. **Severity.** Each estimated quantity is scaled to [0, 1] between "clean" and "heavy",
   ``b = (blur_sigma - 0.375) / (1.5 - 0.375)`` (LR pixels), ``n = noise_sigma / 25`` (0..255 scale),
   ``j = (95 - jpeg_quality) / (95 - 30)``, each clamped to [0, 1], and combined as
   ``severity = 1 - (1 - b)(1 - n)(1 - j)``: 0 only for a sharp, noiseless, uncompressed input, non-decreasing in
   every quantity, 1 when any one of them is at its heavy end. A typical Real-ESRGAN x4plus degradation has severity
   :data:`TYPICAL_SEVERITY` = 0.7: the median over its targets on training crops (the mean targets, blur 0.72 px,
   noise 9.4, JPEG 79, give 0.67).
2. **Knobs.** Each knob (:data:`AUTO_KNOBS`) is piecewise linear in the severity through three anchors: its value for
   a clean input (severity 0), its authors' default at :data:`TYPICAL_SEVERITY`, and its value for the heaviest
   input (severity 1):

   ==================================  =====  ========  =====  ==========================================
   knob                                clean  typical   heavy  direction with more degradation
   ==================================  =====  ========  =====  ==========================================
   ``fidelity_weight`` (StableSR CFW)  1.0    0.5       0.25   down: less of the LR encoder's features
   ``added_noise_level`` (PASD)        700    900       999    up: a noisier start, more generation
   ``controlnet_conditioning_scale``   1.0    1.0       0.8    down: a looser hold on the LR image
   ==================================  =====  ========  =====  ==========================================

   StableSR's default ``w = 0.5`` is the original's ``dec_w``; PASD's ``added_noise_level = 900`` and the ControlNet
   scale 1.0 (PASD and SeeSR) are PASD's and SeeSR's ``test_*.py`` defaults. ``start_point`` (PASD, SeeSR) is
   discrete and never set: both released models start from the LR latent.
3. **Batches.** The knobs are scalars per call, so a batch gets the knobs of its mean estimate.

The estimator sees at most a centred ``512 x 512`` crop of each image (the knobs depend on the degradation, not on the
content, and the crop bounds the cost), and needs images of at least its ``min_input_size`` (16) a side.

The SD pipelines (StableSR, PASD, SeeSR) call :func:`resolve_auto_fidelity` through
``StableDiffusionSRMixin.resolve_fidelity`` (:mod:`sr_diffusion.pipelines.sd_base`, whose module docstring tabulates
every fidelity control of the three), with their ``degradation_estimator`` component.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "AUTO_FIDELITY",
    "AUTO_KNOBS",
    "TYPICAL_SEVERITY",
    "AutoKnob",
    "auto_fidelity_knobs",
    "check_fidelity",
    "degradation_severity",
    "estimate_degradation",
    "resolve_auto_fidelity",
]

#: The ``fidelity`` value that asks a pipeline to set its unset fidelity knobs from the input.
AUTO_FIDELITY = "auto"

#: Median severity of the Real-ESRGAN x4plus degradation's targets (tests/test_fidelity_auto.py measures it): where
#: each knob takes its authors' default.
TYPICAL_SEVERITY = 0.7

# (clean, heavy) ends of each quantity's severity scale
_BLUR_RANGE = (0.375, 1.5)
_NOISE_RANGE = (0.0, 25.0)
_JPEG_RANGE = (95.0, 30.0)
_MAX_SIDE = 512


@dataclass(frozen=True)
class AutoKnob:
    """A knob's values at severity 0 (``clean``), :data:`TYPICAL_SEVERITY` (``typical``) and 1 (``heavy``); linear in
    between; ``integer`` knobs are rounded."""

    clean: float
    typical: float
    heavy: float
    integer: bool = False

    def __call__(self, severity: float) -> float | int:
        s = min(max(float(severity), 0.0), 1.0)
        if s <= TYPICAL_SEVERITY:
            value = self.clean + (self.typical - self.clean) * s / TYPICAL_SEVERITY
        else:
            value = self.typical + (self.heavy - self.typical) * (s - TYPICAL_SEVERITY) / (1.0 - TYPICAL_SEVERITY)
        return int(round(value)) if self.integer else float(value)


#: The knobs ``fidelity="auto"`` can set, by their ``__call__`` keyword (table in the module docstring).
AUTO_KNOBS: dict[str, AutoKnob] = {
    "fidelity_weight": AutoKnob(clean=1.0, typical=0.5, heavy=0.25),
    "added_noise_level": AutoKnob(clean=700, typical=900, heavy=999, integer=True),
    "controlnet_conditioning_scale": AutoKnob(clean=1.0, typical=1.0, heavy=0.8),
}


def check_fidelity(fidelity: Any) -> None:
    """Raise a ``ValueError`` unless ``fidelity`` is None (the knobs' own defaults) or ``"auto"``."""
    if fidelity is not None and fidelity != AUTO_FIDELITY:
        raise ValueError(f"fidelity must be None or {AUTO_FIDELITY!r}, got {fidelity!r}")


def _unit(value: torch.Tensor, clean: float, heavy: float) -> torch.Tensor:
    return ((value.float() - clean) / (heavy - clean)).clamp(0.0, 1.0)


def degradation_severity(estimate) -> torch.Tensor:
    """``(B,)`` severities in [0, 1] of a :class:`~sr_diffusion.estimation.DegradationEstimate` (module docstring)."""
    b = _unit(estimate.blur_sigma, *_BLUR_RANGE)
    n = _unit(estimate.noise_sigma, *_NOISE_RANGE)
    j = _unit(estimate.jpeg_quality, *_JPEG_RANGE)
    return 1.0 - (1.0 - b) * (1.0 - n) * (1.0 - j)


def auto_fidelity_knobs(estimate, knobs=None) -> dict[str, float | int]:
    """The knobs of :data:`AUTO_KNOBS` (or only those named in ``knobs``) for ``estimate``; a batch gets the knobs of
    its mean estimate."""
    names = list(AUTO_KNOBS) if knobs is None else list(knobs)
    unknown = [name for name in names if name not in AUTO_KNOBS]
    if unknown:
        raise ValueError(f"fidelity='auto' cannot set {unknown}; it sets {list(AUTO_KNOBS)}")
    severity = float(degradation_severity(estimate.mean())[0])
    return {name: AUTO_KNOBS[name](severity) for name in names}


@functools.lru_cache(maxsize=1)
def _default_estimator():
    from sr_diffusion.estimation import load_default_degradation_estimator

    return load_default_degradation_estimator().requires_grad_(False)


def _center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return images[..., top : top + min(h, size), left : left + min(w, size)]


@torch.no_grad()
def estimate_degradation(images: torch.Tensor, estimator=None):
    """The :class:`~sr_diffusion.estimation.DegradationEstimate` of ``images`` ``(B, 3, h, w)`` in [0, 1] (centred
    crops of at most 512 pixels a side), by ``estimator`` (on its own device) or, when None, by the estimator shipped
    in the package (on the CPU)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"fidelity='auto' estimates the degradation of a (B, 3, h, w) RGB batch, got {shape}")
    model = _default_estimator() if estimator is None else estimator
    h, w = images.shape[-2:]
    if min(h, w) < model.min_input_size:
        raise ValueError(
            f"fidelity='auto' needs LR images of at least {model.min_input_size}x{model.min_input_size} pixels to "
            f"estimate their degradation, got {w}x{h}: set the fidelity knobs explicitly for smaller images"
        )
    parameter = next(model.parameters())
    crops = _center_crop(images, _MAX_SIDE).to(device=parameter.device, dtype=parameter.dtype)
    was_training = model.training
    model.eval()
    estimate = model(crops).estimate
    model.train(was_training)
    return estimate


def resolve_auto_fidelity(
    knobs: Mapping[str, Any], images: torch.Tensor, estimator=None, fidelity: str | None = AUTO_FIDELITY
) -> dict[str, Any]:
    """The pipeline's fidelity knobs with ``fidelity="auto"`` applied: every knob whose value is None is set from the
    estimated degradation of ``images``; given values are kept (the caller's value always wins).

    Args:
        knobs: the pipeline's knob keywords (names in :data:`AUTO_KNOBS`) and the caller's values (None: unset).
        images: the LR batch ``(B, 3, h, w)`` in [0, 1], ``h, w >= 16``.
        estimator: a :class:`~sr_diffusion.estimation.DegradationEstimator` (a pipeline's ``degradation_estimator``
            component), or None for the one shipped in the package.
        fidelity: ``"auto"``, or None to return ``knobs`` unchanged (the knobs' own defaults then apply).

    Returns:
        A new dict with the same keys. The estimator only runs when some knob is unset.

    Example (what ``StableDiffusionSRMixin.resolve_fidelity`` does for PASD's ``__call__``)::

        knobs = resolve_auto_fidelity(
            {"added_noise_level": added_noise_level, "controlnet_conditioning_scale": controlnet_conditioning_scale},
            lr_images, self.degradation_estimator, fidelity,
        )
    """
    check_fidelity(fidelity)
    unknown = [name for name in knobs if name not in AUTO_KNOBS]
    if unknown:
        raise ValueError(f"fidelity='auto' cannot set {unknown}; it sets {list(AUTO_KNOBS)}")
    out = dict(knobs)
    unset = [name for name, value in knobs.items() if value is None]
    if fidelity is None or not unset:
        return out
    out.update(auto_fidelity_knobs(estimate_degradation(images, estimator), unset))
    return out
