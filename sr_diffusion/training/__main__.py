"""Train any registered method: ``python -m sr_diffusion.training --method NAME --config FILE [section.key=value ...]``.

The method's entry in :mod:`sr_diffusion.registry` gives the training task and its experiment config class (the
config sections it reads); everything after ``--method NAME`` is the command line of every training script
(:func:`sr_diffusion.training.config.parse_args`: ``--config``, overrides, ``--resume_from_checkpoint``, ...).
Runs under ``accelerate launch -m sr_diffusion.training ...`` too. ``--list`` prints the trainable methods.

    python -m sr_diffusion.training --method sr3 --config configs/sr3_tiny.yaml train.max_steps=10
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None):
    """Parse ``--method`` (and ``--list``), then train that method's task; returns the ``TrainResult`` (``None``
    for ``--list``)."""
    from sr_diffusion.registry import methods

    trainable = [entry for entry in methods() if entry.training_task is not None]
    parser = argparse.ArgumentParser(
        prog="python -m sr_diffusion.training",
        description="Train a registered method (sr_diffusion.registry).",
        epilog="Everything else is the training scripts' command line: --config FILE, section.key=value overrides, "
        "--resume_from_checkpoint, ... (see --method NAME --help).",
        add_help=False,
    )
    parser.add_argument("--method", choices=[entry.name for entry in trainable], help="the method to train")
    parser.add_argument("--list", action="store_true", help="list the trainable methods and exit")
    parser.add_argument("-h", "--help", action="store_true", help="this help, or with --method the method's")
    args, rest = parser.parse_known_args(argv)
    if args.list:
        for entry in trainable:
            print(f"{entry.name:12s} {entry.description}")
        return None
    if args.method is None:
        if args.help:
            parser.print_help()
            parser.exit(0)
        parser.error("--method is required (--list shows the trainable methods)")

    from sr_diffusion.registry import method
    from sr_diffusion.training import Trainer, parse_args

    entry = method(args.method)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    description = f"Train {entry.name}: {entry.description}" if entry.description else f"Train {entry.name}"
    config = parse_args([*rest, *(["--help"] if args.help else [])], cls=entry.config_class(), description=description)
    try:
        entry.check_config(config)
    except ValueError as err:
        parser.error(str(err))
    return Trainer(config, entry.task()).train()


if __name__ == "__main__":
    main(sys.argv[1:])
