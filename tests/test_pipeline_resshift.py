"""ResShiftPipeline: the shared pipeline checks for three component sets (pixel-space ResShiftUNet, VQ-f4-style latent
space, a diffusers UNet2DModel conditioned by concatenation), then ResShift's own: scheduler check, respacing, colour
fix, tiling, input errors, and a perfect denoiser that must give back the HR image exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, ConfigMixin, DDPMScheduler, ModelMixin, UNet2DModel, VQModel
from diffusers.configuration_utils import register_to_config
from pipeline_common import SRPipelineTesterMixin

from sr_diffusion.color_fix import wavelet_decomposition
from sr_diffusion.models import PixelUnshuffleUNet, ResShiftUNet
from sr_diffusion.pipelines import AutoSRPipeline, ResShiftPipeline
from sr_diffusion.resize import imresize, resize
from sr_diffusion.schedulers import ResShiftScheduler

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


# ----------------------------------------------------------------------------------------------------------------------
# tiny components
# ----------------------------------------------------------------------------------------------------------------------

TINY_UNET = {
    "image_size": 16,
    "model_channels": 32,
    "num_res_blocks": 1,
    "attention_resolutions": (8,),
    "channel_mult": (1, 2),
    "num_head_channels": 16,
    "swin_depth": 1,
    "swin_embed_dim": 32,
    "window_size": 4,
    "mlp_ratio": 2.0,
    "lq_size": 16,
}


def tiny_resshift_unet(**overrides) -> ResShiftUNet:
    """Seeded; the original zero-initialises the last conv of every residual block, so perturb every weight (else
    the timestep and x_t barely reach the output)."""
    torch.manual_seed(0)
    unet = ResShiftUNet(**{**TINY_UNET, **overrides}).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


def tiny_scheduler(**overrides) -> ResShiftScheduler:
    return ResShiftScheduler(**{"num_train_timesteps": 4, "kappa": 1.0, "input_scaling": "max", **overrides})


def tiny_vq_f4() -> VQModel:
    """Three levels, so ×4 down like the released VQ-f4 (a 4x SR latent is the size of the LR image)."""
    torch.manual_seed(0)
    return VQModel(
        block_out_channels=(8, 8, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=3,
        num_vq_embeddings=64,
        vq_embed_dim=3,
        scaling_factor=1.0,
    ).eval()


def tiny_unet2d(in_channels: int = 6, out_channels: int = 3) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=32,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    ).eval()


def lr_image(seed: int, size=(8, 8)) -> torch.Tensor:
    """A smooth random LR image (1, 3, h, w) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 3, 3, generator=g)
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=True).clamp(0, 1)


class ResShiftInputs:
    pipeline_class = ResShiftPipeline

    def get_dummy_inputs(self, seed: int = 0) -> dict:
        return {"image": lr_image(seed), "generator": torch.Generator().manual_seed(seed)}


class TestResShiftPixelSpace(ResShiftInputs, SRPipelineTesterMixin):
    """The chain at the HR size; the UNet's lq is y_0 (lq_size = image_size)."""

    def get_dummy_components(self) -> dict:
        return {"unet": tiny_resshift_unet(), "scheduler": tiny_scheduler(clip_sample=True), "vae": None}


class TestResShiftLatentSpace(ResShiftInputs, SRPipelineTesterMixin):
    """The released geometry: ×4 SR in a ×4-down VQ latent, so the UNet's lq is the LR image itself."""

    def get_dummy_components(self) -> dict:
        return {"unet": tiny_resshift_unet(), "scheduler": tiny_scheduler(input_scaling="std"), "vae": tiny_vq_f4()}


class TestResShiftUNet2DConcat(ResShiftInputs, SRPipelineTesterMixin):
    """A diffusers UNet2DModel with in_channels = 2 x 3: [scale_model_input(x_t), y_0]."""

    def get_dummy_components(self) -> dict:
        return {"unet": tiny_unet2d(), "scheduler": tiny_scheduler(), "vae": None}


def tiny_unshuffle_unet() -> PixelUnshuffleUNet:
    torch.manual_seed(0)
    return PixelUnshuffleUNet(sample_size=32, block_out_channels=(16, 32), norm_num_groups=8).eval()


