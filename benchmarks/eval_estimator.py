"""The shipped degradation estimator on the held-out photos, against predicting the training mean, overall and by
what the degradation's final stage did.

Exactly the evaluation the training script writes to ``evaluation.json`` (with
``configs/degradation_estimator_default.yaml``: 512 crops of 192 px, x4 Real-ESRGAN chain, seed = the config's), run
on ``sr_diffusion/weights/degradation_estimator`` (or ``--model DIR``), printed as a markdown table: one row per group,
one column per quantity, MAE / predict-the-mean MAE = ratio.

    .venv/bin/python benchmarks/eval_estimator.py [--model DIR] [--crop-size 384] [--threads 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sr_diffusion.estimation import QUANTITIES, DegradationEstimator
from sr_diffusion.training import load_config
from sr_diffusion.training.degradation_estimator import (
    DegradationEstimatorExperimentConfig,
    evaluate_on_held_out_photos,
)

REPO = Path(__file__).resolve().parents[1]
GROUP_NAMES = {
    "jpeg_last": "final JPEG is the last operation",
    "jpeg_before_resize": "final JPEG, then resize + sinc",
    "no_final_jpeg": "no final JPEG",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "sr_diffusion" / "weights" / "degradation_estimator"))
    parser.add_argument("--config", default=str(REPO / "configs" / "degradation_estimator_default.yaml"))
    parser.add_argument("--crop-size", type=int, default=None, help="HR crop side (default: the config's gt_size)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = load_config(args.config, cls=DegradationEstimatorExperimentConfig)
    model = DegradationEstimator.from_pretrained(args.model)
    scores = evaluate_on_held_out_photos(model, config, crop_size=args.crop_size)
    rows = [("all", scores)] + [(GROUP_NAMES[name], group) for name, group in scores["by_final_stage"].items()]
    print("| samples | n | " + " | ".join(QUANTITIES) + " |")
    print("|---|---:|" + "---:|" * len(QUANTITIES))
    for label, s in rows:
        cells = [f"{s['mae'][q]:.3g} / {s['baseline_mae'][q]:.3g} = **{s['ratio'][q]:.2f}**" for q in QUANTITIES]
        print(f"| {label} | {s['num_samples']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
