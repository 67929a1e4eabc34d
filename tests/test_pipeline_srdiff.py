"""SRDiffPipeline: the shared pipeline checks, then SRDiff's own: what the UNet is fed (x_T, the step, the RRDB
features, up(x_L)), a perfect denoiser recovers the HR image through the residual, the cosine schedule, swapped
schedulers, tiling, component and input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from pipeline_common import SRPipelineTesterMixin

from sr_diffusion.models import RRDBNet, SRDiffUNet
from sr_diffusion.models.srdiff_unet import SRDiffUNetOutput
from sr_diffusion.pipelines import AutoSRPipeline, SRDiffPipeline
from sr_diffusion.pipelines.srdiff.pipeline_srdiff import srdiff_betas, srdiff_scheduler
from sr_diffusion.resize import imresize
from sr_diffusion.schedulers import ResShiftScheduler

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


# ----------------------------------------------------------------------------------------------------------------------
# tiny components
# ----------------------------------------------------------------------------------------------------------------------


def tiny_unet(**overrides) -> SRDiffUNet:
    torch.manual_seed(0)
    kwargs = {"dim": 16, "dim_mults": (1, 2), "cond_dim": 8, "rrdb_num_block": 2, "use_attn": True, **overrides}
    return SRDiffUNet(**kwargs).eval()


def tiny_rrdb(**overrides) -> RRDBNet:
    torch.manual_seed(1)
    return RRDBNet(**{"num_feat": 8, "num_block": 2, "num_grow_ch": 4, **overrides}).eval()


def tiny_components() -> dict:
    return {"unet": tiny_unet(), "rrdb": tiny_rrdb(), "scheduler": srdiff_scheduler(100)}


def lr_image(seed: int, size=(8, 8)) -> torch.Tensor:
    """A smooth random LR image (1, 3, h, w) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 3, 3, generator=g)
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=True).clamp(0, 1)


def make_pipe(**components) -> SRDiffPipeline:
    pipe = SRDiffPipeline(**{**tiny_components(), **components})
    pipe.set_progress_bar_config(disable=True)
    return pipe


class EpsOracle(SRDiffUNet):
    """A stub noise predictor that knows the HR image ``x_H`` (in [-1, 1]): from ``x_t``, ``alpha_bar_t`` and the
    ``img_lr_up`` it is given it returns the true noise of the residual ``x_0 = 2 (x_H - up(x_L))``. It records every
    call's inputs in ``seen``."""

    def __init__(self, alphas_cumprod: torch.Tensor, **kwargs):
        super().__init__(**{"dim": 8, "dim_mults": (1, 2), "cond_dim": 8, "rrdb_num_block": 2, **kwargs})
        self.alphas_cumprod = alphas_cumprod
        self.hr: torch.Tensor | None = None
        self.seen: list[dict] = []

    def forward(self, sample, timestep, cond_features, img_lr_up=None, return_dict=True):
        self.seen.append({"sample": sample, "timestep": timestep, "cond": cond_features, "img_lr_up": img_lr_up})
        ab = self.alphas_cumprod[int(timestep)]
        x0 = (self.hr - img_lr_up) * 2.0
        eps = (sample - ab.sqrt() * x0) / (1 - ab).sqrt()
        return SRDiffUNetOutput(sample=eps) if return_dict else (eps,)


class TestSRDiffPipeline(SRPipelineTesterMixin):
    pipeline_class = SRDiffPipeline

    def get_dummy_components(self) -> dict:
        return tiny_components()

    def get_dummy_inputs(self, seed: int = 0) -> dict:
        return {"image": lr_image(seed), "generator": torch.Generator().manual_seed(seed), "num_inference_steps": 2}


# ----------------------------------------------------------------------------------------------------------------------
# the schedule
# ----------------------------------------------------------------------------------------------------------------------


