"""PASD training: config checks, the loss is the noise-prediction MSE plus the degradation-removal L1 and trains only
the add-ons on a frozen base, both terms fall when training on real photo crops, and an `accelerate launch` run of
training/train_pasd.py writes checkpoints and a PASDPipeline that AutoSRPipeline loads and runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import accelerate_launch
from learning import photo_crops, train_on_crops_overrides
from pasd_tiny import tiny_components
from stablesr_tiny import save_sd_base

from sr_diffusion.resize import imresize, resize
from sr_diffusion.training import ConfigError, Trainer, load_config
from sr_diffusion.training.pasd import PASDExperimentConfig, PASDTask, degradation_removal_loss

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "pasd_tiny.yaml"
SCRIPT = REPO / "training" / "train_pasd.py"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random SD folder, as `from_sd_base` and the trainer read it."""
    return save_sd_base(tiny_components(), tmp_path_factory.mktemp("sd_base"))


def tiny_config(tmp_path, base, *overrides: str) -> PASDExperimentConfig:
    args = [f"pasd.base={base}", f"train.output_dir={tmp_path / 'run'}", *overrides]
    return load_config(TINY, args, cls=PASDExperimentConfig)


def ready_task(tmp_path, base, *overrides: str) -> tuple[PASDTask, PASDExperimentConfig]:
    config = tiny_config(tmp_path, base, *overrides)
    config.validate()
    task = PASDTask()
    task.check_config(config)
    return task, config


def test_config_errors_name_the_key(tmp_path, base):
    with pytest.raises(ConfigError, match="pasd.base: required"):
        load_config(TINY, cls=PASDExperimentConfig).validate()
    with pytest.raises(ConfigError, match="is not a diffusers SD folder"):
        tiny_config(tmp_path, tmp_path).validate()
    with pytest.raises(ConfigError, match="model.block_out_channels"):
        tiny_config(tmp_path, base, "model.block_out_channels=[8]").validate()
    with pytest.raises(ConfigError, match="pasd.added_noise_level"):
        tiny_config(tmp_path, base, "pasd.added_noise_level=1000").validate()
    with pytest.raises(ConfigError, match="data.gt_size"):
        PASDTask().check_config(tiny_config(tmp_path, base, "data.gt_size=36"))
    with pytest.raises(ConfigError, match="downsample the image by 8, the base's VAE by 4"):
        PASDTask().check_config(tiny_config(tmp_path, base, "model.conditioning_embedding_out_channels=[8,8,8,8]"))


