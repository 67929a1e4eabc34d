#!/usr/bin/env python
"""Train SRDiff (an SRDiffUNet denoising the residual, conditioned on a pre-trained RRDB encoder) and export an
SRDiffPipeline.

    accelerate launch training/train_srdiff.py --config configs/srdiff_tiny.yaml train.max_steps=10
    python training/train_srdiff.py --config my_config.yaml --resume_from_checkpoint latest

The encoder is trained first, as a regression model (``training/train_regression.py`` with an ``rrdbnet`` config,
e.g. ``configs/srdiff_rrdb_tiny.yaml``), and named by ``srdiff.rrdb_path``; see the header of
``configs/srdiff_tiny.yaml`` for the two-stage recipe. Overrides are ``section.key=value`` (the shared sections of
``sr_diffusion/training/config.py``, plus ``srdiff``: see ``sr_diffusion/training/srdiff.py``); the run writes
``checkpoint-{step}/``, tensorboard logs, ``config.yaml`` and, at the end, ``pipeline/`` (EMA weights), loadable with
``AutoSRPipeline.from_pretrained``, into ``train.output_dir``.
"""

import logging

from sr_diffusion.training import Trainer, parse_args
from sr_diffusion.training.srdiff import SRDiffExperimentConfig, SRDiffTask


def main(argv=None):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    config = parse_args(argv, cls=SRDiffExperimentConfig, description=__doc__.splitlines()[0])
    return Trainer(config, SRDiffTask()).train()


if __name__ == "__main__":
    main()
