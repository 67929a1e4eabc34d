"""SeeSRPipeline: the shared pipeline checks (and the SD-base ones) on a tiny random SD base, then SeeSR's own: the LR
start point, soft prompts and their precedence, guidance sharing soft prompts and condition, the ControlNet scale,
latent tiling, prompt extraction with a tiny DAPE (and saving it), loading from an SD base, and the errors."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from pipeline_common import OffloadTracker, SRPipelineTesterMixin
from sd_pipeline_common import SDPipelineTesterMixin, run, tiny_inputs
from seesr_tiny import (
    IMAGE_DIM,
    soft_prompts,
    tiny_components,
    tiny_controlnet,
    tiny_dape,
    tiny_unet_image_attentions,
)
from stablesr_tiny import lr_image, tiny_text_encoder, tiny_unet

from sr_diffusion.estimation import DegradationEstimator
from sr_diffusion.models.seesr import seesr_controlnet_from_unet, seesr_image_attentions
from sr_diffusion.pipelines import AutoSRPipeline
from sr_diffusion.pipelines.seesr import SeeSRPipeline, seesr_scheduler
from sr_diffusion.prompts import PromptExtraction, PromptExtractor

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


def make_pipe(**overrides) -> SeeSRPipeline:
    pipe = SeeSRPipeline(**{**tiny_components(), **overrides})
    pipe.set_progress_bar_config(disable=True)
    return pipe


class TestSeeSRPipeline(SRPipelineTesterMixin, SDPipelineTesterMixin):
    pipeline_class = SeeSRPipeline

    def get_dummy_components(self) -> dict:
        return tiny_components()

    def get_dummy_inputs(self, seed: int = 0) -> dict:
        return tiny_inputs(seed)


class FixedExtractor(PromptExtractor):
    """Tags and soft prompts that do not depend on the image: to check how the pipeline uses them."""

    def __init__(self, tags: str, soft: torch.Tensor):
        self.tags, self.soft = tags, soft

    def __call__(self, images):
        n = images.shape[0]
        return PromptExtraction([self.tags] * n, self.soft.expand(n, -1, -1))


# ----------------------------------------------------------------------------------------------------------------------
# the original's sampler: scheduler, start point, guidance, ControlNet scale
# ----------------------------------------------------------------------------------------------------------------------


def test_scheduler_is_the_originals_ddpm_with_leading_spacing():
    scheduler = seesr_scheduler()
    scheduler.set_timesteps(50)
    assert scheduler.timesteps[:3].tolist() == [981, 961, 941] and scheduler.timesteps[-1] == 1
    assert not scheduler.config.clip_sample and scheduler.config.variance_type == "fixed_small"


def test_start_point_lr_noises_the_lr_latent_to_step_999():
    pipe = make_pipe()
    eps = torch.randn(pipe.latent_shape(1, 8, 8), generator=torch.Generator().manual_seed(3))
    condition = F.interpolate(lr_image(0), scale_factor=4, mode="bicubic").clamp(0, 1)
    timesteps = pipe.scheduler.timesteps
    start = pipe.prepare_start_latents(
        eps.shape, device=torch.device("cpu"), generator=torch.Generator().manual_seed(5), latents=eps,
        start_point="lr", condition=condition, timesteps=timesteps,
    )  # fmt: skip
    posterior = pipe.vae.encode(condition * 2 - 1).latent_dist
    z_lr = posterior.sample(generator=torch.Generator().manual_seed(5)) * pipe.vae.config.scaling_factor
    abar = pipe.scheduler.alphas_cumprod[999]
    torch.testing.assert_close(start, abar.sqrt() * z_lr + (1 - abar).sqrt() * eps, rtol=1e-5, atol=1e-5)
    noise = pipe.prepare_start_latents(
        eps.shape, device=torch.device("cpu"), generator=None, latents=eps, start_point="noise", condition=condition,
        timesteps=timesteps,
    )  # fmt: skip
    torch.testing.assert_close(noise, eps, rtol=0, atol=0)
    # end to end: the start point changes the result, each deterministically
    lr_start, noise_start = run(pipe), run(pipe, start_point="noise")
    assert (lr_start - noise_start).abs().max() > 1e-3
    torch.testing.assert_close(run(pipe, start_point="noise"), noise_start, rtol=0, atol=0)
    with pytest.raises(ValueError, match="start_point must be one of 'lr', 'noise'"):
        run(pipe, start_point="hr")


def test_guidance_shares_the_soft_prompts_and_the_condition_between_both_halves():
    """With the negative prompt equal to the prompt, guidance changes nothing only if the unconditional half also gets
    the soft prompts and the ControlNet condition (the original duplicates both)."""
    pipe = make_pipe()
    kwargs = {"prompt": "a photo", "added_prompt": None, "image_prompt_embeds": soft_prompts(1)}
    unguided = run(pipe, guidance_scale=1.0, **kwargs)
    same = run(pipe, guidance_scale=5.5, negative_prompt="a photo", **kwargs)
    torch.testing.assert_close(same, unguided, rtol=0, atol=1e-4)
    guided = run(pipe, guidance_scale=5.5, **kwargs)  # SeeSR's negative prompt by default
    assert (guided - unguided).abs().max() > 1e-3
    with pytest.raises(ValueError, match="guidance_scale must be a number >= 1"):
        run(pipe, guidance_scale=0.5)


def test_controlnet_conditioning_scale():
    unet = tiny_unet()
    fresh, fresh_extra = seesr_controlnet_from_unet(
        unet, context_dim=IMAGE_DIM, conditioning_embedding_out_channels=(16, 16, 32)
    )
    components = tiny_components()
    pipe = make_pipe(**components)
    zero = make_pipe(**{**components, "controlnet": fresh, "controlnet_image_attentions": fresh_extra})
    # scale 0: the ControlNet adds nothing, as a fresh one (zero convolutions) at scale 1
    torch.testing.assert_close(run(pipe, controlnet_conditioning_scale=0.0), run(zero), rtol=0, atol=1e-5)
    assert (run(pipe, controlnet_conditioning_scale=0.5) - run(pipe)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="controlnet_conditioning_scale must be a number >= 0"):
        run(pipe, controlnet_conditioning_scale=-1.0)


# ----------------------------------------------------------------------------------------------------------------------
# soft and hard prompts
# ----------------------------------------------------------------------------------------------------------------------


def test_soft_prompts_change_the_output_and_broadcast():
    pipe = make_pipe()
    a, b = soft_prompts(1), soft_prompts(2)
    out_a = run(pipe, image_prompt_embeds=a)
    assert (run(pipe, image_prompt_embeds=b) - out_a).abs().max() > 1e-3
    assert (run(pipe) - out_a).abs().max() > 1e-3  # none given: the null soft prompt
    batch = torch.cat([lr_image(0), lr_image(1)])
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    one = run(pipe, image=batch, generator=gens, image_prompt_embeds=a)
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    both = run(pipe, image=batch, generator=gens, image_prompt_embeds=a.expand(2, -1, -1))
    torch.testing.assert_close(one, both, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=rf"are 7-d but the image cross-attention takes {IMAGE_DIM}-d"):
        run(pipe, image_prompt_embeds=torch.zeros(1, 3, 7))
    with pytest.raises(ValueError, match="pass one .* for all images or one per image"):
        run(pipe, image=batch, generator=None, image_prompt_embeds=torch.zeros(3, 2, IMAGE_DIM))


def test_the_extractors_prompts_are_used_and_the_callers_win():
    tags, soft = "dog, grass", soft_prompts(4)
    components = tiny_components()
    plain = make_pipe(**components)
    extracting = make_pipe(**{**components, "prompt_extractor": FixedExtractor(tags, soft)})
    expected = run(plain, prompt=f"{tags}, clean, high-resolution, 8k", added_prompt=None, image_prompt_embeds=soft)
    auto = run(extracting, prompt="auto")
    torch.testing.assert_close(auto, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(run(extracting), auto, rtol=0, atol=0)  # None: the tags alone, as "auto"
    # the user's prompt comes first; a tag the user already names is not repeated
    user = run(extracting, prompt="a dog")
    ref = run(plain, prompt="a dog, grass, clean, high-resolution, 8k", added_prompt=None, image_prompt_embeds=soft)
    torch.testing.assert_close(user, ref, rtol=0, atol=1e-5)
    # the caller's soft prompts win over the extractor's
    other = soft_prompts(5)
    torch.testing.assert_close(
        run(extracting, image_prompt_embeds=other),
        run(plain, prompt=f"{tags}, clean, high-resolution, 8k", added_prompt=None, image_prompt_embeds=other),
        rtol=0,
        atol=1e-5,
    )
    # the user's negative prompt is used verbatim: "" differs from SeeSR's default
    assert (run(extracting, negative_prompt="") - auto).abs().max() > 1e-4


def test_model_cpu_offload_with_a_dape_and_a_degradation_estimator(monkeypatch):
    """``prompt="auto"`` and ``fidelity="auto"`` under ``enable_model_cpu_offload``: the DAPE is offloaded in sequence
    and runs on the device, the estimator (kept on the device) runs, and the image is the one without offload."""
    torch.manual_seed(0)
    estimator = DegradationEstimator(block_out_channels=(8, 16), head_channels=8).eval()
    pipe = make_pipe(prompt_extractor=tiny_dape(), degradation_estimator=estimator)
    image = lr_image(0, size=(16, 16))
    reference = run(pipe, image=image, prompt="auto", fidelity="auto")
    tracker = OffloadTracker(monkeypatch)
    pipe.enable_model_cpu_offload(device="cpu")
    assert "prompt_extractor" in tracker.watch(pipe)
    ran = []
    estimator.register_forward_pre_hook(lambda module, args: ran.append(args[0].shape))
    torch.testing.assert_close(run(pipe, image=image, prompt="auto", fidelity="auto"), reference, rtol=0, atol=0)
    assert not tracker.violations, sorted(set(tracker.violations))
    assert {"prompt_extractor", "text_encoder", "controlnet", "unet", "vae"} <= tracker.loaded
    assert ran, "the degradation estimator did not run"


def test_a_dape_extracts_prompts_and_saves_and_loads_with_the_pipeline(tmp_path):
    dape = tiny_dape()
    pipe = make_pipe(prompt_extractor=dape)
    image = lr_image(0)
    extraction = dape(image)
    assert len(extraction.hard_prompts[0].split(", ")) == 3 and extraction.soft_prompts.shape[-1] == IMAGE_DIM
    ref = run(pipe, prompt="auto")
    assert (run(pipe, prompt="auto", image_prompt_embeds=soft_prompts(1)) - ref).abs().max() > 1e-3
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["prompt_extractor"] == ["sr_diffusion.prompts.dape", "DAPE"]
    for load in (SeeSRPipeline.from_pretrained, AutoSRPipeline.from_pretrained):
        loaded = load(tmp_path / "pipe")
        loaded.set_progress_bar_config(disable=True)
        torch.testing.assert_close(run(loaded, prompt="auto"), ref, rtol=0, atol=1e-4)
    shutil.rmtree(tmp_path / "pipe" / "prompt_extractor")
    with pytest.raises(FileNotFoundError, match=r"prompt_extractor/ \(the prompt extractor \(DAPE\)\) is missing"):
        SeeSRPipeline.from_pretrained(tmp_path / "pipe")
    with pytest.raises(ValueError, match="makes 16-d soft prompts but the image cross-attention takes 24-d"):
        make_pipe(prompt_extractor=tiny_dape(cross_attention_dim=16))


def test_bad_prompts_are_refused():
    pipe = make_pipe()
    with pytest.raises(ValueError, match=r'prompt="auto" needs a prompt extractor'):
        run(pipe, prompt="auto")
    with pytest.raises(ValueError, match=r"is 160 tokens long; the text encoder takes at most 75"):
        run(pipe, prompt="ab " * 80)
    with pytest.raises(ValueError, match="got 3 prompts for a batch of 1 images"):
        run(pipe, prompt=["a", "b", "c"])
    with pytest.raises(ValueError, match="must be a string or a list of strings"):
        run(pipe, prompt=7)
    with pytest.raises(ValueError, match="negative_prompt is an empty list"):
        run(pipe, negative_prompt=[])
    with pytest.raises(ValueError, match=r"latents \(z_T\) must have shape \(1, 4, 8, 8\)"):
        run(pipe, latents=torch.zeros(1, 4, 4, 4))
    # long extracted tags are truncated, never the user's words: a long prompt from the extractor runs
    long_tags = ", ".join(["grass"] * 40)
    extracting = make_pipe(prompt_extractor=FixedExtractor(long_tags, soft_prompts(0)))
    assert torch.isfinite(run(extracting, prompt="a dog")).all()


# ----------------------------------------------------------------------------------------------------------------------
# tiling
# ----------------------------------------------------------------------------------------------------------------------


def test_tile_aggregation_crops_the_condition_with_the_latent(monkeypatch):
    """With a denoiser that looks at each latent pixel (and its f x f condition pixels) alone, the blended tiles give
    the whole-image result: the condition tile is the latent tile's pixels."""
    pipe = make_pipe()
    f = pipe.vae_scale_factor

    def pointwise(latents, *, t, condition, prompt_embeds, image_prompt_embeds, guidance_scale, conditioning_scale):
        assert condition.shape[-2:] == (latents.shape[-2] * f, latents.shape[-1] * f)
        return torch.tanh(latents) * 2 + F.avg_pool2d(condition, f).mean(1, keepdim=True)

    monkeypatch.setattr(pipe, "predict_noise", pointwise)
    latents, condition = torch.randn(1, 4, 20, 28), torch.rand(1, 3, 20 * f, 28 * f)
    kwargs = dict(t=5, condition=condition, prompt_embeds=None, image_prompt_embeds=None, guidance_scale=1.0,
                  conditioning_scale=1.0)  # fmt: skip
    whole = pipe.predict_noise(latents, **kwargs)
    tiled = pipe.predict_noise_tiled(latents, **kwargs, tile=8, overlap=4)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-5)


