#!/usr/bin/env python
"""Train the autoencoder of a latent method (a diffusers VQModel, default the VQ-f4 layout, or AutoencoderKL).

    accelerate launch training/train_autoencoder.py --config configs/autoencoder_tiny.yaml train.max_steps=10
    python training/train_autoencoder.py --config my_config.yaml --resume_from_checkpoint latest

Overrides are ``section.key=value`` (the shared sections of ``sr_diffusion/training/config.py``, plus
``autoencoder``: see ``sr_diffusion/training/autoencoder.py``); the run writes ``checkpoint-{step}/``, tensorboard
logs, ``config.yaml`` and, at the end, ``pipeline/``: the EMA autoencoder itself, loadable with
``VQModel.from_pretrained`` (or ``AutoencoderKL.from_pretrained``) and usable as the ``vae=`` of ``ResShiftPipeline``.
L1 + codebook/commitment (or KL) losses only: no LPIPS / GAN terms.
"""

import logging

from sr_diffusion.training import Trainer, parse_args
from sr_diffusion.training.autoencoder import AutoencoderExperimentConfig, AutoencoderTask


def main(argv=None):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    config = parse_args(argv, cls=AutoencoderExperimentConfig, description=__doc__.splitlines()[0])
    return Trainer(config, AutoencoderTask()).train()


if __name__ == "__main__":
    main()
