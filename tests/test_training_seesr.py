"""SeeSR training: config checks, the loss trains the ControlNet and both image cross-attentions only (initialised as
the original's from_unet), prompts from a frozen DAPE, the objective falls on real photo crops, and an
`accelerate launch` run of training/train_seesr.py writes a SeeSRPipeline (with its DAPE) that AutoSRPipeline loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import accelerate_launch
from learning import photo_crops, train_on_crops_overrides
from seesr_tiny import tiny_components, tiny_dape
from stablesr_tiny import save_sd_base

from sr_diffusion.training import ConfigError, Trainer, load_config
from sr_diffusion.training.seesr import SeeSRAddOns, SeeSRExperimentConfig, SeeSRTask

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "seesr_tiny.yaml"
SCRIPT = REPO / "training" / "train_seesr.py"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random SD folder, as `from_sd_base` and the trainer read it."""
    return save_sd_base(tiny_components(), tmp_path_factory.mktemp("sd_base"))


@pytest.fixture(scope="module")
def dape_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dape") / "dape"
    tiny_dape().save_pretrained(folder)
    return folder


def tiny_config(tmp_path, base, *overrides: str) -> SeeSRExperimentConfig:
    args = [f"seesr.base={base}", f"train.output_dir={tmp_path / 'run'}", *overrides]
    return load_config(TINY, args, cls=SeeSRExperimentConfig)


def ready_task(config) -> SeeSRTask:
    config.validate()
    task = SeeSRTask()
    task.check_config(config)
    return task


def test_config_errors_name_the_key(tmp_path, base, dape_folder):
    with pytest.raises(ConfigError, match="seesr.base: required"):
        load_config(TINY, cls=SeeSRExperimentConfig).validate()
    with pytest.raises(ConfigError, match="is not a diffusers SD folder"):
        tiny_config(tmp_path, tmp_path).validate()
    with pytest.raises(ConfigError, match="model.bogus"):
        tiny_config(tmp_path, base, "model.bogus=1").validate()
    with pytest.raises(ConfigError, match="seesr.null_text_ratio"):
        tiny_config(tmp_path, base, "seesr.null_text_ratio=1.5").validate()
    with pytest.raises(ConfigError, match="seesr.dape: .* not a saved DAPE folder"):
        tiny_config(tmp_path, base, f"seesr.dape={tmp_path}").validate()
    with pytest.raises(ConfigError, match="data.gt_size"):
        SeeSRTask().check_config(tiny_config(tmp_path, base, "data.gt_size=36"))
    with pytest.raises(ConfigError, match="downsamples by 8 but the base's VAE by 4"):
        SeeSRTask().check_config(tiny_config(tmp_path, base, "model.conditioning_embedding_out_channels=[8,8,8,8]"))
    with pytest.raises(ConfigError, match="model.image_prompt_dim: 16, but the DAPE .* makes 24-d"):
        SeeSRTask().check_config(tiny_config(tmp_path, base, f"seesr.dape={dape_folder}", "model.image_prompt_dim=16"))


