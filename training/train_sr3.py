#!/usr/bin/env python
"""Train an SR3 denoiser (a diffusers UNet2DModel, continuous noise-level conditioning) and export an SR3Pipeline.

    accelerate launch training/train_sr3.py --config configs/sr3_tiny.yaml train.max_steps=10
    python training/train_sr3.py --config my_config.yaml --resume_from_checkpoint latest

Overrides are ``section.key=value`` (the shared sections of ``sr_diffusion/training/config.py``, plus ``scheduler``
and ``sr3``: see ``sr_diffusion/training/sr3.py``); the run writes ``checkpoint-{step}/``, tensorboard logs,
``config.yaml`` and, at the end, ``pipeline/`` (EMA weights), loadable with ``AutoSRPipeline.from_pretrained``, into
``train.output_dir``.
"""

import logging

from sr_diffusion.training import Trainer, parse_args
from sr_diffusion.training.sr3 import SR3ExperimentConfig, SR3Task


def main(argv=None):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    config = parse_args(argv, cls=SR3ExperimentConfig, description=__doc__.splitlines()[0])
    return Trainer(config, SR3Task()).train()


if __name__ == "__main__":
    main()
