"""Speed of the diffusion pipelines on this machine's CPU (or a GPU with --device cuda).

Three measurements, each a ratio between things timed in the same run (minimum of ``--repeats``):

1. **Overhead**: each pipeline's wall time against the time spent inside its networks, timed by wrapping
   the denoiser's ``forward`` and the autoencoder's ``encode``/``decode``. Overhead = wall − networks,
   i.e. everything the pipeline adds (input checks, scheduler steps, pre/post-processing).
2. **LDM-SR against diffusers**: ``LDMSRPipeline`` against diffusers' ``LDMSuperResolutionPipeline`` on
   identical components, seed and steps (a tensor input, which diffusers does not resize).
3. **Methods at 64→256** with the same denoiser (a diffusers ``UNet2DModel``, 6 → 3 channels; width set by
   ``--width``): ResShift with its 15 steps in the VQ-f4 latent space, LDM-SR with 100 DDIM steps in the
   same latent space, SR3 with its pipeline default (100 DDIM steps) in pixel space, and SRDiff (its own UNet at
   the same widths on the released 8-block RRDB encoder, 100 DDIM steps of its T=100 cosine schedule). The
   autoencoder is the released VQ-f4 architecture
   (``VQModel`` (128, 256, 512), random weights: speed does not depend on them).

    .venv/bin/python benchmarks/bench_diffusion.py [--repeats 1] [--width 64] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch
from diffusers import DDIMScheduler, LDMSuperResolutionPipeline, UNet2DModel, VQModel

from sr_diffusion.conversion.vq_f4 import RELEASED_VQ_F4_CONFIG
from sr_diffusion.models import RRDBNet, SRDiffUNet
from sr_diffusion.pipelines import LDMSRPipeline, ResShiftPipeline, SR3Pipeline, SRDiffPipeline
from sr_diffusion.pipelines.srdiff.pipeline_srdiff import srdiff_scheduler
from sr_diffusion.schedulers import RESSHIFT_PRESETS, ResShiftScheduler


def denoiser(width: int) -> UNet2DModel:
    """A small diffusers UNet: 3 levels (w, 2w, 4w), attention at the lowest one, 6 → 3 channels."""
    torch.manual_seed(0)
    return UNet2DModel(
        in_channels=6,
        out_channels=3,
        block_out_channels=(width, 2 * width, 4 * width),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=32 if width % 32 == 0 else 8,
    ).eval()


def vq_f4() -> VQModel:
    """The released ResShift / LDM VQ-f4 autoencoder's architecture (see sr_diffusion.conversion.vq_f4)."""
    torch.manual_seed(0)
    return VQModel(**RELEASED_VQ_F4_CONFIG).eval()


class NetworkTimer:
    """Accumulates seconds spent inside wrapped methods (denoiser forward, autoencoder encode/decode)."""

    def __init__(self):
        self.seconds = {}

    def wrap(self, module: torch.nn.Module, method: str, label: str) -> None:
        original = getattr(module, method)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start

        setattr(module, method, timed)

    def reset(self) -> None:
        self.seconds = {}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_of(
    fn: Callable[[], object],
    repeats: int,
    device: torch.device,
    timer: NetworkTimer | None = None,
    warmup: Callable[[], object] | None = None,
):
    """Minimum wall time over ``repeats`` runs after a warm-up (``warmup``, default ``fn``), with the network
    seconds of that run."""
    (warmup or fn)()
    best = (float("inf"), {})
    for _ in range(repeats):
        if timer is not None:
            timer.reset()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - start
        if wall < best[0]:
            best = (wall, dict(timer.seconds) if timer is not None else {})
    return best


def build_pipelines(width: int, device: torch.device) -> dict[str, tuple[object, dict]]:
    """name → (pipeline, call kwargs), all x4 with the same denoiser architecture."""
    resshift_scheduler = ResShiftScheduler(**RESSHIFT_PRESETS["realsr_swinunet_realesrgan256"])
    pipes = {
        "ResShift-15 (latent)": (
            ResShiftPipeline(unet=denoiser(width), scheduler=resshift_scheduler, vae=vq_f4()),
            {"num_inference_steps": 15},
        ),
        "LDM-SR-100 (latent)": (
            LDMSRPipeline(vqvae=vq_f4(), unet=denoiser(width), scheduler=DDIMScheduler(num_train_timesteps=1000)),
            {"num_inference_steps": 100},
        ),
        "SR3-100 (pixel)": (
            SR3Pipeline(unet=denoiser(width), scheduler=DDIMScheduler(num_train_timesteps=1000)),
            {"num_inference_steps": 100},
        ),
    }
    pipes["SRDiff-100 (pixel)"] = (srdiff_pipeline(width), {"num_inference_steps": 100})
    for pipe, _ in pipes.values():
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
    return pipes