class TestResShiftPixelUnshuffle(ResShiftInputs, SRPipelineTesterMixin):
    """The embedded default's layout: a UNet2DModel on the pixel-unshuffled x_t and y_0 (the LR grid)."""

    def get_dummy_components(self) -> dict:
        return {"unet": tiny_unshuffle_unet(), "scheduler": tiny_scheduler(clip_sample=True), "vae": None}


def make_pipe(**components) -> ResShiftPipeline:
    components = {"unet": tiny_resshift_unet(), "scheduler": tiny_scheduler(), **components}
    pipe = ResShiftPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------------------------------
# components and config
# ----------------------------------------------------------------------------------------------------------------------


def test_geometry_of_each_component_set():
    pixel = make_pipe()
    # pixel space: the HR size must be a multiple of the UNet's 8, so LR sides are padded to even sizes
    assert (pixel.vae_scale_factor, pixel.unet_input_multiple, pixel.lr_multiple) == (1, 8, 2)
    assert pixel.latent_shape(2, 5, 7) == (2, 3, 24, 32)
    latent = make_pipe(vae=tiny_vq_f4())
    # latent space: the latent is the LR size and must be a multiple of 8
    assert (latent.vae_scale_factor, latent.lr_multiple) == (4, 8)
    assert latent.latent_shape(1, 5, 9) == (1, 3, 8, 16)
    concat = make_pipe(unet=tiny_unet2d())
    assert concat.lr_multiple == 1 and concat.latent_shape(1, 5, 7) == (1, 3, 20, 28)
    # pixel unshuffle by 4, then one 2x level: the HR size must be a multiple of 8, so LR sides are even
    unshuffle = make_pipe(unet=tiny_unshuffle_unet())
    assert unshuffle.lr_multiple == 2 and unshuffle.latent_shape(1, 5, 7) == (1, 3, 24, 32)


def test_upscale_is_registered_and_saved(tmp_path):
    pipe = make_pipe(upscale=2)
    assert pipe.config.upscale == 2 and pipe.upscale == 2
    assert pipe(lr_image(0, (5, 6)), output_type="pt").images.shape == (1, 3, 10, 12)
    pipe.save_pretrained(tmp_path)
    assert AutoSRPipeline.from_pretrained(tmp_path).upscale == 2
    with pytest.raises(ValueError, match="upscale"):
        make_pipe(upscale=0)


def test_call_defaults_are_registered_and_saved(tmp_path):
    """config.lr_consistency / config.num_inference_steps are what __call__ does when not told; an explicit value
    wins; they survive save/load."""
    from sr_diffusion.metrics import lr_consistency

    lr = lr_image(3, (6, 6))
    pipe = make_pipe(unet=tiny_unshuffle_unet(), lr_consistency=True, num_inference_steps=2)
    steps = []

    def run(**kwargs):
        def count(pipe, i, t, state):
            steps.append(int(t))
            return state

        steps.clear()
        kwargs = {"generator": torch.Generator().manual_seed(0), "callback_on_step_end": count, **kwargs}
        return pipe(lr, output_type="pt", **kwargs).images, len(steps)

    (default, n_default), (explicit, n_explicit) = run(), run(lr_consistency=True, num_inference_steps=2)
    (plain, _), (full, n_full) = run(lr_consistency=False), run(num_inference_steps=4)
    assert torch.equal(default, explicit) and (n_default, n_explicit, n_full) == (2, 2, 4)
    assert not torch.equal(default, plain) and not torch.equal(default, full)
    assert lr_consistency(lr, default, 4).item() > lr_consistency(lr, plain, 4).item() + 10
    pipe.save_pretrained(tmp_path)
    loaded = AutoSRPipeline.from_pretrained(tmp_path)
    assert (loaded.config.lr_consistency, loaded.config.num_inference_steps) == (True, 2)
    assert (make_pipe().config.lr_consistency, make_pipe().config.num_inference_steps) == (False, None)
    with pytest.raises(ValueError, match="lr_consistency must be a bool"):
        make_pipe(lr_consistency=1)
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match="num_inference_steps must be None or an int"):
            make_pipe(num_inference_steps=bad)


