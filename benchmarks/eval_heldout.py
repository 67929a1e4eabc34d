"""Score a pipeline on the photos held out of the default model's training set, against bicubic.

Writes the held-out scikit-image / scikit-learn photos (chelsea, coffee, rocket, flower) as PNGs into
a folder, then runs exactly what ``sr-diffusion eval --hr FOLDER --model DIR`` runs: mod-crop, MATLAB
bicubic x4 downsampling to 8 bits, upscale, Y-channel PSNR/SSIM with crop_border = scale, plus the
bicubic baseline and LR-consistency.

    .venv/bin/python benchmarks/eval_heldout.py [--model DIR] [--out outputs/eval_heldout]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import PIL.Image

from sr_diffusion.cli import main as cli_main
from sr_diffusion.training.data import load_skimage_sklearn


def write_heldout_photos(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in load_skimage_sklearn("val"):
        stem = name.replace("/", "_")
        PIL.Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{stem}.png")
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="pipeline folder (default: the embedded model)")
    parser.add_argument("--out", default="outputs/eval_heldout", help="folder for photos and metrics")
    args = parser.parse_args()
    out = Path(args.out)
    hr = write_heldout_photos(out / "hr")
    argv = ["eval", "--hr", str(hr), "--scale", "4", "-o", str(out)]
    if args.model:
        argv += ["--model", args.model]
    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
