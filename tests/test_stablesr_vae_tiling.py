"""StableSRPipeline's tiled VAE with CFW (``vae_tile_size``, ``vae_tile_overlap``) on the tiny random SD base (VAE
factor f = 4, one CFW level): one tile is the whole-image path, several tiles give the right size and stay close to
it, every decoder tile is fused with the encoder features of its own region, and bad options are refused."""

from __future__ import annotations

import pytest
import torch
from stablesr_tiny import lr_image, tiny_components

from sr_diffusion.pipelines.stablesr import StableSRPipeline
from sr_diffusion.resize import resize

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)

LR_SIZE = (16, 16)  # x4 -> 64 x 64 output, a 16 x 16 latent


@pytest.fixture(scope="module")
def pipe() -> StableSRPipeline:
    pipe = StableSRPipeline(**tiny_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, image=None, seed: int | list[int] = 0, **kwargs) -> torch.Tensor:
    image = lr_image(0, size=LR_SIZE) if image is None else image
    generator = (
        [torch.Generator().manual_seed(s) for s in seed]
        if isinstance(seed, list)
        else torch.Generator().manual_seed(seed)
    )
    kwargs = {"num_inference_steps": 2, "generator": generator, "output_type": "pt", "color_fix": "none", **kwargs}
    return pipe(image, **kwargs).images


@pytest.mark.parametrize("fidelity_weight", [None, 0.0])
@pytest.mark.parametrize("vae_tile_size", [64, 128])
def test_one_tile_is_the_whole_image_path(pipe, fidelity_weight, vae_tile_size):
    # the tiled path draws z_lr from the assembled posterior with the same generator calls as the whole-image path
    # (then z_T), so with one tile covering the image only float rounding of the (trivial) blend differs
    whole = run(pipe, fidelity_weight=fidelity_weight)
    tiled = run(pipe, fidelity_weight=fidelity_weight, vae_tile_size=vae_tile_size, vae_tile_overlap=0)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)


def test_several_tiles_right_size_and_close_to_whole(pipe):
    whole = run(pipe)
    other_seed = run(pipe, seed=1)
    for tile, overlap in [(32, 16), (24, 8)]:  # 3 x 3 and 4 x 4 tiles (the last ones shifted back to the border)
        tiled = run(pipe, vae_tile_size=tile, vae_tile_overlap=overlap)
        assert tiled.shape == whole.shape == (1, 3, 64, 64)
        assert torch.isfinite(tiled).all()
        diff = (tiled - whole).abs().mean().item()
        # measured: 0.022 (32/16) and 0.042 (24/8) against 0.19 between seeds; the VAE's receptive field (and its
        # GroupNorm statistics and mid-block attention, which see the whole tile) make tiles differ slightly
        assert diff < 0.06
        assert diff < 0.35 * (other_seed - whole).abs().mean().item()


def test_tiled_batch_is_images_one_at_a_time(pipe):
    images = torch.cat([lr_image(0, size=LR_SIZE), lr_image(1, size=LR_SIZE)])
    batch = run(pipe, images, seed=[0, 1], vae_tile_size=32, vae_tile_overlap=16)
    for i in range(2):
        alone = run(pipe, images[i : i + 1], seed=[i], vae_tile_size=32, vae_tile_overlap=16)
        torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-5, rtol=0)


def test_cfw_is_applied_per_tile(pipe):
    plain = run(pipe, fidelity_weight=0.0, vae_tile_size=32, vae_tile_overlap=16)
    fused = run(pipe, fidelity_weight=1.0, vae_tile_size=32, vae_tile_overlap=16)
    assert (fused - plain).abs().max() > 0.05


@torch.no_grad()
def test_decoder_tiles_use_their_own_regions_features(pipe):
    # without overlap every output pixel comes from one tile: the tiled decode must be, tile by tile, the decode of
    # that latent tile fused with the CFW features of the same image region (encoded alone)
    image = resize(lr_image(2, size=LR_SIZE) * 2 - 1, size=(64, 64), mode="bicubic").clamp(-1, 1)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    tiled = pipe.decode_latents_tiled(latents, upsampled_lr=image, fidelity_weight=1.0, tile_size=32, overlap=0)
    swapped = None
    for y in (0, 8):
        for x in (0, 8):
            pixels = (slice(None), slice(None), slice(4 * y, 4 * y + 32), slice(4 * x, 4 * x + 32))
            store: dict[int, list[torch.Tensor]] = {}
            with pipe.cfw.capture_encoder_features(pipe.vae, store):
                pipe.vae.encode(image[pixels])
            features = {k: torch.cat(v) for k, v in store.items()}
            region = (slice(None), slice(None), slice(y, y + 8), slice(x, x + 8))
            expected = pipe.decode_latents(latents[region], features, 1.0)
            torch.testing.assert_close(tiled[pixels], expected, atol=1e-5, rtol=0)
            if (y, x) == (0, 0):
                swapped = features
    # and the features matter: another region's features give another tile
    other = pipe.decode_latents(latents[:, :, 8:16, 8:16], swapped, 1.0)
    assert (other - tiled[:, :, 32:64, 32:64]).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"vae_tile_size": 30}, "multiple of the VAE's downsampling factor 4"),
        ({"vae_tile_size": -8}, "positive multiple"),  # (0 is "never tile")
        ({"vae_tile_size": 32.0}, "must be an integer"),
        ({"vae_tile_size": 32, "vae_tile_overlap": 32}, r"vae_tile_overlap must be a multiple of 4 in \[0, "),
        ({"vae_tile_size": 32, "vae_tile_overlap": 6}, "vae_tile_overlap must be a multiple of 4"),
        ({"vae_tile_size": 32, "vae_tile_overlap": -4}, "vae_tile_overlap"),
        ({"vae_tile_size": 32}, r"\[0, vae_tile_size=32\), got 280"),  # the original's default overlap
    ],
)
def test_bad_vae_tiling_options(pipe, options, match):
    with pytest.raises(ValueError, match=match):
        run(pipe, **options)
