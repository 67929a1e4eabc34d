"""Fidelity controls (issue 4): with a fixed seed, raising each fidelity knob of StableSR, PASD and SeeSR does not
lower the LR-consistency PSNR of the output (monotone within :data:`TOLERANCE`, under every colour fix), and the
LR-consistency correction reaches 40 dB in every pipeline.

The models mean something (tests/fidelity_tiny.py): the trained tiny VAE, a tiny SD base trained as a v-prediction
denoiser of its latents, and each method's add-ons trained briefly by the package's own training task, all on real
photo crops. Every measurement is the LR-PSNR (:func:`sr_diffusion.metrics.lr_consistency`) of the output for 8
held-out photo crops (LR 8x8, x4), averaged over the crops, each crop sampled with its own fixed seed (the same for
every setting), :data:`STEPS` sampler steps, no classifier-free guidance, the empty prompt (as the add-ons were
trained), and every knob passed explicitly.

What each knob does to these models (the tables the tests print with ``-s``) was also measured over 6 seeds to choose
what to assert. Over those seeds every asserted step up a knob kept the mean LR-PSNR within 0.13 dB or raised it,
with one exception: SeeSR's ControlNet scale without colour fix saturates between 0.5 and 1 (one seed of six
dropped 0.32 dB there; the test's seed: +0.03 dB). SeeSR's ``start_point`` is compared under a deterministic sampler
(:func:`test_seesr_start_point`). Left out of the assertions: PASD's ``start_point`` (noise -> lr). Its LR start, as
the original's, noises the LR latent to the first timestep and then again to ``added_noise_level``, keeping
``sqrt(abar_999 · abar_900) ≈ 0.008`` of it, and draws its noise in another order than the pure-noise start (the
posterior sample first), so at one seed the difference is mostly the noise's: over 6 seeds the mean LR-PSNR goes
12.29 -> 12.34 dB (no colour fix), 17.42 -> 17.84 (AdaIN), 18.12 -> 18.44 (wavelet), but single seeds range from
-0.63 to +1.28 dB. ``added_noise_level``, which moves the same start with the same draws, is asserted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fidelity_tiny import fit, held_out_pairs, lr_psnr, train_photos, train_sd_base

from sr_diffusion.training import load_config

REPO = Path(__file__).resolve().parents[1]
#: sampler steps of every measurement (and of the CFW stage's generated latents)
STEPS = 4
#: how much one step up a fidelity knob may lower the mean LR-PSNR (dB) and still count as non-decreasing: over 6
#: seeds the largest such drop was 0.13 dB (PASD, wavelet, added_noise_level 700 -> 500), but for the case the module
#: docstring names
TOLERANCE = 0.25
#: a knob must matter: its most faithful setting at least this much (dB) above its least faithful one, on average
#: over the colour fixes (measured: 0.35 dB for SeeSR's start point up to 2.9 dB for StableSR's CFW weight)
MIN_GAIN = 0.1
COLOR_FIXES = ("none", "adain", "wavelet")

pytestmark = pytest.mark.usefixtures("one_thread")


class Sampler:
    """A trained pipeline, the held-out LR crops, and the settings every measurement starts from (every knob given:
    nothing depends on the pipeline's defaults; the CFW weight and the ControlNet scales at their most faithful, 1,
    PASD's added_noise_level at the original's 900); measurements are cached."""

    def __init__(self, pipe, lr: torch.Tensor, losses: dict[str, list[float]], **settings):
        self.pipe, self.lr, self.losses, self.settings = pipe, lr, losses, settings
        self._cache: dict[tuple, torch.Tensor] = {}

    def psnr(self, **changes) -> torch.Tensor:
        """The per-crop LR-PSNR ``(N,)`` (dB) with the settings changed by ``changes``."""
        kwargs = {**self.settings, **changes}
        key = tuple(sorted(kwargs.items()))
        if key not in self._cache:
            self._cache[key] = lr_psnr(self.pipe, self.lr, **kwargs)
        return self._cache[key]

    def sweep(self, knob: str, values: list, **changes) -> list[float]:
        """The mean LR-PSNR for each value of ``knob`` (printed with the per-crop values)."""
        means = []
        for value in values:
            per_crop = self.psnr(**changes, **{knob: value})
            means.append(float(per_crop.mean()))
            print(f"{type(self.pipe).__name__} {changes} {knob}={value!r}: {means[-1]:.2f} dB "
                  f"(per crop {np.round(per_crop.numpy(), 1).tolist()})")  # fmt: skip
        return means


def assert_fidelity_knob(sampler: Sampler, knob: str, values: list) -> None:
    """``values`` from least to most faithful: under every colour fix the mean LR-PSNR never falls by more than
    :data:`TOLERANCE` from one value to the next, and the knob matters (:data:`MIN_GAIN`)."""
    gains = []
    for fix in COLOR_FIXES:
        means = sampler.sweep(knob, values, color_fix=fix)
        drops = {f"{a!r} -> {b!r}": round(x - y, 3) for a, b, x, y in zip(values, values[1:], means, means[1:])}
        assert max(drops.values()) <= TOLERANCE, f"{knob} lowers LR-consistency (color_fix={fix!r}; drops {drops})"
        gains.append(means[-1] - means[0])
    assert np.mean(gains) >= MIN_GAIN, f"{knob} barely changes LR-consistency: gains {gains} dB"


# ----------------------------------------------------------------------------------------------------------------------
# Trained components (module-scoped, trained once; about 45 s of the file's time on one thread)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos() -> list[torch.Tensor]:
    return train_photos()


@pytest.fixture(scope="module")
def held_out_lr() -> torch.Tensor:
    return held_out_pairs()[1]


@pytest.fixture(scope="module")
def sd_base(tmp_path_factory, photos, one_thread) -> tuple[Path, list[float]]:
    folder = tmp_path_factory.mktemp("fidelity") / "sd_base"
    losses = train_sd_base(folder, photos, steps=150, batch_size=16, lr=2e-3)
    return folder, losses


def ready_task(task, config_file: str, config_class, *overrides: str):
    config = load_config(REPO / "configs" / config_file, list(overrides), cls=config_class)
    config.validate()
    task.check_config(config)
    torch.manual_seed(0)
    return task, task.build_model(config)


@pytest.fixture(scope="module")
def stablesr(sd_base, photos, held_out_lr, tmp_path_factory, one_thread) -> Sampler:
    """The time-aware encoder and SFT layers (StableSRTask), then the CFW layers (StableSRCFWTask) on latents the
    trained first stage samples from the LR crops (``latents: generated``, the original's second stage). Trained on
    ``latents: hr`` instead (the VAE's own reconstructions of the HR crops, which need no correction) the CFW learns
    nothing that moves LR-consistency: over 6 seeds 17.09, 17.12, 17.11 dB at w = 0, 0.5, 1 without colour fix,
    23.07 -> 22.85 dB with the wavelet fix (with generated latents: 17.09 -> 18.50 and 23.07 -> 26.30 dB)."""
    from sr_diffusion.pipelines import StableSRPipeline
    from sr_diffusion.training.stablesr import StableSRExperimentConfig, StableSRTask
    from sr_diffusion.training.stablesr_cfw import StableSRCFWExperimentConfig, StableSRCFWTask

    base, out = sd_base[0], tmp_path_factory.mktemp("stablesr")
    task, model = ready_task(StableSRTask(), "stablesr_tiny.yaml", StableSRExperimentConfig, f"stablesr.base={base}",
                             f"train.output_dir={out}")  # fmt: skip
    losses = {"stage 1": fit(task, model, photos, steps=60, batch_size=8)}

    first_stage = out / "first_stage"
    StableSRPipeline.from_sd_base(base, model.time_aware_encoder, model.sft).save_pretrained(first_stage)
    cfw_task, cfw_model = ready_task(StableSRCFWTask(), "stablesr_cfw_tiny.yaml", StableSRCFWExperimentConfig,
                                     f"cfw.pipeline={first_stage}", "cfw.latents=generated",
                                     f"cfw.num_inference_steps={STEPS}", f"train.output_dir={out}")  # fmt: skip
    losses["cfw"] = fit(cfw_task, cfw_model, photos, steps=40, betas=(0.5, 0.9))

    pipe = StableSRPipeline.from_sd_base(base, model.time_aware_encoder, model.sft, cfw_model.cfw)
    return Sampler(pipe, held_out_lr, losses, prompt="", num_inference_steps=STEPS, guidance_scale=1.0,
                   fidelity_weight=1.0, fidelity=None, color_fix="none", lr_consistency=False)  # fmt: skip


@pytest.fixture(scope="module")
def pasd(sd_base, photos, held_out_lr, tmp_path_factory, one_thread) -> Sampler:
    """The ControlNet (with its degradation-removal module) and the pixel-aware cross-attention (PASDTask)."""
    from sr_diffusion.pipelines import PASDPipeline
    from sr_diffusion.training.pasd import PASDExperimentConfig, PASDTask

    base, out = sd_base[0], tmp_path_factory.mktemp("pasd")
    task, model = ready_task(PASDTask(), "pasd_tiny.yaml", PASDExperimentConfig, f"pasd.base={base}",
                             f"train.output_dir={out}")  # fmt: skip
    losses = {"add-ons": fit(task, model, photos, steps=60, batch_size=8)}
    pipe = PASDPipeline.from_sd_base(base, model.controlnet, model.pixel_attentions)
    return Sampler(pipe, held_out_lr, losses, prompt="", added_prompt="", num_inference_steps=STEPS,
                   guidance_scale=1.0, controlnet_conditioning_scale=1.0, start_point="lr", added_noise_level=900,
                   fidelity=None, color_fix="none", lr_consistency=False)  # fmt: skip


@pytest.fixture(scope="module")
def seesr(sd_base, photos, held_out_lr, tmp_path_factory, one_thread) -> Sampler:
    """The ControlNet and both image cross-attentions (SeeSRTask; no DAPE: the empty and the null soft prompt)."""
    from sr_diffusion.pipelines import SeeSRPipeline
    from sr_diffusion.training.seesr import SeeSRExperimentConfig, SeeSRTask

    base, out = sd_base[0], tmp_path_factory.mktemp("seesr")
    task, model = ready_task(SeeSRTask(), "seesr_tiny.yaml", SeeSRExperimentConfig, f"seesr.base={base}",
                             f"train.output_dir={out}")  # fmt: skip
    losses = {"add-ons": fit(task, model, photos, steps=60, batch_size=8)}
    pipe = SeeSRPipeline.from_sd_base(base, model.controlnet, model.unet_image_attentions,
                                      model.controlnet_image_attentions)  # fmt: skip
    return Sampler(pipe, held_out_lr, losses, prompt="", added_prompt="", num_inference_steps=STEPS,
                   guidance_scale=1.0, eta=0.0, controlnet_conditioning_scale=1.0, start_point="lr", fidelity=None,
                   color_fix="none", lr_consistency=False)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# The premise: the models learned
# ----------------------------------------------------------------------------------------------------------------------


def test_the_base_and_the_add_ons_learned(sd_base, stablesr, pasd, seesr):
    """Every training run lowered its objective (the mean of its last 20 steps against its first 20; measured: SD base
    0.76 -> 0.45, StableSR 0.43 -> 0.29 and CFW 0.20 -> 0.15, PASD 1.60 -> 1.23, SeeSR 0.42 -> 0.39, whose add-ons
    start from the trained base's own prediction)."""
    runs = {"sd base": sd_base[1]}
    for name, sampler in (("stablesr", stablesr), ("pasd", pasd), ("seesr", seesr)):
        runs |= {f"{name} {part}": losses for part, losses in sampler.losses.items()}
    for name, losses in runs.items():
        first, last = np.mean(losses[:20]), np.mean(losses[-20:])
        print(f"{name}: loss {first:.3f} -> {last:.3f}")
        assert last < first, (name, first, last)


# ----------------------------------------------------------------------------------------------------------------------
# Knobs, from least to most faithful
# ----------------------------------------------------------------------------------------------------------------------


def test_stablesr_fidelity_weight(stablesr):
    """CFW's ``w``: 0 is the plain decoder, 1 fuses the most of the LR image's encoder features."""
    assert_fidelity_knob(stablesr, "fidelity_weight", [0.0, 0.5, 1.0])


@pytest.mark.parametrize("method", ["pasd", "seesr"])
def test_controlnet_conditioning_scale(method, request):
    """0 switches the ControlNet (the only path of the LR image into the denoiser) off."""
    assert_fidelity_knob(request.getfixturevalue(method), "controlnet_conditioning_scale", [0.0, 0.5, 1.0])


def test_pasd_added_noise_level(pasd):
    """Lower keeps more of the LR latent in the start: ``sqrt(abar_999 · abar_a)`` = 0.005, 0.008, 0.020, 0.036."""
    assert_fidelity_knob(pasd, "added_noise_level", [999, 900, 700, 500])


def test_seesr_start_point(seesr):
    """``"lr"`` starts from the LR latent noised to step 999 (``sqrt(abar_999) ≈ 0.07`` of it), ``"noise"`` from pure
    noise. Compared with DDIM (``eta = 0``), so that the start is the only difference: with the pipeline's DDPM sampler
    the LR start's posterior sample shifts every later noise draw of the generator, and at one seed the difference is
    the noise's (over 6 seeds, 12.55 -> 12.65 dB without colour fix, from -0.5 to +1.0 dB per seed; with DDIM,
    13.01 -> 13.38 dB and higher at every seed)."""
    from diffusers import DDIMScheduler

    from sr_diffusion.pipelines import SeeSRPipeline

    pipe = seesr.pipe
    ddim = SeeSRPipeline(**{**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)},
                         upscale=pipe.upscale)  # fmt: skip
    assert_fidelity_knob(Sampler(ddim, seesr.lr, {}, **seesr.settings), "start_point", ["noise", "lr"])


@pytest.mark.parametrize("method", ["stablesr", "pasd", "seesr"])
@pytest.mark.parametrize("fix", ["adain", "wavelet"])
def test_color_fix(method, fix, request):
    """The colour fix pulls the output's colours (AdaIN: per-channel mean and std; wavelet: the low frequencies)
    towards the LR image's."""
    means = request.getfixturevalue(method).sweep("color_fix", ["none", fix])
    assert means[1] >= means[0] - TOLERANCE, means


@pytest.mark.parametrize("method", ["stablesr", "pasd", "seesr"])
@pytest.mark.parametrize("fix", ["none", "wavelet"])
def test_lr_consistency_correction_reaches_40_db(method, fix, request):
    sampler = request.getfixturevalue(method)
    plain, corrected = sampler.psnr(color_fix=fix), sampler.psnr(color_fix=fix, lr_consistency=True)
    print(f"{method} {fix}: LR-PSNR {np.round(plain.numpy(), 1).tolist()} -> {np.round(corrected.numpy(), 1).tolist()}")
    assert (corrected >= 40).all() and (plain < 40).all(), corrected
