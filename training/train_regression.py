#!/usr/bin/env python
"""Train a regression SR model (EDSR, RRDBNet, SwinIR, SRVGGNetCompact) and export a RegressionSRPipeline.

    accelerate launch training/train_regression.py --config configs/regression_tiny.yaml train.max_steps=10
    python training/train_regression.py --config configs/regression_default_x4.yaml --resume_from_checkpoint latest

Overrides are ``section.key=value`` (see ``sr_diffusion/training/config.py``); the run writes
``checkpoint-{step}/``, tensorboard logs, ``config.yaml`` and, at the end, ``pipeline/`` (EMA weights),
loadable with ``AutoSRPipeline.from_pretrained``, into ``train.output_dir``.
"""

import logging

from sr_diffusion.training import RegressionTask, Trainer, parse_args


def main(argv=None):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    config = parse_args(argv, description=__doc__.splitlines()[0])
    return Trainer(config, RegressionTask()).train()


if __name__ == "__main__":
    main()
