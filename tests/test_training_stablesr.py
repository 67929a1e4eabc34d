"""StableSR training: config checks, the loss trains only the add-ons on a frozen base, and an `accelerate launch`
run of training/train_stablesr.py writes checkpoints and a StableSRPipeline that AutoSRPipeline loads and runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import accelerate_launch
from stablesr_tiny import save_sd_base, tiny_components

from sr_diffusion.training import ConfigError, load_config
from sr_diffusion.training.stablesr import StableSRExperimentConfig, StableSRTask

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "stablesr_tiny.yaml"
SCRIPT = REPO / "training" / "train_stablesr.py"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random SD folder, as `from_sd_base` and the trainer read it."""
    return save_sd_base(tiny_components(), tmp_path_factory.mktemp("sd_base"))


def tiny_config(tmp_path, base, *overrides: str) -> StableSRExperimentConfig:
    args = [f"stablesr.base={base}", f"train.output_dir={tmp_path / 'run'}", *overrides]
    return load_config(TINY, args, cls=StableSRExperimentConfig)


def test_config_errors_name_the_key(tmp_path, base):
    with pytest.raises(ConfigError, match="stablesr.base: required"):
        load_config(TINY, cls=StableSRExperimentConfig).validate()
    with pytest.raises(ConfigError, match="is not a diffusers SD folder"):
        tiny_config(tmp_path, tmp_path).validate()
    with pytest.raises(ConfigError, match="model.in_channels"):
        tiny_config(tmp_path, base, "model.in_channels=4").validate()
    with pytest.raises(ConfigError, match="model.bogus"):
        tiny_config(tmp_path, base, "model.bogus=1").validate()
    with pytest.raises(ConfigError, match="data.gt_size"):
        StableSRTask().check_config(tiny_config(tmp_path, base, "data.gt_size=36"))


def test_the_loss_trains_the_add_ons_only(tmp_path, base):
    config = tiny_config(tmp_path, base)
    config.validate()
    task = StableSRTask()
    task.check_config(config)
    model = task.build_model(config)
    assert model.sft.config.cond_channels == model.time_aware_encoder.config.out_channels == 64
    batch = {"lr": torch.rand(2, 3, 8, 8), "hr": torch.rand(2, 3, 32, 32)}
    loss = task.compute_loss(model, batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert all(p.grad is not None for p in model.sft.parameters())
    assert all(p.grad is None for p in task.base()["unet"].parameters())
    again = task.compute_loss(model, batch, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, loss, rtol=0, atol=0)  # every draw from the generator


@pytest.mark.slow
def test_accelerate_launch_writes_a_loadable_pipeline(tmp_path, base):
    from sr_diffusion.pipelines import AutoSRPipeline, StableSRPipeline

    out = tmp_path / "run"
    args = ["--config", str(TINY), f"stablesr.base={base}", f"train.output_dir={out}", "train.max_steps=2"]
    proc = accelerate_launch(SCRIPT, [*args, "train.validation_steps=2", "stablesr.num_inference_steps=2"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "checkpoint-2" / "model" / "config.json").is_file()
    assert "PSNR" in proc.stdout + proc.stderr  # validation ran the pipeline

    pipe = AutoSRPipeline.from_pretrained(out / "pipeline")
    assert isinstance(pipe, StableSRPipeline) and pipe.upscale == 4 and pipe.cfw is None
    assert pipe.sft.config.hidden_channels == 16
    pipe.set_progress_bar_config(disable=True)
    images = pipe(torch.rand(1, 3, 6, 10), num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 24, 40) and torch.isfinite(images).all()
