"""fidelity="auto": the documented monotone mapping from a degradation estimate to the fidelity knobs, the resolver
the pipelines call, and its wiring into StableSR, PASD and SeeSR (tiny components, a fake "clean" or "heavy" estimator):
each picks the mapped values of its own knobs, a value given explicitly wins (and the estimator does not run), the
defaults hold without "auto", and the estimator component saves and loads with the pipeline."""

from __future__ import annotations

import shutil

import pasd_tiny
import pytest
import seesr_tiny
import torch
from stablesr_tiny import lr_image, tiny_components

from sr_diffusion.estimation import DegradationEstimate, DegradationEstimator
from sr_diffusion.fidelity_auto import (
    AUTO_KNOBS,
    TYPICAL_SEVERITY,
    auto_fidelity_knobs,
    degradation_severity,
    resolve_auto_fidelity,
)
from sr_diffusion.pipelines.pasd import PASDPipeline
from sr_diffusion.pipelines.seesr import SeeSRPipeline
from sr_diffusion.pipelines.stablesr import StableSRPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def estimate(blur=0.375, noise=0.0, quality=100.0) -> DegradationEstimate:
    return DegradationEstimate(torch.tensor([blur]), torch.tensor([noise]), torch.tensor([quality]))


def constant_estimator(blur: float, noise: float, quality: float) -> DegradationEstimator:
    """An estimator that predicts the same estimate for every image (its head's last layer is zero)."""
    torch.manual_seed(0)
    model = DegradationEstimator(block_out_channels=(8, 16), head_channels=8, target_mean=(blur, noise, quality))
    return model.eval()


def heavy_estimator() -> DegradationEstimator:
    return constant_estimator(2.0, 30.0, 20.0)  # severity 1: every knob at its "heavy" anchor


def clean_estimator() -> DegradationEstimator:
    return constant_estimator(0.375, 0.0, 100.0)  # severity 0: every knob at its "clean" anchor


def forbid_estimation(pipe, monkeypatch) -> None:
    """Make the pipeline's estimator fail if it runs (a value given explicitly must not need it)."""

    def fail(*args, **kwargs):
        raise AssertionError("the estimator must not run when every knob is given")

    monkeypatch.setattr(pipe.degradation_estimator, "forward", fail)


def test_severity_is_zero_when_clean_one_when_heavy_and_monotone():
    assert degradation_severity(estimate()).item() == 0.0
    assert degradation_severity(estimate(noise=25.0)).item() == 1.0
    assert degradation_severity(estimate(quality=30.0)).item() == 1.0
    assert degradation_severity(estimate(blur=1.5)).item() == 1.0
    grid = [degradation_severity(estimate(noise=n)).item() for n in (0, 2, 5, 10, 20, 40)]
    assert grid == sorted(grid)


def test_typical_severity_is_the_median_of_the_realesrgan_x4plus_targets():
    """Where the knobs take their authors' defaults: the median severity of the targets of Real-ESRGAN x4plus
    degradations of 192-px photo crops (the estimator's training targets and crop size), so that a change of their
    definitions shows here."""
    from skimage import data

    from sr_diffusion.degradations import RealESRGANDegradation
    from sr_diffusion.estimation import degrade_with_targets

    g = torch.Generator().manual_seed(0)
    severities = []
    for photo in (data.astronaut(), data.camera(), data.coffee()):
        photo = torch.from_numpy(photo).float() / 255
        photo = photo.permute(2, 0, 1) if photo.ndim == 3 else photo.expand(3, -1, -1)
        tops = torch.randint(0, photo.shape[1] - 192, (32,), generator=g).tolist()
        lefts = torch.randint(0, photo.shape[2] - 192, (32,), generator=g).tolist()
        hr = torch.stack([photo[:, t : t + 192, x : x + 192] for t, x in zip(tops, lefts)])
        severities.append(degradation_severity(degrade_with_targets(RealESRGANDegradation(), hr, g)[1]))
    assert torch.cat(severities).median().item() == pytest.approx(TYPICAL_SEVERITY, abs=0.05)


