"""Per photo: the x4 grid scores (``sr_diffusion.metrics.grid_score``) of the models, bicubic and the HR image.

The same evaluation as ``compare_defaults.py`` (``sr_diffusion.heldout``), which prints only the medians: here each
held-out image's period-4 and period-2 peaks (power at the x4 sub-pixel grid's frequencies over the median of their
spectral neighbourhood; clean photos and bicubic score in the single digits).

    .venv/bin/python benchmarks/periodic_artifacts.py [--corpus data/photos] [--model NAME=DIR ...] [--threads 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from compare_defaults import model_arg

from sr_diffusion.defaults import DEFAULT_MODELS
from sr_diffusion.heldout import bundled_images, corpus_images, evaluate
from sr_diffusion.pipelines import AutoSRPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="data/photos", help="photo corpus; its val subfolder is used")
    parser.add_argument("--model", type=model_arg, action="append", metavar="NAME=PIPELINE_DIR")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipes = {}
    for name, path in args.model or [(name, str(path)) for name, path in DEFAULT_MODELS.items()]:
        pipes[name] = AutoSRPipeline.from_pretrained(path)
        pipes[name].set_progress_bar_config(disable=True)
    result = evaluate(pipes, corpus_images(Path(args.corpus) / "val") + bundled_images())
    print("| image | " + " | ".join(f"{m}: p4 / p2" for m in result.methods) + " |")
    print("|---|" + "---:|" * len(result.methods))
    for image in result.rows["HR"]:
        cells = [
            f"{result.rows[m][image]['period4']:.0f} / {result.rows[m][image]['period2']:.0f}" for m in result.methods
        ]
        print(f"| {image} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