def test_latent_scaling_uses_the_vae_and_scheduler_factors():
    """z = (E(x) - shift_factor) * scaling_factor * latent_scale_factor, undone before decoding."""
    x = lr_image(0, (16, 16)) * 2 - 1
    vq = tiny_vq_f4()
    vq.register_to_config(scaling_factor=0.5)
    pipe = make_pipe(vae=vq, scheduler=tiny_scheduler(latent_scale_factor=3.0))
    with torch.no_grad():
        h = vq.encode(x).latents
        torch.testing.assert_close(pipe.encode_images(x), h * 1.5)
        torch.testing.assert_close(pipe.decode_latents(h * 1.5), vq.decode(h).sample, rtol=1e-5, atol=1e-5)

    torch.manual_seed(0)
    kl = AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        scaling_factor=0.25,
        shift_factor=0.1,
    ).eval()
    unet = tiny_resshift_unet(in_channels=4, out_channels=4, lq_size=32)  # lq: the LR image at 2x the latent size
    pipe = make_pipe(vae=kl, unet=unet)
    with torch.no_grad():
        mode = kl.encode(x).latent_dist.mode()  # the posterior's mode: y_0 is deterministic
        torch.testing.assert_close(pipe.encode_images(x), (mode - 0.1) * 0.25)
        torch.testing.assert_close(
            pipe.decode_latents((mode - 0.1) * 0.25), kl.decode(mode).sample, rtol=1e-5, atol=1e-5
        )
    assert pipe.vae_scale_factor == 2 and pipe.latent_shape(1, 5, 7) == (1, 4, 16, 16)
    out = pipe(lr_image(0, (5, 7)), generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (1, 3, 20, 28)


def test_a_diffusers_scheduler_is_refused(tmp_path):
    with pytest.raises(ValueError, match="needs a ResShiftScheduler, got DDPMScheduler"):
        ResShiftPipeline(unet=tiny_resshift_unet(), scheduler=DDPMScheduler())
    pipe = make_pipe()
    pipe.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="needs a ResShiftScheduler"):
        ResShiftPipeline.from_pretrained(tmp_path, scheduler=DDPMScheduler())
    pipe.scheduler = DDPMScheduler()  # swapped after construction: refused at call time
    with pytest.raises(ValueError, match="needs a ResShiftScheduler"):
        pipe(lr_image(0))


def test_wrong_channel_counts_are_refused():
    with pytest.raises(ValueError, match="in_channels=3, but the pixel-space chain needs 2 x 3"):
        make_pipe(unet=tiny_unet2d(in_channels=3))
    with pytest.raises(ValueError, match="out_channels=6"):
        make_pipe(unet=tiny_unet2d(out_channels=6))
    with pytest.raises(ValueError, match="in_channels=4, but the pixel-space chain needs 3"):
        make_pipe(unet=tiny_resshift_unet(in_channels=4, out_channels=4))
    vae = tiny_vq_f4()
    vae.register_to_config(latent_channels=4)  # a 4-channel latent for a 3-channel UNet
    with pytest.raises(ValueError, match="latent-space chain needs 4"):
        make_pipe(vae=vae)
    with pytest.raises(ValueError, match="cond_mask"):
        make_pipe(unet=tiny_resshift_unet(cond_mask=True))


def test_input_errors():
    pipe = make_pipe()
    image = lr_image(0)
    for steps in (0, -1, 5, 2.0):
        with pytest.raises(ValueError, match="num_inference_steps"):
            pipe(image, num_inference_steps=steps)
    with pytest.raises(ValueError, match="color_fix"):
        pipe(image, color_fix="histogram")
    with pytest.raises(ValueError, match=r"latents \(x_T\) must have shape \(1, 3, 32, 32\)"):
        pipe(image, latents=torch.zeros(1, 3, 24, 32))
    with pytest.raises(ValueError, match="2 generators for a batch of 1"):
        pipe(image, generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match="tile_size must be a positive multiple of 2"):
        pipe(image, tile_size=5)
    with pytest.raises(ValueError, match="tile_overlap"):
        pipe(image, tile_size=4, tile_overlap=4)
    with pytest.raises(ValueError, match="cannot be combined with tile_size"):
        pipe(image, tile_size=4, tile_overlap=2, latents=torch.zeros(1, 3, 32, 32))


# ----------------------------------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------------------------------