def test_the_scheduler_is_srdiffs_cosine_schedule():
    """diffusers' squaredcos_cap_v2 equals the original's cosine_beta_schedule(s=0.008) with its 0.999 clip."""
    T = 100
    steps = T + 1
    x = np.linspace(0, steps, steps)  # the original's cosine_beta_schedule, literally
    ac = np.cos(((x / steps) + 0.008) / (1 + 0.008) * np.pi * 0.5) ** 2
    ac = ac / ac[0]
    original = np.clip(1 - (ac[1:] / ac[:-1]), a_min=0, a_max=0.999)
    np.testing.assert_allclose(srdiff_betas(T), original, rtol=0, atol=1e-12)
    scheduler = srdiff_scheduler(T)
    assert scheduler.config.beta_schedule == "squaredcos_cap_v2" and scheduler.config.trained_betas is None
    for cls in (DDPMScheduler, DDIMScheduler):  # the config alone rebuilds it (save_pretrained, swaps)
        rebuilt = cls.from_config(scheduler.config)
        assert rebuilt.config.num_train_timesteps == T and torch.equal(rebuilt.betas, scheduler.betas)
    assert torch.equal(scheduler.betas, torch.tensor(original, dtype=torch.float32))
    assert scheduler.betas[-1] == torch.tensor(0.999) and scheduler.config.clip_sample
    assert (scheduler.config.variance_type, scheduler.config.prediction_type) == ("fixed_small", "epsilon")
    original_ac = torch.tensor(np.cumprod(1 - original), dtype=torch.float32)
    torch.testing.assert_close(scheduler.alphas_cumprod, original_ac, rtol=0, atol=3e-7)
    # another s, and the linear schedule (last beta 0.999), go in as trained_betas
    other = srdiff_scheduler(T, beta_s=0.02)
    assert other.config.trained_betas is not None and not torch.equal(other.betas, scheduler.betas)
    linear = srdiff_scheduler(50, beta_schedule="linear", beta_end=0.02)
    assert linear.betas[0] == torch.tensor(1e-4) and linear.betas[-1] == torch.tensor(0.999)
    torch.testing.assert_close(linear.betas[-2], torch.tensor(1e-4 + 48 * (0.02 - 1e-4) / 49))
    with pytest.raises(ValueError, match="beta_schedule"):
        srdiff_betas(10, "quad")


# ----------------------------------------------------------------------------------------------------------------------
# what the UNet is fed, and the sampler
# ----------------------------------------------------------------------------------------------------------------------


def test_geometry_and_config():
    pipe = make_pipe()
    assert (pipe.upscale, pipe.lr_multiple, pipe.unet.input_multiple) == (4, 1, 2)
    assert pipe.latent_shape(2, 5, 7) == (2, 3, 20, 28)
    assert dict(pipe.config)["res_rescale"] == 2.0 and pipe.config.clip_input and pipe.config.lr_up_gain == 1.0
    pipe = make_pipe(unet=tiny_unet(sr_scale=8), rrdb=tiny_rrdb(scale=8))
    assert (pipe.upscale, pipe.lr_multiple) == (8, 1) and pipe.latent_shape(1, 5, 7) == (1, 3, 40, 56)
    pipe = make_pipe(unet=tiny_unet(dim_mults=(1, 1, 1, 1, 1)))  # x_t must divide by 16: the LR by 4
    assert pipe.lr_multiple == 4 and pipe.latent_shape(1, 5, 7) == (1, 3, 32, 32)
    out = pipe(lr_image(0, (5, 7)), num_inference_steps=1, output_type="pt").images
    assert out.shape == (1, 3, 20, 28)


