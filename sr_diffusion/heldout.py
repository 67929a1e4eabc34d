"""The held-out x4 evaluation behind every benchmark, README table and shipped-model test.

Two sets of HR images, each with its x4 LR input (MATLAB-bicubic ``imresize`` by 1/4, antialiased, rounded to
8 bits, as a benchmark LR image saved to PNG):

* :func:`corpus_images`: for each photo of a corpus folder (``<corpus>/val/*.png``, Debian wallpaper photos
  downscaled x2), its most detailed ``384 x 384`` crop (:func:`most_detailed_crop`);
* :func:`bundled_images`: the four bundled photos held out of the shipped models' training sets (scikit-image's
  chelsea, coffee, rocket and scikit-learn's flower), mod-cropped to a multiple of 4.

:func:`evaluate` upscales every LR image with each named pipeline (one that samples gets
``generator=torch.Generator().manual_seed(index)``, ``index`` the image's position in its set) and scores the 8-bit
output (:class:`HeldoutResult`): Y-PSNR and Y-SSIM with ``crop_border`` 4 (:func:`~sr_diffusion.evaluation.score`),
the Y-PSNR gain over bicubic, LR-consistency (:func:`~sr_diffusion.metrics.lr_consistency`), the mean luminance
gradient over the HR image's (``grad_ratio``) and the x4 grid scores (:func:`~sr_diffusion.metrics.grid_score`).
MATLAB bicubic upsampling (``"bicubic"``) and the HR image itself (``"HR"``, grid scores only) are reference rows.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .evaluation import _call_kwargs, score
from .image_processor import SRImageProcessor, load_image
from .metrics import gradient_magnitude, grid_score, lr_consistency
from .resize import imresize

__all__ = [
    "CROP_SIZE",
    "SCALE",
    "HeldoutImage",
    "HeldoutResult",
    "bundled_images",
    "corpus_images",
    "evaluate",
    "most_detailed_crop",
]

SCALE = 4
#: The side of the held-out crop of each corpus photo.
CROP_SIZE = 384
#: The metrics of a method's row, in table order; the HR reference row has only the grid scores.
METRICS = ("psnr_y", "psnr_y_gain", "ssim_y", "lr_consistency", "grad_ratio", "period4", "period2")
REFERENCES = ("bicubic", "HR")


def _quantize(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round() / 255


# ----------------------------------------------------------------------------------------------------------
# the held-out sets
# ----------------------------------------------------------------------------------------------------------


@dataclass
class HeldoutImage:
    """One held-out pair: ``hr`` ``(1, 3, H, W)`` and ``lr`` ``(1, 3, H/4, W/4)``, float32 in [0, 1] on the 8-bit
    grid; ``box`` is ``(top, left, height, width)`` of ``hr`` in the source photo."""

    name: str
    hr: torch.Tensor
    lr: torch.Tensor
    box: tuple[int, int, int, int]


def bicubic_lr(hr: torch.Tensor) -> torch.Tensor:
    """The x4 LR input of an HR image with sides multiple of 4: MATLAB bicubic by 1/4 in float64, rounded to 8 bits
    (the same numbers as ``sr_diffusion.training.data.bicubic_downsample``)."""
    return _quantize(imresize(hr.double(), scale=1 / SCALE)).float()


def most_detailed_crop(hr: torch.Tensor, size: int = CROP_SIZE, stride: int = 4) -> tuple[int, int]:
    """``(top, left)`` of the ``size x size`` window of ``hr`` with the largest mean luminance gradient magnitude.

    The window's score is :func:`~sr_diffusion.metrics.gradient_magnitude` of the crop (Sobel, over the pixels whose
    3x3 neighbourhood lies in the crop), computed for every window at once from one gradient map and its integral
    image. ``top`` and ``left`` run over the multiples of ``stride`` (a multiple of 4, so the crop keeps the x4 grid
    of the photo); ties go to the first window in row-major order.

    Args:
        hr: ``(1, 3, H, W)`` or ``(3, H, W)`` in [0, 1], at least ``size`` on each side.
        size: the window side, at least 3.
        stride: step between candidate windows, a positive multiple of 4.
    """
    if stride <= 0 or stride % 4:
        raise ValueError(f"stride must be a positive multiple of 4, got {stride}")
    h, w = hr.shape[-2:]
    if size < 3 or size > min(h, w):
        raise ValueError(f"size must be between 3 and the image's shorter side {min(h, w)}, got {size}")
    magnitude = gradient_magnitude(hr, reduction="none")[0]  # (H - 2, W - 2)
    integral = torch.nn.functional.pad(magnitude.cumsum(0).cumsum(1), (1, 0, 1, 0))
    n = size - 2  # a window's gradient pixels
    tops = torch.arange(0, h - size + 1, stride)
    lefts = torch.arange(0, w - size + 1, stride)
    t, left = tops[:, None], lefts[None, :]
    sums = integral[t + n, left + n] - integral[t, left + n] - integral[t + n, left] + integral[t, left]
    best = int(sums.flatten().argmax())
    return int(tops[best // len(lefts)]), int(lefts[best % len(lefts)])


def corpus_images(folder: str | Path, size: int = CROP_SIZE) -> list[HeldoutImage]:
    """The most detailed ``size`` crop of every PNG photo in ``folder`` (sorted by name) and its x4 LR."""
    paths = sorted(Path(folder).glob("*.png"))
    if not paths:
        raise ValueError(f"{folder}: no PNG photos")
    images = []
    for path in paths:
        photo = SRImageProcessor().preprocess(load_image(path)).rgb
        top, left = most_detailed_crop(photo, size)
        hr = photo[..., top : top + size, left : left + size].contiguous()
        images.append(HeldoutImage(path.stem, hr, bicubic_lr(hr), (top, left, size, size)))
    return images


def bundled_images(split: str = "val") -> list[HeldoutImage]:
    """The four bundled photos held out of the shipped models' training sets (``split="train"``: the eleven they
    were trained on), mod-cropped to a multiple of 4."""
    from .training.data import load_skimage_sklearn  # the training package is slow to import

    images = []
    for name, photo in load_skimage_sklearn(split):
        h, w = photo.shape[-2:]
        hr = photo[None, :, : h - h % SCALE, : w - w % SCALE].float() / 255
        images.append(HeldoutImage(name, hr, bicubic_lr(hr), (0, 0, *hr.shape[-2:])))
    return images


# ----------------------------------------------------------------------------------------------------------
# the evaluator
# ----------------------------------------------------------------------------------------------------------


@dataclass
class HeldoutResult:
    """``rows[method][image]``: the metrics of one method on one image (:data:`METRICS`), with the reference
    methods ``"bicubic"`` and ``"HR"``; ``outputs[method][image]``: the 8-bit output ``(1, 3, H, W)``."""

    rows: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    outputs: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return list(self.rows)

    def summary(self, method: str, how: str = "median") -> dict[str, float]:
        """The ``"median"`` or ``"mean"`` of each of ``method``'s metrics over the images."""
        reduce = {"median": statistics.median, "mean": statistics.fmean}[how]
        rows = list(self.rows[method].values())
        return {k: float(reduce(r[k] for r in rows)) for k in METRICS if k in rows[0]}

    def to_dict(self) -> dict:
        return {
            method: {"images": images, "median": self.summary(method), "mean": self.summary(method, "mean")}
            for method, images in self.rows.items()
        }