def test_the_loss_is_noise_mse_plus_degradation_removal_and_trains_the_add_ons_only(tmp_path, base):
    task, config = ready_task(tmp_path, base, "model.use_rrdb=true")
    torch.manual_seed(0)
    model = task.build_model(config)
    assert model.controlnet.config.use_rrdb and len(model.pixel_attentions.positions) == 4
    unet = task.base()["unet"]
    # the ControlNet starts as a copy of the UNet's encoder
    assert torch.equal(
        model.controlnet.down_blocks[1].attentions[0].proj_in.weight, unet.down_blocks[1].attentions[0].proj_in.weight
    )
    g = torch.Generator().manual_seed(0)
    batch = {"lr": torch.rand(2, 3, 8, 8, generator=g), "hr": torch.rand(2, 3, 32, 32, generator=g)}
    loss = task.compute_loss(model, batch, torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert all(p.grad is not None for p in model.pixel_attentions.parameters())
    assert model.controlnet.controlnet_cond_embedding.preprocesser[0].rdb1.conv1.weight.grad is not None
    assert all(p.grad is None for p in unet.parameters())

    # by hand, with the same draws in the same order: posterior sample, t, eps
    vae, scheduler = task.base()["vae"], task.noise_scheduler()
    hr = batch["hr"] * 2 - 1
    cond = resize(batch["lr"], size=(32, 32), mode="bicubic").clamp(0, 1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        z_0 = vae.encode(hr).latent_dist.sample(g) * vae.config.scaling_factor
        t = torch.randint(0, 1000, (2,), generator=g)
        noise = torch.randn(z_0.shape, generator=g)
        pred, rgbs = model(
            unet, scheduler.add_noise(z_0, noise, t), t, task.empty_prompt(torch.device("cpu")).expand(2, -1, -1), cond
        )
    rgb_l1 = sum(F.l1_loss(r, F.interpolate(hr, size=r.shape[-2:], mode="bilinear")) for r in rgbs)
    torch.testing.assert_close(loss.detach(), F.mse_loss(pred, noise) + rgb_l1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(degradation_removal_loss(rgbs, hr), rgb_l1)
    assert len(rgbs) == 2
    again = task.compute_loss(model, batch, torch.Generator().manual_seed(1))
    torch.testing.assert_close(again, loss, rtol=0, atol=0)  # every draw from the generator
    task.section.rgb_loss_weight = 0.0
    with torch.no_grad():
        mse_only = task.compute_loss(model, batch, torch.Generator().manual_seed(1))
    torch.testing.assert_close(mse_only, F.mse_loss(pred, noise), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# it learns: both terms of the objective fall on the photos it is trained on
# ----------------------------------------------------------------------------------------------------------------------


def objective_terms(task, model, hr: torch.Tensor, lr: torch.Tensor, draws: int = 8) -> tuple[float, float]:
    """``(noise MSE, degradation-removal L1)`` of ``model`` on ``(lr, hr)``, averaged over fixed draws."""
    weight, task.section.rgb_loss_weight = task.section.rgb_loss_weight, 0.0
    cond = resize(lr, size=hr.shape[-2:], mode="bicubic").clamp(0, 1)
    with torch.no_grad():
        mse = np.mean(
            [
                task.compute_loss(model, {"lr": lr, "hr": hr}, torch.Generator().manual_seed(s)).item()
                for s in range(draws)
            ]
        )
        rgbs = model.controlnet.controlnet_cond_embedding.embed(cond)[1]
        rgb = degradation_removal_loss(rgbs, hr * 2 - 1).item()
    task.section.rgb_loss_weight = weight
    return float(mse), rgb


@pytest.mark.slow
def test_both_terms_fall_on_real_photo_crops(tmp_path, base, fresh_accelerate_state):
    from sr_diffusion.pipelines import AutoSRPipeline, PASDPipeline

    crops = photo_crops()
    task, config = ready_task(tmp_path, base, *train_on_crops_overrides(tmp_path, crops, 100))
    hr = torch.stack([torch.from_numpy(c).permute(2, 0, 1).float() / 255 for c in crops.values()])
    lr = imresize(hr, scale=0.25).clamp(0, 1)
    torch.manual_seed(config.train.seed)
    before = objective_terms(task, task.build_model(config).eval(), hr, lr)

    result = Trainer(config, task).train()
    first, last = np.mean(result.losses[:20]), np.mean(result.losses[-20:])
    assert last < 0.7 * first, (first, last)
    pipe = AutoSRPipeline.from_pretrained(result.pipeline_dir)
    assert isinstance(pipe, PASDPipeline)
    trained = task.build_model(config).eval()
    trained.controlnet.load_state_dict(pipe.controlnet.state_dict())
    trained.pixel_attentions.load_state_dict(pipe.pixel_attentions.state_dict())
    after = objective_terms(task, trained, hr, lr)
    # about 1.10 -> 0.46 (noise MSE) and 0.94 -> 0.41 (degradation-removal L1) after 100 steps (EMA weights)
    assert after[0] < 0.7 * before[0] and after[1] < 0.7 * before[1], (before, after)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(lr[:1], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


@pytest.mark.slow
def test_accelerate_launch_writes_a_loadable_pipeline(tmp_path, base):
    from sr_diffusion.pipelines import AutoSRPipeline, PASDPipeline

    out = tmp_path / "run"
    args = ["--config", str(TINY), f"pasd.base={base}", f"train.output_dir={out}", "train.max_steps=2"]
    proc = accelerate_launch(SCRIPT, [*args, "train.validation_steps=2", "pasd.num_inference_steps=2"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "checkpoint-2" / "model" / "config.json").is_file()
    assert "PSNR" in proc.stdout + proc.stderr  # validation ran the pipeline

    pipe = AutoSRPipeline.from_pretrained(out / "pipeline")
    assert isinstance(pipe, PASDPipeline) and pipe.upscale == 4
    assert list(pipe.controlnet.config.conditioning_embedding_out_channels) == [8, 16, 32]
    pipe.set_progress_bar_config(disable=True)
    images = pipe(torch.rand(1, 3, 6, 10), num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 24, 40) and torch.isfinite(images).all()
