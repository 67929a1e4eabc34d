"""StableSRPipeline: the shared pipeline checks on a tiny random SD base, then StableSR's own: the original's respaced
DDPM schedule, progressive patch aggregation, fidelity weight and guidance at the pipeline level, prompts (the
original's empty one, prompt="auto" with a prompt extractor, the user's words first, saving a DAPE with the pipeline),
loading from an SD base folder (with torch_dtype), and the errors for incomplete folders, other model families and bad
prompts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from pipeline_common import SRPipelineTesterMixin
from sd_pipeline_common import FixedExtractor, SDPipelineTesterMixin, record_prompts, run, tiny_inputs
from seesr_tiny import tiny_dape
from stablesr_tiny import (
    lr_image,
    tiny_cfw,
    tiny_components,
    tiny_encoder,
    tiny_sft,
    tiny_text_encoder,
    tiny_unet,
    tiny_vae,
)

from sr_diffusion.pipelines import AutoSRPipeline
from sr_diffusion.pipelines.stablesr import StableSRPipeline, space_timesteps
from sr_diffusion.pipelines.stablesr.pipeline_stablesr import stablesr_tile_weights

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


def make_pipe(**overrides) -> StableSRPipeline:
    pipe = StableSRPipeline(**{**tiny_components(), **overrides})
    pipe.set_progress_bar_config(disable=True)
    return pipe


class TestStableSRPipeline(SRPipelineTesterMixin, SDPipelineTesterMixin):
    pipeline_class = StableSRPipeline

    def get_dummy_components(self) -> dict:
        return tiny_components()

    def get_dummy_inputs(self, seed: int = 0) -> dict:
        return tiny_inputs(seed)


# ----------------------------------------------------------------------------------------------------------------------
# the original's sampler
# ----------------------------------------------------------------------------------------------------------------------


def test_timesteps_and_variances_are_the_originals_respacing():
    steps = space_timesteps(1000, 200)
    assert len(steps) == 200 and steps[0] == 999 and steps[-1] == 0
    assert steps[::-1][:4] == [round(i * 999 / 199) for i in range(4)] == [0, 5, 10, 15]
    pipe = make_pipe()
    timesteps = pipe.set_timesteps(200, torch.device("cpu"))
    assert timesteps.tolist() == steps
    # the original re-registers the schedule with the betas of the kept steps; its posterior variance is
    # beta'_i (1 - abar_{i-1}) / (1 - abar_i), which the DDPM scheduler must reproduce step by step
    abar = pipe.scheduler.alphas_cumprod.double()
    kept = abar[torch.tensor(steps[::-1])]
    prev = torch.cat([torch.ones(1, dtype=torch.float64), kept[:-1]])
    expected = (1 - kept / prev) * (1 - prev) / (1 - kept)
    for i in (1, 57, 199):
        t = steps[::-1][i]
        torch.testing.assert_close(pipe.scheduler._get_variance(t).double(), expected[i], rtol=1e-5, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------------
# progressive patch aggregation
# ----------------------------------------------------------------------------------------------------------------------


def test_tile_aggregation_is_exact_for_a_pointwise_denoiser(monkeypatch):
    """With a denoiser that looks at each latent pixel alone, the Gaussian-blended tiles give the whole-image result."""
    pipe = make_pipe()
    monkeypatch.setattr(pipe, "predict_noise", lambda x, **kw: torch.tanh(x) * 2 + kw["lr_latents"])
    latents, lr_latents = torch.randn(2, 4, 20, 28), torch.randn(2, 4, 20, 28)
    kwargs = dict(t=5, lr_latents=lr_latents, prompt_embeds=None, guidance_scale=1.0)
    whole = pipe.predict_noise(latents, **kwargs)
    tiled = pipe.predict_noise_tiled(latents, **kwargs, tile=8, overlap=4)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-5)


def test_tile_weights_follow_the_originals_gaussian_weights_formula():
    """Reference: the originals' ``_gaussian_weights`` (var 0.01): x centred at (W - 1)/2, y at H/2, per-axis
    ``exp(-(i - c)² / n² / (2 var)) / sqrt(2π var)``; the constant factor cancels, so compare after normalising."""
    import math

    height, width, var = 6, 10, 0.01

    def probs(n, centre):
        scale = 1 / math.sqrt(2 * math.pi * var)
        return [math.exp(-(i - centre) * (i - centre) / (n * n) / (2 * var)) * scale for i in range(n)]

    reference = torch.tensor([[py * px for px in probs(width, (width - 1) / 2)] for py in probs(height, height / 2)])
    weights = stablesr_tile_weights(height, width)[0, 0]
    assert weights.shape == (height, width) and weights.min() > 0
    torch.testing.assert_close(weights / weights.max(), reference / reference.max(), rtol=1e-6, atol=1e-7)
    assert weights[height // 2].max() == weights.max() and weights[:, 4].max() == weights[:, 5].max()  # peak row H/2


def test_tiled_sampling_agrees_with_untiled_where_one_tile_fits_and_runs_on_many():
    pipe = make_pipe()
    ref = run(pipe)
    torch.testing.assert_close(run(pipe, tile_size=8, tile_overlap=4), ref, rtol=0, atol=0)  # 8 LR px: whole image
    image = lr_image(1, size=(12, 20))
    tiled = run(pipe, image=image, tile_size=8, tile_overlap=4)  # 2 x 4 latent tiles
    assert tiled.shape == (1, 3, 48, 80) and torch.isfinite(tiled).all()
    with pytest.raises(ValueError, match="tile_size must be a positive multiple of 2"):
        run(pipe, tile_size=3)


# ----------------------------------------------------------------------------------------------------------------------
# fidelity weight, guidance, upscale
# ----------------------------------------------------------------------------------------------------------------------


def test_fidelity_weight_zero_is_the_pipeline_without_cfw_and_others_differ():
    with_cfw, without = make_pipe(), make_pipe(cfw=None)
    plain = run(without)
    torch.testing.assert_close(run(with_cfw, fidelity_weight=0.0), plain, rtol=0, atol=0)
    assert (run(with_cfw) - plain).abs().max() > 1e-4  # default 0.5
    with pytest.raises(ValueError, match="needs the CFW layers"):
        run(without, fidelity_weight=0.5)
    with pytest.raises(ValueError, match=r"fidelity_weight must be in \[0, 1\]"):
        run(with_cfw, fidelity_weight=1.5)


def test_guidance_uses_the_negative_prompt():
    pipe = make_pipe()
    unguided = run(pipe, prompt="a photo")
    # the same text as condition and negative: guidance changes nothing (up to batched rounding)
    same = run(pipe, prompt="a photo", negative_prompt="a photo", guidance_scale=4.0)
    torch.testing.assert_close(same, unguided, rtol=0, atol=1e-4)
    guided = run(pipe, prompt="a photo", negative_prompt="blurry", guidance_scale=4.0)
    assert (guided - unguided).abs().max() > 1e-3
    with pytest.raises(ValueError, match="guidance_scale must be a number >= 1"):
        run(pipe, guidance_scale=0.5)


def test_other_upscale_factors_give_exactly_that_size():
    pipe = make_pipe(upscale=2)
    out = run(pipe, image=lr_image(0, size=(7, 5)))
    assert out.shape == (1, 3, 14, 10)


# ----------------------------------------------------------------------------------------------------------------------
# prompts: the original's empty prompt, prompt="auto" with an extractor (as PASD and SeeSR)
# ----------------------------------------------------------------------------------------------------------------------


def test_default_prompt_is_the_originals_empty_one_and_auto_needs_an_extractor(monkeypatch):
    pipe = make_pipe()
    seen = record_prompts(pipe, monkeypatch)
    run(pipe)
    assert seen == [[""]]
    seen.clear()
    run(pipe, prompt="a cat", negative_prompt="blurry", guidance_scale=2.0)
    assert seen == [["a cat"], ["blurry"]]
    with pytest.raises(ValueError, match=r'prompt="auto" needs a prompt extractor'):
        run(pipe, prompt="auto")


def test_prompt_auto_uses_the_extractor_and_the_user_wins(monkeypatch):
    extractor = FixedExtractor(["dog, grass, blurry", "tree"])
    pipe = make_pipe(prompt_extractor=extractor)
    seen = record_prompts(pipe, monkeypatch)
    batch = torch.cat([lr_image(0), lr_image(1)])
    run(pipe, image=batch, prompt="auto", negative_prompt="blurry", guidance_scale=2.0, generator=None)
    # the tag the user's negative prompt names is dropped
    assert seen == [["dog, grass", "tree"], ["blurry", "blurry"]]
    assert extractor.seen[-1].shape == (2, 3, 8, 8) and 0 <= extractor.seen[-1].min() <= extractor.seen[-1].max() <= 1
    seen.clear()
    run(pipe, image=batch, generator=None)  # None: the tags alone, as "auto"
    assert seen == [["dog, grass, blurry", "tree"]]
    seen.clear()
    run(pipe, image=batch, prompt=["a red dog", "a tree"], generator=None)  # the user's words first, no repeats
    assert seen == [["a red dog, grass, blurry", "a tree"]]
    # the extracted prompt changes the output: it is what the UNet is conditioned on
    plain = make_pipe()
    torch.testing.assert_close(run(pipe, prompt="auto"), run(plain, prompt="dog, grass, blurry"), rtol=0, atol=1e-6)
    assert (run(pipe, prompt="auto") - run(plain)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="prompt_extractor must be a sr_diffusion.prompts.PromptExtractor"):
        make_pipe(prompt_extractor=lambda images: ["x"])


def test_a_dape_extractor_saves_and_loads_with_the_pipeline(tmp_path):
    pipe = make_pipe(prompt_extractor=tiny_dape())
    ref = run(pipe, prompt="auto")
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = StableSRPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.prompt_extractor).__name__ == "DAPE"
    torch.testing.assert_close(run(loaded, prompt="auto"), ref, rtol=0, atol=1e-4)
    shutil.rmtree(tmp_path / "pipe" / "prompt_extractor")
    with pytest.raises(FileNotFoundError, match=r"prompt_extractor/ \(the prompt extractor\) is missing"):
        StableSRPipeline.from_pretrained(tmp_path / "pipe")


# ----------------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------------


def test_from_sd_base_builds_the_same_pipeline(tmp_path):
    parts = tiny_components()
    for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler"):
        parts[name].save_pretrained(tmp_path / "base" / name)
    pipe = StableSRPipeline.from_sd_base(
        tmp_path / "base", time_aware_encoder=tiny_encoder(), sft=tiny_sft(), cfw=tiny_cfw()
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "epsilon" and pipe.scheduler.config.variance_type == "fixed_small"
    torch.testing.assert_close(run(pipe), run(make_pipe()), rtol=0, atol=1e-5)
    # torch_dtype casts the add-ons with the base, the CFW layers included (they run inside the UNet's and VAE's calls)
    low = StableSRPipeline.from_sd_base(
        tmp_path / "base", tiny_encoder(), tiny_sft(), cfw=tiny_cfw(), torch_dtype=torch.bfloat16
    )
    modules = ("unet", "vae", "time_aware_encoder", "sft", "cfw")
    assert {getattr(low, name).dtype for name in modules} == {torch.bfloat16}
    with pytest.raises(FileNotFoundError, match="not a Stable Diffusion diffusers folder"):
        StableSRPipeline.from_sd_base(tmp_path, time_aware_encoder=tiny_encoder(), sft=tiny_sft())


def test_incomplete_or_foreign_folders_give_clear_errors(tmp_path):
    make_pipe().save_pretrained(tmp_path / "pipe")
    shutil.rmtree(tmp_path / "pipe" / "cfw")  # an optional add-on the saved pipeline names
    with pytest.raises(FileNotFoundError, match=r"add-on subfolder cfw/ \(the CFW layers\) is missing"):
        StableSRPipeline.from_pretrained(tmp_path / "pipe")
    shutil.rmtree(tmp_path / "pipe" / "sft")
    for load in (StableSRPipeline.from_pretrained, AutoSRPipeline.from_pretrained):
        with pytest.raises(FileNotFoundError, match=r"add-on subfolder sft/ \(the SFT layers\) is missing"):
            load(tmp_path / "pipe")
    # a plain Stable Diffusion folder is not a StableSR one
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="from_sd_base"):
        StableSRPipeline.from_pretrained(tmp_path / "sd")


# ----------------------------------------------------------------------------------------------------------------------
# bad components and inputs
# ----------------------------------------------------------------------------------------------------------------------


def test_components_of_another_family_are_refused():
    with pytest.raises(ValueError, match="different bases"):
        make_pipe(text_encoder=tiny_text_encoder(hidden_size=48))  # SD 1.x-like text with an SD 2.x-like UNet
    with pytest.raises(ValueError, match="inpainting or upscaler"):
        make_pipe(unet=tiny_unet(in_channels=7))
    with pytest.raises(ValueError, match="class embeddings"):
        make_pipe(unet=tiny_unet(num_class_embeds=10))
    with pytest.raises(ValueError, match="SDXL-like"):
        make_pipe(
            unet=tiny_unet(
                addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80
            )
        )
    with pytest.raises(ValueError, match="SFT layers were built for a UNet"):
        make_pipe(unet=tiny_unet(block_out_channels=(32, 96)))
    with pytest.raises(ValueError, match="CFW layers were built for a VAE"):
        make_pipe(cfw=tiny_cfw(widths=(32, 64, 64)))
    with pytest.raises(ValueError, match="must be a Stable Diffusion AutoencoderKL"):
        make_pipe(vae=tiny_unet())
    assert tiny_vae().config.latent_channels == 4


def test_bad_prompts_are_refused():
    pipe = make_pipe()
    with pytest.raises(ValueError, match="prompt is an empty list"):
        run(pipe, prompt=[])
    with pytest.raises(ValueError, match=r"is 160 tokens long; the text encoder takes at most 75"):
        run(pipe, prompt="ab " * 80)
    with pytest.raises(ValueError, match="got 3 prompts for a batch of 1 images"):
        run(pipe, prompt=["a", "b", "c"])
    with pytest.raises(ValueError, match="must be a string or a list of strings"):
        run(pipe, prompt=7)
    with pytest.raises(ValueError, match="negative_prompt"):
        run(pipe, negative_prompt=[], guidance_scale=2.0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        run(pipe, num_inference_steps=0)
    with pytest.raises(ValueError, match=r"latents \(z_T\) must have shape \(1, 4, 8, 8\)"):
        run(pipe, latents=torch.zeros(1, 4, 4, 4))
    torch.testing.assert_close(run(pipe, latents=torch.zeros(1, 4, 8, 8)), run(pipe, latents=torch.zeros(1, 4, 8, 8)))
    batch = torch.cat([lr_image(0), lr_image(1)])
    out = run(pipe, image=batch, prompt=["a photo", ""], generator=None)
    assert out.shape == (2, 3, 32, 32)
