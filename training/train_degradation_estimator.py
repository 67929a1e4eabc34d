#!/usr/bin/env python
"""Train the degradation estimator (blur, noise level, JPEG quality of LR images) and score it on held-out photos.

    accelerate launch training/train_degradation_estimator.py --config configs/degradation_estimator_tiny.yaml
    OMP_NUM_THREADS=1 python training/train_degradation_estimator.py \
        --config configs/degradation_estimator_default.yaml --resume_from_checkpoint latest

Overrides are ``section.key=value`` (the shared sections of ``sr_diffusion/training/config.py``, ``model`` with the
arguments of ``DegradationEstimator`` and ``estimator``: see ``sr_diffusion/training/degradation_estimator.py``); the
run writes ``checkpoint-{step}/``, tensorboard logs, ``config.yaml``, ``pipeline/`` (the EMA weights: a
``DegradationEstimator`` folder) and ``evaluation.json``: the exported estimator's mean absolute errors on
``estimator.evaluation_samples`` degraded crops of the held-out photos, next to those of predicting the training mean.
"""

import json
import logging
from pathlib import Path

from sr_diffusion.training import Trainer, parse_args
from sr_diffusion.training.degradation_estimator import (
    DegradationEstimatorExperimentConfig,
    DegradationEstimatorTask,
    evaluate_on_held_out_photos,
)


def evaluate(config, pipeline_dir: Path) -> dict:
    """Score the exported estimator on the held-out bundled photos; written to ``evaluation.json``."""
    from sr_diffusion.estimation import DegradationEstimator

    result = evaluate_on_held_out_photos(DegradationEstimator.from_pretrained(pipeline_dir), config)
    (Path(config.train.output_dir) / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, mae in result["mae"].items():
        print(
            f"{name}: MAE {mae:.4g} vs predict-the-mean {result['baseline_mae'][name]:.4g} "
            f"(ratio {result['ratio'][name]:.3f})"
        )
    return result


def main(argv=None):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    config = parse_args(argv, cls=DegradationEstimatorExperimentConfig, description=__doc__.splitlines()[0])
    result = Trainer(config, DegradationEstimatorTask()).train()
    from accelerate import PartialState

    if config.estimator.evaluation_samples and PartialState().is_main_process:
        result.metrics = evaluate(config, result.pipeline_dir)
    return result


if __name__ == "__main__":
    main()
