"""Memory of one upscale as ``sr-diffusion upscale`` runs it, per input pixel: the numbers behind the CLI's automatic
tiling (``sr_diffusion.cli.MEMORY_PER_PIXEL``).

Each measurement is a fresh subprocess: load the pipeline as the CLI does, read the resident set (``/proc/self/statm``),
then decode a PNG, upscale it (whole or in tiles), save the result as PNG, and read the peak (``ru_maxrss``). The work
memory is the peak minus the resident set after loading. Whole-image runs at two sizes give the bytes per LR pixel of a
whole-image upscale; tiled runs at two image sizes with one tile give the part that grows with the image (accumulation
buffers, input and output conversions, the LR-consistency projection); the difference is what a tile costs per pixel.

    .venv/bin/python benchmarks/bench_tile_memory.py --model generative --whole 128 256 --tiled 256 512 --tile 64
    .venv/bin/python benchmarks/bench_tile_memory.py --model regression --whole 256 512 --tiled 512 1024 --tile 64
    .venv/bin/python benchmarks/bench_tile_memory.py --model regression --cli 750x1000   # the CLI's auto tiling
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 2**20


def smooth_photo(width: int, height: int, path: Path, seed: int = 0) -> None:
    """A random smooth photo-like PNG (coarse structure plus fine texture)."""
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(seed)
    coarse = PIL.Image.fromarray(rng.integers(0, 256, (max(1, height // 16), max(1, width // 16), 3), np.uint8))
    coarse = np.asarray(coarse.resize((width, height), PIL.Image.BICUBIC), np.float32)
    image = 0.8 * coarse + 0.2 * rng.integers(0, 256, (height, width, 3)).astype(np.float32)
    PIL.Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(path)


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def child(args) -> None:
    import torch

    from sr_diffusion.cli import load_pipeline
    from sr_diffusion.image_processor import load_image, save_image

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(None if args.model in ("generative", "regression") else args.model, "cpu", "fp32",
                         regression=args.model == "regression")  # fmt: skip
    loaded = resident_mib()
    with tempfile.TemporaryDirectory() as tmp:
        smooth_photo(args.width, args.height, Path(tmp) / "in.png")
        start = time.perf_counter()
        image = load_image(Path(tmp) / "in.png")
        kwargs = {"tile_size": args.tile, "tile_overlap": args.overlap}
        if "generator" in pipe.__call__.__code__.co_varnames:
            kwargs["generator"] = torch.Generator().manual_seed(0)
        save_image(pipe(image, **kwargs).images[0], Path(tmp) / "out.png")
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"loaded_mib": loaded, "peak_mib": peak, "work_mib": peak - loaded, "seconds": seconds}))


def run(model: str, width: int, height: int, tile: int | None, overlap: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", model, "--width", str(width), "--height", str(height),
           "--overlap", str(overlap), "--threads", str(threads)]  # fmt: skip
    if tile:
        cmd += ["--tile", str(tile)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_cli(model: str, size: str, threads: int) -> None:
    """``sr-diffusion upscale`` with its defaults (automatic tiling) on a ``WxH`` photo, under ``/usr/bin/time -v``
    when it exists, else the peak RSS of the child (``RUSAGE_CHILDREN``)."""
    width, height = map(int, size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        smooth_photo(width, height, Path(tmp) / "photo.png")
        cmd = [sys.executable, "-m", "sr_diffusion.cli", "upscale", str(Path(tmp) / "photo.png"), "-o",
               str(Path(tmp) / "out"), "-q"]  # fmt: skip
        if model == "regression":
            cmd.append("--regression")
        else:  # a sampling pipeline: seeded
            cmd += ["--seed", "0"] + (["--model", model] if model != "generative" else [])
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(done.stdout.strip())
        if done.returncode:
            print(done.stderr.strip())
        print(f"{model} {size} -> x4: exit {done.returncode}, {seconds:.0f} s, peak RSS {peak:.0f} MiB "
              f"({peak / 1024:.2f} GiB)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="generative", help="generative, regression, or a pipeline folder")
    parser.add_argument("--whole", type=int, nargs="*", default=[], help="square LR sides upscaled whole")
    parser.add_argument("--tiled", type=int, nargs="*", default=[], help="square LR sides upscaled in tiles")
    parser.add_argument("--tile", type=int, default=None, help="tile side of the --tiled runs (default: 64)")
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cli", help="WxH: run sr-diffusion upscale with its defaults on a photo of this size")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--height", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.cli:
        return run_cli(args.model, args.cli, args.threads)
    rows = []
    for side, tile in [(s, None) for s in args.whole] + [(s, args.tile or 64) for s in args.tiled]:
        result = run(args.model, side, side, tile, args.overlap, args.threads)
        per_pixel = result["work_mib"] * MIB / side**2
        rows.append((side, tile, result, per_pixel))
        print(f"{args.model} {side}x{side} {'tile ' + str(tile) if tile else 'whole'}: loaded "
              f"{result['loaded_mib']:.0f} MiB, peak {result['peak_mib']:.0f} MiB, work {result['work_mib']:.0f} MiB "
              f"({per_pixel:.0f} B/LR px), {result['seconds']:.1f} s", flush=True)  # fmt: skip
    for tiled in (False, True):
        pair = [r for r in rows if bool(r[1]) == tiled]
        if len(pair) >= 2:
            (s0, _, r0, _), (s1, _, r1, _) = pair[0], pair[-1]
            slope = (r1["work_mib"] - r0["work_mib"]) * MIB / (s1**2 - s0**2)
            print(f"{'tiled' if tiled else 'whole'}: {slope:.0f} bytes per LR pixel (slope {s0}² -> {s1}²)")


if __name__ == "__main__":
    main()