def test_the_loss_trains_the_controlnet_and_image_attentions_only(tmp_path, base):
    config = tiny_config(tmp_path, base)
    task = ready_task(config)
    model = task.build_model(config)
    unet = task.base()["unet"]
    # initialised as the original's from_unet: the ControlNet's blocks and image attentions are the UNet's
    assert torch.equal(
        model.controlnet.down_blocks[1].attentions[0].proj_in.weight, unet.down_blocks[1].attentions[0].proj_in.weight
    )
    assert torch.equal(
        model.controlnet_image_attentions.mid_block.image_attentions[0].proj_out.weight,
        model.unet_image_attentions.mid_block.image_attentions[0].proj_out.weight,
    )
    batch = {"lr": torch.rand(2, 3, 8, 8), "hr": torch.rand(2, 3, 32, 32)}
    loss = task.compute_loss(model, batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    for part in (model.controlnet, model.unet_image_attentions, model.controlnet_image_attentions):
        assert all(p.grad is not None for p in part.parameters())
    assert all(p.grad is None for p in unet.parameters())
    again = task.compute_loss(model, batch, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, loss, rtol=0, atol=0)  # every draw from the generator
    # the model checkpoints and reloads as a diffusers model folder
    model.save_pretrained(tmp_path / "model")
    loaded = SeeSRAddOns.from_pretrained(tmp_path / "model")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_prompts_come_from_the_frozen_dape(tmp_path, base, dape_folder):
    config = tiny_config(tmp_path, base, f"seesr.dape={dape_folder}", "seesr.null_text_ratio=0")
    task = ready_task(config)
    model = task.build_model(config)
    assert model.unet_image_attentions.config.layers[0]["cross_attention_dim"] == 24  # the DAPE's width
    hr, condition = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    prompts, soft = task.prompts(hr, condition, torch.Generator().manual_seed(0))
    dape = task.dape()
    assert not any(p.requires_grad for p in dape.parameters())
    assert prompts == dape(hr, use_lora=False).hard_prompts and all(prompts)  # the HR tags, by the original tower
    torch.testing.assert_close(soft, dape(condition).soft_prompts)  # the LR's soft prompts
    task.section.null_text_ratio = 1.0
    assert task.prompts(hr, condition, torch.Generator().manual_seed(0))[0] == ["", ""]
    loss = task.compute_loss(model, {"lr": torch.rand(2, 3, 8, 8), "hr": hr}, torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None for p in dape.parameters())


@pytest.mark.slow
def test_the_objective_falls_on_real_photo_crops(tmp_path, base, fresh_accelerate_state):
    """100 steps on four 32x32 photo crops: the noise-prediction loss of the trained (EMA) add-ons, on the crops with
    fixed draws, falls below 60 % of the fresh model's (about 50 %)."""
    from sr_diffusion.pipelines import AutoSRPipeline, SeeSRPipeline
    from sr_diffusion.resize import imresize

    crops = photo_crops()
    overrides = [*train_on_crops_overrides(tmp_path, crops, 100), "data.batch_size=4"]
    config = tiny_config(tmp_path, base, *overrides)
    task = SeeSRTask()
    result = Trainer(config, task).train()
    assert result.global_step == 100
    assert np.mean(result.losses[-20:]) < 0.8 * np.mean(result.losses[:20])

    pipe = AutoSRPipeline.from_pretrained(result.pipeline_dir)
    assert isinstance(pipe, SeeSRPipeline)
    trained = SeeSRAddOns.from_parts(pipe.controlnet, pipe.unet_image_attentions, pipe.controlnet_image_attentions)
    torch.manual_seed(config.train.seed)
    fresh = task.build_model(config)
    hr = torch.stack([torch.from_numpy(c).permute(2, 0, 1).float() / 255.0 for c in crops.values()])
    batch = {"lr": imresize(hr, scale=0.25).clamp(0, 1), "hr": hr}

    def objective(model) -> float:
        with torch.no_grad():
            losses = [task.compute_loss(model, batch, torch.Generator().manual_seed(i)).item() for i in range(8)]
        return float(np.mean(losses))

    before, after = objective(fresh), objective(trained)
    assert after < 0.6 * before, (before, after)


@pytest.mark.slow
def test_accelerate_launch_writes_a_loadable_pipeline(tmp_path, base, dape_folder):
    from sr_diffusion.pipelines import AutoSRPipeline, SeeSRPipeline

    out = tmp_path / "run"
    args = ["--config", str(TINY), f"seesr.base={base}", f"seesr.dape={dape_folder}", f"train.output_dir={out}"]
    args += ["train.max_steps=2", "train.validation_steps=2", "seesr.num_inference_steps=2"]
    proc = accelerate_launch(SCRIPT, args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "checkpoint-2" / "model" / "config.json").is_file()
    assert "PSNR" in proc.stdout + proc.stderr  # validation ran the pipeline

    pipe = AutoSRPipeline.from_pretrained(out / "pipeline")
    assert isinstance(pipe, SeeSRPipeline) and pipe.upscale == 4 and pipe.prompt_extractor is not None
    assert pipe.image_prompt_dim == 24
    pipe.set_progress_bar_config(disable=True)
    images = pipe(torch.rand(1, 3, 6, 10), num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 24, 40) and torch.isfinite(images).all()
