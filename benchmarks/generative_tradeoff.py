"""The generative default's PSNR / sharpness trade-off on the held-out photos: which of its trained timesteps run
(the chain), and the mean of K samples.

On the bundled held-out photos of ``compare_defaults.py`` (``sr_diffusion.heldout.bundled_images``: x4 MATLAB-bicubic
LR on the 8-bit grid; seed = the photo's index; the pipeline's LR-consistency projection on): for each chain
(``--chains``, comma-separated trained timesteps) and each ``K`` of ``--average`` (the mean of K samples of the
pipeline's default chain and of the full chain, sample k seeded ``index + 1000 k``), the mean Y-PSNR (crop_border 4)
and the mean luminance gradient over the HR photo's. Both knobs move along one line (BENCHMARKS.md).

    .venv/bin/python benchmarks/generative_tradeoff.py [--model DIR] [--chains 3 3,2,0] [--average 2 3] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch

from sr_diffusion.defaults import DEFAULT_MODELS
from sr_diffusion.evaluation import score
from sr_diffusion.heldout import bundled_images
from sr_diffusion.pipelines import AutoSRPipeline


def mean_score(pipe, pairs, samples: int = 1, **kwargs) -> tuple[float, float]:
    """Mean Y-PSNR and gradient ratio over ``pairs`` of the mean of ``samples`` outputs of ``pipe(lr, **kwargs)``."""
    psnr, grad = [], []
    for index, image in enumerate(pairs):
        hr, lr = image.hr, image.lr
        outputs = [
            pipe(lr, generator=torch.Generator().manual_seed(index + 1000 * k), output_type="pt", **kwargs).images
            for k in range(samples)
        ]
        sr = (torch.stack(outputs).mean(0).clamp(0, 1) * 255).round() / 255
        s = score(sr, hr, 4)
        psnr.append(s["psnr_y"])
        grad.append(s["grad_ratio"])
    return sum(psnr) / len(psnr), sum(grad) / len(grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODELS["generative"]))
    parser.add_argument("--chains", nargs="*", default=["3", "3,2", "3,1", "3,2,0", "3,2,1,0"])
    parser.add_argument("--average", nargs="*", type=int, default=[2, 3], help="numbers of samples to average")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = AutoSRPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    pairs = bundled_images()

    print("| sampling | Y-PSNR (dB) | gradient vs HR |")
    print("|---|---:|---:|")
    for chain in args.chains:
        timesteps = [int(t) for t in chain.split(",")]
        psnr, grad = mean_score(pipe, pairs, timesteps=timesteps)
        print(f"| timesteps {chain} | {psnr:.2f} | {100 * grad:.1f}% |", flush=True)
    full = pipe.scheduler.config.num_train_timesteps
    for steps in (None, full):
        for k in args.average:
            psnr, grad = mean_score(pipe, pairs, samples=k, num_inference_steps=steps)
            label = "default chain" if steps is None else f"all {full} steps"
            print(f"| mean of {k} samples, {label} | {psnr:.2f} | {100 * grad:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
