"""SR3 training: config, the objective (checked term by term), and a tiny run whose pipeline beats bicubic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import accelerate_launch
from learning import photo_crops, psnr_against_bicubic, train_on_crops_overrides
from PIL import Image

from sr_diffusion.training import ConfigError, Trainer, load_config
from sr_diffusion.training.sr3 import SR3ExperimentConfig, SR3Task, build_sr3_model, build_sr3_scheduler

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "sr3_tiny.yaml"
SCRIPT = REPO / "training" / "train_sr3.py"

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


def tiny_config(tmp_path, *overrides: str) -> SR3ExperimentConfig:
    return load_config(TINY, [f"train.output_dir={tmp_path / 'run'}", *overrides], cls=SR3ExperimentConfig)


# ----------------------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------------------


def test_tiny_config_and_sections(tmp_path):
    config = tiny_config(tmp_path)
    assert config.train.loss == "l1" and config.model.arch == "unet2d"
    assert (config.sr3.noise_level_scale, config.sr3.sampler, config.sr3.num_inference_steps) == (1000.0, "ddim", 10)
    scheduler = build_sr3_scheduler(config)
    assert scheduler.config.num_train_timesteps == 50 and scheduler.config.beta_end == 0.2
    # defaults: diffusers' DDPMScheduler, L1 (as the re-implementation), the paper's DDPM sampler over all steps
    default = load_config(None, cls=SR3ExperimentConfig)
    assert default.train.loss == "l1" and default.sr3.sampler == "ddpm" and default.sr3.num_inference_steps is None
    assert build_sr3_scheduler(default).config.num_train_timesteps == 1000


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("scheduler.beta_ending=1", "unknown config key.*scheduler.beta_ending"),
        ("scheduler.prediction_type=v_prediction", "scheduler.prediction_type"),
        ("scheduler.beta_schedule=cubic", "scheduler:"),
        ("sr3.noise_level_scale=0", "sr3.noise_level_scale"),
        ("sr3.num_inference_steps=51", "sr3.num_inference_steps"),
        ("sr3.strength=0", "sr3.strength"),
        ("sr3.sampler=euler", "sr3.sampler"),
    ],
)
def test_bad_settings_fail_early(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, override)


def test_model_settings_are_checked(tmp_path):
    task = SR3Task()
    for overrides, message in [
        (["model.arch=edsr"], "unknown SR3 denoiser 'edsr'"),
        (["model.num_feat=8"], "unknown config key.*model.num_feat"),
        (["model.in_channels=3"], "model.in_channels must be 6"),
        (["model.out_channels=6"], "model.out_channels must be 3"),
    ]:
        with pytest.raises(ConfigError, match=message):
            task.check_config(tiny_config(tmp_path, *overrides))
    with pytest.raises(ConfigError, match="multiple of the UNet's input multiple"):
        build_sr3_model(tiny_config(tmp_path, "model.block_out_channels=[16, 16, 32, 32]", "data.gt_size=36"))
    model = build_sr3_model(tiny_config(tmp_path))
    assert (model.config.in_channels, model.config.out_channels, model.config.sample_size) == (6, 3, 32)
    assert list(model.config.down_block_types) == ["DownBlock2D", "DownBlock2D"]


# ----------------------------------------------------------------------------------------------------------------------
# the objective
# ----------------------------------------------------------------------------------------------------------------------


def _batch(seed: int = 0, n: int = 3):
    from sr_diffusion.resize import imresize

    hr = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return {"lr": imresize(hr, scale=0.25).clamp(0, 1), "hr": hr}


@pytest.mark.parametrize("loss", ["l1", "mse"])
def test_compute_loss_is_the_sr3_objective(tmp_path, loss):
    config = tiny_config(tmp_path, f"train.loss={loss}", "sr3.noise_level_scale=500")
    task = SR3Task()
    task.check_config(config)
    torch.manual_seed(0)
    model = task.build_model(config)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args))
    batch = _batch()
    out = task.compute_loss(model, batch, torch.Generator().manual_seed(7))

    # the same draws by hand: t, the uniform of gamma, then the noise, from the generator
    ab = task.scheduler.alphas_cumprod
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 50, (3,), generator=g)
    u = torch.rand(3, generator=g)
    noise = torch.randn(3, 3, 32, 32, generator=g)
    upper = torch.where(t > 0, ab[(t - 1).clamp(min=0)], torch.ones(())).sqrt()  # sqrt(alpha_bar_{t-1}), 1 at t=0
    lower = ab[t].sqrt()
    gamma = lower + u * (upper - lower)
    assert ((gamma >= lower) & (gamma <= upper)).all()
    y0, lr = batch["hr"] * 2 - 1, batch["lr"] * 2 - 1
    # x as the original's data pipeline makes it: PIL bicubic on the 8-bit LR image, read back as k/255, * 2 - 1
    x = torch.stack(
        [
            torch.from_numpy(np.asarray(Image.fromarray(im, mode="RGB").resize((32, 32), Image.BICUBIC)).copy())
            for im in ((lr + 1) / 2 * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        ]
    )
    x = x.permute(0, 3, 1, 2).float().div(255) * 2 - 1
    y_t = gamma.view(-1, 1, 1, 1) * y0 + (1 - gamma.view(-1, 1, 1, 1) ** 2).sqrt() * noise  # Eq. 4
    torch.testing.assert_close(seen[0][0], torch.cat([x, y_t], dim=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen[0][1], 500 * gamma, rtol=1e-5, atol=1e-4)  # the scaled noise level, not t
    eps = model(torch.cat([x, y_t], dim=1), 500 * gamma).sample
    expected = (eps - noise).abs().mean() if loss == "l1" else (eps - noise).pow(2).mean()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)

    # deterministic given the generator, different for another seed, and it trains
    assert torch.equal(out, task.compute_loss(model, batch, torch.Generator().manual_seed(7)))
    assert not torch.equal(out, task.compute_loss(model, batch, torch.Generator().manual_seed(8)))
    out.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_noise_levels_cover_the_continuum(tmp_path):
    """Many draws: gamma fills (sqrt(alpha_bar_{T-1}), 1), not just the T discrete values."""
    config = tiny_config(tmp_path)
    task = SR3Task()
    task.check_config(config)
    levels = []

    class Recorder(torch.nn.Module):
        dtype = torch.float32

        def forward(self, sample, timestep, return_dict=False):
            levels.append(timestep / 1000)
            return (sample[:, 3:],)

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        task.compute_loss(Recorder(), _batch(n=8), g)
    gamma = torch.cat(levels)
    assert gamma.min() >= task.scheduler.alphas_cumprod[-1].sqrt() and gamma.max() <= 1
    assert len(torch.unique(gamma)) == len(gamma)  # continuous draws


def test_the_reimplementation_unet_as_denoiser(tmp_path):
    """``model.arch: sr3unet`` trains the re-implementation's UNet (e.g. converted weights) on the same objective."""
    import yaml

    from sr_diffusion.models.sr3_unet import SR3UNet
    from sr_diffusion.pipelines import SR3Pipeline

    data = yaml.safe_load(TINY.read_text())
    data["model"] = {
        "arch": "sr3unet",
        "inner_channel": 16,
        "norm_groups": 8,
        "channel_mults": [1, 2],
        "attn_res": [16],
        "res_blocks": 1,
        "dropout": 0.0,
    }
    data["sr3"]["noise_level_scale"] = 1.0  # the re-implementation's conditioning: the raw noise level
    (tmp_path / "sr3unet.yaml").write_text(yaml.safe_dump(data))
    config = load_config(tmp_path / "sr3unet.yaml", [f"train.output_dir={tmp_path / 'run'}"], cls=SR3ExperimentConfig)
    task = SR3Task()
    task.check_config(config)
    model = task.build_model(config)
    assert isinstance(model, SR3UNet) and model.config.image_size == 32  # data.gt_size
    assert (model.config.in_channel, model.config.out_channel) == (6, 3)
    assert model.downs[1].attn is None and model.downs[3].attn is not None  # level 1 of 32 is 16: attention
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    loss = task.compute_loss(model, _batch(), torch.Generator().manual_seed(0))
    assert seen[0].shape == (3,) and 0 < seen[0].min() and seen[0].max() <= 1  # gamma itself
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    pipe = task.build_pipeline(model.eval())
    assert isinstance(pipe, SR3Pipeline) and pipe.noise_level_scale == 1.0
    assert task.predict(model, torch.rand(1, 3, 5, 6), torch.Generator().manual_seed(0)).shape == (1, 3, 20, 24)
    for overrides, message in [
        (["model.in_channel=3"], "model.in_channel must be 6"),
        (["model.num_feat=8"], "unknown config key.*model.num_feat.*for arch 'sr3unet'"),
    ]:
        bad = load_config(tmp_path / "sr3unet.yaml", overrides, cls=SR3ExperimentConfig)
        with pytest.raises(ConfigError, match=message):
            task.check_config(bad)
    with pytest.raises(ConfigError, match="multiple of the UNet's input multiple"):
        build_sr3_model(
            load_config(
                tmp_path / "sr3unet.yaml",
                ["data.gt_size=36", "model.channel_mults=[1, 1, 1, 1]"],
                cls=SR3ExperimentConfig,
            )
        )