def test_the_unet_sees_x_T_the_step_the_rrdb_features_and_the_upsampled_lr():
    scheduler = srdiff_scheduler(100)
    oracle = EpsOracle(scheduler.alphas_cumprod)
    oracle.hr = torch.zeros(1, 3, 20, 24)
    pipe = make_pipe(unet=oracle, scheduler=scheduler, lr_up_gain=255 / 256)
    image = lr_image(0, (5, 6))
    pipe(image, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert [int(s["timestep"]) for s in oracle.seen] == [75, 50, 25, 0]  # DDPM, "leading" spacing
    first = oracle.seen[0]
    torch.testing.assert_close(first["sample"], torch.randn(1, 3, 20, 24, generator=torch.Generator().manual_seed(0)))
    features = pipe.rrdb(image, output_hidden_states=True).hidden_states  # x_e: the encoder on x_L in [0, 1]
    assert len(first["cond"]) == 3
    for a, b in zip(first["cond"], features):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # up(x_L): MATLAB bicubic of the [0, 1] image times lr_up_gain, in [-1, 1]
    torch.testing.assert_close(first["img_lr_up"], imresize(image * 255 / 256, scale=4) * 2 - 1)


@pytest.mark.parametrize(
    ("scheduler", "kwargs"),
    [
        (srdiff_scheduler(100), {"num_inference_steps": 100}),
        (srdiff_scheduler(100), {"num_inference_steps": 7}),
        (DDIMScheduler.from_config(srdiff_scheduler(100).config), {"num_inference_steps": 5}),
        (DDIMScheduler.from_config(srdiff_scheduler(100).config), {"num_inference_steps": 5, "eta": 1.0}),
        (srdiff_scheduler(100), {"num_inference_steps": 10, "strength": 0.4}),
    ],
    ids=["ddpm-all", "ddpm-7", "ddim-5", "ddim-eta1", "ddpm-strength"],
)
def test_a_perfect_denoiser_returns_the_hr_image(scheduler, kwargs):
    """With the true noise of the residual at every step the chain ends at x_0 = 2 (x_H - up(x_L)), and the pipeline
    adds up(x_L) back: the output is x_H."""
    image = lr_image(0, (4, 5))
    up01 = imresize(image, scale=4)
    detail = torch.sin(torch.arange(16.0)[:, None] + torch.arange(20.0)[None, :]) * 0.1
    hr = (up01 + detail).clamp(0.02, 0.98)
    oracle = EpsOracle(scheduler.alphas_cumprod)
    oracle.hr = hr * 2 - 1
    pipe = make_pipe(unet=oracle, scheduler=scheduler)
    out = pipe(image, generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images
    torch.testing.assert_close(out, hr, rtol=0, atol=2e-4)
    assert len(oracle.seen) == int(kwargs["num_inference_steps"] * kwargs.get("strength", 1)) == pipe.num_timesteps


def test_strength_starts_from_the_noised_upsampled_lr_image():
    """strength < 1: the last int(S · strength) steps, from the zero residual (x_H = up(x_L)) noised to the first,
    x_t = sqrt(1 - alpha_bar_t) · noise; strength 1 (the default): from x_T = the noise."""
    scheduler = DDIMScheduler.from_config(srdiff_scheduler(100).config)
    oracle = EpsOracle(scheduler.alphas_cumprod)
    oracle.hr = torch.zeros(1, 3, 20, 24)
    pipe = make_pipe(unet=oracle, scheduler=scheduler)
    noise = torch.randn(pipe.latent_shape(1, 5, 6), generator=torch.Generator().manual_seed(1))
    pipe(lr_image(0, (5, 6)), num_inference_steps=10, strength=0.3, latents=noise, output_type="pt")
    assert [int(s["timestep"]) for s in oracle.seen] == [20, 10, 0] and pipe.num_timesteps == 3
    torch.testing.assert_close(oracle.seen[0]["sample"], (1 - scheduler.alphas_cumprod[20]).sqrt() * noise)
    oracle.seen.clear()
    pipe(lr_image(0, (5, 6)), num_inference_steps=10, latents=noise, output_type="pt")
    assert len(oracle.seen) == 10 and torch.equal(oracle.seen[0]["sample"], noise)


def test_the_residual_is_clipped_and_rescaled():
    """x_H = clip(x_0) / res_rescale + up(x_L): with a zero-noise oracle on a pure-noise x_0 the residual saturates."""
    scheduler = srdiff_scheduler(100)
    image = lr_image(0, (4, 4))
    up = imresize(image, scale=4) * 2 - 1
    for res_rescale in (2.0, 4.0):
        oracle = EpsOracle(scheduler.alphas_cumprod)
        oracle.hr = up + 10.0  # x_0 = 20 · ... far outside [-1, 1]: clipped to 1 at every step
        pipe = make_pipe(unet=oracle, scheduler=scheduler, res_rescale=res_rescale)
        out = pipe(image, num_inference_steps=3, output_type="pt").images
        torch.testing.assert_close(out, ((up + 1.0 / res_rescale).clamp(-1, 1) + 1) / 2, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "scheduler_cls", [DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler], ids=lambda c: c.__name__
)
def test_swapped_diffusers_schedulers(scheduler_cls, tmp_path):
    pipe = make_pipe()
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    image = lr_image(0, (5, 6))
    a = pipe(image, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    b = pipe(image, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert a.shape == (1, 3, 20, 24) and torch.isfinite(a).all() and pipe.num_timesteps == 3
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    pipe.save_pretrained(tmp_path)
    loaded = AutoSRPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is scheduler_cls
    torch.testing.assert_close(loaded.scheduler.betas, pipe.scheduler.betas, rtol=0, atol=0)


def test_tiled_and_untiled():
    pipe = make_pipe(scheduler=DDIMScheduler.from_config(srdiff_scheduler(100).config))
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
    assert len(tiles) == 6 and set(tiles) == {(1, 3, 24, 24)}  # rows at 0, 4, 7; columns at 0, 3
    whole = pipe(image, tile_size=13, tile_overlap=2, generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(whole, untiled, rtol=0, atol=1e-6)


def test_color_fix_and_the_img_lr_up_callback():
    pipe = make_pipe()
    for method in ("adain", "wavelet"):
        out = pipe(lr_image(0), num_inference_steps=1, color_fix=method, output_type="pt").images
        assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()

    def brighten(pipeline, i, t, callback_kwargs):
        return {"img_lr_up": callback_kwargs["img_lr_up"] + 0.5}

    kwargs = {"num_inference_steps": 1, "output_type": "pt", "generator": torch.Generator().manual_seed(0)}
    ref = pipe(lr_image(0), **kwargs).images
    kwargs["generator"] = torch.Generator().manual_seed(0)
    out = pipe(
        lr_image(0), callback_on_step_end=brighten, callback_on_step_end_tensor_inputs=["img_lr_up"], **kwargs
    ).images
    assert (out - ref).mean() > 0.1  # up(x_L) is added back after the loop: the callback's value is used


# ----------------------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------------------


def test_incompatible_components_are_refused():
    from diffusers import UNet2DModel

    with pytest.raises(ValueError, match="unet must be an SRDiffUNet"):
        blocks = {"down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2}
        make_pipe(unet=UNet2DModel(block_out_channels=(32, 64), norm_num_groups=8, **blocks))
    with pytest.raises(ValueError, match="rrdb must be an RRDBNet"):
        make_pipe(rrdb=tiny_unet())
    with pytest.raises(ValueError, match="out_dim=6"):
        make_pipe(unet=tiny_unet(out_dim=6))
    with pytest.raises(ValueError, match="pixel-unshuffles"):
        make_pipe(unet=tiny_unet(sr_scale=2), rrdb=tiny_rrdb(scale=2))
    with pytest.raises(ValueError, match="rrdb is x8 but unet has sr_scale=4"):
        make_pipe(rrdb=tiny_rrdb(scale=8))
    with pytest.raises(ValueError, match="num_feat=16, num_block=2, but unet expects cond_dim=8"):
        make_pipe(rrdb=tiny_rrdb(num_feat=16))
    with pytest.raises(ValueError, match="ends its chain at the LR image"):
        make_pipe(scheduler=ResShiftScheduler(num_train_timesteps=4))
    with pytest.raises(ValueError, match="prediction_type='epsilon'"):
        make_pipe(scheduler=DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction"))
    for kwargs in ({"res_rescale": 0.0}, {"lr_up_gain": -1.0}, {"res_rescale": True}, {"clip_input": 1}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            make_pipe(**kwargs)


def test_input_errors():
    pipe = make_pipe()
    image = lr_image(0)
    for steps in (0, -1, 101, 2.0, None):
        with pytest.raises(ValueError, match="num_inference_steps must be an int between 1 and"):
            pipe(image, num_inference_steps=steps)
    with pytest.raises(ValueError, match="eta"):
        pipe(image, num_inference_steps=2, eta=-1.0)
    for strength in (0.0, -0.5, 1.5, "0.5", True):
        with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\]"):
            pipe(image, num_inference_steps=2, strength=strength)
    with pytest.raises(ValueError, match="runs no step"):
        pipe(image, num_inference_steps=2, strength=0.4)
    with pytest.raises(ValueError, match="color_fix"):
        pipe(image, num_inference_steps=2, color_fix="histogram")
    with pytest.raises(ValueError, match=r"latents \(x_T\) must have shape \(1, 3, 32, 32\)"):
        pipe(image, num_inference_steps=2, latents=torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="2 generators for a batch of 1"):
        pipe(image, num_inference_steps=2, generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match="tile_overlap"):
        pipe(image, num_inference_steps=2, tile_size=4, tile_overlap=4)
    with pytest.raises(ValueError, match="cannot be combined with tile_size"):
        pipe(image, num_inference_steps=2, tile_size=4, tile_overlap=2, latents=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="float images must have values in"):
        pipe(image * 2 - 1, num_inference_steps=2)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(image, num_inference_steps=2, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["x"])
