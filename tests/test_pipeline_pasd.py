"""PASDPipeline: the shared pipeline checks (and the SD-base ones) on a tiny random SD base, then PASD's own: the
denoiser call is the original's block order, the adjustable noise schedule's start, the ControlNet conditioning scale,
latent tiling, prompts (the original's defaults, prompt="auto" with an extractor, the user's words first), loading from
an SD base folder, and the errors for incomplete folders, other model families, mismatched dtypes and bad prompts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import ControlNetModel
from pasd_tiny import (
    lr_image,
    perturb,
    reference_pasd_unet,
    tiny_components,
    tiny_controlnet,
    tiny_pixel_attentions,
    tiny_text_encoder,
    tiny_unet,
)
from pipeline_common import SRPipelineTesterMixin
from sd_pipeline_common import FixedExtractor, SDPipelineTesterMixin, record_prompts, run, tiny_inputs

from sr_diffusion.pipelines import AutoSRPipeline
from sr_diffusion.pipelines.pasd import PASD_NEGATIVE_PROMPT, PASDPipeline, pasd_noise_pred

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


def make_pipe(**overrides) -> PASDPipeline:
    pipe = PASDPipeline(**tiny_components(**overrides))
    pipe.set_progress_bar_config(disable=True)
    return pipe


class TestPASDPipeline(SRPipelineTesterMixin, SDPipelineTesterMixin):
    pipeline_class = PASDPipeline

    def get_dummy_components(self) -> dict:
        return tiny_components()

    def get_dummy_inputs(self, seed: int = 0) -> dict:
        return tiny_inputs(seed)


# ----------------------------------------------------------------------------------------------------------------------
# the denoiser call
# ----------------------------------------------------------------------------------------------------------------------


def start_latents(pipe, cond, timesteps, start_point, added_noise_level):
    return pipe.prepare_start_latents(
        cond, timesteps=timesteps, start_point=start_point, added_noise_level=added_noise_level,
        generator=torch.Generator().manual_seed(3), latents=None,
    )  # fmt: skip


def test_the_denoiser_call_is_the_original_block_order():
    c = tiny_components()
    g = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    cond, t = torch.rand(2, 3, 32, 32, generator=g), torch.tensor(500)
    with torch.no_grad():
        got, rgbs = pasd_noise_pred(
            c["unet"],
            controlnet=c["controlnet"],
            pixel_attentions=c["pixel_attentions"],
            sample=sample,
            timestep=t,
            encoder_hidden_states=text,
            cond_image=cond,
            conditioning_scale=0.7,
        )
        down, mid, _ = c["controlnet"](sample, t, text, cond, conditioning_scale=0.7, return_dict=False)
        expected = reference_pasd_unet(c["unet"], c["pixel_attentions"], sample, t, text, down, mid)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert [tuple(r.shape) for r in rgbs] == [(2, 3, 16, 16), (2, 3, 8, 8)]


# ----------------------------------------------------------------------------------------------------------------------
# the adjustable noise schedule, the conditioning scale
# ----------------------------------------------------------------------------------------------------------------------


def test_the_start_is_the_lr_latent_noised_to_the_first_step_then_to_added_noise_level():
    pipe = make_pipe()
    pipe.scheduler.set_timesteps(4)
    timesteps = pipe.scheduler.timesteps
    cond = torch.nn.functional.interpolate(lr_image(0), scale_factor=4, mode="bicubic").clamp(0, 1)
    start = start_latents(pipe, cond, timesteps, "lr", 900)
    # by hand, with the same draws in the same order: posterior sample, then the two noises
    g = torch.Generator().manual_seed(3)
    z_lr = pipe.vae.encode(cond * 2 - 1).latent_dist.sample(g) * pipe.vae.config.scaling_factor
    n1, n2 = torch.randn(z_lr.shape, generator=g), torch.randn(z_lr.shape, generator=g)
    abar = pipe.scheduler.alphas_cumprod.double()
    t1 = int(timesteps[0])
    z = abar[t1].sqrt() * z_lr.double() + (1 - abar[t1]).sqrt() * n1.double()
    z = abar[900].sqrt() * z + (1 - abar[900]).sqrt() * n2.double()
    torch.testing.assert_close(start.double(), z, rtol=1e-5, atol=1e-5)
    # start_point="noise": pure noise (the original's --init_latent_with_noise); another level, another start
    pure = start_latents(pipe, cond, timesteps, "noise", None)
    torch.testing.assert_close(pure, torch.randn(z_lr.shape, generator=torch.Generator().manual_seed(3)))
    low = start_latents(pipe, cond, timesteps, "lr", 100)
    assert (low - start).abs().max() > 1e-2
    # and the pipeline's output follows the start; None is the default level, 900 (no longer pure noise)
    default = run(pipe)
    torch.testing.assert_close(run(pipe, added_noise_level=None), default, rtol=0, atol=0)
    torch.testing.assert_close(run(pipe, added_noise_level=900), default, rtol=0, atol=0)
    assert (run(pipe, start_point="noise") - default).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"added_noise_level must be None \(the default, 900\) or an int in \[0, 1000"):
        run(pipe, added_noise_level=1000)
    with pytest.raises(ValueError, match="start_point='noise' starts from pure noise: leave added_noise_level unset"):
        run(pipe, start_point="noise", added_noise_level=900)
    with pytest.raises(ValueError, match="start_point must be one of 'lr', 'noise'"):
        run(pipe, start_point="hr")


def test_conditioning_scale_zero_removes_the_controlnet():
    pipe = make_pipe()
    ref = run(pipe, controlnet_conditioning_scale=0.0)
    full = run(pipe)
    perturb(pipe.controlnet, seed=11, scale=0.2)
    # scale 0: residuals and PACA context are zeros whatever the ControlNet computes
    torch.testing.assert_close(run(pipe, controlnet_conditioning_scale=0.0), ref, rtol=0, atol=1e-6)
    assert (run(pipe) - full).abs().max() > 1e-3
    assert (full - ref).abs().max() > 1e-3
    with pytest.raises(ValueError, match="controlnet_conditioning_scale must be a number >= 0"):
        run(pipe, controlnet_conditioning_scale=-1)


# ----------------------------------------------------------------------------------------------------------------------
# tiling
# ----------------------------------------------------------------------------------------------------------------------


def test_tile_blending_is_exact_for_a_pointwise_denoiser(monkeypatch):
    pipe = make_pipe()

    def pointwise(x, *, t, cond_image, prompt_embeds, guidance_scale, conditioning_scale):
        cond = cond_image
        assert cond.shape[-2:] == tuple(4 * s for s in x.shape[-2:])  # the condition crop matches the latent tile
        return torch.tanh(x) * 2 + torch.nn.functional.avg_pool2d(cond, 4).mean(1, keepdim=True)

    monkeypatch.setattr(pipe, "predict_noise", pointwise)
    latents, cond = torch.randn(1, 4, 12, 20), torch.rand(1, 3, 48, 80)
    kwargs = dict(t=5, cond_image=cond, prompt_embeds=None, guidance_scale=1.0, conditioning_scale=1.0)
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
# prompts and guidance
# ----------------------------------------------------------------------------------------------------------------------


def test_default_prompts_are_the_originals_and_the_user_wins(monkeypatch):
    pipe = make_pipe()
    seen = record_prompts(pipe, monkeypatch)
    run(pipe)
    assert seen == [["clean, high-resolution, 8k"], [PASD_NEGATIVE_PROMPT]]
    seen.clear()
    run(pipe, prompt="a cat", negative_prompt="", added_prompt=None)
    assert seen == [["a cat"], [""]]
    seen.clear()
    run(pipe, prompt="a photo", guidance_scale=1.0)  # no guidance: no negative prompt
    assert seen == [["a photo, clean, high-resolution, 8k"]]
    with pytest.raises(ValueError, match="needs a prompt extractor"):
        run(pipe, prompt="auto")


def test_prompt_auto_uses_the_extractor(monkeypatch):
    extractor = FixedExtractor(["dog, grass, blurry", "tree"])
    pipe = make_pipe(prompt_extractor=extractor)
    seen = record_prompts(pipe, monkeypatch)
    batch = torch.cat([lr_image(0), lr_image(1)])
    run(pipe, image=batch, prompt="auto", generator=None)
    # the negative prompt mentions "blurry": that tag is dropped (the user's negative words overrule the extractor)
    assert seen[0] == ["dog, grass, clean, high-resolution, 8k", "tree, clean, high-resolution, 8k"]
    assert extractor.seen[-1].shape == (2, 3, 8, 8) and extractor.seen[-1].max() <= 1  # the LR images in [0, 1]
    seen.clear()
    run(pipe, prompt=["a red dog", "a tree"], image=batch, negative_prompt="noise", generator=None)
    assert seen == [
        ["a red dog, grass, blurry, clean, high-resolution, 8k", "a tree, clean, high-resolution, 8k"],
        ["noise", "noise"],
    ]


def test_guidance_uses_the_negative_prompt():
    pipe = make_pipe()
    unguided = run(pipe, prompt="a photo", added_prompt=None, guidance_scale=1.0)
    same = run(pipe, prompt="a photo", added_prompt=None, negative_prompt="a photo", guidance_scale=4.0)
    torch.testing.assert_close(same, unguided, rtol=0, atol=1e-4)  # condition = negative: guidance changes nothing
    assert (run(pipe, prompt="a photo", added_prompt=None, guidance_scale=4.0) - unguided).abs().max() > 1e-3
    with pytest.raises(ValueError, match="guidance_scale must be a number >= 1"):
        run(pipe, guidance_scale=0.5)


def test_bad_prompts_are_refused():
    pipe = make_pipe()
    with pytest.raises(ValueError, match="prompt is an empty list"):
        run(pipe, prompt=[])
    with pytest.raises(ValueError, match=r"is 160 tokens long; the text encoder takes at most 75"):
        run(pipe, prompt="ab " * 80)
    with pytest.raises(ValueError, match="got 3 prompts for a batch of 1 images"):
        run(pipe, prompt=["a", "b", "c"])
    with pytest.raises(ValueError, match="prompt must be a string or a list of strings"):
        run(pipe, prompt=7)
    with pytest.raises(ValueError, match="negative_prompt is an empty list"):
        run(pipe, negative_prompt=[])
    with pytest.raises(ValueError, match="added_prompt must be a string"):
        run(pipe, added_prompt=3)
    with pytest.raises(ValueError, match=r"latents \(z_T\) must have shape \(1, 4, 8, 8\)"):
        run(pipe, latents=torch.zeros(1, 4, 4, 4))
    torch.testing.assert_close(run(pipe, latents=torch.zeros(1, 4, 8, 8)), run(pipe, latents=torch.zeros(1, 4, 8, 8)))


# ----------------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------------


def test_from_sd_base_builds_the_same_pipeline(tmp_path):
    parts = tiny_components()
    for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler"):
        parts[name].save_pretrained(tmp_path / "base" / name)
    pipe = PASDPipeline.from_sd_base(
        tmp_path / "base", controlnet=parts["controlnet"], pixel_attentions=parts["pixel_attentions"]
    )
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    torch.testing.assert_close(run(pipe), run(make_pipe()), rtol=0, atol=1e-5)
    # torch_dtype casts the add-ons with the base (they run in one call with the UNet)
    low = PASDPipeline.from_sd_base(
        tmp_path / "base", tiny_controlnet(), tiny_pixel_attentions(), torch_dtype=torch.bfloat16
    )
    assert {low.unet.dtype, low.controlnet.dtype, low.pixel_attentions.dtype} == {torch.bfloat16}
    with pytest.raises(FileNotFoundError, match="not a Stable Diffusion diffusers folder.*stable-diffusion-v1-5"):
        PASDPipeline.from_sd_base(tmp_path, controlnet=parts["controlnet"], pixel_attentions=parts["pixel_attentions"])


def test_incomplete_or_foreign_folders_give_clear_errors(tmp_path):
    make_pipe().save_pretrained(tmp_path / "pipe")
    shutil.rmtree(tmp_path / "pipe" / "pixel_attentions")
    for load in (PASDPipeline.from_pretrained, AutoSRPipeline.from_pretrained):
        with pytest.raises(FileNotFoundError, match=r"add-on subfolder pixel_attentions/ .* is missing"):
            load(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="from_sd_base"):
        PASDPipeline.from_pretrained(tmp_path / "sd")


# ----------------------------------------------------------------------------------------------------------------------
# bad components
# ----------------------------------------------------------------------------------------------------------------------


def test_components_of_another_family_or_dtype_are_refused():
    with pytest.raises(ValueError, match="different bases"):
        make_pipe(text_encoder=tiny_text_encoder(hidden_size=48))
    with pytest.raises(ValueError, match="class embeddings"):
        make_pipe(unet=tiny_unet(num_class_embeds=10))
    with pytest.raises(ValueError, match="inpainting or upscaler"):
        make_pipe(unet=tiny_unet(in_channels=7))
    plain = ControlNetModel.from_unet(tiny_unet(), conditioning_embedding_out_channels=(8, 16, 32))
    with pytest.raises(ValueError, match="must be PASD's PASDControlNetModel"):
        make_pipe(controlnet=plain)
    wider = tiny_unet(block_out_channels=(32, 96))
    with pytest.raises(ValueError, match="ControlNet was built for a UNet with block_out_channels"):
        make_pipe(unet=wider)
    with pytest.raises(ValueError, match="add-on was built for a model of another width"):
        make_pipe(unet=wider, controlnet=tiny_controlnet(wider))
    with pytest.raises(ValueError, match="pixel_attentions must be PASD's BlockAttentions"):
        make_pipe(pixel_attentions=torch.nn.Linear(2, 2))
    unet = tiny_unet()
    coarse = tiny_controlnet(unet)
    coarse = type(coarse).from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    with pytest.raises(ValueError, match="downsamples its image by 8 but the VAE by 4"):
        make_pipe(controlnet=coarse)
    with pytest.raises(ValueError, match="must share one dtype"):
        make_pipe(controlnet=tiny_controlnet().to(torch.float16))
    with pytest.raises(ValueError, match="prompt_extractor must be a sr_diffusion.prompts.PromptExtractor"):
        make_pipe(prompt_extractor=lambda images: ["x"])
    assert tiny_pixel_attentions().config.name == "pixel_attentions"


def test_other_upscale_factors_give_exactly_that_size():
    pipe = make_pipe()
    pipe.register_to_config(upscale=2)
    assert run(pipe, image=lr_image(0, size=(7, 5))).shape == (1, 3, 14, 10)
