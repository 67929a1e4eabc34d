#!/usr/bin/env python
"""Train SeeSR's degradation-aware prompt extractor (DAPE: open_clip ViT + peft LoRA) and export the DAPE folder.

    accelerate launch training/train_dape.py --config configs/dape_tiny.yaml train.max_steps=10
    accelerate launch training/train_dape.py --config my_config.yaml model.model_name=ViT-B-16 \
        model.pretrained=/path/to/open_clip_vit_b16.bin
    python training/train_dape.py --config my_config.yaml --resume_from_checkpoint latest

Overrides are ``section.key=value`` (the shared sections of ``sr_diffusion/training/config.py``, ``model`` with the
arguments of ``DAPE.from_open_clip`` and ``dape`` with the loss weights: see ``sr_diffusion/training/dape.py``); the
run writes ``checkpoint-{step}/``, tensorboard logs, ``config.yaml`` and, at the end, ``pipeline/``: a DAPE folder,
loadable with ``sr_diffusion.prompts.DAPE.from_pretrained``, into ``train.output_dir``.
"""

import logging

from sr_diffusion.training import Trainer, parse_args
from sr_diffusion.training.dape import DAPEExperimentConfig, DAPETask


def main(argv=None):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    config = parse_args(argv, cls=DAPEExperimentConfig, description=__doc__.splitlines()[0])
    return Trainer(config, DAPETask()).train()


if __name__ == "__main__":
    main()
