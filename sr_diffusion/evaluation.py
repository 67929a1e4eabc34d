"""Scoring SR outputs against HR images: per-image and mean PSNR / SSIM, RGB and BT.601 Y, and sharpness as the
ratio of the output's mean luminance gradient magnitude to the HR image's (``grad_ratio``).

Two modes, both behind ``sr-diffusion eval``:

* :func:`evaluate_folders`: SR folder vs HR folder, matched by file stem.
* :func:`evaluate_model`: HR folder + pipeline: mod-crop the HR to a multiple of the scale, degrade
  (MATLAB bicubic by default, or a seeded Real-ESRGAN / BSRGAN degradation), upscale, score; also
  the bicubic baseline and, for bicubic degradation, LR-consistency (the known kernel). Any of our pipelines
  works: a diffusion pipeline gets a generator seeded from ``seed`` and the image's index, so a report is
  reproducible.

``crop_border`` defaults to the scale, as in BasicSR and the published tables.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .image_processor import ImageLoadError, SRImageProcessor, load_image
from .metrics import gradient_magnitude, lr_consistency, psnr, ssim
from .resize import imresize
from .utils import IMAGE_EXTENSIONS, atomic_path

__all__ = ["EvaluationReport", "evaluate_folders", "evaluate_model", "write_report", "score"]


@dataclass
class EvaluationReport:
    """Per-image rows (dicts of metric → value, plus ``name``), their means, and failures."""

    rows: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def mean(self) -> dict[str, float]:
        keys = [k for k in (self.rows[0] if self.rows else {}) if k != "name"]
        return {k: float(sum(r[k] for r in self.rows) / len(self.rows)) for k in keys}

    def to_dict(self) -> dict:
        return {"images": self.rows, "mean": self.mean, "failures": self.failures, "count": len(self.rows)}


def _images(folder: str | Path) -> dict[str, Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    files = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
    if not files:
        raise ValueError(f"{folder}: no images found")
    return files


def _to_tensor(image) -> torch.Tensor:
    return SRImageProcessor().preprocess(image).rgb


def score(sr: torch.Tensor, hr: torch.Tensor, crop_border: int) -> dict[str, float]:
    """PSNR / SSIM on RGB and on Y for one (1,3,H,W) pair in [0,1], and ``grad_ratio``: the SR image's mean
    luminance gradient magnitude over the HR image's (:func:`~sr_diffusion.metrics.gradient_magnitude`; ``inf`` for
    a flat HR image with a textured SR one). Images are quantised to 8 bits first."""
    sr = (sr.clamp(0, 1) * 255).round() / 255
    hr = (hr.clamp(0, 1) * 255).round() / 255
    grad_sr = float(gradient_magnitude(sr, crop_border=crop_border)[0])
    grad_hr = float(gradient_magnitude(hr, crop_border=crop_border)[0])
    return {
        "psnr": float(psnr(sr, hr, crop_border=crop_border)[0]),
        "ssim": float(ssim(sr, hr, crop_border=crop_border)[0]),
        "psnr_y": float(psnr(sr, hr, crop_border=crop_border, y_channel=True)[0]),
        "ssim_y": float(ssim(sr, hr, crop_border=crop_border, y_channel=True)[0]),
        "grad_ratio": grad_sr / grad_hr if grad_hr > 0 else (1.0 if grad_sr == 0 else math.inf),
    }


def evaluate_folders(sr_dir, hr_dir, scale: int = 4, crop_border: int | None = None) -> EvaluationReport:
    """Score every SR image against the HR image with the same stem."""
    crop_border = scale if crop_border is None else crop_border
    report = EvaluationReport()
    sr_files, hr_files = _images(sr_dir), _images(hr_dir)
    for stem, hr_path in hr_files.items():
        if stem not in sr_files:
            report.failures.append(f"{hr_path}: no SR image with stem {stem!r} in {sr_dir}")
            continue
        try:
            sr, hr = _to_tensor(load_image(sr_files[stem])), _to_tensor(load_image(hr_path))
            if sr.shape != hr.shape:
                raise ValueError(f"size {tuple(sr.shape[-2:])} differs from HR size {tuple(hr.shape[-2:])}")
            report.rows.append({"name": stem, **score(sr, hr, crop_border)})
        except (ImageLoadError, ValueError) as err:
            report.failures.append(f"{sr_files[stem]}: {err}")
    return report


def _degrade(hr: torch.Tensor, scale: int, degradation: str, seed: int) -> torch.Tensor:
    if degradation == "bicubic":
        return imresize(hr, scale=1 / scale).clamp(0, 1)
    generator = torch.Generator().manual_seed(seed)
    if degradation == "realesrgan":
        from .degradations import RealESRGANDegradation, RealESRGANDegradationConfig

        return RealESRGANDegradation(RealESRGANDegradationConfig(scale=scale))(hr, generator=generator)
    if degradation == "bsrgan":
        from .degradations import BSRGANDegradation, BSRGANDegradationConfig

        return BSRGANDegradation(BSRGANDegradationConfig(scale=scale))(hr, generator=generator)
    raise ValueError(f"unknown degradation {degradation!r}; use bicubic, realesrgan or bsrgan")


def _call_kwargs(pipe, scale: int, tile_size: int | None, seed: int) -> dict:
    """The keywords of ``pipe(lr, ...)``: the output scale where the pipeline can change it, tiling, and a seeded
    generator where it samples."""
    accepted = inspect.signature(pipe.__call__).parameters
    kwargs = {"tile_size": tile_size}
    if "outscale" in accepted:
        kwargs["outscale"] = scale
    elif int(getattr(pipe.config, "upscale", scale)) != scale:
        raise ValueError(f"the pipeline upscales x{pipe.config.upscale}, not x{scale}")
    if "generator" in accepted:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return kwargs


def evaluate_model(
    pipe,
    hr_dir,
    scale: int = 4,
    degradation: str = "bicubic",
    crop_border: int | None = None,
    tile_size: int | None = None,
    seed: int = 0,
) -> EvaluationReport:
    """Degrade each HR image, upscale it with ``pipe`` and score it; also the bicubic baseline."""
    crop_border = scale if crop_border is None else crop_border
    report = EvaluationReport()
    for index, (stem, hr_path) in enumerate(_images(hr_dir).items()):
        try:
            hr = _to_tensor(load_image(hr_path))
            h, w = hr.shape[-2:]
            hr = hr[..., : h - h % scale, : w - w % scale]  # mod-crop, as BasicSR
            if min(hr.shape[-2:]) < scale:
                raise ValueError(f"image is smaller than the scale {scale}")
            lr = (_degrade(hr, scale, degradation, seed + index) * 255).round() / 255
            sr = pipe(lr, **_call_kwargs(pipe, scale, tile_size, seed + index), output_type="pt").images[:, :3].cpu()
            if sr.shape != hr.shape:
                raise ValueError(f"the pipeline returned {tuple(sr.shape[-2:])}, the HR is {tuple(hr.shape[-2:])}")
            bicubic = imresize(lr, scale=scale).clamp(0, 1)
            row = {"name": stem, **score(sr, hr, crop_border)}
            row.update({f"bicubic_{k}": v for k, v in score(bicubic, hr, crop_border).items()})
            if degradation == "bicubic":
                row["lr_consistency"] = float(lr_consistency(lr, sr, scale)[0])
            report.rows.append(row)
        except (ImageLoadError, ValueError, RuntimeError) as err:
            report.failures.append(f"{hr_path}: {' '.join(str(err).split())}")
    return report


def write_report(report: EvaluationReport, out_dir=None, echo: Callable[[str], None] | None = print) -> None:
    """Print a table of per-image and mean metrics; write ``metrics.json`` / ``metrics.csv`` to ``out_dir``."""
    if echo is not None:
        if report.rows:
            keys = [k for k in report.rows[0] if k != "name"]
            echo("name".ljust(24) + "".join(k.rjust(18) for k in keys))
            for row in report.rows + [{"name": "MEAN", **report.mean}]:
                echo(str(row["name"])[:24].ljust(24) + "".join(_fmt(row[k]).rjust(18) for k in keys))
        for failure in report.failures:
            echo(f"failed: {failure}")
    if out_dir is None:
        return
    out_dir = Path(out_dir)
    with atomic_path(out_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(_json_safe(report.to_dict()), indent=2))
    if report.rows:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(report.rows[0]))
        writer.writeheader()
        writer.writerows(report.rows + [{"name": "MEAN", **report.mean}])
        with atomic_path(out_dir / "metrics.csv") as tmp:
            tmp.write_text(buffer.getvalue())


def _fmt(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.4f}"


def _json_safe(obj):
    if isinstance(obj, float) and math.isinf(obj):
        return "inf"
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj
