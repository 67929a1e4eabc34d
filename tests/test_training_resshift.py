"""ResShift training: config, the objective (checked term by term), and a tiny run whose pipeline beats bicubic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import accelerate_launch
from learning import photo_crops, psnr_against_bicubic, train_on_crops_overrides

from sr_diffusion.training import ConfigError, Trainer, load_config
from sr_diffusion.training.resshift import (
    ResShiftExperimentConfig,
    ResShiftTask,
    build_resshift_model,
    build_resshift_scheduler,
)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "resshift_tiny.yaml"
SCRIPT = REPO / "training" / "train_resshift.py"


def tiny_config(tmp_path, *overrides: str) -> ResShiftExperimentConfig:
    return load_config(TINY, [f"train.output_dir={tmp_path / 'run'}", *overrides], cls=ResShiftExperimentConfig)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


# ----------------------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------------------


def test_tiny_config_and_scheduler_section(tmp_path):
    config = tiny_config(tmp_path)
    assert config.train.loss == "mse" and config.model.arch == "resshift_unet"
    scheduler = build_resshift_scheduler(config)
    assert scheduler.config.num_train_timesteps == 4 and scheduler.config.input_scaling == "max"
    # a preset, with overrides on top
    config = load_config(None, ["scheduler.preset=v3", "scheduler.kappa=1.5"], cls=ResShiftExperimentConfig)
    scheduler = build_resshift_scheduler(config)
    assert scheduler.config.kappa == 1.5
    assert scheduler.config.num_train_timesteps == 4 and scheduler.config.min_noise_level == 0.2  # from the preset
    # a config without the section (the shared ExperimentConfig) gets the default scheduler; train.loss defaults to mse
    assert build_resshift_scheduler(load_config(None)).config.num_train_timesteps == 15
    assert load_config(None, cls=ResShiftExperimentConfig).train.loss == "mse"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("scheduler.kapa=1", "unknown config key.*scheduler.kapa"),
        ("scheduler.kappa=-1", "scheduler: kappa must be > 0"),
        ("scheduler.preset=v9", "scheduler: Unknown ResShift preset 'v9'"),
    ],
)
def test_bad_scheduler_settings_fail_early(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, override)


def test_model_settings_are_checked(tmp_path):
    task = ResShiftTask()
    for overrides, message in [
        (["model.arch=edsr"], "unknown ResShift denoiser 'edsr'"),
        (["model.num_feat=8"], "unknown config key.*model.num_feat"),
        (["model.in_channels=6"], "model.in_channels must be 3"),
        (["model.cond_mask=true"], "cond_mask"),
    ]:
        with pytest.raises(ConfigError, match=message):
            task.check_config(tiny_config(tmp_path, *overrides))
    with pytest.raises(ConfigError, match="multiple of the denoiser's input multiple"):
        build_resshift_model(tiny_config(tmp_path, "data.gt_size=36"))
    # in pixel space the lq of a ResShiftUNet is y_0: lq_size defaults to image_size
    model = build_resshift_model(tiny_config(tmp_path))
    assert model.config.lq_size == model.config.image_size == 32 and model.lq_scale == 1
    unet2d = build_resshift_model(
        tiny_config(tmp_path, "model={arch: unet2d, block_out_channels: [16, 32], norm_num_groups: 8}")
    )
    assert (unet2d.config.in_channels, unet2d.config.out_channels, unet2d.config.sample_size) == (6, 3, 32)


# ----------------------------------------------------------------------------------------------------------------------
# the objective
# ----------------------------------------------------------------------------------------------------------------------


def _batch(seed: int = 0, n: int = 2):
    from sr_diffusion.resize import imresize

    hr = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return {"lr": imresize(hr, scale=0.25).clamp(0, 1), "hr": hr}


@pytest.mark.parametrize("prediction_type", ["sample", "residual", "epsilon_scale"])
def test_compute_loss_is_the_resshift_objective(tmp_path, prediction_type):
    config = tiny_config(tmp_path, f"scheduler.prediction_type={prediction_type}")
    task = ResShiftTask()
    task.check_config(config)
    torch.manual_seed(0)
    model = task.build_model(config)
    batch = _batch()
    loss = task.compute_loss(model, batch, torch.Generator().manual_seed(7))

    # the same draws by hand: t, then the noise, from the generator
    scheduler = task.scheduler
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 4, (2,), generator=g)
    noise = torch.randn(2, 3, 32, 32, generator=g)
    x0, lr = batch["hr"] * 2 - 1, batch["lr"] * 2 - 1
    y0 = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False)
    eta = scheduler.etas[t].float().view(-1, 1, 1, 1)
    x_t = x0 + eta * (y0 - x0) + scheduler.config.kappa * eta.sqrt() * noise  # (R2)
    scaled = x_t / (3 * scheduler.config.kappa * eta.sqrt() + 1)  # input_scaling "max"
    output = model(scaled, t, lq=y0).sample  # pixel space: lq is y_0
    target = {"sample": x0, "residual": y0 - x0, "epsilon_scale": scheduler.config.kappa * eta.sqrt() * noise}
    error = output - target[prediction_type]
    if prediction_type == "epsilon_scale":
        error = error / (scheduler.config.kappa * eta.sqrt())  # the reference's weighting of that target
    torch.testing.assert_close(loss, error.pow(2).mean(), rtol=1e-5, atol=1e-6)

    # deterministic given the generator, different for another seed, and it trains
    assert torch.equal(loss, task.compute_loss(model, batch, torch.Generator().manual_seed(7)))
    assert not torch.equal(loss, task.compute_loss(model, batch, torch.Generator().manual_seed(8)))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_compute_loss_with_a_unet2d_concatenates_y0(tmp_path):
    config = tiny_config(tmp_path, "model={arch: unet2d, block_out_channels: [16, 32], norm_num_groups: 8}")
    task = ResShiftTask()
    task.check_config(config)
    torch.manual_seed(0)
    model = task.build_model(config)
    seen = {}
    model.register_forward_pre_hook(lambda module, args: seen.update(input=args[0]))
    loss = task.compute_loss(model, _batch(), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and seen["input"].shape == (2, 6, 32, 32)
    y0 = torch.nn.functional.interpolate(_batch()["lr"] * 2 - 1, scale_factor=4, mode="bicubic")
    torch.testing.assert_close(seen["input"][:, 3:], y0)


def test_compute_loss_with_an_unshuffle_unet_gives_it_y0_as_lq(tmp_path):
    config = tiny_config(tmp_path, "model={arch: unshuffle_unet, block_out_channels: [16, 32], norm_num_groups: 8}")
    task = ResShiftTask()
    task.check_config(config)
    torch.manual_seed(0)
    model = task.build_model(config)
    assert (model.config.sample_size, model.config.lq_channels, model.input_multiple) == (32, 3, 8)
    seen = {}
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.update(x=args[0], lq=kwargs["lq"]), with_kwargs=True)
    loss = task.compute_loss(model, _batch(), torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and seen["x"].shape == (2, 3, 32, 32)
    y0 = torch.nn.functional.interpolate(_batch()["lr"] * 2 - 1, scale_factor=4, mode="bicubic")
    torch.testing.assert_close(seen["lq"], y0)
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ConfigError, match="lq_channels must be 3"):
        task.check_config(tiny_config(tmp_path, "model={arch: unshuffle_unet, lq_channels: 0}"))


def test_pipeline_section_sets_the_exported_call_defaults(tmp_path):
    config = tiny_config(tmp_path, "pipeline.lr_consistency=true", "pipeline.num_inference_steps=2")
    task = ResShiftTask()
    task.check_config(config)
    pipe = task.build_pipeline(build_resshift_model(config))
    assert (pipe.config.lr_consistency, pipe.config.num_inference_steps) == (True, 2)
    plain = ResShiftTask()
    plain.check_config(tiny_config(tmp_path))
    assert plain.build_pipeline(build_resshift_model(config)).config.num_inference_steps is None
    with pytest.raises(ConfigError, match="pipeline.num_inference_steps must be between 1 and"):
        tiny_config(tmp_path, "pipeline.num_inference_steps=5")


def test_predict_and_build_pipeline(tmp_path):
    from sr_diffusion.pipelines import ResShiftPipeline

    config = tiny_config(tmp_path)
    task = ResShiftTask()
    task.check_config(config)
    model = task.build_model(config).eval()
    pipe = task.build_pipeline(model)
    assert isinstance(pipe, ResShiftPipeline) and pipe.upscale == 4
    assert pipe.scheduler is not task.scheduler and pipe.scheduler.config == task.scheduler.config
    lr = torch.rand(1, 3, 7, 9)
    sr = task.predict(model, lr, torch.Generator().manual_seed(0))
    assert sr.shape == (1, 3, 28, 36)
    torch.testing.assert_close(sr, task.predict(model, lr, torch.Generator().manual_seed(0)), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# it learns: the trained pipeline beats bicubic on the photos it was trained on
# ----------------------------------------------------------------------------------------------------------------------

# Four 32x32 crops of skimage photos with texture (bicubic x4 scores 19-39 dB on them). The model is trained on these
# very crops (no augmentation), so that 300 CPU steps suffice: what is tested is that the objective, the scheduler
# and the pipeline agree (a mismatch in conditioning, input scaling or chain would not carry the fit over to sampling).


@pytest.mark.slow
def test_a_tiny_pixel_space_model_beats_bicubic(tmp_path, fresh_accelerate_state):
    from sr_diffusion.pipelines import AutoSRPipeline, ResShiftPipeline

    crops = photo_crops()
    config = tiny_config(tmp_path, *train_on_crops_overrides(tmp_path, crops, 300))
    result = Trainer(config, ResShiftTask()).train()
    assert result.global_step == 300
    first, last = np.mean(result.losses[:20]), np.mean(result.losses[-20:])
    assert last < 0.5 * first, (first, last)

    pipe = AutoSRPipeline.from_pretrained(result.pipeline_dir)
    assert isinstance(pipe, ResShiftPipeline)
    psnr_sr, psnr_bicubic = psnr_against_bicubic(pipe, crops)
    # about +6 dB after 300 steps (the paper's x_0 prediction, a 4-step chain); every crop must beat bicubic
    assert psnr_sr.mean() > psnr_bicubic.mean() + 1.0, (psnr_sr.tolist(), psnr_bicubic.tolist())
    assert (psnr_sr > psnr_bicubic).all(), (psnr_sr.tolist(), psnr_bicubic.tolist())


@pytest.mark.slow
def test_accelerate_launch_writes_a_loadable_pipeline(tmp_path):
    from sr_diffusion.pipelines import AutoSRPipeline, ResShiftPipeline

    out = tmp_path / "run"
    proc = accelerate_launch(
        SCRIPT,
        [
            "--config",
            str(TINY),
            "train.max_steps=3",
            "train.checkpointing_steps=3",
            "train.validation_steps=3",
            "validation.max_images=1",
            f"train.output_dir={out}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "checkpoint-3" / "model" / "config.json").is_file() and (out / "config.yaml").is_file()
    assert "PSNR" in proc.stdout + proc.stderr  # validation ran the pipeline

    pipe = AutoSRPipeline.from_pretrained(out / "pipeline")
    assert isinstance(pipe, ResShiftPipeline) and pipe.upscale == 4
    assert pipe.scheduler.config.num_train_timesteps == 4 and pipe.scheduler.config.clip_sample
    pipe.set_progress_bar_config(disable=True)
    assert pipe(torch.rand(1, 3, 9, 11), output_type="pt").images.shape == (1, 3, 36, 44)
