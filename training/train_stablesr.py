#!/usr/bin/env python
"""Train StableSR's time-aware encoder and SFT layers on a frozen Stable Diffusion base; export a StableSRPipeline.

    accelerate launch training/train_stablesr.py --config configs/stablesr_tiny.yaml stablesr.base=path/to/sd-folder
    python training/train_stablesr.py --config my_config.yaml --resume_from_checkpoint latest

Overrides are ``section.key=value`` (the shared sections of ``sr_diffusion/training/config.py``, plus ``stablesr``:
see ``sr_diffusion/training/stablesr.py``); the run writes ``checkpoint-{step}/`` (the add-ons only), tensorboard logs,
``config.yaml`` and, at the end, ``pipeline/`` (the base with the EMA add-ons), loadable with
``AutoSRPipeline.from_pretrained``, into ``train.output_dir``.
"""

import logging

from sr_diffusion.training import Trainer, parse_args
from sr_diffusion.training.stablesr import StableSRExperimentConfig, StableSRTask


def main(argv=None):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    config = parse_args(argv, cls=StableSRExperimentConfig, description=__doc__.splitlines()[0])
    return Trainer(config, StableSRTask()).train()


if __name__ == "__main__":
    main()