def test_tiled_sampling_agrees_with_untiled_where_one_tile_fits_and_runs_on_many():
    pipe = make_pipe()
    ref = run(pipe)
    torch.testing.assert_close(run(pipe, tile_size=8, tile_overlap=4), ref, rtol=0, atol=0)  # 8 LR px: whole image
    tiled = run(pipe, image=lr_image(1, size=(12, 20)), tile_size=8, tile_overlap=4)  # 2 x 4 latent tiles
    assert tiled.shape == (1, 3, 48, 80) and torch.isfinite(tiled).all()
    with pytest.raises(ValueError, match="tile_size must be a positive multiple of 2"):
        run(pipe, tile_size=3)


# ----------------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------------


def test_from_sd_base_builds_the_same_pipeline(tmp_path):
    parts = tiny_components()
    for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler"):
        parts[name].save_pretrained(tmp_path / "base" / name)
    addons = {k: parts[k] for k in ("controlnet", "unet_image_attentions", "controlnet_image_attentions")}
    pipe = SeeSRPipeline.from_sd_base(tmp_path / "base", **addons)
    pipe.set_progress_bar_config(disable=True)
    torch.testing.assert_close(run(pipe), run(make_pipe()), rtol=0, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="not a Stable Diffusion diffusers folder"):
        SeeSRPipeline.from_sd_base(tmp_path, **addons)


