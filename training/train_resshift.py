#!/usr/bin/env python
"""Train a pixel-space ResShift denoiser (ResShiftUNet or a diffusers UNet2DModel) and export a ResShiftPipeline.

    accelerate launch training/train_resshift.py --config configs/resshift_tiny.yaml train.max_steps=10
    python training/train_resshift.py --config my_config.yaml --resume_from_checkpoint latest

Overrides are ``section.key=value`` (the shared sections of ``sr_diffusion/training/config.py``, plus ``scheduler``:
see ``sr_diffusion/training/resshift.py``); the run writes ``checkpoint-{step}/``, tensorboard logs, ``config.yaml``
and, at the end, ``pipeline/`` (EMA weights), loadable with ``AutoSRPipeline.from_pretrained``, into
``train.output_dir``.
"""

import logging

from sr_diffusion.training import Trainer, parse_args
from sr_diffusion.training.resshift import ResShiftExperimentConfig, ResShiftTask


def main(argv=None):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    config = parse_args(argv, cls=ResShiftExperimentConfig, description=__doc__.splitlines()[0])
    return Trainer(config, ResShiftTask()).train()


if __name__ == "__main__":
    main()
