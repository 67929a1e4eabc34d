#!/usr/bin/env python
"""Train StableSR on a frozen Stable Diffusion base: the time-aware encoder and SFT layers (``--stage sft``, the
default), or the CFW layers of the decoder (``--stage cfw``); export a StableSRPipeline (or the CFW layers).

    accelerate launch training/train_stablesr.py --config configs/stablesr_tiny.yaml stablesr.base=path/to/sd-folder
    accelerate launch training/train_stablesr.py --stage cfw --config configs/stablesr_cfw_tiny.yaml \
        cfw.pipeline=path/to/stablesr-pipeline cfw.latents=generated
    python training/train_stablesr.py --config my_config.yaml --resume_from_checkpoint latest

Overrides are ``section.key=value`` (the shared sections of ``sr_diffusion/training/config.py``, plus ``stablesr``:
see ``sr_diffusion/training/stablesr.py``; with ``--stage cfw``, ``cfw``: ``sr_diffusion/training/stablesr_cfw.py``);
the run writes ``checkpoint-{step}/`` (the trained layers only), tensorboard logs, ``config.yaml`` and, at the end,
``pipeline/`` into ``train.output_dir``: the base with the EMA add-ons, loadable with ``AutoSRPipeline.from_pretrained``
(``--stage cfw``: ``cfw.pipeline`` with the trained CFW layers, or, without ``cfw.pipeline``, a ``StableSRCFW`` folder).
"""

import argparse
import logging

from sr_diffusion.training import Trainer, parse_args
from sr_diffusion.training.stablesr import StableSRExperimentConfig, StableSRTask
from sr_diffusion.training.stablesr_cfw import StableSRCFWExperimentConfig, StableSRCFWTask

STAGES = {"sft": (StableSRExperimentConfig, StableSRTask), "cfw": (StableSRCFWExperimentConfig, StableSRCFWTask)}


def main(argv=None):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    stage_parser = argparse.ArgumentParser(add_help=False)
    stage_parser.add_argument("--stage", choices=sorted(STAGES), default="sft")
    stage, rest = stage_parser.parse_known_args(argv)
    config_cls, task_cls = STAGES[stage.stage]
    description = f"{__doc__.splitlines()[0]} Stage: {stage.stage} (--stage sft|cfw)."
    config = parse_args(rest, cls=config_cls, description=description)
    return Trainer(config, task_cls()).train()


if __name__ == "__main__":
    main()
