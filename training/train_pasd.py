#!/usr/bin/env python
"""Train PASD's ControlNet (with its degradation-removal module) and pixel-aware cross-attention on a frozen Stable
Diffusion base; export a PASDPipeline.

    accelerate launch training/train_pasd.py --config configs/pasd_tiny.yaml pasd.base=path/to/sd-folder
    python training/train_pasd.py --config my_config.yaml --resume_from_checkpoint latest

Overrides are ``section.key=value`` (the shared sections of ``sr_diffusion/training/config.py``, plus ``pasd``: see
``sr_diffusion/training/pasd.py``); the run writes ``checkpoint-{step}/`` (the add-ons only), tensorboard logs,
``config.yaml`` and, at the end, ``pipeline/`` (the base with the EMA add-ons), loadable with
``AutoSRPipeline.from_pretrained``, into ``train.output_dir``.
"""

import logging

from sr_diffusion.training import Trainer, parse_args
from sr_diffusion.training.pasd import PASDExperimentConfig, PASDTask


def main(argv=None):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    config = parse_args(argv, cls=PASDExperimentConfig, description=__doc__.splitlines()[0])
    return Trainer(config, PASDTask()).train()


if __name__ == "__main__":
    main()
