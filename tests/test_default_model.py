"""The regression x4 model shipped inside the package (trained by configs/regression_default_x4.yaml)."""

import numpy as np
import torch
from skimage import data

from sr_diffusion.cli import main
from sr_diffusion.defaults import DEFAULT_REGRESSION_DIR, default_pipeline_dir
from sr_diffusion.metrics import psnr
from sr_diffusion.pipelines import AutoSRPipeline, RegressionSRPipeline
from sr_diffusion.resize import imresize


def test_default_model_is_shipped_small_and_loads():
    folder = default_pipeline_dir()
    weights = sorted(folder.rglob("*.safetensors"))
    assert weights and sum(p.stat().st_size for p in weights) < 5 * 2**20
    pipe = AutoSRPipeline.from_pretrained(folder)
    assert isinstance(pipe, RegressionSRPipeline) and pipe.upscale == 4


def test_default_model_beats_bicubic_on_a_held_out_photo():
    """'coffee' is held out of training; x4 MATLAB-bicubic LR, Y-PSNR with crop_border 4, as in the README."""
    hr = torch.from_numpy(np.ascontiguousarray(data.coffee()[:192, 200:392])).permute(2, 0, 1)[None].double() / 255
    lr = (imresize(hr, scale=0.25).clamp(0, 1) * 255).round() / 255
    pipe = AutoSRPipeline.from_pretrained(DEFAULT_REGRESSION_DIR)
    pipe.set_progress_bar_config(disable=True)
    sr = pipe(lr.float(), output_type="pt").images.double()
    sr = (sr * 255).round() / 255
    bicubic = (imresize(lr, scale=4).clamp(0, 1) * 255).round() / 255
    gain = psnr(sr, hr, crop_border=4, y_channel=True) - psnr(bicubic, hr, crop_border=4, y_channel=True)
    assert gain.item() > 0.5, f"default model only {gain.item():.2f} dB above bicubic"


def test_demo_runs_with_the_default_model(tmp_path):
    assert main(["demo", "-o", str(tmp_path)]) == 0
    assert (tmp_path / "sample_sr.png").is_file() and (tmp_path / "sample_comparison.png").is_file()
