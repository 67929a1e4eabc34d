"""SR3Pipeline: the shared pipeline checks, then SR3's own: the noise level the UNet sees, a perfect denoiser
recovers the HR image, strength, swapped schedulers, tiling, component and input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    ConfigMixin,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    ModelMixin,
    UNet2DModel,
)
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput
from pipeline_common import SRPipelineTesterMixin

from sr_diffusion.models.sr3_unet import SR3UNet
from sr_diffusion.pipelines import AutoSRPipeline, SR3Pipeline
from sr_diffusion.schedulers import ResShiftScheduler

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


# ----------------------------------------------------------------------------------------------------------------------
# tiny components
# ----------------------------------------------------------------------------------------------------------------------


def tiny_unet(in_channels: int = 6, out_channels: int = 3) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=32,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval()


def tiny_sr3unet(in_channel: int = 6) -> SR3UNet:
    """The re-implementation's UNet (what converted checkpoints hold), attention at the 8x8 level."""
    torch.manual_seed(0)
    return SR3UNet(
        in_channel=in_channel,
        inner_channel=16,
        norm_groups=8,
        channel_mults=(1, 2),
        attn_res=(8,),
        res_blocks=1,
        dropout=0.0,
        image_size=16,
    ).eval()


def tiny_components() -> dict:
    return {"unet": tiny_unet(), "scheduler": DDPMScheduler(num_train_timesteps=50)}


