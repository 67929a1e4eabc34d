"""Period-4 and period-2 grid artefacts of the shipped x4 models on the held-out photos.

An x4 network that works on a 4x4 pixel-(un)shuffled grid (the generative default's ``PixelUnshuffleUNet``, EDSR's
pixel-shuffle upsampler) can treat the 16 output phases ``(y mod 4, x mod 4)`` differently, which shows as a faint
4-pixel texture. For each held-out photo (MATLAB-bicubic x4 LR, 8-bit) and output, on the luma:

* ``peak 1/4`` and ``peak 1/2``: the spectral power on the frequency lines ``f = 1/4`` (period 4) and ``f = 1/2``
  cycles per pixel, columns and rows averaged, over the mean of the lines 3 bins away (1.0: no peak; HR and bicubic
  are about 1);
* ``phase bias``: the RMS over the 16 phases of the mean error (output − HR, Y in 0..255) at each phase, less its
  mean over the phases (a global brightness offset is not a grid artefact), and the Y-PSNR the output would gain
  with that per-phase offset removed (what the systematic part of the grid texture costs).

    .venv/bin/python benchmarks/periodic_artifacts.py [--threads 2]
"""

from __future__ import annotations

import argparse

import torch

from sr_diffusion.defaults import DEFAULT_GENERATIVE_DIR, DEFAULT_REGRESSION_DIR
from sr_diffusion.pipelines import AutoSRPipeline
from sr_diffusion.resize import imresize
from sr_diffusion.training.data import bicubic_downsample, load_skimage_sklearn

SCALE = 4


def luma(img: torch.Tensor) -> torch.Tensor:
    """BT.601 Y (16..235 range, as the Y-PSNR of the README) of (1, 3, H, W) in [0, 1], in 0..255 units."""
    return 16.0 + (img[0] * torch.tensor([65.481, 128.553, 24.966]).view(3, 1, 1)).sum(0)


def peak_ratio(y: torch.Tensor, period: int) -> float:
    """Spectral power on the lines of frequency 1/period (rows and columns) over that 3 bins away."""
    y = y - y.mean()
    h, w = y.shape
    power = torch.fft.fft2(y).abs() ** 2
    kx, ky = w // period, h // period
    on = power[:, kx].sum() + power[ky, :].sum()
    off = (power[:, kx - 3].sum() + power[:, kx + 3].sum() + power[ky - 3, :].sum() + power[ky + 3, :].sum()) / 2
    return float(on / off)


def phase_bias(out: torch.Tensor, hr: torch.Tensor) -> tuple[float, float]:
    """(RMS of the 16 per-phase mean errors, Y-PSNR gain in dB with them removed), crop_border = SCALE."""
    e = (luma(out) - luma(hr))[SCALE:-SCALE, SCALE:-SCALE]
    h, w = (s - s % SCALE for s in e.shape)
    e = e[:h, :w].double()
    bias = e.reshape(h // SCALE, SCALE, w // SCALE, SCALE).mean((0, 2))
    bias = bias - bias.mean()
    mse, removed = e.square().mean(), bias.square().mean()
    return float(removed.sqrt()), float(10 * torch.log10(mse / (mse - removed)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generative = AutoSRPipeline.from_pretrained(DEFAULT_GENERATIVE_DIR)
    regression = AutoSRPipeline.from_pretrained(DEFAULT_REGRESSION_DIR)
    for pipe in (generative, regression):
        pipe.set_progress_bar_config(disable=True)
    print("| photo | output | peak 1/4 | peak 1/2 | phase bias (Y, 0..255) | PSNR gain without it |")
    print("|---|---|---:|---:|---:|---:|")
    for index, (name, photo) in enumerate(load_skimage_sklearn("val")):
        hr = photo.float()[None] / 255.0
        h, w = hr.shape[-2:]
        hr = hr[..., : h - h % SCALE, : w - w % SCALE]
        lr = bicubic_downsample(hr, SCALE)

        def sample(lr=lr, seed=index, **kwargs):
            return generative(lr, output_type="pt", generator=torch.Generator().manual_seed(seed), **kwargs).images

        outputs = {
            "HR": hr,
            "bicubic": imresize(lr, size=tuple(hr.shape[-2:])).clamp(0, 1),
            "regression": regression(lr, output_type="pt").images,
            "generative": sample(),
            "generative, no projection": sample(lr_consistency=False),
            "generative, 1 step": sample(num_inference_steps=1),
        }
        for label, out in outputs.items():
            y = luma(out)
            bias = "— | —" if label == "HR" else "{:.2f} | {:+.3f} dB".format(*phase_bias(out, hr))
            print(f"| {name} | {label} | {peak_ratio(y, 4):.2f} | {peak_ratio(y, 2):.2f} | {bias} |")


if __name__ == "__main__":
    main()