def test_predict_and_build_pipeline(tmp_path):
    from diffusers import DDIMScheduler, DDPMScheduler

    from sr_diffusion.pipelines import SR3Pipeline

    config = tiny_config(tmp_path)
    task = SR3Task()
    task.check_config(config)
    model = task.build_model(config).eval()
    pipe = task.build_pipeline(model)
    assert isinstance(pipe, SR3Pipeline) and pipe.upscale == 4 and pipe.noise_level_scale == 1000.0
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.num_train_timesteps == 50 and pipe.scheduler.config.beta_end == 0.2
    lr = torch.rand(1, 3, 7, 9)
    sr = task.predict(model, lr, torch.Generator().manual_seed(0))
    assert sr.shape == (1, 3, 28, 36)
    torch.testing.assert_close(sr, task.predict(model, lr, torch.Generator().manual_seed(0)), rtol=0, atol=0)
    task = SR3Task()
    task.check_config(tiny_config(tmp_path, "sr3.sampler=ddpm"))
    assert type(task.build_pipeline(model).scheduler) is DDPMScheduler


# ----------------------------------------------------------------------------------------------------------------------
# it learns: the trained pipeline beats bicubic on the photos it was trained on
# ----------------------------------------------------------------------------------------------------------------------

# The crops of tests/test_training_resshift.py (bicubic x4 scores 19-39 dB on them). The model is trained on these
# very crops (no augmentation) so that a few hundred CPU steps suffice: what is tested is that the objective, the
# noise-level conditioning and the sampler agree (a mismatch would not carry the fit over to sampling).