def test_incomplete_or_foreign_folders_give_clear_errors(tmp_path):
    make_pipe().save_pretrained(tmp_path / "pipe")
    shutil.rmtree(tmp_path / "pipe" / "controlnet_image_attentions")
    for load in (SeeSRPipeline.from_pretrained, AutoSRPipeline.from_pretrained):
        with pytest.raises(FileNotFoundError, match=r"subfolder controlnet_image_attentions/ .* is missing"):
            load(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="from_sd_base"):
        SeeSRPipeline.from_pretrained(tmp_path / "sd")


# ----------------------------------------------------------------------------------------------------------------------
# bad components
# ----------------------------------------------------------------------------------------------------------------------


def test_components_that_do_not_fit_are_refused():
    parts = tiny_components()
    with pytest.raises(ValueError, match="different bases"):
        make_pipe(text_encoder=tiny_text_encoder(hidden_size=48))
    with pytest.raises(ValueError, match="SDXL-like"):
        make_pipe(
            unet=tiny_unet(
                addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80
            )
        )
    other_unet = tiny_unet(block_out_channels=(32, 96))
    with pytest.raises(ValueError, match=r"the ControlNet has block_out_channels=.* it was made from another UNet"):
        make_pipe(controlnet=tiny_controlnet(other_unet)[0])
    with pytest.raises(ValueError, match="must be a diffusers ControlNetModel"):
        make_pipe(controlnet=parts["unet"])
    sd_like, _ = seesr_controlnet_from_unet(parts["unet"], context_dim=IMAGE_DIM)  # (16, 32, 96, 256): f = 8
    with pytest.raises(ValueError, match="condition encoder downsamples by 8 but the VAE by 4"):
        make_pipe(controlnet=sd_like)
    with pytest.raises(ValueError, match="has no up_blocks.0.attentions.0, .* built for a model with other blocks"):
        make_pipe(controlnet_image_attentions=parts["unet_image_attentions"])
    with pytest.raises(ValueError, match="unet_image_attentions has layers at .* built for another model"):
        make_pipe(unet_image_attentions=parts["controlnet_image_attentions"])
    with pytest.raises(ValueError, match="takes 24-d soft prompts, the ControlNet's 16-d"):
        make_pipe(controlnet_image_attentions=seesr_image_attentions(parts["controlnet"], 16))
    with pytest.raises(ValueError, match="must be a BlockAttentions"):
        make_pipe(unet_image_attentions=parts["controlnet"])
    with pytest.raises(ValueError, match="different dtypes"):
        make_pipe(unet_image_attentions=tiny_unet_image_attentions(parts["unet"]).to(torch.float64))
    with pytest.raises(ValueError, match="must be a PromptExtractor"):
        make_pipe(prompt_extractor=parts["vae"])
    assert math.isclose(make_pipe().image_prompt_dim, IMAGE_DIM)