def test_knobs_follow_their_anchors_and_move_the_documented_way():
    # typical: about the mean Real-ESRGAN x4plus targets (severity 0.69)
    clean, typical, heavy = (auto_fidelity_knobs(estimate(*e)) for e in ((0.375, 0, 100), (0.72, 10, 79), (2, 30, 20)))
    assert clean == {"fidelity_weight": 1.0, "added_noise_level": 700, "controlnet_conditioning_scale": 1.0}
    assert heavy == {"fidelity_weight": 0.25, "added_noise_level": 999, "controlnet_conditioning_scale": 0.8}
    assert typical["fidelity_weight"] == pytest.approx(0.5, abs=0.02)
    assert typical["added_noise_level"] in range(880, 921)
    weights = [auto_fidelity_knobs(estimate(noise=n))["fidelity_weight"] for n in range(0, 30, 3)]
    assert weights == sorted(weights, reverse=True)
    levels = [auto_fidelity_knobs(estimate(noise=n))["added_noise_level"] for n in range(0, 30, 3)]
    assert levels == sorted(levels) and isinstance(levels[0], int)
    assert set(AUTO_KNOBS) == set(clean)


def test_resolver_fills_only_unset_knobs_and_checks_its_arguments():
    images = torch.rand(2, 3, 16, 16)
    estimator = constant_estimator(0.375, 0.0, 100.0)  # clean
    out = resolve_auto_fidelity({"added_noise_level": None, "controlnet_conditioning_scale": 0.3}, images, estimator)
    assert out == {"added_noise_level": 700, "controlnet_conditioning_scale": 0.3}
    unchanged = resolve_auto_fidelity({"fidelity_weight": None}, images, estimator, fidelity=None)
    assert unchanged == {"fidelity_weight": None}
    with pytest.raises(ValueError, match="fidelity must be None or 'auto'"):
        resolve_auto_fidelity({"fidelity_weight": None}, images, estimator, fidelity="high")
    with pytest.raises(ValueError, match="cannot set"):
        resolve_auto_fidelity({"guidance_scale": None}, images, estimator)
    with pytest.raises(ValueError, match="at least 16x16"):
        resolve_auto_fidelity({"fidelity_weight": None}, torch.rand(1, 3, 8, 8), estimator)


# ----------------------------------------------------------------------------------------------------------------------
# StableSR
# ----------------------------------------------------------------------------------------------------------------------


def make_pipe(estimator=None) -> StableSRPipeline:
    pipe = StableSRPipeline(**tiny_components(), degradation_estimator=estimator)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def decoded_weight(pipe, monkeypatch, **kwargs) -> float:
    """The ``fidelity_weight`` the pipeline decodes with."""
    seen = []
    decode = pipe.decode_latents

    def spy(latents, cfw_features=None, fidelity_weight=0.0):
        seen.append(fidelity_weight)
        return decode(latents, cfw_features, fidelity_weight)

    monkeypatch.setattr(pipe, "decode_latents", spy)
    image = lr_image(0, size=(16, 16))
    pipe(image, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs)
    return seen[0]


def test_stablesr_fidelity_auto_picks_the_mapped_weight_and_a_given_weight_wins(monkeypatch):
    heavy = make_pipe(constant_estimator(2.0, 30.0, 20.0))
    assert decoded_weight(heavy, monkeypatch, fidelity="auto") == pytest.approx(0.25)
    clean = make_pipe(constant_estimator(0.375, 0.0, 100.0))
    assert decoded_weight(clean, monkeypatch, fidelity="auto") == pytest.approx(1.0)
    assert decoded_weight(clean, monkeypatch) == 0.5  # the original's default without "auto"
    forbid_estimation(clean, monkeypatch)
    assert decoded_weight(clean, monkeypatch, fidelity="auto", fidelity_weight=0.3) == 0.3
    with pytest.raises(ValueError, match="fidelity must be None or 'auto'"):
        clean(lr_image(0, size=(16, 16)), num_inference_steps=1, fidelity="max")


