"""Speed and memory of the regression fallbacks on this machine's CPU (or a GPU with --device cuda).

Prints, for each architecture at its released size, x4 on a 128x128 input: output megapixels/s and
achieved GFLOP/s (FLOPs from ``model.flops``, 2 per multiply-add), for the pipeline's channels-last
CPU path and plain contiguous tensors (the reference, measured in the same run). Then the peak RSS of
a tiled 512x512 → 2048x2048 upscale with RRDBNet-23, measured in a fresh subprocess.

    .venv/bin/python benchmarks/bench_regression.py [--repeats 5] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from sr_diffusion.models import EDSR, RRDBNet, SRVGGNetCompact, SwinIR
from sr_diffusion.pipelines import RegressionSRPipeline

ARCHITECTURES = {
    "EDSR baseline (16x64)": lambda: EDSR(num_feat=64, num_block=16, upscale=4, res_scale=1.0),
    "EDSR full (32x256)": lambda: EDSR(num_feat=256, num_block=32, upscale=4, res_scale=0.1),
    "RRDBNet 23 blocks (ESRGAN)": lambda: RRDBNet(num_feat=64, num_block=23, num_grow_ch=32, scale=4),
    "SwinIR classical (180, 6x6)": lambda: SwinIR(
        upscale=4,
        embed_dim=180,
        depths=[6] * 6,
        num_heads=[6] * 6,
        window_size=8,
        mlp_ratio=2.0,
        upsampler="pixelshuffle",
        resi_connection="1conv",
    ),
    "SwinIR lightweight (60, 4x6)": lambda: SwinIR(
        upscale=4,
        embed_dim=60,
        depths=[6] * 4,
        num_heads=[6] * 4,
        window_size=8,
        mlp_ratio=2.0,
        upsampler="pixelshuffledirect",
        resi_connection="1conv",
    ),
    "SRVGGNetCompact (64x32)": lambda: SRVGGNetCompact(num_feat=64, num_conv=32, upscale=4),
}


def time_call(fn, repeats: int) -> float:
    fn()  # warm-up (oneDNN primitive creation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_speed(args) -> None:
    device = torch.device(args.device)
    size = args.size
    print(f"# x4 on a {size}x{size} input, device={device}, torch threads={torch.get_num_threads()}")
    print(f"{'model':32s} {'GFLOP':>8s} {'path':>15s} {'seconds':>8s} {'out MP/s':>9s} {'GFLOP/s':>8s}")
    x = torch.rand(1, 3, size, size, device=device)
    for name, build in ARCHITECTURES.items():
        if args.only and args.only.lower() not in name.lower():
            continue
        torch.manual_seed(0)
        model = build().eval().to(device)
        flops = model.flops(size, size)
        out_mp = (size * 4) ** 2 / 1e6
        for path, seconds in measure_paths(model, x, args.repeats, args.reference):
            print(
                f"{name:32s} {flops / 1e9:8.1f} {path:>15s} {seconds:8.3f} {out_mp / seconds:9.3f} "
                f"{flops / seconds / 1e9:8.1f}",
                flush=True,
            )


def measure_paths(model, x, repeats: int, reference: bool) -> list[tuple[str, float]]:
    """Seconds per forward for the pipeline's path, and for plain contiguous tensors as the reference."""
    pipe = RegressionSRPipeline(model=model)
    pipe.set_progress_bar_config(disable=True)
    results = []
    with torch.inference_mode():
        results.append(("pipeline", time_call(lambda: pipe.upscale_tensor(x), repeats)))
        if reference:
            model.to(memory_format=torch.contiguous_format)
            results.append(("contiguous ref", time_call(lambda: model(x.contiguous(), return_dict=False), repeats)))
    return results


def bench_memory_child() -> None:
    import resource

    torch.manual_seed(0)
    model = RRDBNet(num_feat=64, num_block=23, num_grow_ch=32, scale=4).eval()
    pipe = RegressionSRPipeline(model=model)
    pipe.set_progress_bar_config(disable=True)
    x = torch.rand(1, 3, 512, 512)
    start = time.perf_counter()
    image = pipe(x, tile_size=128, tile_overlap=16, output_type="pil").images[0]
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"size": image.size, "seconds": seconds, "peak_rss_mib": peak}))


def bench_memory() -> None:
    out = subprocess.run([sys.executable, __file__, "--memory-child"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    w, h = result["size"]
    print(
        f"# tiled 512x512 -> {w}x{h} with RRDBNet-23 (tile 128, overlap 16): "
        f"{result['seconds']:.1f} s, peak RSS {result['peak_rss_mib']:.0f} MiB (whole process)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", default=None, help="run only architectures whose name contains this")
    parser.add_argument("--no-reference", dest="reference", action="store_false")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        bench_memory_child()
        return
    bench_speed(args)
    if not args.skip_memory:
        bench_memory()


if __name__ == "__main__":
    main()
