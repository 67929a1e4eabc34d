"""Tests for sr_diffusion.degradations: kernels, noise, JPEG, configs, Real-ESRGAN and BSRGAN pipelines."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from sr_diffusion.degradations import (
    INTERPOLATION_MODES,
    KERNEL_TYPES,
    PARAM_KEYS,
    BSRGANDegradation,
    BSRGANDegradationConfig,
    RealESRGANDegradation,
    RealESRGANDegradationConfig,
    add_gaussian_noise,
    bivariate_gaussian,
    bivariate_generalized_gaussian,
    bivariate_plateau,
    circular_lowpass_kernel,
    collate_kernels,
    filter2d,
    gaussian_noise,
    jpeg_compress,
    poisson_noise,
    pulse_kernel,
    quantize_8bit,
    random_kernel,
    reflect_pad,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    skimage_data = pytest.importorskip("skimage.data")
    return torch.from_numpy(skimage_data.astronaut()).permute(2, 0, 1).float() / 255.0  # (3, 512, 512)


@pytest.fixture(scope="module")
def hr(astronaut) -> torch.Tensor:
    """Four 64x64 crops of a real photo, (4, 3, 64, 64) in [0, 1]."""
    corners = [(40, 180), (200, 200), (300, 100), (150, 320)]
    return torch.stack([astronaut[:, y : y + 64, x : x + 64] for y, x in corners])


def on_8bit_grid(x: torch.Tensor) -> bool:
    return torch.equal(x, (x * 255).round() / 255)


def no_noise_config(**overrides) -> RealESRGANDegradationConfig:
    return dataclasses.replace(RealESRGANDegradationConfig(), noise_prob=0.0, noise_prob2=0.0, **overrides)


# --------------------------------------------------------------------------------------------------------------
# Package
# --------------------------------------------------------------------------------------------------------------


def test_import_does_not_load_optional_dependencies():
    code = (
        "import sys, sr_diffusion.degradations as d; "
        "heavy = ('diffusers', 'accelerate', 'transformers', 'cv2', 'scipy', 'skimage'); "
        "bad = [m for m in heavy if m in sys.modules]; "
        "assert not bad, bad; assert all(hasattr(d, n) for n in d.__all__)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_type", KERNEL_TYPES)
@pytest.mark.parametrize("size", [7, 21])
def test_random_kernels_are_normalised_centred(kernel_type, size):
    for seed in range(3):
        k = random_kernel(kernel_type, size, (0.2, 3.0), betag_range=(0.5, 4), betap_range=(1, 2), generator=gen(seed))
        assert k.shape == (size, size) and k.dtype == torch.float64
        assert torch.isclose(k.sum(), torch.tensor(1.0, dtype=torch.float64))
        assert (k >= 0).all()
        torch.testing.assert_close(k, k.flip(0, 1))  # point-symmetric about the centre
        assert k[size // 2, size // 2] == k.max()


def test_isotropic_gaussian_matches_formula():
    size, sigma = 9, 1.7
    c = size // 2
    i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    expected = np.exp(-((i - c) ** 2 + (j - c) ** 2) / (2 * sigma**2))
    expected /= expected.sum()
    np.testing.assert_allclose(bivariate_gaussian(size, sigma).numpy(), expected, rtol=1e-12, atol=1e-15)


def test_anisotropic_gaussian_axes_and_rotation():
    size, sx, sy = 11, 3.0, 1.0
    c = size // 2
    row, col = np.meshgrid(np.arange(size) - c, np.arange(size) - c, indexing="ij")
    expected = np.exp(-(col**2) / (2 * sx**2) - row**2 / (2 * sy**2))  # x runs along columns
    np.testing.assert_allclose(bivariate_gaussian(size, sx, sy, 0.0).numpy(), expected / expected.sum(), rtol=1e-12)
    # a quarter turn swaps the axes
    torch.testing.assert_close(bivariate_gaussian(size, sx, sy, math.pi / 2), bivariate_gaussian(size, sy, sx, 0.0))


def test_generalized_and_plateau_formulas():
    size, sigma, beta = 7, 1.3, 0.7
    torch.testing.assert_close(bivariate_generalized_gaussian(size, sigma, beta=1.0), bivariate_gaussian(size, sigma))
    c = size // 2
    row, col = np.meshgrid(np.arange(size) - c, np.arange(size) - c, indexing="ij")
    q = (row**2 + col**2) / sigma**2
    gen_expected = np.exp(-0.5 * q**beta)
    plateau_expected = 1 / (1 + q**beta)
    np.testing.assert_allclose(
        bivariate_generalized_gaussian(size, sigma, beta=beta).numpy(),
        gen_expected / gen_expected.sum(),
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        bivariate_plateau(size, sigma, beta=beta).numpy(),
        plateau_expected / plateau_expected.sum(),
        rtol=1e-12,
    )


def _bessel_j1(x: np.ndarray) -> np.ndarray:
    """J1 from its integral form, J1(x) = 1/pi int_0^pi cos(t - x sin t) dt (independent of torch.special)."""
    t = np.linspace(0.0, np.pi, 20001)
    return np.trapezoid(np.cos(t[None, :] - np.asarray(x)[:, None] * np.sin(t[None, :])), t, axis=1) / np.pi


@pytest.mark.parametrize("cutoff", [math.pi / 3, 2.0, math.pi])
def test_sinc_kernel_matches_circular_lowpass_closed_form(cutoff):
    size = 21
    kernel = circular_lowpass_kernel(cutoff, size)
    assert kernel.shape == (size, size)
    assert torch.isclose(kernel.sum(), torch.tensor(1.0, dtype=torch.float64))
    c = size // 2
    row, col = np.meshgrid(np.arange(size) - c, np.arange(size) - c, indexing="ij")
    r = np.hypot(row, col).ravel()
    safe_r = np.where(r > 0, r, 1.0)
    closed = np.where(r > 0, cutoff * _bessel_j1(cutoff * safe_r) / (2 * np.pi * safe_r), cutoff**2 / (4 * np.pi))
    closed = closed.reshape(size, size) / closed.sum()
    for i, j in [(c, c), (c, c + 1), (c + 3, c - 4), (0, 0), (2, 17)]:
        assert kernel[i, j].item() == pytest.approx(closed[i, j], rel=1e-4, abs=1e-7)
    padded = circular_lowpass_kernel(cutoff, 9, pad_to=21)
    assert padded.shape == (21, 21) and padded[:6].abs().sum() == 0
    torch.testing.assert_close(padded[6:15, 6:15], circular_lowpass_kernel(cutoff, 9))


def test_filter2d_is_per_image_and_pulse_is_identity(hr):
    kernels = torch.stack([bivariate_gaussian(21, 0.5 + i).float() for i in range(hr.shape[0])])
    batched = filter2d(hr, kernels)
    for i in range(hr.shape[0]):
        torch.testing.assert_close(batched[i : i + 1], filter2d(hr[i : i + 1], kernels[i]))
    torch.testing.assert_close(filter2d(hr, pulse_kernel(21).float()), hr, rtol=0, atol=0)


def test_reflect_pad_handles_images_smaller_than_the_padding():
    img = torch.arange(2 * 5 * 4, dtype=torch.float32).view(1, 2, 5, 4)
    expected = np.pad(img.numpy(), ((0, 0), (0, 0), (10, 10), (10, 10)), mode="reflect")
    np.testing.assert_array_equal(reflect_pad(img, 10).numpy(), expected)
    np.testing.assert_array_equal(
        reflect_pad(img, 2).numpy(), np.pad(img.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    )
    assert filter2d(torch.rand(2, 3, 3, 3), bivariate_gaussian(21, 2.0)).shape == (2, 3, 3, 3)


def test_sample_kernels_shapes_and_collate():
    degradation = RealESRGANDegradation()
    samples = [degradation.sample_kernels(gen(seed)) for seed in range(8)]
    for sample in samples:
        assert set(sample) == set(PARAM_KEYS)
        for key in ("kernel1", "kernel2", "sinc_kernel"):
            assert sample[key].shape == (21, 21) and sample[key].dtype == torch.float32
            assert sample[key].sum().item() == pytest.approx(1.0, abs=1e-5)
        assert 30 <= sample["jpeg_quality1"].item() <= 95
        assert 1 <= sample["noise_sigma1"].item() <= 30
    batch = default_collate(samples)
    assert batch["kernel1"].shape == (8, 21, 21) and batch["jpeg_first"].shape == (8,)
    for key, value in collate_kernels(samples).items():
        assert torch.equal(value, batch[key])


def test_sampling_rules_follow_config():
    all_sinc = RealESRGANDegradation(dataclasses.replace(RealESRGANDegradationConfig(), sinc_prob=1.0))
    never = dataclasses.replace(RealESRGANDegradationConfig(), second_blur_prob=0.0, final_sinc_prob=0.0)
    pulse = pulse_kernel(21).float()
    for seed in range(5):
        sample = RealESRGANDegradation(never).sample_kernels(gen(seed))
        assert torch.equal(sample["kernel2"], pulse) and torch.equal(sample["sinc_kernel"], pulse)
        assert (all_sinc.sample_kernels(gen(seed))["kernel1"] < 0).any()  # sinc kernels ring below zero


# --------------------------------------------------------------------------------------------------------------
# Noise and JPEG
# --------------------------------------------------------------------------------------------------------------


def test_gaussian_noise_variance_and_gray():
    img = torch.full((2, 3, 128, 128), 0.5)
    noise = gaussian_noise(img, torch.tensor([10.0, 20.0]), gray=torch.tensor([False, True]), generator=gen(0))
    assert noise[0].std().item() == pytest.approx(10 / 255, rel=0.03)
    assert noise[1].std().item() == pytest.approx(20 / 255, rel=0.03)
    assert abs(noise.mean().item()) < 1e-3
    assert torch.equal(noise[1, 0], noise[1, 2]) and not torch.equal(noise[0, 0], noise[0, 2])
    out = add_gaussian_noise(img, 200.0, generator=gen(0))
    assert out.min() >= 0 and out.max() <= 1


def test_poisson_noise_variance():
    # 256 distinct 8-bit levels -> L = 256 and Var[noise] = scale^2 * v / 256
    levels = torch.arange(256, dtype=torch.float32) / 255
    img = levels.repeat(3, 128, 1).view(1, 3, 128, 256)
    scale = 2.0
    noise = poisson_noise(img, scale, generator=gen(0))
    expected_var = scale**2 * img.mean().item() / 256
    assert noise.pow(2).mean().item() == pytest.approx(expected_var, rel=0.05)
    assert abs(noise.mean().item()) < 0.01 * math.sqrt(expected_var)
    bright = noise[..., 192:].pow(2).mean() / noise[..., :64].pow(2).mean()
    assert bright.item() > 4  # shot noise grows with intensity
    gray = poisson_noise(img, scale, gray=True, generator=gen(0))
    assert torch.equal(gray[:, 0], gray[:, 1])
    assert torch.equal(poisson_noise(img, scale, generator=gen(3)), poisson_noise(img, scale, generator=gen(3)))


def test_jpeg_quality_affects_output(hr):
    low, high = jpeg_compress(hr, 10), jpeg_compress(hr, 90)
    assert low.shape == hr.shape and low.dtype == hr.dtype and on_8bit_grid(low)
    err_low, err_high = (low - hr).abs().mean().item(), (high - hr).abs().mean().item()
    assert err_low > 1.5 * err_high > 0
    mixed = jpeg_compress(hr[:2], torch.tensor([10, 90]))
    assert torch.equal(mixed[0], low[0]) and torch.equal(mixed[1], high[1])
    with pytest.raises(ValueError, match="quality"):
        jpeg_compress(hr, 0)


# --------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------


def test_realesrgan_defaults_are_x4plus():
    cfg = RealESRGANDegradationConfig()
    assert cfg.kernel_prob == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    assert cfg.blur_sigma == (0.2, 3.0) and cfg.blur_sigma2 == (0.2, 1.5)
    assert cfg.resize_prob == (0.2, 0.7, 0.1) and cfg.resize_range == (0.15, 1.5)
    assert cfg.noise_range == (1.0, 30.0) and cfg.noise_range2 == (1.0, 25.0)
    assert cfg.second_blur_prob == 0.8 and cfg.final_sinc_prob == 0.8 and cfg.scale == 4


@pytest.mark.parametrize(
    ("cls", "path"),
    [
        (RealESRGANDegradationConfig, "configs/degradations/realesrgan_x4.yaml"),
        (BSRGANDegradationConfig, "configs/degradations/bsrgan_x4.yaml"),
    ],
)
def test_shipped_yaml_equals_defaults(cls, path):
    from pathlib import Path

    assert cls.from_yaml(Path(__file__).resolve().parents[1] / path) == cls()


def test_config_yaml_round_trip(tmp_path):
    cfg = RealESRGANDegradationConfig(
        kernel_list=["iso", "plateau_aniso"],
        kernel_prob=[0.3, 0.7],
        sinc_prob=0.0,
        jpeg_range2=[50, 60],
        scale=2,
    )
    cfg.to_yaml(tmp_path / "r.yaml")
    assert RealESRGANDegradationConfig.from_yaml(tmp_path / "r.yaml") == cfg
    assert RealESRGANDegradationConfig.from_dict(cfg.to_dict()) == cfg
    bsr = BSRGANDegradationConfig(scale=2, jpeg_prob=0.5)
    bsr.to_yaml(tmp_path / "b.yaml")
    assert BSRGANDegradationConfig.from_yaml(tmp_path / "b.yaml") == bsr
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.scale = 3


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"sinc_probb": 0.1}, "did you mean 'sinc_prob'"),
        ({"sinc_prob": 1.5}, "sinc_prob is a probability"),
        ({"second_blur_prob": -0.1}, "second_blur_prob"),
        ({"blur_sigma": [3.0, 0.2]}, "blur_sigma must satisfy low <= high"),
        ({"noise_range2": [1, 2, 3]}, "noise_range2 must be a"),
        ({"kernel_list": ["iso", "box"], "kernel_prob": [0.5, 0.5]}, "unknown kernel type 'box'"),
        ({"kernel_list": ["iso", "sinc"], "kernel_prob": [0.5, 0.5]}, "sinc_prob"),
        ({"kernel_prob": [0.5, 0.5]}, "kernel_prob must be a list of 6"),
        ({"resize_prob": [0.5, 0.5, 0.5]}, "resize_prob must sum to 1"),
        ({"resize_range": [1.2, 1.5]}, "resize_range must contain 1"),
        ({"blur_kernel_size": 20}, "odd"),
        ({"jpeg_range": [0, 95]}, "jpeg_range"),
        ({"scale": 0}, "scale"),
        ({"gray_noise_prob": True}, "gray_noise_prob"),
    ],
)
def test_realesrgan_config_errors(options, match):
    with pytest.raises(ValueError, match=match):
        RealESRGANDegradationConfig.from_dict(options)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"jpeg_prb": 0.9}, "unknown BSRGANDegradationConfig option"),
        ({"isp_prob": 2}, "isp_prob"),
        ({"color_noise_prob": 0.7}, "color_noise_prob \\+ gray_noise_prob"),
        ({"jpeg_range": [95, 30]}, "low <= high"),
        ({"blur_kernel_size_range": [7, 24]}, "odd"),
    ],
)
def test_bsrgan_config_errors(options, match):
    with pytest.raises(ValueError, match=match):
        BSRGANDegradationConfig.from_dict(options)


def test_from_yaml_rejects_non_mapping(tmp_path):
    (tmp_path / "bad.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(TypeError, match="mapping"):
        RealESRGANDegradationConfig.from_yaml(tmp_path / "bad.yaml")


# --------------------------------------------------------------------------------------------------------------
# Real-ESRGAN pipeline
# --------------------------------------------------------------------------------------------------------------


def test_realesrgan_is_deterministic(hr):
    degradation = RealESRGANDegradation()
    first = degradation(hr, generator=gen(0))
    second = degradation(hr, generator=gen(0))
    assert torch.equal(first, second)
    assert not torch.equal(first, degradation(hr, generator=gen(1)))
    kernels = degradation.sample_batch(hr.shape[0], gen(7))
    assert torch.equal(degradation.apply(hr, kernels, gen(3)), degradation.apply(hr, kernels, gen(3)))


@pytest.mark.parametrize("scale", [1, 2, 4])
def test_realesrgan_shape_and_range(hr, scale):
    degradation = RealESRGANDegradation(RealESRGANDegradationConfig(scale=scale))
    lr = degradation(hr[:2], generator=gen(scale))
    assert lr.shape == (2, 3, 64 // scale, 64 // scale) and lr.dtype == hr.dtype
    assert lr.min() >= 0 and lr.max() <= 1 and on_8bit_grid(lr)


def test_realesrgan_odd_sizes_and_tiny_images(astronaut):
    assert RealESRGANDegradation()(astronaut[None, :, :66, :70], generator=gen(0)).shape == (1, 3, 16, 17)
    # a 6x7 LR image is still blurred by 21x21 kernels (reflect padding wider than the image)
    cfg = RealESRGANDegradationConfig(second_blur_prob=1.0, final_sinc_prob=1.0)
    for seed in range(3):
        lr = RealESRGANDegradation(cfg)(astronaut[None, :, :24, :28], generator=gen(seed))
        assert lr.shape == (1, 3, 6, 7) and torch.isfinite(lr).all()


def test_realesrgan_batch_equals_per_image_without_noise(hr):
    degradation = RealESRGANDegradation(no_noise_config())  # JPEG stays on: its qualities are per image
    kernels = degradation.sample_batch(hr.shape[0], gen(11))
    batched = degradation.apply(hr, kernels, gen(5))
    for i in range(hr.shape[0]):
        single = degradation.apply(hr[i : i + 1], {k: v[i] for k, v in kernels.items()}, gen(5))
        torch.testing.assert_close(single[0], batched[i], rtol=0, atol=1 / 255 + 1e-6)
        assert (single[0] == batched[i]).float().mean() > 0.99


def test_realesrgan_without_degradations_is_a_plain_resize(hr):
    cfg = no_noise_config(
        jpeg_prob=0.0, jpeg_prob2=0.0, second_blur_prob=0.0, final_sinc_prob=0.0,
        resize_prob=[0, 0, 1], resize_prob2=[0, 0, 1],
    )  # fmt: skip
    degradation = RealESRGANDegradation(cfg)
    resized = [quantize_8bit(F.interpolate(hr, size=(16, 16), mode=m)) for m in INTERPOLATION_MODES]
    for seed in range(4):  # each seed picks its own interpolation mode
        kernels = degradation.sample_batch(hr.shape[0], gen(seed))
        kernels["kernel1"] = pulse_kernel(21).float().expand(hr.shape[0], 21, 21)  # no first blur either
        lr = degradation.apply(hr, kernels, gen(seed))
        assert sum(torch.allclose(lr, r, atol=1e-6) for r in resized) == 1


def test_realesrgan_degrades_more_than_bicubic(hr):
    lr = RealESRGANDegradation()(hr, generator=gen(0))
    bicubic = quantize_8bit(F.interpolate(hr, size=(16, 16), mode="bicubic", antialias=True))
    assert (lr - bicubic).abs().mean().item() > 0.02


def test_realesrgan_input_errors(hr):
    degradation = RealESRGANDegradation()
    kernels = degradation.sample_kernels(gen(0))
    with pytest.raises(TypeError, match="torch.Generator"):
        degradation(hr, generator=np.random.default_rng(0))
    with pytest.raises(ValueError, match="missing"):
        degradation.apply(hr, {"kernel1": kernels["kernel1"]}, gen(0))
    with pytest.raises(ValueError, match="channels"):
        degradation(torch.rand(1, 4, 32, 32), generator=gen(0))
    # one sample's dict is broadcast over the batch
    assert degradation.apply(hr[:2], kernels, gen(0)).shape == (2, 3, 16, 16)


# --------------------------------------------------------------------------------------------------------------
# BSRGAN pipeline
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1, 2, 4])
def test_bsrgan_shape_and_range(hr, scale):
    lr = BSRGANDegradation(BSRGANDegradationConfig(scale=scale))(hr[:2], generator=gen(scale))
    assert lr.shape == (2, 3, 64 // scale, 64 // scale) and lr.dtype == hr.dtype
    assert lr.min() >= 0 and lr.max() <= 1 and on_8bit_grid(lr)


def test_bsrgan_is_deterministic_and_degrades(hr):
    degradation = BSRGANDegradation()
    first = degradation(hr, generator=gen(0))
    assert torch.equal(first, degradation(hr, generator=gen(0)))
    assert not torch.equal(first, degradation(hr, generator=gen(1)))
    bicubic = quantize_8bit(F.interpolate(hr, size=(16, 16), mode="bicubic", antialias=True))
    assert (first - bicubic).abs().mean().item() > 0.02
    assert degradation(hr[:, :, :62, :63], generator=gen(2)).shape == (4, 3, 15, 15)


def test_bsrgan_isp_model_is_optional_and_generator_driven(hr):
    calls = []

    def isp(img, generator):
        calls.append(img.shape)
        return img + 0.01 * torch.randn(img.shape, generator=generator)

    degradation = BSRGANDegradation(BSRGANDegradationConfig(isp_prob=1.0), isp_model=isp)
    out = degradation(hr[:2], generator=gen(0))
    assert len(calls) == 2 and all(shape[:2] == (1, 3) for shape in calls)
    assert torch.equal(out, degradation(hr[:2], generator=gen(0)))