def test_stablesr_fidelity_auto_uses_the_shipped_estimator_without_a_component(monkeypatch):
    pipe = make_pipe()
    weight = decoded_weight(pipe, monkeypatch, fidelity="auto")
    assert 0.25 <= weight <= 1.0
    with pytest.raises(ValueError, match="at least 16x16"):
        pipe(lr_image(0), num_inference_steps=1, fidelity="auto")  # 8x8


def test_stablesr_saves_and_loads_its_estimator(tmp_path):
    pipe = make_pipe(constant_estimator(1.0, 5.0, 60.0))
    pipe.save_pretrained(tmp_path / "with")
    loaded = StableSRPipeline.from_pretrained(tmp_path / "with")
    assert isinstance(loaded.degradation_estimator, DegradationEstimator)
    assert loaded.degradation_estimator.config.target_mean == [1.0, 5.0, 60.0]
    make_pipe().save_pretrained(tmp_path / "without")
    assert StableSRPipeline.from_pretrained(tmp_path / "without").degradation_estimator is None


# ----------------------------------------------------------------------------------------------------------------------
# PASD: added_noise_level and controlnet_conditioning_scale
# ----------------------------------------------------------------------------------------------------------------------


def make_pasd(estimator=None) -> PASDPipeline:
    pipe = PASDPipeline(**pasd_tiny.tiny_components(degradation_estimator=estimator))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pasd_knobs(pipe, monkeypatch, **kwargs) -> dict:
    """The start point, added noise level and ControlNet scale a PASD call samples with."""
    seen = {}
    start, predict = pipe.prepare_start_latents, pipe.predict_noise

    def spy_start(cond, **kwargs):
        seen.update(start_point=kwargs["start_point"], added_noise_level=kwargs["added_noise_level"])
        return start(cond, **kwargs)

    def spy_predict(latents, **kwargs):
        seen["controlnet_conditioning_scale"] = kwargs["conditioning_scale"]
        return predict(latents, **kwargs)

    monkeypatch.setattr(pipe, "prepare_start_latents", spy_start)
    monkeypatch.setattr(pipe, "predict_noise", spy_predict)
    kwargs = {"num_inference_steps": 1, "guidance_scale": 1.0, "output_type": "pt", **kwargs}
    pipe(lr_image(0, size=(16, 16)), generator=torch.Generator().manual_seed(0), **kwargs)
    return seen


def test_pasd_fidelity_auto_picks_the_mapped_values_and_given_values_win(monkeypatch):
    heavy = make_pasd(heavy_estimator())
    assert pasd_knobs(heavy, monkeypatch, fidelity="auto") == {
        "start_point": "lr",
        "added_noise_level": 999,
        "controlnet_conditioning_scale": pytest.approx(0.8),
    }
    clean = make_pasd(clean_estimator())
    assert pasd_knobs(clean, monkeypatch, fidelity="auto") == {
        "start_point": "lr",
        "added_noise_level": 700,
        "controlnet_conditioning_scale": 1.0,
    }
    # without "auto": the original's defaults, whatever the estimator would say
    assert pasd_knobs(heavy, monkeypatch) == {
        "start_point": "lr",
        "added_noise_level": 900,
        "controlnet_conditioning_scale": 1.0,
    }
    # a given value wins; the other one is still set from the input
    assert pasd_knobs(heavy, monkeypatch, fidelity="auto", added_noise_level=100) == {
        "start_point": "lr",
        "added_noise_level": 100,
        "controlnet_conditioning_scale": pytest.approx(0.8),
    }
    # start_point="noise" (pure noise, the original's --init_latent_with_noise) has no noise level: only the scale
    assert pasd_knobs(heavy, monkeypatch, fidelity="auto", start_point="noise") == {
        "start_point": "noise",
        "added_noise_level": None,
        "controlnet_conditioning_scale": pytest.approx(0.8),
    }
    forbid_estimation(heavy, monkeypatch)
    given = {"added_noise_level": 500, "controlnet_conditioning_scale": 0.3}
    assert pasd_knobs(heavy, monkeypatch, fidelity="auto", **given) == {"start_point": "lr", **given}
    with pytest.raises(ValueError, match="fidelity must be None or 'auto'"):
        heavy(lr_image(0, size=(16, 16)), num_inference_steps=1, fidelity="max")


