"""ResShiftScheduler: schedule, forward marginal, posterior (closed form and Bayes), sampler, I/O, presets, errors.

Statistical checks use 200k float64 scalar draws from seeded generators (deterministic) and 5-sigma tolerances:
mean within ``5 sd / sqrt(n)``, variance within ``5 sqrt(2/n)`` relative.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from sr_diffusion.schedulers import (
    RESSHIFT_PRESET_ALIASES,
    RESSHIFT_PRESET_INFO,
    RESSHIFT_PRESETS,
    ResShiftScheduler,
    ResShiftSchedulerOutput,
    resshift_sqrt_eta_schedule,
)

N_DRAWS = 200_000
X0, Y0 = 0.3, -0.5  # scalar HR value and (upsampled) LR value for the statistical tests


def _assert_moments(samples: torch.Tensor, mean: float, var: float) -> None:
    n = samples.numel()
    assert abs(samples.mean().item() - mean) < 5 * math.sqrt(var / n) + 1e-12, (samples.mean().item(), mean)
    assert abs(samples.var().item() / var - 1) < 5 * math.sqrt(2 / n), (samples.var().item(), var)


def _scalar_batch(value: float) -> torch.Tensor:
    return torch.full((N_DRAWS,), value, dtype=torch.float64)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "T, min_noise_level, etas_end, kappa, power",
    [(15, 0.04, 0.99, 2.0, 0.3), (4, 0.2, 0.99, 2.0, 0.3), (15, 0.04, 0.99, 1.0, 0.3), (10, 0.05, 0.9, 0.5, 1.7)],
)
def test_eta_schedule_matches_paper_formula(T, min_noise_level, etas_end, kappa, power):
    scheduler = ResShiftScheduler(
        num_train_timesteps=T, kappa=kappa, power=power, min_noise_level=min_noise_level, etas_end=etas_end
    )
    # The paper's schedule: sqrt(eta_t) = sqrt(eta_1) * b0 ** beta_t, b0 = exp(log(sqrt(eta_T)/sqrt(eta_1)) / (T-1)),
    # beta_t = ((t-1)/(T-1)) ** p * (T-1), t = 1..T; end points as in the reference code.
    s1 = min(min_noise_level / kappa, min_noise_level)
    b0 = math.exp(math.log(etas_end / s1) / (T - 1))
    expected = [s1 * b0 ** (((t - 1) / (T - 1)) ** power * (T - 1)) for t in range(1, T + 1)]
    torch.testing.assert_close(scheduler.sqrt_etas, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)

    assert scheduler.sqrt_etas[0].item() == pytest.approx(s1, rel=1e-14)
    assert scheduler.sqrt_etas[-1].item() == pytest.approx(etas_end, rel=1e-14)  # etas_end is sqrt(eta_T)
    if kappa >= 1:
        assert kappa * scheduler.sqrt_etas[0].item() == pytest.approx(min_noise_level)  # noise level of step 1
    assert torch.all(scheduler.etas[1:] > scheduler.etas[:-1])
    torch.testing.assert_close(scheduler.etas, scheduler.sqrt_etas**2)
    assert scheduler.alphas[0].item() == scheduler.etas[0].item()  # alpha_1 = eta_1
    torch.testing.assert_close(scheduler.alphas.sum(), scheduler.etas[-1])  # alpha_t telescopes to eta_T
    assert torch.all(scheduler.alphas > 0)


def test_eta_schedule_reference_values():
    """Values printed by the reference ``get_named_eta_schedule`` for the shipped settings."""
    realsr = ResShiftScheduler.from_preset("realsr_swinunet_realesrgan256").sqrt_etas
    assert realsr[0].item() == pytest.approx(0.02, rel=1e-14)
    assert realsr[1].item() == pytest.approx(0.11716508229842353, rel=1e-13)
    assert realsr[7].item() == pytest.approx(0.4758577309189878, rel=1e-13)
    assert realsr[-1].item() == pytest.approx(0.99, rel=1e-14)

    journal = ResShiftScheduler.from_preset("v3").sqrt_etas
    torch.testing.assert_close(
        journal,
        torch.tensor([0.1, 0.5200963722082474, 0.761381990619204, 0.99], dtype=torch.float64),
        rtol=1e-13,
        atol=0,
    )
    legacy_bicubic = ResShiftScheduler.from_preset("bicubic_swinunet_bicubic256").sqrt_etas
    assert legacy_bicubic[0].item() == pytest.approx(math.sqrt(0.001), rel=1e-14)
    assert legacy_bicubic[1].item() == pytest.approx(0.15052950653794298, rel=1e-13)


def test_trained_sqrt_etas_table():
    table = [0.05, 0.3, 0.6, 0.95]
    scheduler = ResShiftScheduler(num_train_timesteps=4, trained_sqrt_etas=table, kappa=1.5)
    torch.testing.assert_close(scheduler.sqrt_etas, torch.tensor(table, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------------
# Forward process
# ---------------------------------------------------------------------------------------------------------------------


def test_add_noise_is_the_closed_form():
    scheduler = ResShiftScheduler()
    g = _gen(1)
    x0, y0, noise = (torch.randn(3, 3, 4, 5, generator=g) for _ in range(3))
    t = torch.tensor([0, 7, 14])
    x_t = scheduler.add_noise(x0, noise, t, y0)
    kappa = scheduler.config.kappa
    for i, ti in enumerate(t.tolist()):
        eta = scheduler.etas[ti].item()
        torch.testing.assert_close(x_t[i], x0[i] + eta * (y0[i] - x0[i]) + kappa * math.sqrt(eta) * noise[i])
    # an int timestep broadcasts over the batch; dtype is kept
    assert scheduler.add_noise(x0, noise, 5, y0).dtype == torch.float32
    by_int, by_tensor = scheduler.add_noise(x0, noise, 5, y0), scheduler.add_noise(x0, noise, torch.tensor(5), y0)
    torch.testing.assert_close(by_int, by_tensor)


@pytest.mark.parametrize("t", [0, 5, 14])
def test_forward_marginal_empirical(t):
    scheduler = ResShiftScheduler()
    x0, y0 = _scalar_batch(X0), _scalar_batch(Y0)
    noise = torch.randn(N_DRAWS, generator=_gen(t), dtype=torch.float64)
    x_t = scheduler.add_noise(x0, noise, t, y0)

    mean, var = scheduler.get_marginal_mean_variance(x0, y0, t)
    eta, kappa = scheduler.etas[t].item(), scheduler.config.kappa
    assert mean[0].item() == pytest.approx(X0 + eta * (Y0 - X0))  # q(x_t|x_0,y_0) = N(x_0 + eta_t e_0, kappa^2 eta_t)
    assert var[0].item() == pytest.approx(kappa**2 * eta)
    assert mean.shape == var.shape == x0.shape
    _assert_moments(x_t, mean[0].item(), var[0].item())


# ---------------------------------------------------------------------------------------------------------------------
# Posterior
# ---------------------------------------------------------------------------------------------------------------------


def test_posterior_matches_paper_formula():
    scheduler = ResShiftScheduler()
    g = _gen(2)
    x0, x_t = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g).double()
    kappa = scheduler.config.kappa
    for t in range(1, scheduler.config.num_train_timesteps):
        eta_t, eta_prev = scheduler.etas[t].item(), scheduler.etas[t - 1].item()
        alpha = eta_t - eta_prev
        mean, var = scheduler.get_posterior_mean_variance(x0, x_t, t)
        torch.testing.assert_close(mean, eta_prev / eta_t * x_t + alpha / eta_t * x0)
        torch.testing.assert_close(var, torch.full_like(x_t, kappa**2 * eta_prev / eta_t * alpha))
    # t = 0 (paper's t = 1): eta_0 = 0, so the posterior is a point mass at x_0
    mean, var = scheduler.get_posterior_mean_variance(x0, x_t, 0)
    assert torch.equal(mean, x0) and torch.equal(var, torch.zeros_like(x0))


@pytest.mark.parametrize("prev_offset", [1, 3])
def test_posterior_is_consistent_with_the_marginals_exactly(prev_offset):
    """Law of total mean/variance: pushing q(x_t|x_0,y_0) through q(x_s|x_t,x_0) gives q(x_s|x_0,y_0)."""
    scheduler = ResShiftScheduler()
    x0, y0 = torch.tensor([X0], dtype=torch.float64), torch.tensor([Y0], dtype=torch.float64)
    for t in range(prev_offset, scheduler.config.num_train_timesteps):
        s = t - prev_offset
        mean_t, var_t = scheduler.get_marginal_mean_variance(x0, y0, t)
        mean_s, var_s = scheduler.get_marginal_mean_variance(x0, y0, s)
        post_mean_at_mean, post_var = scheduler.get_posterior_mean_variance(x0, mean_t, t, prev_timesteps=s)
        coef_xt = scheduler.etas[s] / scheduler.etas[t]  # the posterior mean is affine in x_t with this slope
        torch.testing.assert_close(post_mean_at_mean, mean_s)
        torch.testing.assert_close(post_var + coef_xt**2 * var_t, var_s)


@pytest.mark.parametrize("t, s", [(1, 0), (6, 5), (14, 13), (14, 9)])
def test_posterior_bayes_empirical(t, s):
    """Draw x_t ~ q(x_t|x_0,y_0), then x_s ~ q(x_s|x_t,x_0,y_0): x_s must follow q(x_s|x_0,y_0)."""
    scheduler = ResShiftScheduler()
    g = _gen(10 * t + s)
    x0, y0 = _scalar_batch(X0), _scalar_batch(Y0)
    x_t = scheduler.add_noise(x0, torch.randn(N_DRAWS, generator=g, dtype=torch.float64), t, y0)
    mean, var = scheduler.get_posterior_mean_variance(x0, x_t, t, prev_timesteps=s)
    x_s = mean + var.sqrt() * torch.randn(N_DRAWS, generator=g, dtype=torch.float64)
    eta_s = scheduler.etas[s].item()
    _assert_moments(x_s, X0 + eta_s * (Y0 - X0), scheduler.config.kappa**2 * eta_s)


# ---------------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 4, 5, 7)])  # pixel-space images, VQ/KL latents
@pytest.mark.parametrize("steps, spacing", [(None, "leading"), (4, "leading"), (4, "trailing"), (1, "trailing")])
def test_perfect_x0_predictor_recovers_x0_exactly(shape, steps, spacing):
    scheduler = ResShiftScheduler(timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    g = _gen(3)
    x0, y0 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    sample = scheduler.prior_sample(y0, generator=g)
    assert not torch.allclose(sample, x0)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        assert model_input.shape == shape
        out = scheduler.step(x0.clone(), t, sample, y0, generator=g)
        assert isinstance(out, ResShiftSchedulerOutput)
        assert torch.equal(out.pred_original_sample, x0)
        sample = out.prev_sample
    assert torch.equal(sample, x0)  # the last step is the noise-free posterior mean, exactly x_0


@pytest.mark.parametrize("steps, spacing", [(None, "trailing"), (5, "leading"), (4, "trailing")])
def test_sampler_with_oracle_is_exact_ancestral_sampling(steps, spacing):
    """With x0_pred = x_0, prior_sample + step sample the chain started at the prior N(y_0, kappa^2 eta_S).

    Starting from mean ``x_0 + r e_0`` at ``eta_S``, the posterior gives mean ``x_0 + r (eta_t / eta_S) e_0`` and
    variance exactly ``kappa^2 eta_t`` at every later step; the prior has ``r = 1`` (R4), the true marginal
    ``r = eta_S`` (R2), which is close for the full chain (eta_T = 0.9801) but not for a "leading" chain.
    """
    scheduler = ResShiftScheduler(timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    g = _gen(4)
    x0, y0 = _scalar_batch(X0), _scalar_batch(Y0)
    sample = scheduler.prior_sample(y0, generator=g)
    timesteps = scheduler.timesteps.tolist()
    eta_start, kappa = scheduler.etas[timesteps[0]].item(), scheduler.config.kappa
    for i, t in enumerate(timesteps):
        eta = scheduler.etas[t].item()
        if i in (0, len(timesteps) // 2, len(timesteps) - 1):
            _assert_moments(sample, X0 + eta / eta_start * (Y0 - X0), kappa**2 * eta)
        sample = scheduler.step(x0, t, sample, y0, generator=g).prev_sample
    assert torch.equal(sample, x0)


def test_full_chain_prior_approximates_the_forward_marginal():
    """(R4) replaces q(x_T | x_0, y_0) by N(y_0, kappa^2 eta_T): same variance, mean off by (1 - eta_T) e_0."""
    scheduler = ResShiftScheduler()
    x0, y0 = torch.full((1, 3, 2, 2), X0), torch.full((1, 3, 2, 2), Y0)
    mean, var = scheduler.get_marginal_mean_variance(x0, y0, 14)
    noise = torch.randn(1, 3, 2, 2, generator=_gen(0))
    torch.testing.assert_close(scheduler.prior_sample(y0, noise=noise), y0 + var.sqrt() * noise)
    torch.testing.assert_close(y0 - mean, (1 - scheduler.etas[-1].item()) * (y0 - x0))


def _toy_model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * x + 0.3 * y + 0.01 * float(t)


def _run_sampler(scheduler: ResShiftScheduler, y0: torch.Tensor, seed: int) -> list[torch.Tensor]:
    g = _gen(seed)
    sample = scheduler.prior_sample(y0, generator=g)
    trajectory = [sample]
    for t in scheduler.timesteps:
        out = scheduler.step(_toy_model(scheduler.scale_model_input(sample, t), t, y0), t, sample, y0, generator=g)
        sample = out.prev_sample
        trajectory.append(sample)
    return trajectory


def test_same_generator_seed_same_trajectory():
    scheduler = ResShiftScheduler()
    y0 = torch.randn(2, 3, 8, 8, generator=_gen(5))
    first, again, other = _run_sampler(scheduler, y0, 7), _run_sampler(scheduler, y0, 7), _run_sampler(scheduler, y0, 8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.allclose(first[-1], other[-1])


def test_step_tuple_output_and_dtype():
    scheduler = ResShiftScheduler()
    x, y = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    prev, x0_pred = scheduler.step(y, 14, x, y, generator=_gen(0), return_dict=False)
    assert prev.dtype == torch.float32 and torch.equal(x0_pred, y)
    prev16, _ = scheduler.step(y.half(), 14, x.half(), y.half(), generator=_gen(0), return_dict=False)
    assert prev16.dtype == torch.float16


def test_clip_sample():
    scheduler = ResShiftScheduler(clip_sample=True, clip_sample_range=1.0)
    x, y = torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    out = scheduler.step(torch.full_like(x, 3.0), 0, x, y)
    assert torch.equal(out.pred_original_sample, torch.ones_like(x))
    assert torch.equal(out.prev_sample, torch.ones_like(x))


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "epsilon_scale", "residual"])
def test_prediction_types_recover_x0(prediction_type):
    scheduler = ResShiftScheduler(prediction_type=prediction_type)
    g = _gen(6)
    x0, y0, noise = (torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0, 8, 14])
    x_t = scheduler.add_noise(x0, noise, t, y0)
    target = scheduler.get_training_target(x0, noise, t, y0)
    torch.testing.assert_close(scheduler.predict_original_sample(target, x_t, t, y0), x0)
    # an exact model makes step's pred_original_sample x_0 as well
    torch.testing.assert_close(scheduler.step(target[1:2], 8, x_t[1:2], y0[1:2]).pred_original_sample, x0[1:2])


# ---------------------------------------------------------------------------------------------------------------------
# Timesteps, input scaling
# ---------------------------------------------------------------------------------------------------------------------


def test_timesteps():
    scheduler = ResShiftScheduler()
    assert scheduler.timesteps.tolist() == list(range(14, -1, -1)) and len(scheduler) == 15
    scheduler.set_timesteps(15)
    assert scheduler.timesteps.tolist() == list(range(14, -1, -1))
    assert [scheduler.previous_timestep(t) for t in (14, 1, 0)] == [13, 0, -1]
    scheduler.set_timesteps(5)
    assert scheduler.timesteps.tolist() == [14, 11, 8, 5, 2] and scheduler.previous_timestep(2) == -1
    leading = ResShiftScheduler(timestep_spacing="leading")
    leading.set_timesteps(5)  # the reference respace.space_timesteps(15, 5)
    assert leading.timesteps.tolist() == [12, 9, 6, 3, 0]
    assert leading.previous_timestep(12) == 9 and leading.previous_timestep(0) == -1
    journal = ResShiftScheduler.from_preset("v3")
    journal.set_timesteps(4)
    assert journal.timesteps.tolist() == [3, 2, 1, 0]
    # a custom chain: any strictly decreasing subset of the trained timesteps
    scheduler.set_timesteps(timesteps=[14, 6, 1])
    assert scheduler.timesteps.tolist() == [14, 6, 1] and scheduler.num_inference_steps == 3
    assert [scheduler.previous_timestep(t) for t in (14, 6, 1)] == [6, 1, -1]
    with pytest.raises(ValueError, match="not in the current chain"):
        scheduler.previous_timestep(5)
    with pytest.raises(ValueError, match="strictly decreasing trained timesteps in \\[0, 14\\]"):
        scheduler.set_timesteps(timesteps=[15, 3])
    with pytest.raises(ValueError, match="not both"):
        scheduler.set_timesteps(3, timesteps=[14, 6, 1])


def test_respaced_posterior_uses_previous_kept_step():
    scheduler = ResShiftScheduler()
    scheduler.set_timesteps(5)
    x0, x_t = torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2)
    torch.testing.assert_close(
        scheduler.get_posterior_mean_variance(x0, x_t, 11),
        scheduler.get_posterior_mean_variance(x0, x_t, 11, prev_timesteps=8),
    )


def test_scale_model_input_matches_formula():
    scheduler = ResShiftScheduler()
    x = torch.randn(2, 3, 4, 4, generator=_gen(9))
    t = torch.tensor([3, 11])
    scaled = scheduler.scale_model_input(x, t)
    kappa = scheduler.config.kappa
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(scaled[i], x[i] / math.sqrt(kappa**2 * scheduler.etas[ti].item() + 1))

    max_scaled = ResShiftScheduler(input_scaling="max").scale_model_input(x, 11)
    torch.testing.assert_close(max_scaled, x / (3 * kappa * scheduler.sqrt_etas[11].item() + 1))
    assert ResShiftScheduler(normalize_input=False).scale_model_input(x, 11) is x


# ---------------------------------------------------------------------------------------------------------------------
# Save / load, presets
# ---------------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    scheduler = ResShiftScheduler(kappa=1.0, power=0.5, prediction_type="residual", latent_scale_factor=0.5)
    scheduler.save_pretrained(tmp_path / "scheduler")
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "ResShiftScheduler" and saved["kappa"] == 1.0
    loaded = ResShiftScheduler.from_pretrained(tmp_path / "scheduler")
    public = lambda config: {key: value for key, value in config.items() if not key.startswith("_")}
    assert public(loaded.config) == public(scheduler.config)
    assert torch.equal(loaded.sqrt_etas, scheduler.sqrt_etas)

    table = ResShiftScheduler(num_train_timesteps=3, trained_sqrt_etas=[0.1, 0.5, 0.9])
    table.save_pretrained(tmp_path / "table")
    assert torch.equal(ResShiftScheduler.from_pretrained(tmp_path / "table").sqrt_etas, table.sqrt_etas)


@pytest.mark.parametrize("name", sorted(RESSHIFT_PRESETS))
def test_presets_load(name):
    scheduler = ResShiftScheduler.from_preset(name)
    preset = RESSHIFT_PRESETS[name]
    assert scheduler.config.num_train_timesteps == preset["num_train_timesteps"] in (4, 15)
    assert scheduler.config.kappa == preset["kappa"] and scheduler.config.power == 0.3
    assert scheduler.config.prediction_type == "sample" and scheduler.config.normalize_input
    assert "source" in RESSHIFT_PRESET_INFO[name]


def test_preset_numbers_and_aliases():
    assert RESSHIFT_PRESETS["realsr_swinunet_realesrgan256"]["num_train_timesteps"] == 15
    assert RESSHIFT_PRESETS["realsr_swinunet_realesrgan256"]["min_noise_level"] == 0.04
    assert RESSHIFT_PRESETS["realsr_swinunet_realesrgan256_journal"]["num_train_timesteps"] == 4
    assert RESSHIFT_PRESETS["realsr_swinunet_realesrgan256_journal"]["min_noise_level"] == 0.2
    assert RESSHIFT_PRESETS["bicubic_swinunet_bicubic256"]["kappa"] == 1.0
    for alias, target in RESSHIFT_PRESET_ALIASES.items():
        assert dict(ResShiftScheduler.from_preset(alias).config) == dict(ResShiftScheduler.from_preset(target).config)
    assert ResShiftScheduler.from_preset("v1", clip_sample=True).config.clip_sample is True
    with pytest.raises(ValueError, match="Unknown ResShift preset"):
        ResShiftScheduler.from_preset("nope")


# ---------------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prediction_type": "v_prediction"}, "prediction_type"),
        ({"eta_schedule": "ldm"}, "eta_schedule"),
        ({"input_scaling": "minmax"}, "input_scaling"),
        ({"timestep_spacing": "linspace"}, "timestep_spacing"),
        ({"num_train_timesteps": 1}, "num_train_timesteps >= 2"),
        ({"num_train_timesteps": 0}, "positive int"),
        ({"kappa": 0.0}, "kappa"),
        ({"power": -1.0}, "power"),
        ({"min_noise_level": 2.0}, "increase strictly"),
        ({"etas_end": 1.2}, "increase strictly"),
        ({"num_train_timesteps": 3, "trained_sqrt_etas": [0.5, 0.4, 0.9]}, "increase strictly"),
        ({"num_train_timesteps": 4, "trained_sqrt_etas": [0.1, 0.5, 0.9]}, "entries"),
        ({"etas_end": 1.0, "prediction_type": "epsilon"}, "eta_T < 1"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResShiftScheduler(**kwargs)


def test_call_errors():
    scheduler = ResShiftScheduler()
    x, y = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="out of range"):
        scheduler.add_noise(x, x, 15, y)
    with pytest.raises(ValueError, match="out of range"):
        scheduler.add_noise(x, x, torch.tensor([-1, 3]), y)
    with pytest.raises(ValueError, match="out of range"):
        scheduler.step(x, 15, x, y)
    with pytest.raises(ValueError, match="out of range"):
        scheduler.scale_model_input(x, 20)
    with pytest.raises(ValueError, match="integer"):
        scheduler.scale_model_input(x, 2.5)
    with pytest.raises(ValueError, match="entries for a batch"):
        scheduler.add_noise(x, x, torch.tensor([1, 2, 3]), y)
    with pytest.raises(ValueError, match="shape"):
        scheduler.step(x, 3, x, torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        scheduler.add_noise(x, x, 3, torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="shape"):
        scheduler.prior_sample(y, noise=torch.zeros(2, 3, 2, 2))
    with pytest.raises(ValueError, match="shape"):
        scheduler.step(torch.zeros(2, 4, 4, 4), 3, x, y)
    for bad in (0, 16, -3, 2.0):
        with pytest.raises(ValueError, match="num_inference_steps"):
            scheduler.set_timesteps(bad)
    scheduler.set_timesteps(5)
    with pytest.raises(ValueError, match="not in the current chain"):
        scheduler.step(x, 13, x, y)
    with pytest.raises(ValueError, match="smaller than"):
        scheduler.get_posterior_mean_variance(x, x, 3, prev_timesteps=3)
    with pytest.raises(ValueError, match="needs lr_samples"):
        ResShiftScheduler(prediction_type="epsilon").step(x, 3, x)
    with pytest.raises(ValueError, match="needs the timestep"):
        ResShiftScheduler().scale_model_input(x)


def test_schedule_function_errors():
    with pytest.raises(ValueError, match=">= 2"):
        resshift_sqrt_eta_schedule(1, 0.04, 0.99, 2.0, 0.3)
    with pytest.raises(ValueError, match="> 0"):
        resshift_sqrt_eta_schedule(15, 0.0, 0.99, 2.0, 0.3)


# ---------------------------------------------------------------------------------------------------------------------
# The reference's respacing (issue 14 item 5)
# ---------------------------------------------------------------------------------------------------------------------


def reference_space_timesteps(num_timesteps: int, sample_timesteps: int) -> set[int]:
    """``models/respace.py`` ``space_timesteps`` of the reference (``ResShift@3ce1d81``), as a formula."""
    return {int((num_timesteps / sample_timesteps) * x) for x in range(sample_timesteps)}


def test_leading_spacing_is_the_reference_space_timesteps():
    from sr_diffusion.schedulers import resshift_spaced_timesteps

    for num_train in range(1, 61):
        for steps in range(1, num_train + 1):
            leading = resshift_spaced_timesteps(num_train, steps, "leading").tolist()
            assert leading == sorted(reference_space_timesteps(num_train, steps), reverse=True)
            trailing = resshift_spaced_timesteps(num_train, steps, "trailing").tolist()
            assert len(trailing) == steps and trailing[0] == num_train - 1 and trailing == sorted(trailing)[::-1]
    assert resshift_spaced_timesteps(15, 5, "leading").tolist() == [12, 9, 6, 3, 0]
    for bad in (0, 16, 2.0, True):
        with pytest.raises(ValueError, match="num_inference_steps"):
            resshift_spaced_timesteps(15, bad, "leading")
    with pytest.raises(ValueError, match="timestep_spacing"):
        resshift_spaced_timesteps(15, 5, "linspace")


@pytest.mark.parametrize("preset, steps", [("v1", 5), ("v1", 7), ("v1", 15), ("v3", 3), ("v3", 2)])
def test_a_leading_chain_is_the_reference_spaced_diffusion(preset, steps):
    """A "leading" chain of S steps is the reference's ``SpacedDiffusion``: the kept ``sqrt_etas`` with ``etas_prev``
    and ``alpha`` recomputed on them, the input scaling ``sqrt(kappa^2 eta + 1)`` of the kept step, the posterior
    ``(etas_prev / eta) x_t + (alpha / eta) x_0`` with variance ``kappa^2 etas_prev / eta · alpha``, the prior
    ``y + kappa sqrt(eta_last) noise``; the model gets the original timestep (``timestep_map``)."""
    scheduler = ResShiftScheduler.from_preset(preset, timestep_spacing="leading")
    scheduler.set_timesteps(steps)
    num_train, kappa = scheduler.config.num_train_timesteps, scheduler.config.kappa
    timestep_map = sorted(reference_space_timesteps(num_train, steps))
    assert scheduler.timesteps.tolist() == timestep_map[::-1]
    sqrt_etas = scheduler.sqrt_etas[timestep_map]  # the base schedule is pinned above (test_eta_schedule_*)
    etas = sqrt_etas**2
    etas_prev = torch.cat([torch.zeros(1, dtype=torch.float64), etas[:-1]])
    alpha = etas - etas_prev
    g = torch.Generator().manual_seed(0)
    x_t, x0, y, noise = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(4))
    for i, t in enumerate(timestep_map):
        torch.testing.assert_close(
            scheduler.scale_model_input(x_t, t), x_t / (etas[i] * kappa**2 + 1).sqrt(), rtol=1e-12, atol=0
        )
        mean, variance = scheduler.get_posterior_mean_variance(x0, x_t, t)
        torch.testing.assert_close(mean, etas_prev[i] / etas[i] * x_t + alpha[i] / etas[i] * x0, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(
            variance, (kappa**2 * etas_prev[i] / etas[i] * alpha[i]).expand_as(x_t), rtol=1e-12, atol=0
        )
    torch.testing.assert_close(
        scheduler.prior_sample(y, noise), y + kappa * sqrt_etas[-1] * noise, rtol=1e-12, atol=1e-15
    )
