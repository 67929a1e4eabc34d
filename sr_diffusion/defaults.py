"""Paths of the models and sample photo shipped inside the package."""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "DEFAULT_DEGRADATION_ESTIMATOR_DIR",
    "DEFAULT_GENERATIVE_DIR",
    "DEFAULT_MODELS",
    "DEFAULT_REGRESSION_DIR",
    "default_degradation_estimator_dir",
    "default_pipeline_dir",
    "sample_image_path",
]

_PACKAGE_DIR = Path(__file__).resolve().parent

#: The embedded generative x4 pipeline folder: a 4-step pixel-space ResShift (trained by
#: ``configs/resshift_default_x4.yaml``). The default of ``sr-diffusion upscale`` and ``demo``.
DEFAULT_GENERATIVE_DIR = _PACKAGE_DIR / "weights" / "resshift_x4"

#: The embedded regression x4 pipeline folder (trained by ``configs/regression_default_x4.yaml``): the fast,
#: deterministic fallback (``sr-diffusion upscale --regression``).
DEFAULT_REGRESSION_DIR = _PACKAGE_DIR / "weights" / "regression_x4"

#: The embedded pipelines by kind.
DEFAULT_MODELS = {"generative": DEFAULT_GENERATIVE_DIR, "regression": DEFAULT_REGRESSION_DIR}

#: The embedded degradation estimator folder (trained by ``configs/degradation_estimator_default.yaml``).
DEFAULT_DEGRADATION_ESTIMATOR_DIR = _PACKAGE_DIR / "weights" / "degradation_estimator"


def default_pipeline_dir(kind: str = "generative") -> Path:
    """The saved pipeline folder of an embedded model: ``"generative"`` (what ``sr-diffusion upscale`` uses when no
    ``--model`` is given) or ``"regression"`` (``--regression``)."""
    if kind not in DEFAULT_MODELS:
        raise ValueError(f"kind must be one of {', '.join(DEFAULT_MODELS)}, got {kind!r}")
    folder = DEFAULT_MODELS[kind]
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the embedded {kind} model is missing from {folder}; reinstall the package or pass --model DIR"
        )
    return folder


def default_degradation_estimator_dir() -> Path:
    """The ``DegradationEstimator`` folder ``fidelity="auto"`` uses when a pipeline has no estimator of its own."""
    if not (DEFAULT_DEGRADATION_ESTIMATOR_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the embedded degradation estimator is missing from {DEFAULT_DEGRADATION_ESTIMATOR_DIR}; reinstall the "
            "package or give the pipeline a degradation_estimator"
        )
    return DEFAULT_DEGRADATION_ESTIMATOR_DIR


def sample_image_path() -> Path:
    """A dandelion against an out-of-focus meadow, detail and smooth bokeh side by side: the 600x400 region at
    (top 240, left 760) of the photo corpus's held-out 'seeding' (Clemens Engelhardt, CC0-1.0, Debian's
    lomiri-wallpapers-16.04; ``training/prepare_photos.py``), MATLAB-bicubic downscaled x4 to 150x100 (8 bits).

    The photo is held out of the default models' training sets.
    """
    return _PACKAGE_DIR / "data" / "sample_lr.png"