# ----------------------------------------------------------------------------------------------------------------------
# SeeSR: controlnet_conditioning_scale (start_point is never set)
# ----------------------------------------------------------------------------------------------------------------------


def make_seesr(estimator=None) -> SeeSRPipeline:
    pipe = SeeSRPipeline(**seesr_tiny.tiny_components(), degradation_estimator=estimator)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seesr_knobs(pipe, monkeypatch, **kwargs) -> dict:
    """The start point and ControlNet scale a SeeSR call samples with."""
    seen = {}
    start, predict = pipe.prepare_start_latents, pipe.predict_noise

    def spy_start(shape, **kwargs):
        seen["start_point"] = kwargs["start_point"]
        return start(shape, **kwargs)

    def spy_predict(latents, **kwargs):
        seen["controlnet_conditioning_scale"] = kwargs["conditioning_scale"]
        return predict(latents, **kwargs)

    monkeypatch.setattr(pipe, "prepare_start_latents", spy_start)
    monkeypatch.setattr(pipe, "predict_noise", spy_predict)
    kwargs = {"num_inference_steps": 1, "guidance_scale": 1.0, "output_type": "pt", **kwargs}
    pipe(lr_image(0, size=(16, 16)), generator=torch.Generator().manual_seed(0), **kwargs)
    return seen


def test_seesr_fidelity_auto_sets_the_controlnet_scale_only_and_a_given_scale_wins(monkeypatch):
    heavy = make_seesr(heavy_estimator())
    auto = seesr_knobs(heavy, monkeypatch, fidelity="auto")
    assert auto == {"start_point": "lr", "controlnet_conditioning_scale": pytest.approx(0.8)}
    assert seesr_knobs(heavy, monkeypatch, fidelity="auto", start_point="noise")["start_point"] == "noise"
    clean = make_seesr(clean_estimator())
    assert seesr_knobs(clean, monkeypatch, fidelity="auto")["controlnet_conditioning_scale"] == 1.0
    assert seesr_knobs(heavy, monkeypatch)["controlnet_conditioning_scale"] == 1.0  # the original's, without "auto"
    forbid_estimation(heavy, monkeypatch)
    given = seesr_knobs(heavy, monkeypatch, fidelity="auto", controlnet_conditioning_scale=0.4)
    assert given["controlnet_conditioning_scale"] == 0.4
    with pytest.raises(ValueError, match="at least 16x16"):
        make_seesr(heavy_estimator())(lr_image(0), num_inference_steps=1, fidelity="auto")  # 8x8


# ----------------------------------------------------------------------------------------------------------------------
# the estimator component saves and loads with PASD and SeeSR
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [make_pasd, make_seesr], ids=["pasd", "seesr"])
def test_pasd_and_seesr_save_and_load_their_estimator(make, tmp_path):
    pipe = make(constant_estimator(1.0, 5.0, 60.0))
    cls = type(pipe)
    pipe.save_pretrained(tmp_path / "with")
    loaded = cls.from_pretrained(tmp_path / "with")
    assert isinstance(loaded.degradation_estimator, DegradationEstimator)
    assert loaded.degradation_estimator.config.target_mean == [1.0, 5.0, 60.0]
    saved = pipe.degradation_estimator.state_dict()
    assert all(torch.equal(value, saved[key]) for key, value in loaded.degradation_estimator.state_dict().items())
    shutil.rmtree(tmp_path / "with" / "degradation_estimator")
    with pytest.raises(FileNotFoundError, match=r"degradation_estimator/ \(the degradation estimator\) is missing"):
        cls.from_pretrained(tmp_path / "with")
    make().save_pretrained(tmp_path / "without")
    assert cls.from_pretrained(tmp_path / "without").degradation_estimator is None
    with pytest.raises(ValueError, match="degradation_estimator must be a DegradationEstimator or None"):
        make(torch.nn.Linear(2, 2))
