"""Degradation estimation: how blurred, noisy and JPEG-compressed an LR image is, learned from the degradation
pipeline's own parameters, so that ``fidelity="auto"`` can set a pipeline's fidelity knobs from its input.

* :func:`degrade_with_targets` (:mod:`.targets`): Real-ESRGAN-degrade an HR batch and return the LR images with their
  targets (the definitions of the three quantities are in that module's docstring);
* :class:`DegradationEstimator` (:mod:`.model`): the small CNN, and :class:`DegradationEstimate`, its output;
* :func:`load_default_degradation_estimator`: the estimator shipped in the package.

Importing this package loads torch and diffusers (not the training code).
"""

from .model import (
    QUANTITIES,
    DegradationEstimate,
    DegradationEstimator,
    DegradationEstimatorOutput,
    load_default_degradation_estimator,
)
from .targets import BLUR_SIGMA_MIN, degrade_with_targets, effective_blur_sigma

__all__ = [
    "BLUR_SIGMA_MIN",
    "QUANTITIES",
    "DegradationEstimate",
    "DegradationEstimator",
    "DegradationEstimatorOutput",
    "degrade_with_targets",
    "effective_blur_sigma",
    "load_default_degradation_estimator",
]
