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
