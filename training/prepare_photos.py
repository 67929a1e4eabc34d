#!/usr/bin/env python
"""Build the real-photo training corpus (19 train, 7 val photos) from four Debian wallpaper packages.

    python training/prepare_photos.py                                    # apt-get download + dpkg -x into --cache
    python training/prepare_photos.py --debs DIR                         # .deb files already downloaded
    python training/prepare_photos.py --extracted DIR --out data/photos  # trees DIR/<package>/usr/...

Writes ``<out>/train/*.png``, ``<out>/val/*.png`` (each photo downscaled x2 by MATLAB bicubic),
``<out>/manifest.json`` and ``<out>/CREDITS.md``; a re-run only rebuilds photos whose source changed. Train on it
with ``data.source=folder data.hr_dirs=[data/photos/train]`` (``validation.source=folder
validation.hr_dirs=[data/photos/val]``). The photo table and the recipe: ``sr_diffusion/training/photo_corpus.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sr_diffusion.training.photo_corpus import (
    PhotoCorpusError,
    build_corpus,
    default_corpus_dir,
    extract_debs,
    fetch_packages,
    find_extracted,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_corpus_dir(), help="corpus folder (default: data/photos)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--extracted", type=Path, help="already extracted package trees DIR/<package>/usr/...")
    source.add_argument("--debs", type=Path, help="already downloaded <package>_*.deb files (extracted into --cache)")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path.home() / ".cache" / "sr_diffusion" / "debs",
        help="where apt-get downloads the .deb files and they are extracted (<cache>/x/<package>)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild every photo even if it is up to date")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        if args.extracted is not None:
            roots = find_extracted(args.extracted)
        elif args.debs is not None:
            roots = extract_debs(args.debs, args.cache / "x")
        else:
            roots = fetch_packages(args.cache)
        done = build_corpus(roots, args.out, force=args.force, log=print)
    except PhotoCorpusError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    built = sum(p.built for p in done)
    splits = {s: sum(p.split == s for p in done) for s in ("train", "val")}
    print(
        f"{len(done)} photos ({splits['train']} train, {splits['val']} val), {built} built, "
        f"{len(done) - built} up to date, in {time.perf_counter() - start:.1f} s: {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
