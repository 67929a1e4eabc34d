"""Fine-tuning options of the shared trainer: ``train.init_from`` (start from a saved model's weights) and
``train.phase_bias_weight`` (a penalty on the error's per-sub-pixel-phase offsets, against the x4 mesh)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sr_diffusion.models import EDSR
from sr_diffusion.training import RegressionTask, Trainer
from sr_diffusion.training.config import ConfigError, load_config
from sr_diffusion.training.losses import PhaseBiasLoss, build_loss, phase_bias
from sr_diffusion.training.sr3 import SR3Task
from sr_diffusion.training.trainer import load_initial_weights

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "regression_tiny.yaml"


def test_phase_bias_is_the_error_content_at_the_grid_frequencies():
    g = torch.Generator().manual_seed(0)
    pattern = torch.randn(2, 3, 4, 4, generator=g)
    smooth = torch.randn(2, 3, 1, 1, generator=g)  # a global offset is no mesh
    error = pattern.repeat(1, 1, 6, 5) + smooth  # 24 x 20, exactly 4-periodic
    torch.testing.assert_close(phase_bias(error, 4), pattern - pattern.mean((-2, -1), keepdim=True))
    # Parseval: the energy of the phase bias is the error's DFT energy on the bins (a H/4, b W/4), (a, b) != 0
    noise = torch.randn(1, 1, 24, 20, generator=g)
    spectrum = torch.fft.fft2(noise)[0, 0].abs() ** 2
    grid = spectrum[::6, ::5].clone()
    grid[0, 0] = 0
    energy = phase_bias(noise, 4).square().sum() * 16
    torch.testing.assert_close(energy, grid.sum() / (24 * 20 / 16) ** 2, rtol=1e-4, atol=0)
    # a crop that is not a multiple of the period is cropped, not an error
    assert phase_bias(torch.zeros(1, 1, 10, 9), 4).shape == (1, 1, 4, 4)


def test_phase_bias_loss_adds_the_penalty():
    base = torch.nn.L1Loss()
    x, y = torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)
    x[..., ::4, ::4] = 0.16  # one phase off by 0.16: per-phase means 0.16 there, 0 elsewhere
    loss = PhaseBiasLoss(base, 10.0, 4)
    per_phase = torch.zeros(4, 4)
    per_phase[0, 0] = 0.16
    expected = base(x, y) + 10.0 * (per_phase - per_phase.mean()).abs().mean()
    torch.testing.assert_close(loss(x, y), expected)
    assert isinstance(build_loss("l1", phase_bias_weight=1.0, period=4), PhaseBiasLoss)
    assert isinstance(build_loss("mse"), torch.nn.MSELoss)
    with pytest.raises(ValueError):
        PhaseBiasLoss(base, -1.0, 4)


def test_phase_bias_weight_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="train.phase_bias_weight"):
        load_config(TINY, ["train.phase_bias_weight=-1"])
    config = load_config(TINY, [f"train.output_dir={tmp_path}", "train.phase_bias_weight=1"])
    assert isinstance(RegressionTask().__class__.supports_phase_bias, bool) and RegressionTask.supports_phase_bias
    with pytest.raises(ConfigError, match="no pixel-space image loss"):
        Trainer(config, SR3Task())


def _save_tiny_edsr(folder: Path, seed: int = 1, **kwargs) -> EDSR:
    torch.manual_seed(seed)
    model = EDSR(num_feat=8, num_block=1, upscale=4, **kwargs)
    model.save_pretrained(folder)
    return model


def test_init_from_starts_from_the_saved_weights(tmp_path, fresh_accelerate_state, one_thread):
    saved = _save_tiny_edsr(tmp_path / "init")
    config = load_config(
        TINY,
        [
            f"train.output_dir={tmp_path / 'run'}",
            f"train.init_from={tmp_path / 'init'}",
            "train.max_steps=2",
            "optim.lr=1e-20",  # Adam moves each weight by ~1e-20, far below its float32 spacing: nothing changes
            "train.ema_decay=null",
            "train.report_to=none",
            "train.checkpointing_steps=0",
            "train.validation_steps=0",
            "train.phase_bias_weight=5",
        ],
    )
    result = Trainer(config, RegressionTask()).train()
    exported = EDSR.from_pretrained(result.pipeline_dir / "model")
    for name, tensor in saved.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_init_from_refuses_another_architecture_or_a_non_model_folder(tmp_path, fresh_accelerate_state, one_thread):
    _save_tiny_edsr(tmp_path / "wide", upsampler="nearest_conv")
    common = [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1", "train.report_to=none"]
    config = load_config(TINY, [*common, f"train.init_from={tmp_path / 'wide'}"])
    with pytest.raises(ConfigError, match="another architecture.*upsampler"):
        Trainer(config, RegressionTask()).train()
    config = load_config(TINY, [*common, f"train.init_from={tmp_path}"])
    with pytest.raises(ConfigError, match="not a saved model folder"):
        Trainer(config, RegressionTask()).train()


def test_init_from_switches_nearest_to_bilinear_upsampling(tmp_path):
    """nearest + conv and bilinear + conv have the same parameters: a fine-tune may switch (and says so), any other
    difference stays an error."""
    saved = _save_tiny_edsr(tmp_path / "nearest", upsampler="nearest_conv")
    model = EDSR(num_feat=8, num_block=1, upscale=4, upsampler="bilinear_conv")
    assert load_initial_weights(model, tmp_path / "nearest") == ["upsampler: nearest_conv -> bilinear_conv"]
    for name, tensor in saved.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    with pytest.raises(ConfigError, match="another architecture.*upsampler"):
        load_initial_weights(EDSR(num_feat=8, num_block=1, upscale=4), tmp_path / "nearest")  # pixel shuffle