def srdiff_pipeline(width: int) -> SRDiffPipeline:
    """SRDiff's own UNet at the same widths (w, 2w, 4w) on the released x4 encoder (RRDBNet 8 blocks, 32 features)."""
    torch.manual_seed(0)
    unet = SRDiffUNet(dim=width, dim_mults=(1, 2, 4), cond_dim=32, rrdb_num_block=8, sr_scale=4)
    rrdb = RRDBNet(num_feat=32, num_block=8, num_grow_ch=16, scale=4)
    scheduler = DDIMScheduler.from_config(srdiff_scheduler().config)
    return SRDiffPipeline(unet=unet.eval(), rrdb=rrdb.eval(), scheduler=scheduler)


def wrap_networks(pipe, timer: NetworkTimer) -> None:
    for name in ("unet", "rrdb"):
        if getattr(pipe, name, None) is not None:
            timer.wrap(getattr(pipe, name), "forward", "denoiser" if name == "unet" else "lr encoder")
    for name in ("vae", "vqvae"):
        if getattr(pipe, name, None) is not None:
            timer.wrap(getattr(pipe, name), "encode", "autoencoder")
            timer.wrap(getattr(pipe, name), "decode", "autoencoder")


def bench_methods(args, device: torch.device) -> None:
    size = args.size
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    threads = torch.get_num_threads()
    print(f"\n# 1+3. {size}→{4 * size}, denoiser width {args.width}, device={device}, threads={threads}")
    print(
        f"{'pipeline':24s} {'wall s':>8s} {'denoiser s':>10s} {'other nets s':>12s} {'overhead':>9s} "
        f"{'vs ResShift-15':>15s}"
    )
    reference = None
    for name, (pipe, kwargs) in build_pipelines(args.width, device).items():
        timer = NetworkTimer()
        wrap_networks(pipe, timer)

        def call(steps=kwargs["num_inference_steps"], pipe=pipe):
            return pipe(image, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt")

        with torch.inference_mode():  # warm-up: a 2-step call builds the same kernels as the full one
            wall, nets = best_of(call, args.repeats, device, timer, warmup=functools.partial(call, 2))
        reference = reference or wall
        denoise = nets.get("denoiser", 0.0)
        other = sum(v for k, v in nets.items() if k != "denoiser")
        overhead = (wall - denoise - other) / wall
        print(
            f"{name:24s} {wall:8.2f} {denoise:10.2f} {other:12.2f} {overhead:8.1%} {wall / reference:14.2f}x",
            flush=True,
        )


def bench_ldm_vs_diffusers(args, device: torch.device) -> None:
    size, steps = args.size, args.ldm_steps
    components = {"vqvae": vq_f4(), "unet": denoiser(args.width), "scheduler": DDIMScheduler(num_train_timesteps=1000)}
    ours = LDMSRPipeline(**components).to(device)
    theirs = LDMSuperResolutionPipeline(**components).to(device)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    run_ours = lambda: ours(
        image,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),  # noqa: E731
        output_type="np",
    )
    run_theirs = lambda: theirs(
        image * 2 - 1,
        num_inference_steps=steps,  # noqa: E731
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    with torch.inference_mode():
        diff = abs(run_ours().images - run_theirs().images).max()
        # interleave the two so that a machine getting slower or faster affects both alike
        t_ours, t_theirs = float("inf"), float("inf")
        for _ in range(args.repeats):
            t_ours = min(t_ours, best_of(run_ours, 1, device)[0])
            t_theirs = min(t_theirs, best_of(run_theirs, 1, device)[0])
    print(f"\n# 2. LDM-SR {size}→{4 * size}, {steps} DDIM steps, identical components (max |diff| {diff:.1e})")
    print(
        f"LDMSRPipeline {t_ours:.2f} s, diffusers LDMSuperResolutionPipeline {t_theirs:.2f} s, "
        f"ratio {t_ours / t_theirs:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per measurement (the minimum is kept)")
    parser.add_argument("--size", type=int, default=64, help="LR side (output 4x)")
    parser.add_argument("--width", type=int, default=64, help="denoiser base width (levels w, 2w, 4w)")
    parser.add_argument("--ldm-steps", type=int, default=50, help="steps for the diffusers comparison")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", choices=["methods", "diffusers"], default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.only in (None, "diffusers"):
        bench_ldm_vs_diffusers(args, device)
    if args.only in (None, "methods"):
        bench_methods(args, device)


if __name__ == "__main__":
    main()
