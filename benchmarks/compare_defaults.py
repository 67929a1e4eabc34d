"""x4 models against bicubic on the held-out photos: the evaluation behind the README table (``sr_diffusion.heldout``).

Two sets: the most detailed 384x384 crop of each photo of ``<corpus>/val`` (Debian wallpaper photos, downscaled x2)
and the four bundled photos held out of the shipped models' training (chelsea, coffee, rocket, flower), each with its
MATLAB-bicubic x4 LR on the 8-bit grid. Each model upscales every LR (a sampling pipeline with seed = the image's
index, its shipped call defaults otherwise); the outputs are rounded to 8 bits and scored: Y-PSNR, its gain over
MATLAB bicubic and Y-SSIM (crop_border 4), LR-consistency (dB), the mean luminance gradient over the HR's, and the x4
grid scores (``sr_diffusion.metrics.grid_score``: spectral peaks at period 4 and 2 over their neighbourhood; clean
photos score in the single digits). Prints one markdown table: means over the images, medians for the grid scores;
``--json`` writes every image's numbers, means and medians. The HR row is the photos' own grid scores.

    .venv/bin/python benchmarks/compare_defaults.py [--corpus data/photos] [--threads 2] [--json results.json]
    .venv/bin/python benchmarks/compare_defaults.py --model mine=outputs/my_model/pipeline --model ...
    .venv/bin/python benchmarks/compare_defaults.py --comparison-image docs/default_x4_comparison.png
    .venv/bin/python benchmarks/compare_defaults.py --split train    # the photos the shipped models trained on

``--comparison-image`` writes one held-out region with smooth and detailed parts (the Kleiber bird's back, eye and
bokeh background) side by side: LR (nearest), bicubic, each model, HR, enlarged 2x (nearest) so the pixels show.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import PIL.Image
import torch

from sr_diffusion.defaults import DEFAULT_MODELS
from sr_diffusion.heldout import SCALE, HeldoutImage, HeldoutResult, bundled_images, corpus_images, evaluate
from sr_diffusion.image_processor import SRImageProcessor
from sr_diffusion.pipelines import AutoSRPipeline
from sr_diffusion.visualize import comparison_grid

# the region of the side-by-side image: photo, top, left, side, inside the photo's held-out crop
COMPARISON = ("Kleiber_by_Lukas_Baubkus", 168, 240, 144)
# table columns: metric, header, format, summary (mean, or median for the grid scores)
COLUMNS = (
    ("psnr_y", "Y-PSNR", "{:.2f}", "mean"),
    ("psnr_y_gain", "vs bicubic", "{:+.2f}", "mean"),
    ("ssim_y", "Y-SSIM", "{:.4f}", "mean"),
    ("lr_consistency", "LR-cons.", "{:.1f}", "mean"),
    ("grad_ratio", "gradient", "{:.0%}", "mean"),
    ("period4", "grid p4", "{:.0f}", "median"),
    ("period2", "grid p2", "{:.0f}", "median"),
)


def model_arg(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=PIPELINE_DIR, got {text!r}")
    return name, folder


def markdown_table(results: dict[str, HeldoutResult]) -> str:
    """One row per method, one column group per set: means, and medians for the grid scores (``—``: not scored)."""
    header, rule = ["x4"], ["---"]
    for group in results:
        header += [f"{group}: {title}" for _, title, _, _ in COLUMNS]
        rule += ["---:"] * len(COLUMNS)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    for method in next(iter(results.values())).methods:
        cells = [method]
        for result in results.values():
            summary = {how: result.summary(method, how) for how in ("mean", "median")}
            for key, _, fmt, how in COLUMNS:
                value = summary[how].get(key)
                cells.append("—" if value is None else "inf" if math.isinf(value) else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_comparison(result: HeldoutResult, images: list[HeldoutImage], path: Path) -> None:
    """The :data:`COMPARISON` region of every method's output side by side, enlarged 2x (nearest)."""
    photo, top, left, side = COMPARISON
    lr = {image.name: image.lr for image in images}.get(photo)
    if lr is None:
        raise SystemExit(f"--comparison-image needs the corpus photo {photo}")

    def crop(image: torch.Tensor, scale: int = 1) -> PIL.Image.Image:
        t, lf, s = top // scale, left // scale, side // scale
        return SRImageProcessor().postprocess(image[..., t : t + s, lf : lf + s], output_type="pil")[0]

    models = [m for m in result.methods if m not in ("bicubic", "HR")]
    extra = [(m, crop(result.outputs[m][photo])) for m in models[1:]] + [("HR", crop(result.outputs["HR"][photo]))]
    grid = comparison_grid(crop(lr, SCALE), crop(result.outputs[models[0]][photo]), extra=extra, sr_label=models[0])
    grid = grid.resize((grid.width * 2, grid.height * 2), PIL.Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="data/photos", help="photo corpus; its <split> subfolder is used")
    parser.add_argument("--split", choices=("val", "train"), default="val", help="held-out photos, or training ones")
    parser.add_argument(
        "--model",
        type=model_arg,
        action="append",
        metavar="NAME=PIPELINE_DIR",
        help="a pipeline to score (repeatable; default: the two shipped models)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write all numbers to this JSON file")
    parser.add_argument("--comparison-image", type=Path, default=None, help="write the side-by-side PNG here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.corpus) / args.split
    if not folder.is_dir():
        parser.error(f"{folder}: no such folder; pass --corpus DIR, a folder with {args.split}/*.png")
    models = dict(args.model or [(name, str(path)) for name, path in DEFAULT_MODELS.items()])
    pipes = {}
    for name, path in models.items():
        pipes[name] = AutoSRPipeline.from_pretrained(path).to(args.device)
        pipes[name].set_progress_bar_config(disable=True)

    corpus = corpus_images(folder)
    results = {
        f"corpus {args.split}": evaluate(pipes, corpus),
        f"bundled {args.split}": evaluate(pipes, bundled_images(args.split)),
    }
    print(markdown_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {group: result.to_dict() for group, result in results.items()}
        args.json.write_text(json.dumps(payload, indent=2, default=str))
        print(f"wrote {args.json}")
    if args.comparison_image:
        write_comparison(results[f"corpus {args.split}"], corpus, args.comparison_image)
        print(f"wrote {args.comparison_image}")


if __name__ == "__main__":
    main()
