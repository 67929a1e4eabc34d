"""StableSR end to end as the authors' script (``scripts/sr_val_ddpm_text_T_vqganfin_oldcanvas_tile.py`` of
IceClear/StableSR @ 398ee93): the respaced steps, the start ``q(z_lr, 999)``, the colour fix's reference and order, the
automatic canvas and VAE tiling, and one ``z_T`` for a tiled run. Each is pinned against a reference computation written
from the original's formulas (issue 14, item 7)."""

from __future__ import annotations

import pytest
import torch
from sd_pipeline_common import run
from stablesr_tiny import lr_image, tiny_components

from sr_diffusion.color_fix import wavelet_color_fix
from sr_diffusion.image_processor import pad_to_multiple
from sr_diffusion.pipelines.stablesr import StableSRPipeline, space_timesteps
from sr_diffusion.resize import resize

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


@pytest.fixture(scope="module")
def pipe() -> StableSRPipeline:
    pipe = StableSRPipeline(**tiny_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def original_adain(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The original's ``adaptive_instance_normalization``: per channel, ``sqrt(unbiased var + 1e-5)``."""

    def stats(v):
        flat = v.reshape(*v.shape[:2], -1)
        return flat.mean(-1)[..., None, None], (flat.var(-1) + 1e-5).sqrt()[..., None, None]

    (mx, sx), (mr, sr) = stats(x), stats(reference)
    return (x - mx) / sx * sr + mr


def original_space_timesteps(num_timesteps: int, count: int) -> set[int]:
    """guided-diffusion's ``space_timesteps(T, [S])`` for one section, as StableSR's scripts define it: a float index
    walked up by ``(T - 1) / (S - 1)`` from 0, rounded at each step."""
    frac_stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
    cur_idx, taken = 0.0, []
    for _ in range(count):
        taken.append(round(cur_idx))
        cur_idx += frac_stride
    return set(taken)


def test_respaced_steps_are_the_originals_for_every_step_count():
    for count in range(1, 1001):
        assert space_timesteps(1000, count) == sorted(original_space_timesteps(1000, count), reverse=True), count
    # the case the product formula round(i * 999 / 20) gets wrong: 10 * 49.95 rounds to 500, the walk to 499
    assert space_timesteps(1000, 21)[::-1][10] == 499


def test_start_point_lr_is_the_lr_latent_noised_to_the_last_trained_step(pipe):
    """``q_sample_respace(z_lr, 999)`` with the original's schedule (LDM "linear" betas: ``linspace(sqrt(0.00085),
    sqrt(0.012), 1000)²``), in float64; ``eps`` drawn after ``z_lr`` from the same generator."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)[999]
    z_lr = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(1))
    start = pipe.prepare_start_latents(z_lr, "lr", torch.Generator().manual_seed(2), None)
    eps = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(2))
    expected = abar.sqrt() * z_lr.double() + (1 - abar).sqrt() * eps.double()
    torch.testing.assert_close(start.double(), expected, rtol=0, atol=1e-6)  # float32 products of O(1) values
    noise = pipe.prepare_start_latents(z_lr, "noise", torch.Generator().manual_seed(2), None)
    torch.testing.assert_close(noise, eps, rtol=0, atol=0)


def test_the_default_start_is_the_originals_through_the_whole_pipeline(pipe):
    """One step (t = 0 draws no noise): the default run equals a run from the z_T the original would build."""
    image = lr_image(3)
    upsampled = resize(image * 2 - 1, size=(32, 32), mode="bicubic").clamp(-1, 1)
    generator = torch.Generator().manual_seed(0)
    z_lr = pipe.encode_lr(upsampled, generator)
    eps = torch.randn(z_lr.shape, generator=generator)
    abar = pipe.scheduler.alphas_cumprod[999]
    z_t = abar.sqrt() * z_lr + (1 - abar).sqrt() * eps
    default = run(pipe, image=image, num_inference_steps=1)
    torch.testing.assert_close(default, run(pipe, image=image, num_inference_steps=1, latents=z_t), rtol=0, atol=1e-6)
    assert (default - run(pipe, image=image, num_inference_steps=1, start_point="noise")).abs().max() > 1e-3
    with pytest.raises(ValueError, match="start_point"):
        run(pipe, start_point="lr_image")


@pytest.mark.parametrize("method", ["adain", "wavelet"])
def test_colour_fix_uses_the_clamped_upsampled_lr_before_clamping_and_cropping(pipe, monkeypatch, method):
    """The original: ``x = decode(z_0)`` on the padded canvas, ``x = fix(x, y)`` with ``y`` the padded, clamped
    bicubic upsampling in [-1, 1], then ``clamp((x + 1) / 2)`` and the crop."""
    decoded = []
    decode = pipe.decode_latents

    def record(*args, **kwargs):
        decoded.append(decode(*args, **kwargs))
        return decoded[-1]

    monkeypatch.setattr(pipe, "decode_latents", record)
    image = (torch.rand(1, 3, 7, 9, generator=torch.Generator().manual_seed(4)) > 0.5).float()  # overshoots; padded
    out = run(pipe, image=image, color_fix=method)
    padded, _ = pad_to_multiple(image * 2 - 1, pipe.lr_multiple)
    y = resize(padded, size=(padded.shape[-2] * 4, padded.shape[-1] * 4), mode="bicubic").clamp(-1, 1)
    fix = original_adain if method == "adain" else wavelet_color_fix
    expected = ((fix(decoded[-1], y) + 1) / 2).clamp(0, 1)[..., :28, :36]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_canvas_tiles_follow_the_originals_sizes(pipe):
    """The original's canvas: 64-latent-pixel tiles overlapping by 32 whenever the latent exceeds a tile."""
    s, f = pipe.upscale, pipe.vae_scale_factor
    assert (pipe.CANVAS_TILE, pipe.CANVAS_OVERLAP) == (64, 32)
    assert pipe.canvas_tiles((64, 64), None, None) is None  # one tile is the whole latent
    assert pipe.canvas_tiles((65, 10), None, None) == (64, 32)
    assert pipe.canvas_tiles((65, 10), None, 4) == (64, 4 * s // f)
    assert pipe.canvas_tiles((200, 200), 0, None) is None  # never
    assert pipe.canvas_tiles((200, 200), 16, None) == (16 * s // f, 16 * s // f // 2)  # overlap at most half a tile
    assert pipe.canvas_tiles((200, 200), 16, 2) == (16 * s // f, 2 * s // f)
    assert (pipe.VAE_TILE, pipe.VAE_TILE_OVERLAP) == (1280, 280)
    assert pipe.vae_tile((1280, 1280), None) is None and pipe.vae_tile((720, 1281), None) == 1280
    assert pipe.vae_tile((4000, 4000), 0) is None and pipe.vae_tile((64, 64), 32) == 32


def test_tiling_is_automatic_above_the_originals_sizes(pipe, monkeypatch):
    """With the canvas and VAE tile sizes shrunk to the tiny model's scale, the default run is the tiled run and not the
    untiled one."""
    monkeypatch.setattr(pipe, "CANVAS_TILE", 8)
    monkeypatch.setattr(pipe, "CANVAS_OVERLAP", 4)
    monkeypatch.setattr(pipe, "VAE_TILE", 32)
    image = lr_image(1, size=(12, 20))  # latent 12 x 20 (f = s = 4), output 48 x 80
    s, f = pipe.upscale, pipe.vae_scale_factor
    explicit = run(
        pipe, image=image, tile_size=8 * f // s, tile_overlap=4 * f // s, vae_tile_size=32, vae_tile_overlap=8
    )
    auto = run(pipe, image=image, vae_tile_overlap=8)
    torch.testing.assert_close(auto, explicit, rtol=0, atol=0)
    untiled = run(pipe, image=image, tile_size=0, vae_tile_size=0)
    assert (auto - untiled).abs().max() > 1e-4
    small = lr_image(1)  # 8 x 8: one canvas tile, one VAE tile: the whole image either way
    torch.testing.assert_close(run(pipe, image=small), run(pipe, image=small, tile_size=0, vae_tile_size=0))


def test_one_z_t_for_a_tiled_run(pipe):
    """The original draws one z_T for the whole latent and tiles each step: ``latents`` with ``tile_size`` is that run,
    and a tile covering the latent gives the untiled result from the same z_T."""
    image = lr_image(1, size=(12, 20))
    z_t = torch.randn(pipe.latent_shape(1, 12, 20), generator=torch.Generator().manual_seed(5))
    tiled = run(pipe, image=image, latents=z_t, tile_size=8, tile_overlap=4)
    torch.testing.assert_close(tiled, run(pipe, image=image, latents=z_t, tile_size=8, tile_overlap=4, seed=0))
    whole = run(pipe, image=image, latents=z_t, tile_size=0)
    torch.testing.assert_close(run(pipe, image=image, latents=z_t, tile_size=20, tile_overlap=4), whole)
    assert (tiled - whole).abs().max() > 1e-4
    with pytest.raises(ValueError, match="tile_overlap"):
        run(pipe, tile_overlap=-1)


def test_match_original_above_vqgantile_size_runs_the_whole_chain_per_patch_and_stitches(pipe, monkeypatch):
    """The script above ``vqgantile_size``: ``ImageSpliterTh`` patches of y (starts ``range(0, L, stride)`` clamped to
    ``L - P``, column by column), ``seed_everything`` before each patch's whole chain, ``update_gaussian`` / ``gather``
    with its ``_gaussian_weights`` (x centre ``(P - 1)/2``, y centre ``P/2``, var 0.01), then the clamp."""
    import math

    monkeypatch.setattr(pipe, "VAE_TILE", 32)
    calls = []
    restore = pipe.restore_upsampled

    def record(upsampled, **kwargs):
        out = restore(upsampled, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("generator", "latents")}
        calls.append((upsampled.clone(), kwargs, out))
        return out

    monkeypatch.setattr(pipe, "restore_upsampled", record)
    image = lr_image(1, size=(12, 20))
    got = run(pipe, image=image, match_original=True, vae_tile_overlap=8)  # y: 48 x 80, patches 32, stride 24

    def starts(length, size=32, stride=24):
        return list(dict.fromkeys(min(s, length - size) for s in range(0, length, stride)))

    assert (starts(48), starts(80)) == ([0, 16], [0, 24, 48])
    y = resize(image * 2 - 1, size=(48, 80), mode="bicubic").clamp(-1, 1)
    regions = [(h, w) for w in starts(80) for h in starts(48)]  # column by column
    assert len(calls) == len(regions)

    def probs(n, centre):
        return [math.exp(-((i - centre) ** 2) / (n * n) / (2 * 0.01)) / math.sqrt(2 * math.pi * 0.01) for i in range(n)]

    weight = torch.tensor([[py * px for px in probs(32, 31 / 2)] for py in probs(32, 16)])
    total, weight_sum = torch.zeros(1, 3, 48, 80), torch.zeros(1, 1, 48, 80)
    for (h, w), (patch, kwargs, out) in zip(regions, calls):
        torch.testing.assert_close(patch, y[..., h : h + 32, w : w + 32], rtol=0, atol=1e-6)
        # every patch from the same random state: the seed's fresh generator gives the same patch result (up to float32
        # rounding: the pipeline convolves a strided view, this a contiguous copy; another draw differs by O(1))
        again = restore(patch, generator=torch.Generator().manual_seed(0), latents=None, **kwargs)
        torch.testing.assert_close(out, again, rtol=0, atol=1e-5)
        assert (
            out - restore(patch, generator=torch.Generator().manual_seed(1), latents=None, **kwargs)
        ).abs().max() > 1e-3
        total[..., h : h + 32, w : w + 32] += out * weight
        weight_sum[..., h : h + 32, w : w + 32] += weight
    torch.testing.assert_close(got, ((total / weight_sum + 1) / 2).clamp(0, 1), rtol=1e-5, atol=1e-5)
    # below the patch size (and without match_original) nothing changes
    calls.clear()
    small = lr_image(2)
    torch.testing.assert_close(run(pipe, image=small, match_original=True), run(pipe, image=small))
    with pytest.raises(ValueError, match="match_original"):
        run(pipe, image=image, match_original=True, vae_tile_overlap=8, latents=torch.zeros(1, 4, 12, 20))
