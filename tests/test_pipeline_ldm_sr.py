"""LDMSRPipeline: the shared pipeline checks, equivalence with diffusers' ``LDMSuperResolutionPipeline`` on inputs it
does not resize, then LDM-SR's own: any size at exactly ×4, tiling, swapped schedulers, component and input errors."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LDMSuperResolutionPipeline,
    UNet2DModel,
    VQModel,
)
from pipeline_common import SRPipelineTesterMixin

from sr_diffusion.pipelines import AutoSRPipeline, LDMSRPipeline
from sr_diffusion.schedulers import ResShiftScheduler


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one intra-op thread (and do not stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------------
# tiny components
# ----------------------------------------------------------------------------------------------------------------------


def tiny_vq_f4(latent_channels: int = 3) -> VQModel:
    """Three levels, so ×4 down like the released VQ-f4: the latent of the HR image has the LR image's size."""
    torch.manual_seed(0)
    return VQModel(
        block_out_channels=(8, 8, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=latent_channels,
        num_vq_embeddings=64,
        vq_embed_dim=latent_channels,
    ).eval()


def tiny_unet(in_channels: int = 6, out_channels: int = 3) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,  # 32 groups of 32 channels would normalise single values at a 1x1 bottleneck
    ).eval()


def tiny_components() -> dict:
    return {"vqvae": tiny_vq_f4(), "unet": tiny_unet(), "scheduler": DDIMScheduler(num_train_timesteps=100)}


