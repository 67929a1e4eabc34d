"""What the diffusion learning tests share: a few real photo crops to train on, the overrides that train on exactly
those crops, and the Y-PSNR of a trained pipeline against bicubic on them (x4 MATLAB-bicubic LR, 8-bit)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import torch

#: 32x32 crops of scikit-image photos: name -> (photo, top, left)
CROPS = {
    "astronaut_face": ("astronaut", 76, 216),
    "astronaut_suit": ("astronaut", 316, 166),
    "coffee": ("coffee", 266, 316),
    "chelsea": ("chelsea", 96, 136),
}


def photo_crops() -> dict[str, np.ndarray]:
    """The :data:`CROPS` as uint8 (32, 32, 3) arrays."""
    from skimage import data

    return {name: getattr(data, image)()[y : y + 32, x : x + 32].copy() for name, (image, y, x) in CROPS.items()}


def train_on_crops_overrides(tmp_path: Path, crops: dict[str, np.ndarray], steps: int) -> list[str]:
    """Write ``crops`` as PNGs under ``tmp_path/hr`` and return the config overrides that train ``steps`` steps on
    exactly them (no augmentation, no checkpoints, validation or logging)."""
    (tmp_path / "hr").mkdir()
    for name, crop in crops.items():
        PIL.Image.fromarray(crop).save(tmp_path / "hr" / f"{name}.png")
    return [
        f"train.max_steps={steps}",
        "train.report_to=none",
        "train.checkpointing_steps=0",
        "train.validation_steps=0",
        "data.source=folder",
        f"data.hr_dirs=[{tmp_path / 'hr'}]",
        "data.use_hflip=false",
        "data.use_rot=false",
        "validation.source=none",
    ]


def psnr_against_bicubic(pipe, crops: dict[str, np.ndarray], **call_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Y-PSNR (crop_border 4) of ``pipe``'s x4 output and of MATLAB bicubic, per crop, from the 8-bit x4 MATLAB-bicubic
    LR of each crop; sampled with one seeded generator per crop."""
    from sr_diffusion.metrics import psnr
    from sr_diffusion.resize import imresize

    pipe.set_progress_bar_config(disable=True)
    hr = torch.stack([torch.from_numpy(c).permute(2, 0, 1).float() / 255.0 for c in crops.values()])
    lr = (imresize(hr, scale=0.25).clamp(0, 1) * 255).round() / 255
    generators = [torch.Generator().manual_seed(i) for i in range(len(crops))]
    sr = torch.from_numpy(pipe(lr, generator=generators, output_type="np", **call_kwargs).images).permute(0, 3, 1, 2)
    bicubic = (imresize(lr, scale=4).clamp(0, 1) * 255).round() / 255
    psnr_sr = psnr((sr * 255).round() / 255, hr, crop_border=4, y_channel=True)
    return psnr_sr, psnr(bicubic, hr, crop_border=4, y_channel=True)
