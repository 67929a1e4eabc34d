"""The two shipped x4 models against bicubic on the photos held out of their training set, and a side-by-side crop.

For each held-out scikit-image / scikit-learn photo (chelsea, coffee, rocket, flower): mod-crop to a multiple of 4,
MATLAB-bicubic x4 downsampling to 8 bits, then upscale with MATLAB bicubic, the regression fallback, and the
generative default (seed = the photo's index) with its shipped call defaults (3 of its 4 steps, ``lr_consistency``),
and with one of them changed (1 step, all 4 steps, no LR-consistency projection). Scores, as ``sr-diffusion eval``:
Y-PSNR and Y-SSIM with crop_border 4, LR-consistency (PSNR of the output downsampled with the same kernel against the
LR input) and ``grad_ratio`` (mean luminance Sobel gradient magnitude of the output over the HR photo's). Prints a
markdown table of the means (the README's) and per-photo rows, and writes a side-by-side crop
(input, bicubic, generative default, regression default, HR), enlarged 2x (nearest).

    .venv/bin/python benchmarks/compare_defaults.py [--out docs/default_x4_comparison.png] [--threads 2]
    .venv/bin/python benchmarks/compare_defaults.py --split train    # the same on the 11 photos they trained on

``--split train`` scores the photos both models were trained on (no side-by-side crop): the gap between the two
splits is how much of what a model reaches it owes to having seen the photos.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import PIL.Image
import torch

from sr_diffusion.defaults import DEFAULT_MODELS
from sr_diffusion.evaluation import score
from sr_diffusion.image_processor import SRImageProcessor
from sr_diffusion.metrics import lr_consistency
from sr_diffusion.pipelines import AutoSRPipeline
from sr_diffusion.resize import imresize
from sr_diffusion.training.data import bicubic_downsample, load_skimage_sklearn
from sr_diffusion.visualize import comparison_grid

SCALE = 4
METHODS = (
    "bicubic",
    "regression",
    "generative",
    "generative, 1 step",
    "generative, 4 steps",
    "generative, no projection",
)
# the crop of the side-by-side image: photo, HR top, HR left, HR side (chelsea's fur and whiskers)
CROP = ("skimage/chelsea", 24, 112, 160)


def photo_pairs(split: str = "val"):
    """``(index, name, hr, lr)`` for each bundled photo of ``split``: HR ``(1, 3, H, W)`` in [0, 1] mod-cropped to a
    multiple of 4, LR its MATLAB-bicubic x4 downsampling on the 8-bit grid; ``index`` is the photo's seed."""
    for index, (name, photo) in enumerate(load_skimage_sklearn(split)):
        hr = photo.float()[None] / 255
        h, w = hr.shape[-2:]
        hr = hr[..., : h - h % SCALE, : w - w % SCALE]
        yield index, name, hr, bicubic_downsample(hr, SCALE)


def to_pil(x: torch.Tensor) -> PIL.Image.Image:
    return SRImageProcessor().postprocess(x, output_type="pil")[0]


def upscale_all(lr: torch.Tensor, pipes: dict, seed: int) -> dict[str, torch.Tensor]:
    out = {"bicubic": imresize(lr, scale=SCALE).clamp(0, 1)}
    out["regression"] = pipes["regression"](lr, output_type="pt").images
    variants = {  # the shipped defaults (its config), then each knob moved alone
        "generative": {},
        "generative, 1 step": {"num_inference_steps": 1},
        "generative, 4 steps": {"num_inference_steps": 4},
        "generative, no projection": {"lr_consistency": False},
    }
    for name, kwargs in variants.items():
        generator = torch.Generator().manual_seed(seed)
        out[name] = pipes["generative"](lr, generator=generator, output_type="pt", **kwargs).images
    return {name: sr.clamp(0, 1) for name, sr in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/default_x4_comparison.png", help="side-by-side crop PNG")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--split", choices=("val", "train"), default="val", help="held-out photos, or training ones")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipes = {kind: AutoSRPipeline.from_pretrained(folder) for kind, folder in DEFAULT_MODELS.items()}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)

    rows: dict[str, list[dict]] = {name: [] for name in METHODS}
    names = []
    for index, name, hr, lr in photo_pairs(args.split):
        outputs = upscale_all(lr, pipes, seed=index)
        names.append(name)
        for method, sr in outputs.items():
            sr = (sr * 255).round() / 255
            rows[method].append({**score(sr, hr, SCALE), "lr_consistency": float(lr_consistency(lr, sr, SCALE)[0])})
        if name == CROP[0] and args.split == "val":
            _, top, left, side = CROP
            crop = {m: to_pil(sr[..., top : top + side, left : left + side]) for m, sr in outputs.items()}
            lr_crop = to_pil(lr[..., top // SCALE : (top + side) // SCALE, left // SCALE : (left + side) // SCALE])
            hr_crop = to_pil(hr[..., top : top + side, left : left + side])
            grid = comparison_grid(
                lr_crop, crop["generative"], extra=[("regression (EDSR)", crop["regression"]), ("HR", hr_crop)]
            )
            grid = grid.resize((grid.width * 2, grid.height * 2), PIL.Image.Resampling.NEAREST)  # pixels visible
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            grid.save(args.out)

    keys = ("psnr_y", "ssim_y", "lr_consistency", "grad_ratio")
    photos = "held-out" if args.split == "val" else "training"
    print(f"| x4, {photos} photos | Y-PSNR (dB) | Y-SSIM | LR-consistency (dB) | gradient vs HR |")
    print("|---|---|---|---|---|")
    for method in METHODS:
        mean = {k: sum(r[k] for r in rows[method]) / len(rows[method]) for k in keys}
        print(f"| {method} | {mean['psnr_y']:.2f} | {mean['ssim_y']:.4f} | {mean['lr_consistency']:.1f} | "
              f"{100 * mean['grad_ratio']:.0f}% |")
    print()
    for i, name in enumerate(names):
        cells = "  ".join(f"{m}: {rows[m][i]['psnr_y']:.2f} dB {100 * rows[m][i]['grad_ratio']:.0f}%" for m in METHODS)
        print(f"{name:<16} {cells}")
    if args.split == "val":
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
