"""The shipped degradation estimator on the held-out photos, against predicting the training mean, overall and by
what the degradation's final stage did.

Exactly the evaluation the training script writes to ``evaluation.json`` (with
``configs/degradation_estimator_default.yaml``: 512 crops of 192 px, x4 Real-ESRGAN chain, seed = the config's), run
on ``sr_diffusion/weights/degradation_estimator`` (or ``--model DIR``), printed as a markdown table: one row per group,
one column per quantity, MAE / predict-the-mean MAE = ratio.

    .venv/bin/python benchmarks/eval_estimator.py [--model DIR] [--crop-size 384] [--threads 2] [--classical]

``--classical`` adds a reference for the noise column: two classical noise estimators on the LR image, the median
absolute Haar HH coefficient / 0.6745 (Donoho & Johnstone, 1994) and Immerkaer's (1996) Laplacian-difference mean,
combined by least squares on degraded crops of the *training* photos, then scored on the same held-out samples.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import torch

from sr_diffusion.estimation import QUANTITIES, DegradationEstimate, DegradationEstimator, degrade_with_targets
from sr_diffusion.training import load_config
from sr_diffusion.training.data import load_skimage_sklearn, random_crop_pair
from sr_diffusion.training.degradation_estimator import (
    DegradationEstimatorExperimentConfig,
    build_estimator_degradation,
    evaluate_on_held_out_photos,
)

REPO = Path(__file__).resolve().parents[1]
GROUP_NAMES = {
    "jpeg_last": "final JPEG is the last operation",
    "jpeg_before_resize": "final JPEG, then resize + sinc",
    "no_final_jpeg": "no final JPEG",
}


def classical_noise_features(lr: torch.Tensor) -> torch.Tensor:
    """``(B, 3)``: the Haar-HH MAD estimate, Immerkaer's estimate (both on the 0..255 scale, over all channels) and 1,
    for ``lr`` ``(B, 3, h, w)`` in [0, 1]."""
    x = lr.float() * 255
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x2 = x[..., :h, :w]
    hh = (x2[..., 0::2, 0::2] - x2[..., 0::2, 1::2] - x2[..., 1::2, 0::2] + x2[..., 1::2, 1::2]) / 2
    mad = hh.abs().flatten(1).median(1).values / 0.6745
    mask = torch.tensor([[1.0, -2, 1], [-2, 4, -2], [1, -2, 1]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    residual = torch.nn.functional.conv2d(x, mask, groups=3)
    immerkaer = residual.abs().flatten(1).mean(1) * (torch.pi / 2) ** 0.5 / 6
    return torch.stack([mad, immerkaer, torch.ones_like(mad)], 1)


class ClassicalNoiseBaseline(torch.nn.Module):
    """The ``--classical`` reference, shaped like the estimator for ``evaluate_on_held_out_photos``: noise from the
    fitted classical features, blur and JPEG quality at ``reference``'s training mean (not a comparison there)."""

    def __init__(self, reference: DegradationEstimator, config, num_samples: int = 1024, crop_size: int = 192):
        super().__init__()
        self.reference = reference
        self.anchor = torch.nn.Parameter(torch.zeros(()), requires_grad=False)  # gives the evaluation a device
        degradation, photos = build_estimator_degradation(config), [img for _, img in load_skimage_sklearn("train")]
        generator = torch.Generator().manual_seed(config.train.seed + 1)
        features, targets = [], []
        for _ in range(0, num_samples, 32):
            index = torch.randint(0, len(photos), (32,), generator=generator).tolist()
            hr = torch.stack([random_crop_pair(photos[i], None, crop_size, 1, generator)[0] / 255.0 for i in index])
            lr, truth = degrade_with_targets(degradation, hr, generator)
            features.append(classical_noise_features(lr))
            targets.append(truth.noise_sigma)
        features, targets = torch.cat(features).double(), torch.cat(targets).double()
        self.weights = torch.linalg.lstsq(features, targets[:, None]).solution[:, 0].float()

    def mean_estimate(self) -> DegradationEstimate:
        return self.reference.mean_estimate()

    def forward(self, lr: torch.Tensor):
        mean = self.reference.mean_estimate(lr.shape[0]).to_tensor()
        mean[:, QUANTITIES.index("noise_sigma")] = (classical_noise_features(lr) @ self.weights).clamp_min(0)
        return SimpleNamespace(estimate=DegradationEstimate.from_tensor(mean))


def print_table(scores: dict, first_label: str = "all") -> None:
    rows = [(first_label, scores)] + [(GROUP_NAMES[name], group) for name, group in scores["by_final_stage"].items()]
    print("| samples | n | " + " | ".join(QUANTITIES) + " |")
    print("|---|---:|" + "---:|" * len(QUANTITIES))
    for label, s in rows:
        cells = [f"{s['mae'][q]:.3g} / {s['baseline_mae'][q]:.3g} = **{s['ratio'][q]:.2f}**" for q in QUANTITIES]
        print(f"| {label} | {s['num_samples']} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "sr_diffusion" / "weights" / "degradation_estimator"))
    parser.add_argument("--config", default=str(REPO / "configs" / "degradation_estimator_default.yaml"))
    parser.add_argument("--crop-size", type=int, default=None, help="HR crop side (default: the config's gt_size)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--classical", action="store_true", help="also score the classical noise estimators")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = load_config(args.config, cls=DegradationEstimatorExperimentConfig)
    model = DegradationEstimator.from_pretrained(args.model)
    print_table(evaluate_on_held_out_photos(model, config, crop_size=args.crop_size))
    if args.classical:
        crop_size = args.crop_size or config.data.gt_size
        baseline = ClassicalNoiseBaseline(model, config, crop_size=crop_size)
        print(f"\nclassical noise estimators (noise column only), fitted on 1024 training crops of {crop_size} px:")
        print_table(evaluate_on_held_out_photos(baseline, config, crop_size=args.crop_size), "all (classical)")


if __name__ == "__main__":
    main()