def lr_image(seed: int, size=(8, 8)) -> torch.Tensor:
    """A smooth random LR image (1, 3, h, w) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 3, 3, generator=g)
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=True).clamp(0, 1)


def original_condition(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """The re-implementation's condition for an LR image ``(N, 3, h, w)`` in [0, 1], in [-1, 1]: its
    ``data/prepare_data.py`` resizes the 8-bit RGB LR image with ``Image.BICUBIC`` (torchvision's ``resize`` of a PIL
    image is ``Image.resize``), and ``data/LRHR_dataset.py`` reads it back with ``ToTensor()`` (``k / 255``) and
    ``x * 2 - 1``. Here on whole RGB images, as there (our pipeline resizes band by band)."""
    from PIL import Image

    h, w = lr.shape[-2:]
    out = []
    for image in lr:
        rgb = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        up = Image.fromarray(rgb, mode="RGB").resize((w * scale, h * scale), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(up).copy()).permute(2, 0, 1).float().div(255))
    return torch.stack(out) * 2 - 1


def make_pipe(**components) -> SR3Pipeline:
    pipe = SR3Pipeline(**{**tiny_components(), **components})
    pipe.set_progress_bar_config(disable=True)
    return pipe


class EpsOracle(ModelMixin, ConfigMixin):
    """A stub denoiser that knows the clean HR image ``y_0`` (in [-1, 1]): from ``y_t`` and the noise level
    ``gamma = timestep / noise_level_scale`` it returns the true noise ``(y_t - gamma y_0) / sqrt(1 - gamma^2)``.
    ``y_0 = None`` returns zeros. Every timestep it is called with is recorded in ``seen``."""

    @register_to_config
    def __init__(self, in_channels: int = 6, out_channels: int = 3, noise_level_scale: float = 1000.0):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # ModelMixin reads dtype/device from a parameter
        self.y0: torch.Tensor | None = None
        self.seen: list[torch.Tensor] = []

    def forward(self, sample, timestep, return_dict: bool = True):
        self.seen.append(timestep.detach().clone())
        y_t = sample[:, 3:]
        if self.y0 is None:
            eps = torch.zeros_like(y_t)
        else:
            gamma = (timestep.float() / self.config.noise_level_scale).view(-1, 1, 1, 1)
            eps = (y_t - gamma * self.y0) / (1 - gamma**2).sqrt()
        return UNet2DOutput(sample=eps) if return_dict else (eps,)


class TestSR3Pipeline(SRPipelineTesterMixin):
    pipeline_class = SR3Pipeline

    def get_dummy_components(self) -> dict:
        return tiny_components()

    def get_dummy_inputs(self, seed: int = 0) -> dict:
        return {"image": lr_image(seed), "generator": torch.Generator().manual_seed(seed), "num_inference_steps": 2}


class TestSR3PipelineWithSR3UNet(TestSR3Pipeline):
    """The same checks with the re-implementation's :class:`SR3UNet` fed the raw noise level (``c = 1``), as a
    converted checkpoint runs (:mod:`sr_diffusion.conversion.sr3`)."""

    def get_dummy_components(self) -> dict:
        return {"unet": tiny_sr3unet(), "scheduler": DDPMScheduler(num_train_timesteps=50), "noise_level_scale": 1.0}


# ----------------------------------------------------------------------------------------------------------------------
# SR3's conditioning and sampler
# ----------------------------------------------------------------------------------------------------------------------


def test_geometry_and_config():
    pipe = make_pipe()
    assert (pipe.upscale, pipe.noise_level_scale, pipe.unet_input_multiple, pipe.lr_multiple) == (4, 1000.0, 2, 1)
    assert pipe.latent_shape(2, 5, 7) == (2, 3, 20, 28)
    pipe = make_pipe(upscale=3, noise_level_scale=500)
    assert (pipe.config.upscale, pipe.config.noise_level_scale, pipe.lr_multiple) == (3, 500.0, 2)
    assert pipe.latent_shape(1, 5, 7) == (1, 3, 18, 24)


@pytest.mark.parametrize("noise_level_scale", [1000.0, 1.0])
def test_the_unet_sees_the_scaled_noise_level_not_the_step(noise_level_scale):
    oracle = EpsOracle(noise_level_scale=noise_level_scale)
    scheduler = DDPMScheduler(num_train_timesteps=50)
    pipe = make_pipe(unet=oracle, scheduler=scheduler, noise_level_scale=noise_level_scale)
    pipe(lr_image(0, (3, 5)), num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="pt")
    timesteps = pipe.scheduler.timesteps
    assert timesteps.tolist() == [40, 30, 20, 10, 0]
    expected = noise_level_scale * scheduler.alphas_cumprod[timesteps].sqrt()
    seen = torch.stack([s for s in oracle.seen])
    assert seen.shape == (5, 1) and seen.dtype == torch.float32
    torch.testing.assert_close(seen[:, 0], expected.float(), rtol=1e-6, atol=1e-6)
    # strength 0.6 of 5 steps: the last 3 timesteps
    oracle.seen.clear()
    pipe(lr_image(0, (3, 5)), num_inference_steps=5, strength=0.6, output_type="pt")
    torch.testing.assert_close(torch.stack(oracle.seen)[:, 0], expected[2:].float(), rtol=1e-6, atol=1e-6)


def test_the_unet_sees_the_upsampled_lr_image_and_y_t():
    pipe = make_pipe()
    seen = {}

    def record(module, args):
        seen.setdefault("input", args[0])

    pipe.unet.register_forward_pre_hook(record)
    image = lr_image(0, (5, 6))
    pipe(image, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert seen["input"].shape == (1, 6, 20, 24)
    # the condition first, as the re-implementation, made as its data pipeline makes it: exactly
    torch.testing.assert_close(seen["input"][:, :3], original_condition(image, 4), rtol=0, atol=0)
    y_T = torch.randn(1, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(seen["input"][:, 3:], y_T)


@pytest.mark.parametrize(
    ("scheduler", "kwargs"),
    [
        (DDPMScheduler(num_train_timesteps=50), {"num_inference_steps": 50}),
        (DDPMScheduler(num_train_timesteps=50), {"num_inference_steps": 5}),
        (DDIMScheduler(num_train_timesteps=50), {"num_inference_steps": 4}),
        (DDIMScheduler(num_train_timesteps=50), {"num_inference_steps": 4, "eta": 1.0}),
        (DDIMScheduler(num_train_timesteps=50), {"num_inference_steps": 5, "strength": 0.6}),
    ],
    ids=["ddpm-all", "ddpm-5", "ddim-4", "ddim-eta1", "ddim-strength"],
)
def test_a_perfect_denoiser_returns_the_hr_image(scheduler, kwargs):
    """With the true noise at every step the chain ends at y_0 (DDPM's posterior, DDIM's update), whatever the
    start (pure noise, or the noised upsampled LR image)."""
    hr = lr_image(3, (16, 20)) * 0.9 + 0.05
    oracle = EpsOracle()
    oracle.y0 = hr * 2 - 1
    pipe = make_pipe(unet=oracle, scheduler=scheduler)
    out = pipe(lr_image(0, (4, 5)), generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images
    torch.testing.assert_close(out, hr, rtol=0, atol=1e-4)


def test_strength_runs_fewer_steps_and_one_is_the_default():
    pipe = make_pipe(scheduler=DDIMScheduler(num_train_timesteps=50))
    image = lr_image(0, (5, 6))
    steps = []

    def count(pipeline, i, t, callback_kwargs):
        steps.append(int(t))
        return callback_kwargs

    def run(**kwargs):
        generator = torch.Generator().manual_seed(0)
        return pipe(image, num_inference_steps=5, generator=generator, output_type="pt", **kwargs).images

    default = run(callback_on_step_end=count)
    assert steps == [40, 30, 20, 10, 0] and pipe.num_timesteps == 5
    torch.testing.assert_close(run(strength=1.0), default, rtol=0, atol=0)
    steps.clear()
    partial = run(strength=0.5, callback_on_step_end=count)
    assert steps == [10, 0] and pipe.num_timesteps == 2
    assert (partial - default).abs().max() > 1e-4


def test_strength_starts_from_the_noised_upsampled_lr_image():
    """latents = the noise: strength < 1 starts at sqrt(ab_t) x + sqrt(1 - ab_t) noise, strength 1 at the noise."""
    scheduler = DDIMScheduler(num_train_timesteps=50)
    pipe = make_pipe(scheduler=scheduler)
    image = lr_image(0, (5, 6))
    noise = torch.randn(pipe.latent_shape(1, 5, 6), generator=torch.Generator().manual_seed(1))
    seen = []
    pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0][:, 3:]))
    pipe(image, num_inference_steps=5, strength=0.4, latents=noise, output_type="pt")
    x = original_condition(image, 4)
    ab = scheduler.alphas_cumprod[10]
    torch.testing.assert_close(seen[0], ab.sqrt() * x + (1 - ab).sqrt() * noise)
    seen.clear()
    pipe(image, num_inference_steps=5, latents=noise, output_type="pt")
    torch.testing.assert_close(seen[0], noise)


@pytest.mark.parametrize(
    "scheduler",
    [
        DDIMScheduler(num_train_timesteps=50),
        EulerDiscreteScheduler(num_train_timesteps=50),
        DPMSolverMultistepScheduler(num_train_timesteps=50),
    ],
    ids=lambda s: type(s).__name__,
)
def test_swapped_diffusers_schedulers(scheduler, tmp_path):
    pipe = make_pipe()
    pipe.scheduler = scheduler.__class__.from_config(scheduler.config)
    image = lr_image(0, (5, 6))
    a = pipe(image, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    b = pipe(image, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert a.shape == (1, 3, 20, 24) and torch.isfinite(a).all() and pipe.num_timesteps == 3
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    pipe.save_pretrained(tmp_path)
    assert type(AutoSRPipeline.from_pretrained(tmp_path).scheduler) is type(scheduler)


# ----------------------------------------------------------------------------------------------------------------------
# the re-implementation's defaults (issue 14: items 1 and 5)
# ----------------------------------------------------------------------------------------------------------------------


def test_the_condition_is_pil_bicubic_on_the_8_bit_image_as_the_original(photo_tensor):
    """sr3_upsample's default is the re-implementation's condition to the bit, for 8-bit photos (edges: where PIL's
    fixed-point bicubic and torch's float bicubic differ most) and for float images (quantised first), at x4 and x3;
    torch's bicubic is several 8-bit levels away from it, so the test tells them apart."""
    from sr_diffusion.pipelines.sr3.pipeline_sr3 import sr3_upsample

    photos = torch.cat([photo_tensor[..., 10:34, 30:50], photo_tensor[..., 50:74, 90:110]])  # (2, 3, 24, 20), 8-bit
    smooth = lr_image(1, (7, 9))  # not 8-bit
    for lr, scale in ((photos, 4), (photos, 3), (smooth, 4)):
        x = sr3_upsample(lr * 2 - 1, scale)
        assert x.shape == (lr.shape[0], 3, lr.shape[-2] * scale, lr.shape[-1] * scale) and x.dtype == torch.float32
        torch.testing.assert_close(x, original_condition(lr, scale), rtol=0, atol=0)
    torch_bicubic = sr3_upsample(photos * 2 - 1, 4, mode="bicubic")
    torch.testing.assert_close(
        torch_bicubic, torch.nn.functional.interpolate(photos * 2 - 1, scale_factor=4, mode="bicubic"), rtol=0, atol=0
    )
    levels = (torch_bicubic - original_condition(photos, 4)).abs().max() * 255 / 2
    assert levels > 3, levels
    with pytest.raises(ValueError, match="mode must be one of"):
        sr3_upsample(photos, 4, mode="matlab_bicubic")


def test_num_inference_steps_default_and_match_original():
    """None runs 100 steps (at most T); match_original=True runs all T trained steps, as the original (2000 for its
    configs); a number is used as given, and match_original changes nothing else."""
    oracle = EpsOracle()
    image = lr_image(0, (3, 5))

    def steps(scheduler, **kwargs):
        pipe = make_pipe(unet=oracle, scheduler=scheduler)
        out = pipe(image, generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images
        return pipe.num_timesteps, pipe.scheduler.timesteps.tolist(), out

    long_schedule = DDPMScheduler(num_train_timesteps=200)
    assert steps(long_schedule)[0] == 100
    n, timesteps, _ = steps(long_schedule, match_original=True)
    assert n == 200 and timesteps == list(range(199, -1, -1))  # every trained step, as the original's p_sample_loop
    assert steps(DDPMScheduler(num_train_timesteps=50))[0] == 50  # fewer trained steps than 100: all of them
    (n_a, _, a), (n_b, _, b) = (
        steps(long_schedule, num_inference_steps=7),
        steps(long_schedule, num_inference_steps=7, match_original=True),
    )
    assert n_a == n_b == 7 and torch.equal(a, b)
    with pytest.raises(ValueError, match="match_original must be a bool"):
        make_pipe()(image, num_inference_steps=2, match_original=1)


def test_tiled_and_untiled():
    pipe = make_pipe(scheduler=DDIMScheduler(num_train_timesteps=50))
    image = lr_image(0, (13, 9))
    kwargs = {"num_inference_steps": 1, "output_type": "pt"}
    untiled = pipe(image, generator=torch.Generator().manual_seed(0), **kwargs).images
    tiles = []

    def record(pipeline, i, t, callback_kwargs):
        tiles.append(tuple(callback_kwargs["latents"].shape))
        return callback_kwargs

    tiled = pipe(
        image,
        tile_size=6,
        tile_overlap=2,
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=record,
        **kwargs,
    ).images
    assert untiled.shape == tiled.shape == (1, 3, 52, 36)
    assert len(tiles) == 6 and set(tiles) == {(1, 3, 24, 24)}  # rows at 0, 4, 7; columns at 0, 3 of the 13 x 9 image
    whole = pipe(image, tile_size=13, tile_overlap=2, generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(whole, untiled, rtol=0, atol=1e-6)


def test_color_fix_runs():
    pipe = make_pipe()
    for method in ("adain", "wavelet"):
        out = pipe(lr_image(0), num_inference_steps=1, color_fix=method, output_type="pt").images
        assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------------------


def test_incompatible_components_are_refused():
    with pytest.raises(ValueError, match="in_channels=3, but SR3 needs 6"):
        make_pipe(unet=tiny_unet(in_channels=3))
    with pytest.raises(ValueError, match="in_channels=3, but SR3 needs 6"):
        make_pipe(unet=tiny_sr3unet(in_channel=3))
    with pytest.raises(ValueError, match="out_channels=6"):
        make_pipe(unet=tiny_unet(out_channels=6))
    with pytest.raises(ValueError, match="ends its chain at the LR image"):
        make_pipe(scheduler=ResShiftScheduler(num_train_timesteps=4))
    with pytest.raises(ValueError, match="prediction_type='epsilon'"):
        make_pipe(scheduler=DDPMScheduler(num_train_timesteps=50, prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="upscale"):
        make_pipe(upscale=0)
    with pytest.raises(ValueError, match="noise_level_scale"):
        make_pipe(noise_level_scale=0.0)


def test_input_errors():
    pipe = make_pipe()
    image = lr_image(0)
    for steps in (0, -1, 51, 2.0):
        with pytest.raises(ValueError, match="num_inference_steps must be an int between 1 and"):
            pipe(image, num_inference_steps=steps)
    for strength in (0.0, -0.5, 1.5, "0.5", True):
        with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\]"):
            pipe(image, num_inference_steps=2, strength=strength)
    with pytest.raises(ValueError, match="runs no step"):
        pipe(image, num_inference_steps=2, strength=0.4)
    with pytest.raises(ValueError, match="eta"):
        pipe(image, num_inference_steps=2, eta=-1.0)
    with pytest.raises(ValueError, match="color_fix"):
        pipe(image, num_inference_steps=2, color_fix="histogram")
    with pytest.raises(ValueError, match=r"latents \(the noise\) must have shape \(1, 3, 32, 32\)"):
        pipe(image, num_inference_steps=2, latents=torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="2 generators for a batch of 1"):
        pipe(image, num_inference_steps=2, generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match="tile_overlap"):
        pipe(image, num_inference_steps=2, tile_size=4, tile_overlap=4)
    with pytest.raises(ValueError, match="cannot be combined with tile_size"):
        pipe(image, num_inference_steps=2, tile_size=4, tile_overlap=2, latents=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="float images must have values in"):
        pipe(image * 2 - 1, num_inference_steps=2)
