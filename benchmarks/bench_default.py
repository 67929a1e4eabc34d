"""Speed and memory of the two models shipped in the package: the generative default (4-step ResShift) and the
regression fallback (EDSR), on this machine's CPU (or a GPU with --device cuda).

For each: the wall time of a 128x128 → 512x512 upscale (a random smooth photo-like image; the minimum of
``--repeats`` runs after one warm-up), and, in a fresh subprocess each, the peak RSS and time of a 512x512 → 2048x2048
upscale, tiled (``--tile`` LR pixels, overlap ``--overlap``) and whole.

    .venv/bin/python benchmarks/bench_default.py [--repeats 3] [--tile 128] [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from sr_diffusion.defaults import DEFAULT_MODELS
from sr_diffusion.pipelines import AutoSRPipeline


def test_image(size: int, seed: int = 0) -> torch.Tensor:
    """``(1, 3, size, size)`` in [0, 1]: smooth structure plus fine texture, like a downscaled photo."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(1, 3, size // 16, size // 16, generator=g), size=(size, size), mode="bicubic")
    return (0.8 * coarse + 0.2 * torch.rand(1, 3, size, size, generator=g)).clamp(0, 1)


def load(kind: str, device: str):
    pipe = AutoSRPipeline.from_pretrained(DEFAULT_MODELS[kind]).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(pipe) -> dict:
    """A seeded generator for a sampling pipeline."""
    if "generator" in inspect.signature(pipe.__call__).parameters:
        return {"generator": torch.Generator().manual_seed(0)}
    return {}


def bench_speed(args) -> None:
    x = test_image(128).to(args.device)
    for kind in DEFAULT_MODELS:
        pipe = load(kind, args.device)
        times = []
        for i in range(args.repeats + 1):
            start = time.perf_counter()
            pipe(x, output_type="pt", **call_kwargs(pipe))
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if i:  # the first run warms up
                times.append(time.perf_counter() - start)
        print(f"{kind:<11} 128x128 -> 512x512: {min(times):.2f} s (min of {args.repeats})")


def bench_memory_child(kind: str, tile: int | None, overlap: int, device: str) -> None:
    import resource

    pipe = load(kind, device)
    x = test_image(512).to(device)
    start = time.perf_counter()
    image = pipe(x, tile_size=tile, tile_overlap=overlap, output_type="pil", **call_kwargs(pipe)).images[0]
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"size": image.size, "seconds": seconds, "peak_rss_mib": peak}))


def bench_memory(args) -> None:
    for kind in DEFAULT_MODELS:
        for tile in (args.tile, None):
            cmd = [
                sys.executable,
                __file__,
                "--memory-child",
                kind,
                "--tile",
                str(tile or 0),
                "--overlap",
                str(args.overlap),
                "--device",
                args.device,
            ]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            w, h = result["size"]
            how = f"tiled {tile}/{args.overlap}" if tile else "whole"
            print(
                f"{kind:<11} 512x512 -> {w}x{h} ({how}): {result['seconds']:.1f} s, "
                f"peak RSS {result['peak_rss_mib'] / 1024:.2f} GiB (whole process)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile", type=int, default=128, help="LR tile side of the tiled 512 -> 2048 run (0: none)")
    parser.add_argument("--overlap", type=int, default=16, help="LR tile overlap")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", choices=list(DEFAULT_MODELS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        bench_memory_child(args.memory_child, args.tile or None, args.overlap, args.device)
        return
    bench_speed(args)
    if not args.skip_memory:
        bench_memory(args)


if __name__ == "__main__":
    main()