def lr_image(seed: int, size=(8, 8)) -> torch.Tensor:
    """A smooth random LR image (1, 3, h, w) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 3, 3, generator=g)
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=True).clamp(0, 1)


def make_pipe(**components) -> LDMSRPipeline:
    pipe = LDMSRPipeline(**{**tiny_components(), **components})
    pipe.set_progress_bar_config(disable=True)
    return pipe


class TestLDMSRPipeline(SRPipelineTesterMixin):
    pipeline_class = LDMSRPipeline

    def get_dummy_components(self) -> dict:
        return tiny_components()

    def get_dummy_inputs(self, seed: int = 0) -> dict:
        return {"image": lr_image(seed), "generator": torch.Generator().manual_seed(seed), "num_inference_steps": 2}


# ----------------------------------------------------------------------------------------------------------------------
# equivalence with diffusers
# ----------------------------------------------------------------------------------------------------------------------


def diffusers_pipe(components: dict) -> LDMSuperResolutionPipeline:
    pipe = LDMSuperResolutionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_same_image_as_diffusers_on_a_tensor_input():
    """DDIM, eta = 0, a 32x32 LR image (diffusers takes a tensor in [-1, 1] as is; ours a tensor in [0, 1])."""
    components = tiny_components()
    ours = make_pipe(**components)
    theirs = diffusers_pipe(components)
    image = lr_image(3, (32, 32))
    a = ours(image, num_inference_steps=3, generator=torch.Generator().manual_seed(7), output_type="np").images
    b = theirs(image * 2 - 1, num_inference_steps=3, generator=torch.Generator().manual_seed(7), output_type="np")
    assert a.shape == b.images.shape == (1, 128, 128, 3)
    assert np.abs(a - b.images).max() <= 1e-5
    assert a.std() > 0.01  # not a constant image


def test_same_image_as_diffusers_on_a_pil_input():
    """A PIL image whose sides are multiples of 32, so diffusers' preprocess does not resize it."""
    components = tiny_components()
    image = PIL.Image.fromarray((lr_image(4, (32, 64))[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    a = make_pipe(**components)(
        image, num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="np"
    ).images
    b = diffusers_pipe(components)(
        image, num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="np"
    ).images
    assert a.shape == b.shape == (1, 128, 256, 3)
    assert np.abs(a - b).max() <= 1e-5


def test_same_image_as_diffusers_with_ddpm_and_the_global_rng():
    """DDPM draws step noise: with no generator, both draw z_T and then each step's noise from the global RNG."""
    components = {**tiny_components(), "scheduler": DDPMScheduler(num_train_timesteps=100)}
    image = lr_image(5, (32, 32))
    ours, theirs = make_pipe(**components), diffusers_pipe(components)  # (building seeds the global RNG)
    torch.manual_seed(11)
    a = ours(image, num_inference_steps=3, output_type="np").images
    torch.manual_seed(11)
    b = theirs(image * 2 - 1, num_inference_steps=3, output_type="np").images
    assert np.abs(a - b).max() <= 1e-5


def test_loads_a_folder_saved_by_diffusers(tmp_path):
    """The layout of CompVis/ldm-super-resolution-4x-openimages (vqvae/, unet/, scheduler/) loads as ours."""
    components = tiny_components()
    diffusers_pipe(components).save_pretrained(tmp_path)
    loaded = LDMSRPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.vqvae, VQModel) and isinstance(loaded.scheduler, DDIMScheduler)
    ref = make_pipe(**components)(lr_image(0), num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    out = loaded(lr_image(0), num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(np.asarray(out.images[0]), np.asarray(ref.images[0]))


# ----------------------------------------------------------------------------------------------------------------------
# geometry, tiling, schedulers
# ----------------------------------------------------------------------------------------------------------------------


def test_geometry():
    pipe = make_pipe()
    assert (pipe.upscale, pipe.vae_scale_factor, pipe.lr_multiple, pipe.latent_channels) == (4, 4, 2, 3)
    assert pipe.latent_shape(2, 5, 8) == (2, 3, 6, 8)
    assert pipe.model_cpu_offload_seq == "unet->vqvae"


def test_odd_sizes_where_diffusers_would_resize():
    """33x47 is no multiple of 32 (diffusers would resize it to 32x32): ours pads, crops back, gives 132x188."""
    pipe = make_pipe()
    seen = []

    def record(pipeline, i, t, callback_kwargs):
        seen.append(tuple(callback_kwargs["latents"].shape))
        return callback_kwargs

    out = pipe(
        lr_image(0, (33, 47)),
        num_inference_steps=1,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        callback_on_step_end=record,
    ).images
    assert out.shape == (1, 3, 132, 188) and seen == [(1, 3, 34, 48)]


def test_latents_override():
    pipe = make_pipe()
    image = lr_image(0, (5, 7))
    z = torch.randn(pipe.latent_shape(1, 5, 7), generator=torch.Generator().manual_seed(0))
    # DDIM with eta = 0 draws nothing but z_T: passing the same draw gives the same image
    a = pipe(image, num_inference_steps=2, latents=z, output_type="pt").images
    b = pipe(image, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_tiled_and_untiled_sizes():
    pipe = make_pipe()
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
    # padded to 14 x 10: rows at 0, 4, 8 and columns at 0, 4, each tile one step at the LR tile size
    assert len(tiles) == 6 and set(tiles) == {(1, 3, 6, 6)}
    again = pipe(image, tile_size=6, tile_overlap=2, generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(again, tiled, rtol=0, atol=0)
    whole = pipe(image, tile_size=14, tile_overlap=2, generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(whole, untiled, rtol=0, atol=1e-6)  # one tile as large as the image: untiled
    batch = pipe(
        torch.cat([image, lr_image(1, (13, 9))]),
        tile_size=6,
        tile_overlap=2,
        generator=[torch.Generator().manual_seed(i) for i in range(2)],
        **kwargs,
    ).images
    assert batch.shape == (2, 3, 52, 36)


@pytest.mark.parametrize(
    "scheduler",
    [
        DDPMScheduler(num_train_timesteps=100),
        EulerDiscreteScheduler(num_train_timesteps=100),
        DPMSolverMultistepScheduler(),
    ],
    ids=lambda s: type(s).__name__,
)
def test_swapped_diffusers_schedulers(scheduler, tmp_path):
    pipe = make_pipe()
    pipe.scheduler = scheduler.__class__.from_config(scheduler.config)
    image = lr_image(0, (5, 6))
    a = pipe(image, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    b = pipe(image, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert a.shape == (1, 3, 20, 24) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # step noise (DDPM) comes from the generator too
    pipe.save_pretrained(tmp_path)
    assert type(AutoSRPipeline.from_pretrained(tmp_path).scheduler) is type(scheduler)


def test_color_fix_runs():
    pipe = make_pipe()
    image = lr_image(0)
    for method in ("adain", "wavelet"):
        out = pipe(image, num_inference_steps=1, color_fix=method, output_type="pt").images
        assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------------------


def test_incompatible_components_are_refused():
    with pytest.raises(ValueError, match=r"in_channels=3, but LDM-SR needs vqvae latent channels \+ 3 = 3 \+ 3 = 6"):
        make_pipe(unet=tiny_unet(in_channels=3))
    with pytest.raises(ValueError, match="out_channels=6"):
        make_pipe(unet=tiny_unet(out_channels=6))
    with pytest.raises(ValueError, match="= 4 \\+ 3 = 7"):
        make_pipe(vqvae=tiny_vq_f4(latent_channels=4))
    with pytest.raises(ValueError, match="ends its chain at the LR image"):
        make_pipe(scheduler=ResShiftScheduler(num_train_timesteps=4))
    with pytest.raises(ValueError, match="vqvae must be a diffusers VQModel"):
        make_pipe(vqvae=tiny_unet())


def test_input_errors():
    pipe = make_pipe()
    image = lr_image(0)
    for steps in (0, -1, 101, 2.0, None):
        with pytest.raises(ValueError, match="num_inference_steps"):
            pipe(image, num_inference_steps=steps)
    with pytest.raises(ValueError, match="eta"):
        pipe(image, eta=-1.0)
    with pytest.raises(ValueError, match="color_fix"):
        pipe(image, color_fix="histogram")
    with pytest.raises(ValueError, match=r"latents \(z_T\) must have shape \(1, 3, 8, 8\)"):
        pipe(image, latents=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="2 generators for a batch of 1"):
        pipe(image, generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match="tile_size must be a positive multiple of 2"):
        pipe(image, tile_size=5)
    with pytest.raises(ValueError, match="tile_overlap"):
        pipe(image, tile_size=4, tile_overlap=4)
    with pytest.raises(ValueError, match="cannot be combined with tile_size"):
        pipe(image, tile_size=4, tile_overlap=2, latents=torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="float images must have values in"):
        pipe(image * 2 - 1)
