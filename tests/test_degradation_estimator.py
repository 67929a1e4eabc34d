"""The degradation estimator: its targets (read from the Real-ESRGAN degradation's own draws), the model, the shipped
default, and a learning test on held-out photo crops."""

from __future__ import annotations

import math

import pytest
import torch

from sr_diffusion.degradations import (
    RealESRGANDegradation,
    RealESRGANDegradationConfig,
    bivariate_gaussian,
    circular_lowpass_kernel,
)
from sr_diffusion.estimation import (
    BLUR_SIGMA_MIN,
    DegradationEstimate,
    DegradationEstimator,
    degrade_with_targets,
    effective_blur_sigma,
)
from sr_diffusion.estimation import targets as targets_module

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def hr_batch(n: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Real photo crops (astronaut), ``(n, 3, size, size)`` in [0, 1]."""
    from skimage import data

    photo = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float() / 255
    g = torch.Generator().manual_seed(seed)
    tops = torch.randint(0, photo.shape[1] - size, (n,), generator=g).tolist()
    lefts = torch.randint(0, photo.shape[2] - size, (n,), generator=g).tolist()
    return torch.stack([photo[:, t : t + size, x : x + size] for t, x in zip(tops, lefts)])


# ----------------------------------------------------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------------------------------------------------


def test_degrade_with_targets_returns_exactly_the_degradations_lr_images():
    degradation = RealESRGANDegradation()
    hr = hr_batch()
    for seed in range(3):
        lr, targets = degrade_with_targets(degradation, hr, torch.Generator().manual_seed(seed))
        assert torch.equal(lr, degradation.degrade(hr, torch.Generator().manual_seed(seed)))
        assert len(targets) == 4
        assert (targets.blur_sigma >= BLUR_SIGMA_MIN - 1e-6).all() and (targets.noise_sigma > 0).all()
        quality = targets.jpeg_quality
        assert (((quality >= 30) & (quality <= 95)) | (quality == 100)).all()


def test_jpeg_target_is_the_quality_the_lr_grid_shows():
    """The final JPEG's quality counts where its blocks lie on the LR grid: when it is the last operation, or when
    the final resize it precedes keeps the size; a JPEG resampled by a size-changing final resize counts as none."""
    hr = hr_batch(n=8, size=64)
    for resize_prob2, resampled in (((0.0, 1.0, 0.0), True), ((0.0, 0.0, 1.0), False)):
        config = RealESRGANDegradationConfig(jpeg_prob2=1.0, resize_prob2=resize_prob2, resize_range2=(0.5, 1.2))
        _, targets, params = degrade_with_targets(
            RealESRGANDegradation(config), hr, torch.Generator().manual_seed(0), return_params=True
        )
        first = params["jpeg_first"].bool()
        assert first.any() and (~first).any()
        drawn = params["jpeg_quality2"].float()
        torch.testing.assert_close(targets.jpeg_quality[~first], drawn[~first])
        expected = torch.full_like(drawn[first], 100.0) if resampled else drawn[first]
        torch.testing.assert_close(targets.jpeg_quality[first], expected)


def test_recorded_resizes_are_the_ones_apply_performs(monkeypatch):
    """The recording subclass reads the batch-wide draws (and peeks at the final mode): check them against the sizes
    and modes ``apply`` actually resizes with."""
    import sr_diffusion.degradations.realesrgan as realesrgan

    calls = []
    original = realesrgan.resize

    def spy(img, size, mode, *args, **kwargs):
        calls.append((tuple(int(v) for v in size), mode))
        return original(img, size, mode, *args, **kwargs)

    monkeypatch.setattr(realesrgan, "resize", spy)
    hr = hr_batch(n=3, size=48)
    for seed in range(6):
        calls.clear()
        _, _, draws = targets_module._run_recorded(RealESRGANDegradation(), hr, torch.Generator().manual_seed(seed))
        (f1, mode1), (f2, mode2) = draws.resizes
        assert calls[0] == ((int(48 * f1), int(48 * f1)), mode1)
        assert calls[1] == ((int(12 * f2), int(12 * f2)), mode2)
        assert {mode for _, mode in calls[2:]} == {draws.final_mode} and len(calls) in (3, 4)


def test_noise_target_is_the_noise_the_lr_image_shows():
    """Only stage 2, grey Gaussian noise of sigma 10 on mid-grey, no resize before the final one and no sinc: the
    target is ~10. A final JPEG of quality 30 removes much of that noise and the target follows it (95: nearly none);
    without noise it is exactly 0; and the target is the LR image minus the same run replayed without the noise."""

    def noise_targets(**overrides):
        config = RealESRGANDegradationConfig(
            noise_prob=0.0,
            gaussian_noise_prob2=1.0,
            gray_noise_prob2=1.0,  # JPEG's chroma subsampling would remove part of colour noise even at quality 95
            noise_range2=(10.0, 10.0),
            resize_prob2=(0.0, 0.0, 1.0),
            final_sinc_prob=0.0,
            **{"jpeg_prob2": 0.0, **overrides},
        )
        hr = torch.full((4, 3, 64, 64), 0.5)  # mid-grey: no clamping
        return degrade_with_targets(RealESRGANDegradation(config), hr, torch.Generator().manual_seed(0))[1]

    plain = noise_targets()
    torch.testing.assert_close(plain.noise_sigma, torch.full((4,), 10.0), rtol=0.08, atol=0)
    assert (plain.jpeg_quality == 100).all()  # no final JPEG
    high = noise_targets(jpeg_prob2=1.0, jpeg_range2=(95, 95)).noise_sigma
    low = noise_targets(jpeg_prob2=1.0, jpeg_range2=(30, 30)).noise_sigma
    torch.testing.assert_close(high, plain.noise_sigma, rtol=0.1, atol=0)  # quality 95 keeps nearly all of it
    assert (low < 0.7 * high).all(), (low, high)

    silent = RealESRGANDegradationConfig(noise_prob=0.0, noise_prob2=0.0)
    _, targets = degrade_with_targets(RealESRGANDegradation(silent), hr_batch(), torch.Generator().manual_seed(1))
    assert (targets.noise_sigma == 0).all()

    # the definition, on the full chain: LR minus the replay without noise, which repeats every other draw
    degradation, hr = RealESRGANDegradation(), hr_batch(n=3, size=48)
    lr, targets, params = degrade_with_targets(degradation, hr, torch.Generator().manual_seed(2), return_params=True)
    generator = torch.Generator().manual_seed(2)
    degradation.sample_batch(3, generator)
    noiseless = targets_module._NoiselessReplay(degradation.config).apply(hr, params, generator)
    torch.testing.assert_close(targets.noise_sigma, 255 * (lr - noiseless).square().mean((1, 2, 3)).sqrt())
    assert 0 < float((lr - noiseless).abs().max()) and (targets.noise_sigma > 0).all()


def test_a_draw_after_the_second_noise_stage_is_refused(monkeypatch):
    """The noiseless replay repeats the recorded draws only while the second noise stage is the chain's last draw."""
    original = RealESRGANDegradation.apply

    def drawing_late(self, hr, kernels, generator):
        lr = original(self, hr, kernels, generator)
        torch.rand((), generator=generator)
        return lr

    monkeypatch.setattr(RealESRGANDegradation, "apply", drawing_late)
    with pytest.raises(RuntimeError, match="the second noise being its last draw"):
        degrade_with_targets(RealESRGANDegradation(), hr_batch(n=2, size=32), torch.Generator().manual_seed(0))


def test_blur_sigma_of_gaussians_sinc_filters_and_bottlenecks():
    def sigma(kernel, pitch, bottleneck=1.0):
        chain = [(kernel[None], torch.tensor([pitch], dtype=F64))]
        return float(effective_blur_sigma(chain, torch.tensor([bottleneck])))

    # a Gaussian of sigma 2 HR pixels at x4 is sigma 0.5 LR pixels; 4 -> ~1 (truncated to 21 taps)
    assert sigma(bivariate_gaussian(21, 2.0), 0.25) == pytest.approx(0.5, abs=0.01)
    assert sigma(bivariate_gaussian(21, 4.0), 0.25) == pytest.approx(1.0, abs=0.03)
    # an ideal low-pass at w_c has its half-amplitude point at w_c: sqrt(2 ln 2) / w_c
    assert sigma(circular_lowpass_kernel(math.pi / 3, 21), 1.0) == pytest.approx(
        math.sqrt(2 * math.log(2)) * 3 / math.pi, rel=0.01
    )
    # a bottleneck of pitch 2 LR pixels cuts at pi / 2; a sharp kernel stays at the minimum
    assert sigma(bivariate_gaussian(21, 0.2), 0.25, bottleneck=2.0) == pytest.approx(
        math.sqrt(2 * math.log(2)) * 2 / math.pi, rel=1e-4
    )
    assert sigma(bivariate_gaussian(21, 0.2), 0.25) == pytest.approx(BLUR_SIGMA_MIN, rel=1e-4)
    # more blur never lowers it
    values = [sigma(bivariate_gaussian(21, s), 0.25) for s in (1.0, 2.0, 3.0, 4.0, 5.0)]
    assert values == sorted(values)


def test_targets_reject_other_degradations():
    from sr_diffusion.degradations import BSRGANDegradation

    with pytest.raises(TypeError, match="Real-ESRGAN"):
        degrade_with_targets(BSRGANDegradation(), hr_batch(), torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------------------------


def test_estimator_is_small_fully_convolutional_and_checks_its_input():
    torch.manual_seed(0)
    model = DegradationEstimator().eval()
    assert sum(p.numel() for p in model.parameters()) < 300_000
    assert model.min_input_size == 16
    for size in ((16, 16), (23, 40), (64, 48)):
        out = model(torch.rand(2, 3, *size))
        assert out.normalized.shape == (2, 3) and len(out.estimate) == 2
    # before training it predicts the training mean
    torch.testing.assert_close(model(torch.rand(1, 3, 16, 16)).estimate.to_tensor(), model.mean_estimate().to_tensor())
    with pytest.raises(ValueError, match="at least 16x16"):
        model(torch.rand(1, 3, 15, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, h, w\)"):
        model(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="float"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_normalisation_round_trip_and_clamping():
    model = DegradationEstimator(target_mean=(0.8, 9.0, 70.0), target_std=(0.3, 6.0, 20.0))
    estimate = DegradationEstimate(torch.tensor([0.5, 1.2]), torch.tensor([0.0, 20.0]), torch.tensor([35.0, 100.0]))
    back = model.denormalize(model.normalize(estimate))
    torch.testing.assert_close(back.to_tensor(), estimate.to_tensor())
    clamped = model.denormalize(torch.tensor([[-10.0, -10.0, 10.0]]))
    assert clamped.blur_sigma.item() == pytest.approx(BLUR_SIGMA_MIN)
    assert clamped.noise_sigma.item() == 0 and clamped.jpeg_quality.item() == 100
    mean = estimate.mean().as_dict()
    assert mean["blur_sigma"] == pytest.approx([0.85]) and mean["noise_sigma"] == pytest.approx([10.0])
    assert mean["jpeg_quality"] == pytest.approx([67.5]) and len(estimate[1]) == 1
    with pytest.raises(ValueError, match=r"\(B,\) tensor"):
        DegradationEstimate(torch.zeros(2), torch.zeros(3), torch.zeros(2))


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DegradationEstimator(block_out_channels=(8, 16), head_channels=8, target_mean=(1.0, 5.0, 60.0))
    torch.nn.init.normal_(model.head[-1].weight)
    model.save_pretrained(tmp_path)
    loaded = DegradationEstimator.from_pretrained(tmp_path)
    x = torch.rand(2, 3, 20, 24)
    torch.testing.assert_close(loaded(x).normalized, model(x).normalized)
    assert loaded.config.target_mean == [1.0, 5.0, 60.0]


def test_the_shipped_estimator_loads_and_is_small():
    from sr_diffusion.defaults import default_degradation_estimator_dir
    from sr_diffusion.estimation import load_default_degradation_estimator

    folder = default_degradation_estimator_dir()
    assert sum(p.stat().st_size for p in folder.rglob("*.safetensors")) < 2**20
    model = load_default_degradation_estimator()
    assert not model.training
    assert len(model(torch.rand(1, 3, 32, 32)).estimate) == 1


def test_the_shipped_estimator_ranks_noise_and_jpeg_on_a_held_out_photo():
    """'coffee' is held out of training: more noise reads as more noise, a lower JPEG quality as a lower one."""
    import numpy as np
    from skimage import data

    from sr_diffusion.degradations import add_gaussian_noise, jpeg_compress
    from sr_diffusion.estimation import load_default_degradation_estimator
    from sr_diffusion.resize import imresize

    model = load_default_degradation_estimator()
    hr = torch.from_numpy(np.ascontiguousarray(data.coffee()[:256, 200:456])).permute(2, 0, 1)[None].float() / 255
    lr = (imresize(hr, scale=0.25).clamp(0, 1) * 255).round() / 255
    g = torch.Generator().manual_seed(0)
    noisy = torch.cat([add_gaussian_noise(lr, s, generator=g, rounds=True) for s in (2.0, 10.0, 25.0)])
    noise = model(noisy).estimate.noise_sigma
    assert noise[0] < noise[1] < noise[2], noise
    compressed = torch.cat([jpeg_compress(lr, q) for q in (90, 60, 30)])
    quality = model(compressed).estimate.jpeg_quality
    assert quality[0] > quality[1] > quality[2], quality