class OracleDenoiser(ModelMixin, ConfigMixin):
    """Predicts a given ``x_0`` whatever its input: the perfect denoiser for that one image."""

    @register_to_config
    def __init__(self, in_channels: int = 3, out_channels: int = 3):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device and a dtype
        self.register_buffer("x0", torch.zeros(1, out_channels, 1, 1), persistent=False)
        self.calls: list[tuple[int, tuple]] = []

    def forward(self, sample, timestep, lq=None, return_dict=True):
        assert lq is not None and lq.shape == sample.shape  # pixel space: lq is y_0
        self.calls.append((int(torch.as_tensor(timestep).reshape(-1)[0]), tuple(sample.shape)))
        return (self.x0.expand_as(sample).clone(),)


@pytest.mark.parametrize("steps", [None, 2, 1])
def test_a_perfect_denoiser_gives_back_the_hr_image_exactly(photo, steps):
    hr = torch.from_numpy(photo[:32, :40].copy()).permute(2, 0, 1)[None].float() / 255.0
    lr = imresize(hr, scale=0.25).clamp(0, 1)
    oracle = OracleDenoiser()
    oracle.x0 = hr * 2.0 - 1.0
    pipe = make_pipe(unet=oracle, scheduler=tiny_scheduler(num_train_timesteps=6))
    out = pipe(lr, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(out, hr, rtol=0, atol=1e-6)
    as_uint8 = pipe(lr, num_inference_steps=steps, output_type="np").images[0]
    np.testing.assert_array_equal((as_uint8 * 255).round().astype(np.uint8), photo[:32, :40])
    # the chain visited the expected timesteps, at the HR size
    expected = pipe.scheduler.timesteps.tolist()
    assert [t for t, _ in oracle.calls[: len(expected)]] == expected
    assert {shape for _, shape in oracle.calls} == {(1, 3, 32, 40)}


def test_fewer_steps_respace_the_chain():
    pipe = make_pipe(scheduler=tiny_scheduler(num_train_timesteps=6))
    seen: list[int] = []

    def record(pipeline, i, t, callback_kwargs):
        seen.append(int(t))
        return callback_kwargs

    image = lr_image(0)
    full = pipe(image, generator=torch.Generator().manual_seed(0), output_type="pt", callback_on_step_end=record).images
    assert seen == [5, 4, 3, 2, 1, 0] and pipe.num_timesteps == 6
    seen.clear()
    short = pipe(
        image,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        callback_on_step_end=record,
    ).images
    assert seen == [5, 2] and pipe.num_timesteps == 2  # "trailing": starts at T-1, where the prior holds
    assert short.shape == full.shape == (1, 3, 32, 32)
    assert (short - full).abs().max() > 1e-4


def test_custom_timesteps_run_that_chain():
    """``timesteps=[5, 2]`` is ``num_inference_steps=2`` of 6; ``[5, 3, 1]`` runs those steps and differs; a chain that
    is not a decreasing subset of the trained timesteps, or given with num_inference_steps, is refused."""
    pipe = make_pipe(scheduler=tiny_scheduler(num_train_timesteps=6))
    seen: list[int] = []

    def record(pipeline, i, t, callback_kwargs):
        seen.append(int(t))
        return callback_kwargs

    def run(**kwargs):
        seen.clear()
        generator = torch.Generator().manual_seed(0)
        return pipe(lr_image(0), generator=generator, output_type="pt", callback_on_step_end=record, **kwargs).images

    two = run(num_inference_steps=2)
    torch.testing.assert_close(run(timesteps=[5, 2]), two, rtol=0, atol=0)
    custom = run(timesteps=[5, 3, 1])
    assert seen == [5, 3, 1] and pipe.num_timesteps == 3 and (custom - two).abs().max() > 1e-4
    for bad in ([], [2, 5], [5, 5, 1], [6, 1], [5, -1], [5.0, 2], "52"):
        with pytest.raises(ValueError, match="timesteps must be"):
            run(timesteps=bad)
    with pytest.raises(ValueError, match="either num_inference_steps or timesteps"):
        run(num_inference_steps=2, timesteps=[5, 2])


def test_latents_override_starts_the_chain_there():
    pipe = make_pipe()
    image = lr_image(0)
    shape = pipe.latent_shape(1, 8, 8)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    a = pipe(image, latents=x_T, generator=torch.Generator().manual_seed(0), output_type="pt").images
    b = pipe(image, latents=x_T, generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = pipe(image, latents=x_T + 0.5, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert (a - c).abs().max() > 1e-4

    # the default x_T is the prior sample y_0 + kappa sqrt(eta_T) noise, with the noise drawn first
    seen = {}

    def first(pipeline, i, t, callback_kwargs):
        seen.setdefault("lr_latents", callback_kwargs["lr_latents"])
        return {}

    pipe(
        image,
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=first,
        callback_on_step_end_tensor_inputs=["lr_latents"],
    )
    y0 = resize(image * 2 - 1, size=(32, 32), mode="bicubic")
    torch.testing.assert_close(seen["lr_latents"], y0)
    # with one step (to x_0, no step noise) the generator only draws x_T: passing that x_T gives the same image
    pipe.scheduler.set_timesteps(1)
    prior = pipe.scheduler.prior_sample(y0, generator=torch.Generator().manual_seed(0))
    d = pipe(image, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="pt").images
    e = pipe(image, num_inference_steps=1, latents=prior, output_type="pt").images
    torch.testing.assert_close(d, e, rtol=0, atol=0)


def test_color_fix_options(photo):
    hr = torch.from_numpy(photo[:32, :32].copy()).permute(2, 0, 1)[None].float() / 255.0
    lr = imresize(hr, scale=0.25).clamp(0, 1)
    pipe = make_pipe(scheduler=tiny_scheduler(clip_sample=True))
    outs = {
        method: pipe(lr, color_fix=method, generator=torch.Generator().manual_seed(0), output_type="pt").images
        for method in ("none", "adain", "wavelet")
    }
    reference = resize(lr, size=(32, 32), mode="bicubic").clamp(0, 1)  # the LR image at the output size
    # the untrained model drifts; AdaIN moves each channel's mean and std to the reference's
    mean = lambda x: x.mean(dim=(-2, -1))  # noqa: E731
    std = lambda x: x.std(dim=(-2, -1))  # noqa: E731
    assert (mean(outs["none"]) - mean(reference)).abs().max() > 0.02
    torch.testing.assert_close(mean(outs["adain"]), mean(reference), rtol=0, atol=0.01)
    torch.testing.assert_close(std(outs["adain"]), std(reference), rtol=0, atol=0.02)
    # wavelet: the low frequencies come from the reference, the high ones from the model
    low = lambda x: wavelet_decomposition(x)[1]  # noqa: E731
    high = lambda x: wavelet_decomposition(x)[0]  # noqa: E731
    error_none = (low(outs["none"]) - low(reference)).abs().mean()
    error_wavelet = (low(outs["wavelet"]) - low(reference)).abs().mean()
    assert error_wavelet < 0.25 * error_none, (error_wavelet, error_none)
    assert (high(outs["wavelet"]) - high(outs["none"])).abs().mean() < 0.25 * (high(outs["none"])).abs().mean()


def test_tiled_and_untiled_sizes_and_tiled_determinism():
    pipe = make_pipe()
    image = lr_image(0, (13, 9))
    untiled = pipe(image, generator=torch.Generator().manual_seed(0), output_type="pt").images
    tiles: list[tuple] = []

    def record(pipeline, i, t, callback_kwargs):
        tiles.append(tuple(callback_kwargs["latents"].shape))
        return callback_kwargs

    tiled = pipe(
        image,
        tile_size=6,
        tile_overlap=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        callback_on_step_end=record,
    ).images
    assert untiled.shape == tiled.shape == (1, 3, 52, 36)
    # padded to 14 x 10: rows at 0, 4, 8 and columns at 0, 4; every tile runs the 4 steps at 24 x 24
    assert len(tiles) == 6 * 4 and set(tiles) == {(1, 3, 24, 24)}
    again = pipe(image, tile_size=6, tile_overlap=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    torch.testing.assert_close(again.images, tiled, rtol=0, atol=0)
    other = pipe(image, tile_size=6, tile_overlap=2, generator=torch.Generator().manual_seed(1), output_type="pt")
    assert (other.images - tiled).abs().max() > 1e-4
    # a tile as large as the image is the untiled run
    whole = pipe(
        image, tile_size=14, tile_overlap=2, generator=torch.Generator().manual_seed(0), output_type="pt"
    ).images
    torch.testing.assert_close(whole, untiled, rtol=0, atol=1e-6)
    # batches and odd sizes tile too
    batch = torch.cat([image, lr_image(1, (13, 9))])
    out = pipe(
        batch,
        tile_size=6,
        tile_overlap=2,
        generator=[torch.Generator().manual_seed(i) for i in range(2)],
        output_type="pt",
    )
    assert out.images.shape == (2, 3, 52, 36)


# ----------------------------------------------------------------------------------------------------------------------
# the reference script's defaults (issue 14: items 3 and 5): tiling, respacing, match_original
# ----------------------------------------------------------------------------------------------------------------------


def reference_extract_starts(length: int, pch_size: int, stride: int) -> list[int]:
    """``ImageSpliterTh.extract_starts`` of the reference (``utils/util_image.py``), as a formula: every ``stride``
    from 0, the starts past ``length - pch_size`` moved to it, duplicates dropped in order."""
    if length <= pch_size:
        return [0]
    starts = [min(start, length - pch_size) for start in range(0, length, stride)]
    return sorted(set(starts), key=starts.index)


def test_original_chop_and_its_tile_starts():
    from sr_diffusion.pipelines.resshift.pipeline_resshift import original_chop, original_chop_starts

    # inference_resshift.py: --chop_size 512, --chop_stride -1 -> (512 - 64) * (4 // sf), both times 4 // sf
    assert [original_chop(s) for s in (4, 2, 1, 3, 8)] == [(512, 448), (1024, 896), (2048, 1792), (512, 448)] + [
        (512, 448)
    ]
    for size, stride in ((512, 448), (256, 224), (64, 48), (8, 6), (6, 4)):
        for length in list(range(1, 3 * size)) + [2000, 2048, 4096]:
            assert original_chop_starts(length, size, stride) == reference_extract_starts(length, size, stride)
    assert original_chop_starts(512, 512, 448) == [0] and original_chop_starts(520, 512, 448) == [0, 8]
    assert original_chop_starts(1000, 512, 448) == [0, 448, 488]


def reference_tiled_run(pipe, lr: torch.Tensor, size: int, stride: int, generator) -> torch.Tensor:
    """The reference's tiled run in [0, 1] (``sampler.py``): tiles of ``size`` LR pixels at the starts of
    :func:`reference_extract_starts`, rows first, each sampled on its own (whole, with the next draws of the one
    generator), clamped, summed and divided by the number of tiles that cover each pixel."""
    n, _, h, w = lr.shape
    s = pipe.upscale
    total, count = torch.zeros(n, 3, h * s, w * s), torch.zeros(1, 1, h * s, w * s)
    for top in reference_extract_starts(h, size, stride):
        for left in reference_extract_starts(w, size, stride):
            tile = lr[..., top : top + size, left : left + size]
            th, tw = tile.shape[-2:]
            out = pipe(tile, tile_size=0, lr_consistency=False, generator=generator, output_type="pt").images
            total[..., top * s : (top + th) * s, left * s : (left + tw) * s] += out
            count[..., top * s : (top + th) * s, left * s : (left + tw) * s] += 1
    return total / count


def test_large_images_are_tiled_as_the_reference_by_default(monkeypatch):
    """tile_size=None tiles an LR image with a side above the chop size as the reference does (here with the chop
    size 8 / stride 6 instead of 512 / 448, so that a tiny image shows it): 13 x 7 -> rows at 0 and 5, one column of 7
    (padded to 8 for the UNet and cropped back); tile_size=0 samples it whole; an image of the chop size is whole."""
    import sr_diffusion.pipelines.resshift.blocks as module

    monkeypatch.setattr(module, "ORIGINAL_CHOP_SIZE", 8)
    monkeypatch.setattr(module, "ORIGINAL_CHOP_STRIDE", 6)
    pipe = make_pipe(scheduler=tiny_scheduler(clip_sample=True))
    image = lr_image(0, (13, 7))
    shapes: list[tuple] = []

    def record(pipeline, i, t, callback_kwargs):
        shapes.append(tuple(callback_kwargs["latents"].shape))
        return callback_kwargs

    auto = pipe(image, generator=torch.Generator().manual_seed(0), output_type="pt", callback_on_step_end=record)
    assert auto.images.shape == (1, 3, 52, 28)
    assert shapes == [(1, 3, 32, 32)] * 8  # 2 tiles x 4 steps, each tile 8 x 7 padded to 8 x 8
    expected = reference_tiled_run(pipe, image, 8, 6, torch.Generator().manual_seed(0))
    torch.testing.assert_close(auto.images, expected, rtol=0, atol=1e-6)  # float32 rounding of the [-1, 1] mapping

    shapes.clear()
    whole = pipe(
        image, tile_size=0, generator=torch.Generator().manual_seed(0), output_type="pt", callback_on_step_end=record
    )
    assert shapes == [(1, 3, 56, 32)] * 4 and (whole.images - auto.images).abs().max() > 1e-3
    # latents describe the whole image: no automatic tiling then
    x_T = torch.randn(pipe.latent_shape(1, 13, 7), generator=torch.Generator().manual_seed(1))
    shapes.clear()
    pipe(image, latents=x_T, output_type="pt", callback_on_step_end=record)
    assert shapes == [(1, 3, 56, 32)] * 4
    # a side of the chop size itself is not tiled (the reference tiles above it)
    small = lr_image(1, (8, 8))
    a = pipe(small, generator=torch.Generator().manual_seed(0), output_type="pt").images
    b = pipe(small, tile_size=0, generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="tile_size must be a positive multiple"):
        pipe(image, tile_size=-2)


def test_the_reference_threshold_is_an_lr_side_above_512():
    """At the real chop size: an 8 x 520 LR image runs two chains of 8 x 512 LR pixels (starts 0 and 8), an 8 x 512
    one runs one chain (a stub denoiser, so that 2048-pixel-wide HR tiles stay cheap)."""
    oracle = OracleDenoiser()
    pipe = make_pipe(unet=oracle)
    for width, chains in ((512, [(1, 3, 32, 2048)]), (520, [(1, 3, 32, 2048)] * 2)):
        oracle.calls.clear()
        out = pipe(torch.full((1, 3, 8, width), 0.5), output_type="pt").images
        assert out.shape == (1, 3, 32, 4 * width)
        torch.testing.assert_close(out, torch.full_like(out, 0.5), rtol=0, atol=1e-6)  # x_0 = 0 is grey: each tile
        assert [shape for _, shape in oracle.calls] == [shape for shape in chains for _ in range(4)]


def test_match_original_tiles_an_explicit_tile_size_as_the_reference():
    """With match_original an explicit tile_size is the reference's --chop_size, and tile_size - tile_overlap its
    --chop_stride; without it, our linear blending of the padded image (another image)."""
    pipe = make_pipe(scheduler=tiny_scheduler(clip_sample=True))
    image = lr_image(2, (13, 7))
    kwargs = {"tile_size": 6, "tile_overlap": 2, "output_type": "pt"}
    out = pipe(image, match_original=True, generator=torch.Generator().manual_seed(0), **kwargs).images
    expected = reference_tiled_run(pipe, image, 6, 4, torch.Generator().manual_seed(0))  # rows 0, 4, 7; columns 0, 1
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    ours = pipe(image, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (ours - out).abs().max() > 1e-3


def reference_respaced_sampling(
    pipe, lr: torch.Tensor, num_steps: int, generator, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The reference's sampling in pixel space with ``timestep_respacing = num_steps`` (``models/respace.py``,
    ``models/gaussian_diffusion.py``), in [0, 1], written from its formulas: ``use_timesteps = {int(T / S · x)}``; the
    spaced process keeps those ``sqrt_etas`` (``etas_prev`` and ``alpha`` recomputed on the kept ones) and gives the
    model the original timestep; ``x_T = y + kappa sqrt(eta_last) noise``; each step scales the input by
    ``3 kappa sqrt(eta) + 1`` (``latent_flag=False``), clips the predicted ``x_0`` (``clip_denoised`` in pixel space)
    and draws from the posterior (no noise on the last step); the result is clamped. ``dtype=torch.float64`` runs the
    chain and a float64 copy of the UNet in float64 (the noise is drawn in float32, as the pipeline draws it)."""
    import copy

    unet = copy.deepcopy(pipe.unet).to(dtype)
    scheduler = pipe.scheduler
    num_train, kappa = scheduler.config.num_train_timesteps, scheduler.config.kappa
    kept = sorted({int(num_train / num_steps * x) for x in range(num_steps)})
    sqrt_etas = scheduler.sqrt_etas[kept]  # float64; the base schedule is pinned in tests/test_scheduler_resshift.py
    etas = sqrt_etas**2
    etas_prev = torch.cat([torch.zeros(1, dtype=torch.float64), etas[:-1]])
    alpha = etas - etas_prev
    y = torch.nn.functional.interpolate(lr.to(dtype) * 2 - 1, scale_factor=pipe.upscale, mode="bicubic")
    x = y + (kappa * sqrt_etas[-1]).to(dtype) * torch.randn(y.shape, generator=generator).to(dtype)
    for i in reversed(range(len(kept))):
        scaled = x / (3 * kappa * sqrt_etas[i] + 1).to(dtype)
        x0 = unet(scaled, torch.tensor([kept[i]]), lq=y, return_dict=False)[0].clamp(-1, 1)
        mean = (etas_prev[i] / etas[i]).to(dtype) * x + (alpha[i] / etas[i]).to(dtype) * x0
        if i > 0:
            std = (kappa**2 * etas_prev[i] / etas[i] * alpha[i]).sqrt().to(dtype)
            x = mean + std * torch.randn(y.shape, generator=generator).to(dtype)
        else:
            x = mean
    return (x.clamp(-1, 1) + 1) / 2


@pytest.mark.parametrize("steps", [6, 4, 2])
def test_match_original_respaces_as_the_reference(steps):
    """match_original=True: num_inference_steps keeps the reference's timesteps ("leading") and samples its spaced
    process; all T steps by default whatever the pipeline's configured default; no LR consistency unless asked."""
    pipe = make_pipe(scheduler=tiny_scheduler(num_train_timesteps=6, clip_sample=True), num_inference_steps=3)
    pipe.register_to_config(lr_consistency=True)
    image = lr_image(0, (8, 8))
    seen: list[int] = []

    def record(pipeline, i, t, callback_kwargs):
        seen.append(int(t))
        return callback_kwargs

    def run(**kwargs):
        seen.clear()
        generator = torch.Generator().manual_seed(0)
        return pipe(image, generator=generator, output_type="pt", callback_on_step_end=record, **kwargs).images

    out = run(num_inference_steps=steps, match_original=True)
    assert seen == sorted({int(6 / steps * x) for x in range(steps)}, reverse=True)  # respace.space_timesteps(6, S)
    with torch.no_grad():
        exact = reference_respaced_sampling(pipe, image, steps, torch.Generator().manual_seed(0), torch.float64)
        single = reference_respaced_sampling(pipe, image, steps, torch.Generator().manual_seed(0))
    # the pipeline's float32 chain is as far from the float64 reference as a float32 run of the reference itself is
    # (rounding amplified through the steps of an untrained UNet), up to a small factor for another order of operations
    rounding = (single - exact).abs().max().item()
    assert 0 < rounding < 1e-4
    assert (out.double() - exact).abs().max() <= 4 * rounding
    if steps == 6:
        torch.testing.assert_close(run(match_original=True), out, rtol=0, atol=0)  # all T by default
        assert seen == [5, 4, 3, 2, 1, 0]
    else:
        ours = run(num_inference_steps=steps, lr_consistency=False)  # "trailing": starts at T - 1
        assert seen[0] == 5 and seen != sorted({int(6 / steps * x) for x in range(steps)}, reverse=True)
        assert (ours - out).abs().max() > 1e-3
    with pytest.raises(ValueError, match="match_original must be a bool"):
        run(match_original="yes")


def test_runs_under_autocast():
    """The reference samples under fp16 autocast (``use_amp=True``); the README's way to do the same is to call the
    pipeline under ``torch.autocast``. On the CPU (bfloat16) here: it runs, returns float32, and autocast was used."""
    pipe = make_pipe(vae=tiny_vq_f4(), scheduler=tiny_scheduler(input_scaling="std"))
    image = lr_image(0, (8, 8))
    full = pipe(image, generator=torch.Generator().manual_seed(0), output_type="pt").images
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = pipe(image, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert mixed.dtype == torch.float32 and mixed.shape == full.shape and torch.isfinite(mixed).all()
    assert (mixed - full).abs().max() > 0  # bfloat16 matmuls and convolutions