def _metrics(sr: torch.Tensor, hr: torch.Tensor, lr: torch.Tensor, bicubic_psnr: float) -> dict[str, float]:
    scores = score(sr, hr, SCALE)
    return {
        "psnr_y": scores["psnr_y"],
        "psnr_y_gain": scores["psnr_y"] - bicubic_psnr,
        "ssim_y": scores["ssim_y"],
        "lr_consistency": float(lr_consistency(lr, sr, SCALE)[0]),
        "grad_ratio": scores["grad_ratio"],
        **grid_score(sr),
    }


def evaluate(pipelines: Mapping[str, object], images: Sequence[HeldoutImage]) -> HeldoutResult:
    """Upscale each image's LR with each pipeline and score the 8-bit outputs against the HR; see the module.

    Args:
        pipelines: name → any of our x4 pipelines (``pipe(lr, output_type="pt").images``); the names
            ``"bicubic"`` and ``"HR"`` are the reference rows'.
        images: a held-out set (:func:`corpus_images`, :func:`bundled_images`).

    Returns:
        A :class:`HeldoutResult` with the rows ``"bicubic"``, the pipelines in order, then ``"HR"``.
    """
    clash = set(pipelines) & set(REFERENCES)
    if clash:
        raise ValueError(f"{', '.join(sorted(clash))}: reserved for the reference rows")
    result = HeldoutResult()
    for method in ("bicubic", *pipelines, "HR"):
        result.rows[method], result.outputs[method] = {}, {}
    for index, image in enumerate(images):
        hr, lr = image.hr, image.lr
        bicubic = _quantize(imresize(lr, scale=SCALE))
        bicubic_psnr = score(bicubic, hr, SCALE)["psnr_y"]
        outputs = {"bicubic": bicubic}
        for name, pipe in pipelines.items():
            sr = pipe(lr, **_call_kwargs(pipe, SCALE, None, index), output_type="pt").images[:, :3]
            if sr.shape != hr.shape:
                raise ValueError(
                    f"{name} returned {tuple(sr.shape[-2:])} for {image.name}, the HR is {tuple(hr.shape[-2:])}"
                )
            outputs[name] = _quantize(sr.float().cpu())
        for name, sr in outputs.items():
            result.rows[name][image.name] = _metrics(sr, hr, lr, bicubic_psnr)
            result.outputs[name][image.name] = sr
        result.rows["HR"][image.name] = grid_score(hr)
        result.outputs["HR"][image.name] = hr
    return result
