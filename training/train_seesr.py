#!/usr/bin/env python
"""Train SeeSR's ControlNet and image cross-attention on a frozen Stable Diffusion base; export a SeeSRPipeline.

    accelerate launch training/train_seesr.py --config configs/seesr_tiny.yaml seesr.base=path/to/sd-folder
    python training/train_seesr.py --config my_config.yaml seesr.dape=path/to/dape --resume_from_checkpoint latest

Overrides are ``section.key=value`` (the shared sections of ``sr_diffusion/training/config.py``, plus ``seesr``: see
``sr_diffusion/training/seesr.py``); the run writes ``checkpoint-{step}/`` (the trainable parts only), tensorboard
logs, ``config.yaml`` and, at the end, ``pipeline/`` (the base, the EMA ControlNet and image cross-attention, and the
DAPE), loadable with ``AutoSRPipeline.from_pretrained``, into ``train.output_dir``.
"""

import logging

from sr_diffusion.training import Trainer, parse_args
from sr_diffusion.training.seesr import SeeSRExperimentConfig, SeeSRTask


def main(argv=None):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    config = parse_args(argv, cls=SeeSRExperimentConfig, description=__doc__.splitlines()[0])
    return Trainer(config, SeeSRTask()).train()


if __name__ == "__main__":
    main()
