"""The ``sr-diffusion`` command line: ``upscale``, ``convert``, ``eval`` and ``demo``.

Every error is one line on stderr and a nonzero exit. In a folder, a bad file is reported and the
others are still processed (exit status 1 at the end). Outputs are written atomically and never
overwrite an input. Under ``accelerate launch`` (or ``torchrun``) with several processes, ``upscale`` shares its inputs
out between them (:mod:`sr_diffusion.distributed`) and writes the files of a one-process run.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
from pathlib import Path

from sr_diffusion.utils import IMAGE_EXTENSIONS

__all__ = ["main", "build_parser"]

#: The smallest ``--tile``: tiles of a few pixels give a model almost nothing to see (--tile 1 is a grey mush)
MIN_TILE = 16

#: ``--max-memory`` default, GiB: what one image's work may take beyond the process and the loaded model. Importing
#: torch and diffusers and loading a shipped model take about 0.82 GiB of RSS (benchmarks/bench_tile_memory.py), so a
#: default upscale peaks under about 2.6 GiB (2.8 GB) while its image fits (see :func:`plan_tile`).
DEFAULT_MAX_MEMORY_GIB = 1.75

#: The work memory of one upscale, per pipeline class: ``(bytes per output pixel, bytes per LR pixel of a tile)``, on
#: top of :data:`WORK_OVERHEAD`. The first part grows with the image whatever the tile (the float32 output accumulator
#: and its blending weights, the conversions to 8 bits and PNG, the float64 LR-consistency projection); the second with
#: the tile (the model's activations; whole image: the whole image). Measured as peak RSS minus RSS after loading, a
#: fresh process each, fp32, 2 threads, with ``benchmarks/bench_tile_memory.py`` on the 2-core CPU (2026-12-04) with
#: the shipped models (whose nearest + conv upsamplers run 32 / 64 channels at the output resolution). Tiles of 64 px
#: over 256² and 512² (regression 512², 1024²) inputs give the first part (its slope), whole 128² and 256² (regression
#: 256², 512²) inputs the sum (their slope):
#:
#: * generative default (ResShift, 3 steps, projected): tiled 1855 B per LR pixel = 116 B per output pixel (x4),
#:   whole 9273 B per LR pixel, so 7418 per tile pixel; work at 256² whole 622 MiB, at 512² in 64-px tiles 600 MiB.
#: * regression fallback (EDSR 64x16): tiled 835 B per LR pixel = 52 B per output pixel, whole 8683, so 7848 per
#:   tile pixel; work at 512² whole 2204 MiB.
MEMORY_PER_PIXEL = {
    "RegressionSRPipeline": (52, 7850),
    "ResShiftPipeline": (120, 7450),
}

#: Work memory that does not grow with the image (the intercepts of the fits above: 42 MiB generative, 33 regression)
WORK_OVERHEAD = 64 * 2**20

#: Pipelines without a measurement of their own: the largest of the measured ones, doubled (an estimate, not a
#: measurement; pass --tile for control)
FALLBACK_MEMORY_PER_PIXEL = tuple(2 * max(v[i] for v in MEMORY_PER_PIXEL.values()) for i in range(2))

#: The smallest tile automatic tiling chooses: with the default 32-pixel overlap a smaller tile repeats most of the
#: work (tile 64: each pixel is computed about 4 times)
MIN_AUTO_TILE = 128


class CLIError(Exception):
    """An error reported as one line and exit status 2."""


# ---------------------------------------------------------------------------------------------------
# helpers


def collect_inputs(inputs: list[str]) -> list[tuple[Path, Path]]:
    """Expand files and folders into (file, path relative to the output folder) pairs, sorted."""
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise CLIError(f"{path}: folder contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            found.extend((p, p.relative_to(path)) for p in files)
        elif path.is_file():
            found.append((path, Path(path.name)))
        else:
            raise CLIError(f"{path}: no such file or folder")
    return found


def load_pipeline(model: str | None, device: str | None, dtype: str, regression: bool = False):
    """The pipeline of ``model`` (a saved folder), else the embedded generative default, or with ``regression`` the
    embedded regression fallback."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    from sr_diffusion.defaults import default_pipeline_dir
    from sr_diffusion.pipelines import AutoSRPipeline

    diffusers_logging.disable_progress_bar()  # its "Loading pipeline components" bar; ours shows the work
    try:  # and transformers' "Loading weights" bar (the text encoders of the SD-based pipelines)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
    if model and regression:
        raise CLIError("give either --model or --regression, not both")
    device = check_device(device)
    folder = Path(model) if model else default_pipeline_dir("regression" if regression else "generative")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    try:
        pipe = AutoSRPipeline.from_pretrained(folder, dtype=torch_dtype)
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot load model from {folder}: {err}") from err
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_device(device: str | None) -> str:
    """``device`` (default: ``cuda`` if available, else ``cpu``) checked by allocating on it: a malformed name or a
    device this machine lacks is a :class:`CLIError`, before any model is loaded."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise CLIError(f"--device {device}: not a torch device name (cpu, cuda, cuda:1, mps, ...)") from None
    try:
        torch.empty(1, device=parsed)
    except Exception as err:  # RuntimeError (no such GPU), AssertionError (torch built without CUDA), ...
        no_gpu = parsed.type == "cuda" and not torch.cuda.is_available()
        reason = "no usable CUDA GPU on this machine (torch.cuda.is_available() is False)" if no_gpu else _one_line(err)
        raise CLIError(f"--device {device}: {reason}") from None
    return device


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _number(kind: type, minimum: float | None, name: str, maximum: float | None = None):
    """An argparse ``type``: a finite ``kind`` (int or float) in ``[minimum, maximum]`` (``None``: unbounded);
    anything else is a usage error (one line, exit status 2) naming the cause."""

    def parse(text: str):
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}")
        return value

    parse.__name__ = name  # argparse names the type in its message
    return parse


def _tile_size(text: str) -> int:
    """``--tile``: 0 (the whole image) or an integer >= :data:`MIN_TILE` (a smaller tile sees too little)."""
    name = f"a tile size (0 for none, or an integer >= {MIN_TILE}: a smaller tile sees too little of the image)"
    value = _number(int, 0, name)(text)
    if 0 < value < MIN_TILE:
        raise argparse.ArgumentTypeError(f"{text!r} is not {name}")
    return value


_tile_size.__name__ = "a tile size"


# ---------------------------------------------------------------------------------------------------
# upscale

#: ``upscale`` options that only some pipelines take: ``__call__`` keyword -> the option's flag
OPTIONAL_CALL_KEYWORDS = {
    "outscale": "--scale",
    "self_ensemble": "--self-ensemble",
    "lr_consistency": "--lr-consistency",
    "prompt": "--prompt",
    "negative_prompt": "--negative-prompt",
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance-scale",
    "fidelity": "--fidelity",
    "color_fix": "--color-fix",
    "generator": "--seed",
}


def tile_size_option(pipe, tile: int | None) -> int | None:
    """The ``tile_size`` keyword for ``--tile``: ``None`` (not given) leaves the pipeline's default, which for the
    pipelines that tile automatically as their originals do (``AUTO_TILING``: ResShift, StableSR, PASD, SeeSR) is that
    automatic tiling; ``0`` is the whole image at once (``tile_size=0`` for those pipelines, ``None`` for the others);
    any other value is the tile side in input pixels."""
    if tile == 0:
        return 0 if getattr(pipe, "AUTO_TILING", False) else None
    return tile


#: The overlap :func:`plan_tile` plans with when ``--tile-overlap`` is not given (the pipelines' own default is used)
PLANNING_TILE_OVERLAP = 32


def upscale_call_kwargs(pipe, args) -> dict:
    """The keywords of ``pipe(image, ...)`` for the ``upscale`` options; an option that was set for a pipeline whose
    ``__call__`` has no such keyword is a :class:`CLIError` (left unset, it is not passed: the pipeline's default)."""
    kwargs = {"tile_size": tile_size_option(pipe, args.tile)}
    if args.tile_overlap is not None:  # not given: the pipeline's own (the original's, for the SD methods)
        kwargs["tile_overlap"] = args.tile_overlap
    accepted = inspect.signature(pipe.__call__).parameters
    for keyword, flag in OPTIONAL_CALL_KEYWORDS.items():
        value = args.seed if keyword == "generator" else getattr(args, keyword)
        if value is None:  # not given: the pipeline's default
            continue
        if keyword not in accepted:
            raise CLIError(f"{flag} is not an option of {type(pipe).__name__} (its __call__ takes no {keyword})")
        kwargs[keyword] = value
    return kwargs


def tile_multiple(pipe) -> int:
    """The multiple of LR pixels a tile side of ``pipe`` must be: the diffusion pipelines' ``lr_multiple``, the
    regression model's ``input_multiple``."""
    multiple = getattr(pipe, "lr_multiple", None)
    if multiple is None:
        multiple = getattr(getattr(pipe, "model", None), "input_multiple", 1)
    return max(1, int(multiple))


def plan_tile(pipe, width: int, height: int, max_memory: float, tile_overlap: int = 32) -> tuple[int | None, float]:
    """The tile size (LR pixels) for a ``width`` x ``height`` input so that its work fits in ``max_memory`` bytes:
    ``None`` (the whole image at once) when it fits whole, else the largest multiple of :func:`tile_multiple` that
    fits, at least :data:`MIN_AUTO_TILE` (and above ``tile_overlap``). Also returns the estimated work memory in bytes
    (:data:`MEMORY_PER_PIXEL`): over ``max_memory`` when even the smallest tile does not fit (the part that grows with
    the image alone is too large)."""
    from sr_diffusion.pipelines.regression.pipeline_regression import MAX_UNTILED_SIDE

    per_output_pixel, per_tile_pixel = MEMORY_PER_PIXEL.get(type(pipe).__name__, FALLBACK_MEMORY_PER_PIXEL)
    pixels = width * height
    image_bytes = WORK_OVERHEAD + per_output_pixel * pixels * pipe.upscale**2
    whole = image_bytes + per_tile_pixel * pixels
    if whole <= max_memory and max(width, height) <= MAX_UNTILED_SIDE:
        return None, whole
    multiple = tile_multiple(pipe)
    side = math.isqrt(max(0, int((max_memory - image_bytes) / per_tile_pixel)))
    smallest = max(MIN_AUTO_TILE, tile_overlap + 1)
    tile = max(side // multiple, -(-smallest // multiple)) * multiple
    tile = min(tile, -(-max(width, height) // multiple) * multiple, MAX_UNTILED_SIDE // multiple * multiple)
    return tile, image_bytes + per_tile_pixel * min(tile, height) * min(tile, width)


#: Bytes per output pixel of a strip beyond the pipeline's own (its float32 ``output_type="np"`` result, the carried
#: overlap and the 8-bit conversion), and per output pixel of the assembled 8-bit image (RGB; RGBA takes 4)
STRIP_BYTES_PER_OUTPUT_PIXEL = 16
IMAGE_BYTES_PER_OUTPUT_PIXEL = 3


def plan_strips(
    pipe, width: int, height: int, max_memory: float, tile_overlap: int = 32, scale: int | None = None
) -> tuple[int, int | None, float] | None:
    """Strips (:mod:`sr_diffusion.strips`) for an image whose whole-output buffers do not fit: ``(strip rows, tile
    size within a strip, estimated bytes)``, or ``None`` when one strip would be the whole image. The 8-bit output
    image is held whole; each strip gets half of the rest of ``max_memory`` for its output buffers (at least
    :data:`MIN_AUTO_TILE` rows, and more than twice ``tile_overlap``), and :func:`plan_tile` picks its tile from the
    remainder."""
    scale = int(pipe.upscale if scale is None else scale)
    per_output_pixel = MEMORY_PER_PIXEL.get(type(pipe).__name__, FALLBACK_MEMORY_PER_PIXEL)[0]
    out_row = (per_output_pixel + STRIP_BYTES_PER_OUTPUT_PIXEL) * width * scale**2  # bytes per LR row of a strip
    image_bytes = IMAGE_BYTES_PER_OUTPUT_PIXEL * width * height * scale**2
    budget = max_memory - image_bytes
    rows = max(int(budget / 2 / out_row), MIN_AUTO_TILE, 2 * tile_overlap + 1)
    if rows >= height:
        return None
    extra = STRIP_BYTES_PER_OUTPUT_PIXEL * width * rows * scale**2
    tile, needed = plan_tile(pipe, width, rows, budget - extra, tile_overlap)
    return rows, tile, image_bytes + extra + needed


def output_targets(inputs: list[tuple[Path, Path]], output: Path, args) -> list[Path]:
    """Where each input's result goes. ``output`` is a folder (created as needed; results keep the inputs' relative
    paths, with ``--suffix`` and ``--ext``), or, for a single input image, an image file path: an ``output`` with an
    image extension that is not an existing folder (its format is the extension's)."""
    if output.suffix.lower() in IMAGE_EXTENSIONS and not output.is_dir():
        if len(inputs) != 1:
            raise CLIError(
                f"{output}: an output file takes one input image, got {len(inputs)}; give an output folder instead"
            )
        if args.ext is not None or args.suffix:
            raise CLIError(f"{output}: --ext and --suffix name files in an output folder, not an output file")
        return [output]
    if output.exists() and not output.is_dir():
        raise CLIError(f"{output}: output exists and is neither a folder nor an image file name")
    if not output.exists() and output.suffix:
        raise CLIError(
            f"{output}: {output.suffix} is not an output image format ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
            "for an output folder with a dot in its name, create the folder first"
        )
    ext = args.ext or "png"
    targets = [output / rel.with_name(f"{rel.stem}{args.suffix}.{ext}") for _, rel in inputs]
    seen: dict[Path, Path] = {}
    for (path, _), target in zip(inputs, targets):
        key = target.resolve()
        if key in seen:
            raise CLIError(
                f"{seen[key]} and {path} would both be written to {target}; rename one, or upscale them in separate "
                "runs or output folders"
            )
        seen[key] = path
    return targets


def check_writable(targets: list[Path]) -> None:
    """Refuse outputs that cannot be written, before any work: for each output folder, its nearest existing ancestor
    must be a folder where a file can be created (tried with a temporary file, so read-only mounts and permissions
    are both caught)."""
    import tempfile

    checked: set[Path] = set()
    for folder in {target.parent for target in targets}:
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if existing in checked:
            continue
        if not existing.is_dir():
            raise CLIError(f"{folder}: cannot create the output folder: {existing} is a file")
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as err:
            raise CLIError(
                f"{folder}: output is not writable ({err.strerror or _one_line(err)} in {existing})"
            ) from None
        checked.add(existing)


def _prepare_upscale(args, device: str | None):
    """The checks before any work, then the pipeline: ``(inputs, targets, pipe, call_kwargs)``."""
    inputs = collect_inputs(args.inputs)
    targets = output_targets(inputs, Path(args.output), args)
    if args.tile and args.tile_overlap is not None and args.tile_overlap >= args.tile:
        raise CLIError(f"--tile-overlap {args.tile_overlap} must be smaller than --tile {args.tile}")
    check_writable(targets)
    pipe = load_pipeline(args.model, device, args.dtype, args.regression)
    return inputs, targets, pipe, upscale_call_kwargs(pipe, args)


def cmd_upscale(args) -> int:
    """Upscale the inputs; under ``accelerate launch`` with several processes, each upscales its share of them.

    Every process builds and checks the same sorted list of inputs and loads the pipeline (on accelerate's device for
    it unless ``--device`` is given); the main process then decides what is to do (an output that would overwrite an
    input is an error, an existing one with ``--skip-existing`` is skipped) and the rest is split between the
    processes (``split_between_processes``), so a resumed run shares out only what is left. Each image's noise comes
    from ``--seed`` whichever process upscales it, so the files are those of a one-process run. Each process writes
    its outputs atomically; the main process shows the progress bar (of its share) and the summary of all, and every
    process exits with the same status."""
    import torch
    from tqdm.auto import tqdm

    from sr_diffusion.distributed import Processes, ProcessesFailed
    from sr_diffusion.image_processor import ImageLoadError, load_image, save_image

    processes = Processes()
    main_process = processes.is_main_process
    try:
        inputs, targets, pipe, call_kwargs = processes.agree(
            lambda: _prepare_upscale(args, args.device or processes.device), _error_report
        )
    except ProcessesFailed as failed:  # on any process: the main one says why, all stop
        if main_process:
            print(f"error: {failed.message}", file=sys.stderr)
        return failed.code
    if (
        processes.distributed
        and main_process
        and args.seed is None
        and "generator" in inspect.signature(pipe.__call__).parameters
    ):
        print(
            f"warning: without --seed, {type(pipe).__name__}'s noise depends on how the images are shared out; "
            "--seed gives the files of a one-process run",
            file=sys.stderr,
        )

    failures, todo, skipped = 0, [], []
    if main_process:  # one decision, shared: the processes never disagree on what is left to do
        input_paths = {p.resolve() for p, _ in inputs}
        for index, ((path, _), target) in enumerate(zip(inputs, targets)):
            if target.resolve() in input_paths:
                print(f"error: {path}: output {target} would overwrite an input; skipped", file=sys.stderr)
                failures += 1
            elif args.skip_existing and target.exists():
                skipped.append(target)
            else:
                todo.append(index)
    share = processes.split(processes.broadcast(todo))

    max_memory = args.max_memory * 2**30
    written = []
    desc = "upscale" if not processes.distributed else f"upscale (main of {processes.num_processes} processes)"
    for index in tqdm(share, desc=desc, unit="img", disable=args.quiet or not main_process):
        path, target = inputs[index][0], targets[index]
        try:
            image = load_image(path, max_pixels=args.max_pixels and int(args.max_pixels))
            strips = None
            overlap = PLANNING_TILE_OVERLAP if args.tile_overlap is None else args.tile_overlap
            if args.tile is None:  # automatic: whole if the work fits in --max-memory, else the largest tile that does
                tile, needed = plan_tile(pipe, image.width, image.height, max_memory, overlap)
                scale = call_kwargs.get("outscale", pipe.upscale)
                if needed > max_memory and float(scale).is_integer():  # the output's buffers alone are too large:
                    strips = plan_strips(pipe, image.width, image.height, max_memory, overlap, int(scale))  # 8 bits
                    if strips is not None and strips[2] < needed:  # but for one strip at a time
                        strip, tile, needed = strips
                    else:
                        strips = None
                call_kwargs["tile_size"] = tile
                if needed > max_memory:
                    print(
                        f"warning: {path}: {image.width}x{image.height} needs about {needed / 2**30:.1f} GiB even in "
                        f"tiles of {tile} px{f' and strips of {strip} rows' if strips else ''}, over --max-memory "
                        f"{args.max_memory:g} GiB",
                        file=sys.stderr,
                    )
            # per-tile progress for a large (tiled) image
            tiled = call_kwargs["tile_size"] is not None
            desc = f"{path.name}, {call_kwargs['tile_size']} px tiles"
            pipe.set_progress_bar_config(disable=args.quiet or not tiled or not main_process, desc=desc, leave=False)
            if "generator" in call_kwargs:  # every image from the same seed: its result does not depend on the order
                call_kwargs["generator"] = torch.Generator().manual_seed(args.seed)
            if strips is None:
                result = pipe(image, **call_kwargs).images[0]
            else:
                result = _upscale_in_strips(pipe, image, call_kwargs, int(scale), strips[0], overlap, desc, args.quiet)
            save_image(result, target)
            written.append(index)
        except Exception as err:  # one failed file, never the end of the run
            reason = (
                _one_line(err)
                if isinstance(err, (ImageLoadError, ValueError, RuntimeError, OSError))
                else (f"{type(err).__name__}: {_one_line(err)}")
            )
            print(f"error: {path}: {reason}", file=sys.stderr)
            failures += 1
    # every process's counts, on every process: the same summary (main process) and the same exit status (all)
    counts = processes.gather((written, failures))
    failures = sum(n for _, n in counts)
    if main_process:
        written = [targets[index] for index in sorted(i for indices, _ in counts for i in indices)]
        print(_summary("wrote", written, Path(args.output)))
        if skipped:
            print(_summary("skipped (--skip-existing: the output exists)", skipped, Path(args.output)))
        if failures and len(inputs) > 1:  # one input: its error line says it all
            print(f"{failures} of {len(inputs)} image(s) failed", file=sys.stderr)
    return 1 if failures else 0


def _upscale_in_strips(pipe, image, call_kwargs: dict, scale: int, strip: int, overlap: int, desc: str, quiet: bool):
    """``pipe`` on ``image`` in strips of ``strip`` LR rows (:func:`sr_diffusion.strips.upscale_in_strips`), each
    shown as its own tile progress bar."""
    from sr_diffusion.strips import upscale_in_strips

    def run(part):
        return pipe(part, **call_kwargs, output_type="np").images[0]

    def progress(done: int, total: int) -> None:
        if done < total:
            pipe.set_progress_bar_config(disable=quiet, desc=f"{desc}, strip {done + 1}/{total}", leave=False)

    pipe.set_progress_bar_config(disable=quiet, desc=f"{desc}, strip 1", leave=False)
    return upscale_in_strips(run, image, scale=scale, strip=strip, overlap=overlap, progress=progress)


#: The most file names a summary line lists
SUMMARY_NAMES = 10


def _summary(verb: str, paths: list[Path], output: Path) -> str:
    """``wrote 3 image(s) to out: a.png, sub/b.png, c.png`` (at most :data:`SUMMARY_NAMES` names, then ``and N more``;
    an output file: its path)."""
    if not output.is_dir():
        return f"{verb} {len(paths)} image(s)" + (f": {paths[0]}" if paths else "")
    names = [str(p.relative_to(output)) for p in paths[:SUMMARY_NAMES]]
    more = f" and {len(paths) - SUMMARY_NAMES} more" if len(paths) > SUMMARY_NAMES else ""
    return f"{verb} {len(paths)} image(s) in {output}" + (f": {', '.join(names)}{more}" if names else "")


# ---------------------------------------------------------------------------------------------------
# convert


def _is_seesr_folder(folder: Path) -> bool:
    """A released SeeSR model folder: its ``unet/config.json`` sets ``use_image_cross_attention``."""
    import json

    try:
        return bool(json.loads((folder / "unet" / "config.json").read_text()).get("use_image_cross_attention"))
    except (OSError, ValueError, AttributeError):
        return False


# Detectors of the built-in methods (:attr:`sr_diffusion.registry.Method.detector`): ``detector(probe) -> bool``.


def _detect_seesr(probe) -> bool:
    """A released SeeSR model folder (a PASD-like folder whose UNet has image cross-attention)."""
    return (probe.path / "unet").is_dir() and (probe.path / "controlnet").is_dir() and _is_seesr_folder(probe.path)


def _detect_pasd(probe) -> bool:
    """A released PASD checkpoint folder (``unet/`` and ``controlnet/``)."""
    return (probe.path / "unet").is_dir() and (probe.path / "controlnet").is_dir()


def _detect_stablesr(probe) -> bool:
    return any(k.startswith("structcond_stage_model.") for k in probe.state_dict)


def _detect_srdiff(probe) -> bool:
    from sr_diffusion.conversion.srdiff import is_srdiff_state_dict

    return is_srdiff_state_dict(probe.state_dict)


def _regression_arch(probe) -> str | None:
    """The regression architecture of the file (``None``: none; the error is kept in ``probe.cache``)."""
    from sr_diffusion.checkpoints import CheckpointError, detect_architecture

    if "regression_arch" not in probe.cache:
        try:
            probe.cache["regression_arch"] = detect_architecture(probe.state_dict)[0]
        except CheckpointError as err:
            probe.cache["regression_arch"], probe.cache["regression_error"] = None, err
    return probe.cache["regression_arch"]


def _detect_edsr(probe) -> bool:
    return _regression_arch(probe) == "edsr"


def _detect_rrdbnet(probe) -> bool:
    return _regression_arch(probe) == "rrdbnet"


def _detect_swinir(probe) -> bool:
    return _regression_arch(probe) == "swinir"


def _detect_srvgg(probe) -> bool:
    return _regression_arch(probe) == "srvgg"


def _detect_resshift(probe) -> bool:
    from sr_diffusion.checkpoints import CheckpointError
    from sr_diffusion.conversion.resshift import infer_resshift_unet_config

    try:
        infer_resshift_unet_config(probe.state_dict, source=probe.source)
    except CheckpointError:
        return False
    return True


def _detect_sr3(probe) -> bool:
    from sr_diffusion.checkpoints import CheckpointError
    from sr_diffusion.conversion.sr3 import infer_sr3_unet_config, split_sr3_state_dict

    try:
        infer_sr3_unet_config(
            split_sr3_state_dict(probe.state_dict, probe.source)[0], norm_groups=32, source=probe.source
        )
    except CheckpointError:
        return False
    return True


# Converters of the built-in methods (:attr:`sr_diffusion.registry.Method.converter`): ``converter(args) -> pipeline``.
# The generic option check of :func:`cmd_convert` has already refused the flags a method does not take.


def _regression_pipeline(args):
    from sr_diffusion.checkpoints import load_regression_model
    from sr_diffusion.pipelines import RegressionSRPipeline

    return RegressionSRPipeline(model=load_regression_model(args.checkpoint, arch=args.arch, scale=args.scale))


def _resshift_pipeline(args):
    from sr_diffusion.conversion import convert_resshift_unet, convert_vq_f4
    from sr_diffusion.pipelines import ResShiftPipeline
    from sr_diffusion.schedulers import RESSHIFT_PRESET_ALIASES, RESSHIFT_PRESETS, ResShiftScheduler

    presets = sorted(RESSHIFT_PRESET_ALIASES) + sorted(RESSHIFT_PRESETS)
    if args.preset is None:
        raise CLIError(
            f"a ResShift checkpoint does not record its noise schedule: pass --preset ({', '.join(presets)})"
        )
    unet, _ = convert_resshift_unet(args.checkpoint)
    vae = convert_vq_f4(args.vae) if args.vae else None
    try:
        scheduler = ResShiftScheduler.from_preset(args.preset)
    except (KeyError, ValueError) as err:
        raise CLIError(f"unknown --preset {args.preset!r}; choose from {', '.join(presets)}") from err
    return ResShiftPipeline(unet=unet, scheduler=scheduler, vae=vae, upscale=args.scale or 4)


def _sr3_pipeline(args):
    from sr_diffusion.conversion.sr3 import convert_sr3_pipeline

    config = {"norm_groups": args.norm_groups} if args.norm_groups else None
    return convert_sr3_pipeline(args.checkpoint, config=config, upscale=args.scale)


def _srdiff_pipeline(args):
    from sr_diffusion.conversion.srdiff import convert_srdiff_pipeline

    pipe = convert_srdiff_pipeline(args.checkpoint)
    if args.scale and args.scale != pipe.upscale:
        raise CLIError(f"{args.checkpoint} is an SRDiff x{pipe.upscale} model, but --scale {args.scale} was requested")
    return pipe


def _stablesr_pipeline(args):
    from sr_diffusion.conversion.stablesr import convert_stablesr

    if not args.base:
        raise CLIError(
            "a StableSR checkpoint has no text encoder, tokenizer or configs: pass --base, a diffusers Stable "
            "Diffusion folder of its family (SD 2.1-base for stablesr_000117.ckpt), and --vae vqgan_cfw_00011.ckpt "
            "for CFW"
        )
    return convert_stablesr(args.checkpoint, args.base, cfw_checkpoint=args.vae, upscale=args.scale or 4)


def _pasd_pipeline(args):
    from sr_diffusion.conversion.pasd import convert_pasd

    if not args.base:
        raise CLIError(
            "a PASD model folder has no VAE, text encoder or tokenizer: pass --base, a diffusers Stable Diffusion "
            "folder of its family (stable-diffusion-v1-5)"
        )
    return convert_pasd(args.checkpoint, args.base, upscale=args.scale or 4)


def _seesr_pipeline(args):
    from sr_diffusion.conversion.seesr import convert_seesr

    if not args.base:
        raise CLIError(
            "a SeeSR model folder has no VAE, text encoder or tokenizer: pass --base, a diffusers Stable Diffusion "
            "folder of its family (stable-diffusion-2-base)"
        )
    return convert_seesr(args.checkpoint, args.base, upscale=args.scale or 4)


def _is_our_pipeline_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a pipeline written by ``save_pretrained`` of this package and nothing else: a
    ``model_index.json`` naming one of our classes, and only the component folders (or files) it lists beside it."""
    import json

    from sr_diffusion.pipelines import PIPELINE_CLASSES

    try:
        model_index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(model_index, dict) or model_index.get("_class_name") not in PIPELINE_CLASSES:
        return False
    return all(entry.name == "model_index.json" or entry.name in model_index for entry in folder.iterdir())


def check_convert_output(out_dir: Path, sources: list[str], overwrite: bool) -> None:
    """Refuse an output folder ``convert`` may not write, before any work. ``--overwrite`` replaces only a pipeline
    folder written by this package (see :func:`_is_our_pipeline_folder`) that holds none of the ``sources`` (the
    checkpoint, --vae, --base): nothing the command did not write is ever deleted."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise CLIError(f"{out_dir}: output exists and is not a folder")
    if not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise CLIError(f"{out_dir}: output folder exists and is not empty (--overwrite replaces an earlier output)")
    resolved = out_dir.resolve()
    for source in sources:
        source_path = Path(source).resolve()
        if source_path == resolved or resolved in source_path.parents or source_path in resolved.parents:
            raise CLIError(f"{out_dir}: output folder contains or is inside the input {source}; choose another folder")
    if not _is_our_pipeline_folder(out_dir):
        raise CLIError(
            f"{out_dir}: --overwrite only replaces a pipeline folder written by sr-diffusion, and this folder holds "
            "other files; choose a new or empty folder"
        )


def cmd_convert(args) -> int:
    """Convert with the registered method ``--arch`` names, else the one whose detector recognises the checkpoint
    (:mod:`sr_diffusion.registry`); a method-specific flag the method does not take is refused."""
    from sr_diffusion.checkpoints import CheckpointError
    from sr_diffusion.registry import convert_checkpoint
    from sr_diffusion.utils import atomic_directory

    out_dir = Path(args.output)
    sources = [s for s in (args.checkpoint, args.vae, args.base) if s]
    check_convert_output(out_dir, sources, args.overwrite)
    try:
        options = {"preset": args.preset, "vae": args.vae, "base": args.base, "norm_groups": args.norm_groups}
        pipe = convert_checkpoint(args.checkpoint, args.arch, scale=args.scale, **options)
    except (CheckpointError, FileNotFoundError) as err:
        raise CLIError(_one_line(err)) from err
    with atomic_directory(out_dir) as tmp:
        pipe.save_pretrained(tmp)
    print(f"wrote {type(pipe).__name__} x{pipe.upscale} to {out_dir}")
    return 0


# ---------------------------------------------------------------------------------------------------
# eval


def cmd_eval(args) -> int:
    from sr_diffusion.evaluation import evaluate_folders, evaluate_model, write_report

    if args.sr and args.model:
        raise CLIError("give either --sr (score existing outputs) or --model (degrade, upscale, score), not both")
    if args.output:
        check_writable([Path(args.output) / "metrics.json"])
    if args.sr:
        report = evaluate_folders(args.sr, args.hr, scale=args.scale, crop_border=args.crop_border)
    else:
        pipe = load_pipeline(args.model, args.device, args.dtype, args.regression)
        report = evaluate_model(
            pipe,
            args.hr,
            scale=args.scale,
            degradation=args.degradation,
            crop_border=args.crop_border,
            tile_size=tile_size_option(pipe, args.tile),
            seed=args.seed,
        )
    write_report(report, args.output, echo=print)
    if report.failures:
        print(f"{len(report.failures)} image(s) failed (see failed: above)", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------------
# demo


def cmd_demo(args) -> int:
    import torch

    from sr_diffusion.defaults import sample_image_path
    from sr_diffusion.image_processor import load_image, save_image
    from sr_diffusion.visualize import comparison_grid

    out_dir = Path(args.output)
    check_writable([out_dir / "sample_sr.png"])
    pipe = load_pipeline(args.model, args.device, args.dtype, args.regression)
    lr = load_image(sample_image_path())
    kwargs = {"tile_size": tile_size_option(pipe, args.tile)}
    if "generator" in inspect.signature(pipe.__call__).parameters:  # a sampling pipeline: the same demo every run
        kwargs["generator"] = torch.Generator().manual_seed(args.seed)
    sr = pipe(lr, **kwargs).images[0]
    save_image(sr, out_dir / "sample_sr.png")
    grid = comparison_grid(lr, sr)
    save_image(grid, out_dir / "sample_comparison.png")
    print(f"upscaled {lr.width}x{lr.height} -> {sr.width}x{sr.height}")
    print(f"wrote {out_dir / 'sample_sr.png'} and {out_dir / 'sample_comparison.png'}")
    return 0


# ---------------------------------------------------------------------------------------------------


#: ``--seed``: what ``torch.Generator().manual_seed`` takes
SEED = _number(int, 0, f"a seed (an integer in [0, {2**64 - 1}])", maximum=2**64 - 1)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line on stderr (exit status 2) instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from sr_diffusion.registry import methods

    parser = _Parser(prog="sr-diffusion", description="Image super-resolution, the diffusers way.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_runtime(p):
        p.add_argument("--model", help="a saved pipeline folder (default: the generative model shipped in the package)")
        p.add_argument(
            "--regression",
            action="store_true",
            help="use the shipped regression fallback (EDSR x4: fast, deterministic) instead of the generative default",
        )
        p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
        p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
        p.add_argument(
            "--tile",
            type=_tile_size,
            default=None,
            help="tile size in input pixels, or 0 for the whole image at once (default: automatic: in upscale from the "
            "image size and --max-memory; ResShift, StableSR, PASD and SeeSR also tile large images as their "
            "originals do)",
        )

    p = sub.add_parser("upscale", help="upscale image files or folders")
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument(
        "-o", "--output", required=True, help="output folder, or an image file (.png, .jpg, ...) for one input image"
    )
    add_runtime(p)
    p.add_argument(
        "--scale",
        type=_number(float, 1e-3, "a scale (a number > 0)"),
        default=None,
        dest="outscale",
        help="output scale (default: the model's own)",
    )
    p.add_argument(
        "--tile-overlap",
        type=_number(int, 0, "a tile overlap (an integer >= 0)"),
        default=None,
        help="tile overlap in input pixels (default: the pipeline's own: 32, or the original's for the SD methods)",
    )
    p.add_argument(
        "--self-ensemble", action="store_true", default=None, help="x8 self-ensemble (slower, slightly better)"
    )
    p.add_argument(
        "--lr-consistency",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="diffusion pipelines: project each output so that its MATLAB-bicubic downsampling is the input "
        "(default: the pipeline's; on for the generative default)",
    )
    sd = p.add_argument_group("diffusion pipelines (a pipeline without the keyword refuses the option)")
    sd.add_argument("--prompt", help='text prompt ("auto": the prompt extractor\'s; your words come first)')
    sd.add_argument("--negative-prompt", help="negative prompt for classifier-free guidance (used verbatim)")
    sd.add_argument(
        "--steps",
        type=_number(int, 1, "a number of steps (an integer >= 1)"),
        dest="num_inference_steps",
        help="denoising steps (default: the method's)",
    )
    sd.add_argument(
        "--guidance-scale",
        type=_number(float, None, "a finite number"),
        help="classifier-free guidance scale (default: the method's)",
    )
    sd.add_argument("--fidelity", choices=["auto"], help="auto: fidelity knobs from the degradation estimator")
    sd.add_argument("--color-fix", choices=["none", "adain", "wavelet"], help="colour fix (default: the method's)")
    sd.add_argument("--seed", type=SEED, help="seed of each image's noise (default: the global RNG)")
    p.add_argument("--ext", choices=["png", "webp", "jpg", "tif"], help="output folder: file format (default: png)")
    p.add_argument("--suffix", default="", help="appended to each output file name's stem")
    p.add_argument(
        "--max-pixels",
        type=_number(float, 1, "a number of pixels (>= 1)"),
        default=None,
        help="the largest input image, in pixels (default: 1e8, or SR_DIFFUSION_MAX_PIXELS); larger files are "
        "refused from their header, before decoding",
    )
    p.add_argument(
        "--max-memory",
        type=_number(float, 0.01, "a memory budget in GiB (a number >= 0.01)"),
        default=DEFAULT_MAX_MEMORY_GIB,
        metavar="GIB",
        help="without --tile: the memory one image's work may take beyond the loaded model, in GiB; a larger image is "
        f"upscaled in tiles that fit (default: {DEFAULT_MAX_MEMORY_GIB:g}; the process and a shipped model take "
        "about 0.8 GiB more)",
    )
    p.add_argument("--skip-existing", action="store_true", help="skip inputs whose output already exists")
    p.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars (per image, and per tile of a large image)"
    )
    p.set_defaults(func=cmd_upscale)

    p = sub.add_parser("convert", help="convert an original checkpoint into a pipeline folder")
    p.add_argument("checkpoint", help="original .pth / .safetensors file (PASD, SeeSR: the released model folder)")
    p.add_argument("output", help="output pipeline folder")
    p.add_argument(
        "--arch",
        choices=[entry.name for entry in methods() if entry.converter is not None],
        help="the method (sr_diffusion.registry; default: auto-detect)",
    )
    p.add_argument(
        "--scale",
        type=_number(int, 1, "a scale (an integer >= 1)"),
        help="expected scale; an error if the checkpoint's differs",
    )
    p.add_argument("--preset", help="ResShift: the noise schedule the file was trained with (v1, v2, v3, bicsr, ...)")
    p.add_argument(
        "--vae",
        help="ResShift: the autoencoder file of latent models (autoencoder_vq_f4.pth); StableSR: the CFW autoencoder "
        "(vqgan_cfw_00011.ckpt)",
    )
    p.add_argument(
        "--base", help="StableSR, PASD, SeeSR: a diffusers Stable Diffusion folder of the checkpoint's family"
    )
    p.add_argument(
        "--norm-groups",
        type=_number(int, 1, "a number of groups (an integer >= 1)"),
        help="SR3: GroupNorm groups of the training config (not in the file)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output folder, only one that holds a pipeline written by sr-diffusion (the new one "
        "is written beside it, then swapped in)",
    )
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("eval", help="score SR outputs against HR images, or a model on HR images")
    p.add_argument("--hr", required=True, help="folder of HR (ground-truth) images")
    p.add_argument("--sr", help="folder of SR outputs with the same file stems as --hr")
    add_runtime(p)
    p.add_argument("--scale", type=_number(int, 1, "a scale (an integer >= 1)"), default=4)
    p.add_argument("--degradation", default="bicubic", choices=["bicubic", "realesrgan", "bsrgan"])
    p.add_argument(
        "--crop-border", type=_number(int, 0, "a border (an integer >= 0)"), default=None, help="default: the scale"
    )
    p.add_argument("--seed", type=SEED, default=0, help="seed for random degradations")
    p.add_argument("-o", "--output", help="folder for metrics.json and metrics.csv")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="upscale the bundled sample photo and write a side-by-side comparison")
    p.add_argument("-o", "--output", default="outputs/demo", help="output folder")
    p.add_argument("--seed", type=SEED, default=0, help="seed of a generative model's noise")
    add_runtime(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # a usage error (one line, already printed) or --help
        return exit.code if isinstance(exit.code, int) else 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("SR_DIFFUSION_TRACEBACK") and not isinstance(err, (CLIError, ValueError, OSError)):
            raise
        message, code = _error_report(err)
        print(f"error: {message}", file=sys.stderr)
        return code


def _error_report(err: BaseException) -> tuple[str, int]:
    """The line (without ``error: ``) and exit status for an error that ends a command: anything the user can fix (a
    path, an argument, a file) is its message and status 2; a failure nobody foresaw is its type and message, status
    1 (``SR_DIFFUSION_TRACEBACK=1`` shows where)."""
    if isinstance(err, (CLIError, ValueError, OSError)):
        return _one_line(err), 2
    return f"{type(err).__name__}: {_one_line(err)} (SR_DIFFUSION_TRACEBACK=1 shows where)", 1


if __name__ == "__main__":
    sys.exit(main())