# What the learning test trains and samples with. From pure noise a tiny eps-predicting model needs far more than a
# CPU test's few hundred steps (after 300-500 steps it is 10-11 dB below bicubic: small eps errors at high noise blow
# up in x_0 = (y_t - sqrt(1 - gamma^2) eps) / gamma). So the test trains the low-noise part of the chain only
# (beta_end 0.05: gamma in [0.53, 1]) with FiLM conditioning (scale_shift, as SR3's affine noise-level layers), and
# samples img2img: strength 0.5 of 10 DDIM steps from the noised bicubic upsampling. Mean Y-PSNR over bicubic's:
# +0.05 dB after 300 steps, +2.0 dB after 400 (every crop above bicubic), +4.6 dB after 500.
LEARN_STEPS = 400
LEARN_OVERRIDES = ("model.resnet_time_scale_shift=scale_shift", "scheduler.beta_end=0.05")
LEARN_SAMPLING = {"num_inference_steps": 10, "strength": 0.5}


@pytest.mark.slow
def test_a_tiny_sr3_model_beats_bicubic(tmp_path, fresh_accelerate_state):
    from sr_diffusion.pipelines import AutoSRPipeline, SR3Pipeline

    crops = photo_crops()
    config = tiny_config(tmp_path, *train_on_crops_overrides(tmp_path, crops, LEARN_STEPS), *LEARN_OVERRIDES)
    result = Trainer(config, SR3Task()).train()
    assert result.global_step == LEARN_STEPS
    first, last = np.mean(result.losses[:20]), np.mean(result.losses[-20:])
    assert last < 0.5 * first, (first, last)

    pipe = AutoSRPipeline.from_pretrained(result.pipeline_dir)
    assert isinstance(pipe, SR3Pipeline)
    psnr_sr, psnr_bicubic = psnr_against_bicubic(pipe, crops, **LEARN_SAMPLING)
    assert psnr_sr.mean() > psnr_bicubic.mean() + 0.5, (psnr_sr.tolist(), psnr_bicubic.tolist())


@pytest.mark.slow
def test_accelerate_launch_writes_a_loadable_pipeline(tmp_path):
    from sr_diffusion.pipelines import AutoSRPipeline, SR3Pipeline

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
            "sr3.num_inference_steps=2",
            f"train.output_dir={out}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "checkpoint-3" / "model" / "config.json").is_file() and (out / "config.yaml").is_file()
    assert "PSNR" in proc.stdout + proc.stderr  # validation ran the pipeline

    pipe = AutoSRPipeline.from_pretrained(out / "pipeline")
    assert isinstance(pipe, SR3Pipeline) and pipe.upscale == 4 and pipe.noise_level_scale == 1000.0
    assert pipe.scheduler.config.num_train_timesteps == 50
    pipe.set_progress_bar_config(disable=True)
    out = pipe(torch.rand(1, 3, 9, 11), num_inference_steps=2, output_type="pt").images
    assert out.shape == (1, 3, 36, 44)
