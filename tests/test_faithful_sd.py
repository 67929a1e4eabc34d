"""PASD and SeeSR against their authors' scripts (issue 14, items 1-4 and 6): reference computations written from the
scripts' formulas (yangxy/PASD ``test_pasd.py`` @ 396f9ac, cswry/SeeSR ``test_seesr.py`` @ 8edecc7), not their code:

1. the LR image is upsampled with PIL's bicubic on the 8-bit image (``Image.resize``);
2. the decode is clamped (and, with ``match_original``, rounded to 8 bits) before the colour fix, which is applied
   against the upsampled LR image and followed by ``ToPILImage``'s truncation; StableSR keeps fix-before-clamp;
3. automatic latent tiling above 320² (PASD) / 96² (SeeSR) latent pixels, square tiles of ``min(T, h, w)``, the
   scripts' grid and Gaussian stitching;
4. the ``process_size`` rules (PASD: ×s, bilinear short side up to 768, floor to a multiple of 8; SeeSR: LR short side
   up to 512 // s first, then ×s and the floor);
6. the scripts' prompt strings, and SeeSR's posterior sample from the global RNG.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pasd_tiny import tiny_components as pasd_components
from PIL import Image
from sd_pipeline_common import FixedExtractor, record_prompts, run
from seesr_tiny import tiny_components as seesr_components
from stablesr_tiny import lr_image
from torchvision import transforms

from sr_diffusion.models.seesr import seesr_noise_pred
from sr_diffusion.pipelines.pasd import (
    PASDPipeline,
    pasd_noise_pred,
    pasd_original_prompt,
    pasd_process_steps,
)
from sr_diffusion.pipelines.sd_base import gaussian_tile_weights
from sr_diffusion.pipelines.seesr import SeeSRPipeline, seesr_original_prompt, seesr_process_steps

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)

LEVEL = 1 / 255
ADDED = "clean, high-resolution, 8k"


def make(kind: str, **overrides):
    if kind == "pasd":
        pipe = PASDPipeline(**{**pasd_components(), **overrides})
    else:
        pipe = SeeSRPipeline(**{**seesr_components(), **overrides})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lr8(seed: int, size=(8, 8)) -> torch.Tensor:
    """An LR image on the 8-bit grid (as read from a PNG): the originals see exactly these values."""
    return torch.round(lr_image(seed, size) * 255) / 255


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(torch.round(x[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy())


def from_pil(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).astype(np.float32) / 255).permute(2, 0, 1)[None]


def spy_condition(pipe, monkeypatch) -> list[torch.Tensor]:
    """The condition image of every (untiled) denoiser call."""
    seen, original = [], pipe.predict_noise

    def spy(latents, **kwargs):
        seen.append(kwargs.get("cond_image", kwargs.get("condition")).clone())
        return original(latents, **kwargs)

    monkeypatch.setattr(pipe, "predict_noise", spy)
    return seen


# ----------------------------------------------------------------------------------------------------------------------
# 1. PIL bicubic on the 8-bit LR image
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pasd", "seesr"])
def test_the_condition_is_pil_bicubic_of_the_8bit_lr_image(kind, monkeypatch):
    pipe = make(kind)
    lr = lr8(1, (8, 10))
    expected = from_pil(to_pil(lr).resize((40, 32), Image.BICUBIC))  # test_*.py: validation_image.resize(...)
    torch.testing.assert_close(pipe.upsample_lr(lr), expected, rtol=0, atol=0)
    seen = spy_condition(pipe, monkeypatch)
    run(pipe, image=lr)
    torch.testing.assert_close(seen[0].float(), expected, rtol=0, atol=0)
    # torch's float bicubic differs from PIL's fixed-point one by whole levels near edges (what the issue measured)
    assert (pipe.upsample_lr(lr, pil=False) - expected).abs().max() > LEVEL / 2


# ----------------------------------------------------------------------------------------------------------------------
# 2. clamp (and quantise) before the colour fix
# ----------------------------------------------------------------------------------------------------------------------


def reference_wavelet_fix(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """PASD's / SeeSR's ``wavelet_reconstruction``: 5 levels of a 3x3 [1, 2, 1]²/16 blur, dilation 2^i, replicate
    padding; the target's high frequencies plus the source's lowest band."""

    def decompose(x):
        high = torch.zeros_like(x)
        kernel = (torch.tensor([1.0, 2.0, 1.0])[:, None] * torch.tensor([1.0, 2.0, 1.0])[None, :] / 16).expand(
            3, 1, 3, 3
        )
        for i in range(5):
            r = 2**i
            low = F.conv2d(F.pad(x, (r, r, r, r), mode="replicate"), kernel, groups=3, dilation=r)
            high, x = high + (x - low), low
        return high, x

    return decompose(target)[0] + decompose(source)[1]


def reference_adain_fix(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Their ``adaptive_instance_normalization``: per channel, (unbiased) variance + 1e-5."""

    def stats(x):
        flat = x.reshape(*x.shape[:2], -1)
        return flat.mean(-1)[..., None, None], (flat.var(-1) + 1e-5).sqrt()[..., None, None]

    (mt, st), (ms, ss) = stats(target), stats(source)
    return (target - mt) / st * ss + ms


@pytest.mark.parametrize("method", ["wavelet", "adain"])
def test_match_original_rounds_fixes_against_the_upsampled_lr_then_truncates(method):
    pipe = make("pasd")
    g = torch.Generator().manual_seed(0)
    lr = lr8(2, (8, 8))
    cond = pipe.upsample_lr(lr)
    hr = (cond * 2 - 1) * 1.3 + 0.1 * torch.randn(cond.shape, generator=g)  # a decode that overshoots [-1, 1]
    got = pipe.finish_output(
        hr,
        rgb=lr,
        alpha=None,
        color_fix=method,
        output_type="pt",
        return_dict=False,
        clamp_before_color_fix=True,
        color_fix_reference=cond,
        quantize=True,
    )[0]
    # the script: diffusers' postprocess (denormalise, clamp, round to uint8), ToTensor, fix against the upsampled LR
    # photo, clamp, ToPILImage (mul(255).byte(): truncation)
    saved = torch.round(((hr / 2 + 0.5).clamp(0, 1)) * 255) / 255
    fixed = (reference_wavelet_fix if method == "wavelet" else reference_adain_fix)(saved, cond)
    expected = torch.floor(fixed.clamp(0, 1) * 255) / 255
    # float order may move a value across a level boundary: at most one level, on a few pixels
    diff = (got - expected).abs()
    assert diff.max() <= LEVEL + 1e-6
    assert (diff > 1e-6).float().mean() < 0.02


def test_clamp_before_the_fix_is_the_default_for_pasd_and_seesr_and_stablesr_keeps_fix_before_clamp():
    pipe = make("seesr")
    lr = lr8(3)
    cond = pipe.upsample_lr(lr)
    hr = (cond * 2 - 1) * 1.5  # overshoots on both sides
    clamp_first = pipe.finish_output(
        hr,
        rgb=lr,
        alpha=None,
        color_fix="adain",
        output_type="pt",
        return_dict=False,
        clamp_before_color_fix=True,
        color_fix_reference=cond,
    )[0]
    x = (hr + 1) / 2
    stats = lambda v: (v.mean((-2, -1), keepdim=True), v.var((-2, -1), keepdim=True, unbiased=True).add(1e-5).sqrt())  # noqa: E731
    (mc, sc), (mr, sr) = stats(x.clamp(0, 1)), stats(cond)
    torch.testing.assert_close(clamp_first, ((x.clamp(0, 1) - mc) / sc * sr + mr).clamp(0, 1), rtol=1e-5, atol=1e-5)
    fix_first = pipe.finish_output(
        hr, rgb=lr, alpha=None, color_fix="adain", output_type="pt", return_dict=False, color_fix_reference=cond
    )[0]  # StableSR's
    (mx, sx) = stats(x)
    torch.testing.assert_close(fix_first, ((x - mx) / sx * sr + mr).clamp(0, 1), rtol=1e-5, atol=1e-5)
    assert (clamp_first - fix_first).abs().max() > 10 * LEVEL


# ----------------------------------------------------------------------------------------------------------------------
# 3. automatic tiling
# ----------------------------------------------------------------------------------------------------------------------


def test_automatic_tiling_thresholds_and_square_tiles_are_the_scripts():
    pasd, seesr = make("pasd"), make("seesr")
    # PASD: h·w <= 320² untiled, else square tiles of min(320, h, w), overlap 8 (latent pixels)
    assert pasd.latent_tiling((320, 320), None, None) is None
    assert pasd.latent_tiling((200, 512), None, None) is None  # 102400 <= 320²
    assert pasd.latent_tiling((321, 320), None, None) == (320, 8)
    assert pasd.latent_tiling((250, 500), None, None) == (250, 8)
    # SeeSR: 96, overlap 4
    assert seesr.latent_tiling((96, 96), None, None) is None
    assert seesr.latent_tiling((97, 96), None, None) == (96, 4)
    assert seesr.latent_tiling((64, 300), None, None) == (64, 4)
    # 0: never; an int: tile_size LR pixels (x4 / f=4 on the tiny VAE: as many latent pixels), square too
    assert pasd.latent_tiling((1000, 1000), 0, None) is None
    assert seesr.latent_tiling((12, 20), 8, 2) == (8, 2)
    assert seesr.latent_tiling((6, 20), 8, None) == (6, 4)


def reference_stitch(predict, latents: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """The scripts' tiled step: the grid loop (``cur_x = max(k·tile - overlap·k, 0) + tile`` until it covers the
    side, the last tile shifted to end at the border) and ``_gaussian_weights`` (x centre (W-1)/2, y centre H/2,
    var 0.01), accumulated and divided by the summed weights."""
    h, w = latents.shape[-2:]
    tile = min(tile, h, w)

    def count(side):
        n, cur = 0, 0
        while cur < side:
            cur = max(n * tile - overlap * n, 0) + tile
            n += 1
        return n

    def axis(n, mid):
        return np.array(
            [math.exp(-((i - mid) ** 2) / (n * n) / (2 * 0.01)) / math.sqrt(2 * math.pi * 0.01) for i in range(n)]
        )

    weights = torch.tensor(np.outer(axis(tile, tile / 2), axis(tile, (tile - 1) / 2)))
    rows, cols = count(w), count(h)
    out, total = torch.zeros(latents.shape, dtype=torch.float64), torch.zeros(latents.shape, dtype=torch.float64)
    for row in range(rows):
        for col in range(cols):
            x0 = w - tile if row == rows - 1 else max(row * tile - overlap * row, 0)
            y0 = h - tile if col == cols - 1 else max(col * tile - overlap * col, 0)
            region = (slice(None), slice(None), slice(y0, y0 + tile), slice(x0, x0 + tile))
            out[region] += predict(region).double() * weights
            total[region] += weights
    return out / total


@pytest.mark.parametrize("shape,tile,overlap", [((20, 33), 8, 2), ((9, 40), 16, 4), ((17, 17), 6, 5)])
def test_tiled_blend_is_the_scripts_grid_and_gaussian_stitching(shape, tile, overlap):
    pipe = make("seesr")
    latents = torch.randn(1, 4, *shape, generator=torch.Generator().manual_seed(1))

    def predict(region):  # not pointwise: every tile's output depends on the whole tile
        x = latents[region]
        return torch.tanh(x) + x.mean((-2, -1), keepdim=True)

    got = pipe.blend_latent_tiles(predict, latents, min(tile, *shape), overlap)
    torch.testing.assert_close(got.double(), reference_stitch(predict, latents, tile, overlap), rtol=1e-5, atol=1e-5)
    # and the weights are the scripts' (the constant factor cancels)
    ref = torch.tensor(np.outer(*[np.exp(-((np.arange(6) - m) ** 2) / 36 / 0.02) for m in (3.0, 2.5)]))
    torch.testing.assert_close(gaussian_tile_weights(6, 6)[0, 0].double(), ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["pasd", "seesr"])
def test_the_default_tiles_automatically_above_the_threshold(kind):
    pipe = make(kind)
    lr = lr8(4, (8, 12))  # latent 8 x 12
    whole = run(pipe, image=lr)
    torch.testing.assert_close(run(pipe, image=lr, tile_size=0), whole, rtol=0, atol=0)  # 96 < 8·12 <= 320²
    pipe.AUTO_LATENT_TILE, pipe.AUTO_LATENT_TILE_OVERLAP = 6, 2  # now 8·12 > 6²: tiles of 6, overlap 2
    auto = run(pipe, image=lr)
    torch.testing.assert_close(run(pipe, image=lr, tile_size=6, tile_overlap=2), auto, rtol=0, atol=0)
    torch.testing.assert_close(run(pipe, image=lr, tile_size=0), whole, rtol=0, atol=0)
    assert (auto - whole).abs().max() > 1e-4
    # one chain on the whole latent: the caller's start latents combine with tiling
    z = torch.randn(pipe.latent_shape(1, 8, 12), generator=torch.Generator().manual_seed(2))
    assert run(pipe, image=lr, latents=z, tile_size=6).shape == (1, 3, 32, 48)
    with pytest.raises(ValueError, match="tile_size must be None or an int >= 0"):
        run(pipe, image=lr, tile_size=-1)


# ----------------------------------------------------------------------------------------------------------------------
# 4. process size
# ----------------------------------------------------------------------------------------------------------------------


def test_pasd_process_steps_are_test_pasd_py_sizes():
    # 50 x 70 LR, x4: 200 x 280; short side 200 < 768: torchvision Resize(768) on the PIL image, then floor to 8
    steps = pasd_process_steps(50, width=70, upscale=4, process_size=768)
    resized = transforms.Resize(768, interpolation=transforms.InterpolationMode.BILINEAR)(Image.new("RGB", (280, 200)))
    assert steps == [((200, 280), "bicubic"), ((resized.height, resized.width), "bilinear"), ((768, 1072), "bicubic")]
    # a portrait image, and one already large enough (only the floor to 8 applies)
    assert pasd_process_steps(71, width=50, upscale=4, process_size=768)[1:] == [
        ((1090, 768), "bilinear"),
        ((1088, 768), "bicubic"),
    ]
    assert pasd_process_steps(201, width=250, upscale=4, process_size=768) == [
        ((804, 1000), "bicubic"),
        ((800, 1000), "bicubic"),
    ]


def test_seesr_process_steps_are_test_seesr_py_sizes():
    # a side under 512 // 4 = 128: scale = 128 / min(w, h), the LR image to (int(scale·w), int(scale·h)), then x4
    w, h = 45, 30
    scale = (512 // 4) / min(w, h)
    small = (int(scale * h), int(scale * w))
    assert seesr_process_steps(h, width=w, upscale=4, process_size=512) == [
        (small, "bicubic"),
        ((small[0] * 4, small[1] * 4), "bicubic"),
        ((small[0] * 4 // 8 * 8, small[1] * 4 // 8 * 8), "bicubic"),
    ]
    assert seesr_process_steps(130, width=131, upscale=4, process_size=512) == [
        ((520, 524), "bicubic"),
        ((520, 520), "bicubic"),
    ]


@pytest.mark.parametrize("kind", ["pasd", "seesr"])
def test_process_size_samples_at_the_scripts_size_and_resizes_back(kind, monkeypatch):
    pipe = make(kind)
    lr = lr8(5, (8, 10))
    seen = spy_condition(pipe, monkeypatch)
    # the scripts' PIL chain for the tiny VAE (factor 4 instead of 8)
    img = to_pil(lr)
    if kind == "pasd":  # process_size 48: x4 = 32 x 40, short side to 48 (bilinear), floor to 4
        img = img.resize((40, 32), Image.BICUBIC)
        img = transforms.Resize(48, interpolation=transforms.InterpolationMode.BILINEAR)(img)
        img = img.resize((img.width // 4 * 4, img.height // 4 * 4), Image.BICUBIC)
        size = 48
    else:  # process_size 48: 48 // 4 = 12 > 8: LR to (12, 15), x4, floor to 4
        scale = (48 // 4) / min(img.size)
        img = img.resize((int(scale * img.width), int(scale * img.height)), Image.BICUBIC)
        img = img.resize((img.width * 4, img.height * 4), Image.BICUBIC)
        img = img.resize((img.width // 4 * 4, img.height // 4 * 4), Image.BICUBIC)
        size = 48
    out = run(pipe, image=lr, process_size=size, color_fix="none")
    torch.testing.assert_close(seen[-1].float(), from_pil(img), rtol=0, atol=0)
    assert out.shape == (1, 3, 32, 40)  # back to exactly upscale x the input
    # process_size=0 is off, and so is the default (unless match_original)
    torch.testing.assert_close(run(pipe, image=lr, process_size=0), run(pipe, image=lr), rtol=0, atol=0)
    # latents are of the working size
    z = torch.randn(1, 4, img.height // 4, img.width // 4, generator=torch.Generator().manual_seed(0))
    assert run(pipe, image=lr, process_size=size, latents=z).shape == (1, 3, 32, 40)
    with pytest.raises(ValueError, match="at the working size of process_size"):
        run(pipe, image=lr, process_size=size, latents=torch.randn(pipe.latent_shape(1, 8, 10)))


def test_match_original_uses_the_scripts_process_size_and_pil_resizes_back(monkeypatch):
    pipe = make("seesr")
    assert pipe.resolve_process_size(None, True) == 512 and pipe.resolve_process_size(None, False) is None
    assert make("pasd").resolve_process_size(None, True) == 768
    assert pipe.resolve_process_size(0, True) is None and pipe.resolve_process_size(64, False) == 64
    # the working output, 8-bit, is resized back with PIL bicubic
    lr = lr8(6, (4, 5))
    hr = torch.rand(1, 3, 48, 60, generator=torch.Generator().manual_seed(1)) * 2 - 1
    got = pipe.finish_output(
        hr,
        rgb=lr,
        alpha=None,
        color_fix="none",
        output_type="pt",
        return_dict=False,
        clamp_before_color_fix=True,
        quantize=True,
        working_size=(48, 60),
    )[0]
    expected = from_pil(to_pil((hr + 1) / 2).resize((20, 16), Image.BICUBIC))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# 6. prompts and randomness
# ----------------------------------------------------------------------------------------------------------------------


def test_the_scripts_prompt_strings():
    # test_seesr.py: f"{res[0]}, {args.prompt}," + args.added_prompt
    assert seesr_original_prompt("dog, grass", None, ADDED) == "dog, grass, ," + ADDED
    assert seesr_original_prompt("dog, grass", "a photo", ADDED) == "dog, grass, a photo," + ADDED
    # test_pasd.py (caption): caption or f"{caption} {prompt}", then += added_prompt; no high-level info: f"{prompt}, "
    assert pasd_original_prompt("a dog on the grass", "", ADDED) == "a dog on the grass" + ADDED
    assert pasd_original_prompt("a dog on the grass", "sunny", ADDED) == "a dog on the grass sunny" + ADDED
    assert pasd_original_prompt(None, "sunny", ADDED) == "sunny, " + ADDED
    assert pasd_original_prompt(None, None, ADDED) == ADDED


@pytest.mark.parametrize("kind", ["pasd", "seesr"])
def test_match_original_builds_the_scripts_prompt(kind, monkeypatch):
    pipe = make(kind, prompt_extractor=FixedExtractor(["dog, grass"]))
    seen = record_prompts(pipe, monkeypatch)
    run(pipe, prompt="dog", match_original=True, process_size=0, guidance_scale=1.0)  # 768 / 512 px: too slow here
    expected = "dog, grass, dog," + ADDED if kind == "seesr" else "dog, grass dog" + ADDED
    assert seen == [[expected]]
    seen.clear()
    run(pipe, prompt="dog", guidance_scale=1.0)  # ours: the user's words first, tags they mention dropped
    assert seen == [["dog, grass, " + ADDED]]


def test_seesr_match_original_draws_the_posterior_sample_from_the_global_rng():
    pipe = make("seesr")
    eps = torch.randn(pipe.latent_shape(1, 8, 8), generator=torch.Generator().manual_seed(3))
    cond = pipe.upsample_lr(lr8(0))
    args = dict(device=torch.device("cpu"), generator=torch.Generator().manual_seed(5), latents=eps.clone(),
                start_point="lr", condition=cond, timesteps=None)  # fmt: skip
    torch.manual_seed(7)
    start = pipe.prepare_start_latents(eps.shape, **args, global_rng_posterior=True)
    # the script: vae.encode(image * 2 - 1).latent_dist.sample() (no generator) after set_seed(seed)
    z = pipe.vae.encode(cond * 2 - 1).latent_dist.sample(generator=torch.Generator().manual_seed(7))
    abar = pipe.scheduler.alphas_cumprod[999]
    expected = abar.sqrt() * z * pipe.vae.config.scaling_factor + (1 - abar).sqrt() * eps
    torch.testing.assert_close(start, expected, rtol=1e-5, atol=1e-5)
    # end to end: the global seed decides the result (the generator draws the noise alone)
    torch.manual_seed(1)
    a = run(pipe, match_original=True, process_size=0)
    torch.manual_seed(1)
    torch.testing.assert_close(run(pipe, match_original=True, process_size=0), a, rtol=0, atol=0)
    torch.manual_seed(2)
    assert (run(pipe, match_original=True, process_size=0) - a).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------------------
# end to end: test_seesr.py's flow, written out from the script, against match_original=True
# ----------------------------------------------------------------------------------------------------------------------


def test_seesr_match_original_is_the_scripts_flow_end_to_end():
    pipe = make("seesr", prompt_extractor=FixedExtractor(["dog, grass"]))
    lr, seed, steps, size = lr8(7, (8, 10)), 3, 3, 48
    torch.manual_seed(seed)
    got = run(pipe, image=lr, seed=seed, num_inference_steps=steps, match_original=True, process_size=size)

    # the script, for the tiny VAE (factor 4 where SD's is 8), process_size 48 (12 LR pixels at x4)
    img = to_pil(lr)
    scale = (size // 4) / min(img.size)
    img = img.resize((int(scale * img.width), int(scale * img.height)), Image.BICUBIC)
    img = img.resize((img.width * 4, img.height * 4), Image.BICUBIC)
    img = img.resize((img.width // 4 * 4, img.height // 4 * 4), Image.BICUBIC)
    image = from_pil(img)
    ids = [
        pipe.tokenizer(
            text, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids  # fmt: skip
        for text in ("dotted, noise, blur, lowres, smooth", "dog, grass, ," + ADDED)
    ]
    with torch.no_grad():
        embeds = torch.cat([pipe.text_encoder(i)[0] for i in ids])  # [negative, prompt]
        soft = torch.zeros(2, 1, pipe.image_prompt_dim)  # no RAM embeddings here: the null soft prompt
        generator = torch.Generator().manual_seed(seed)
        scheduler = pipe.scheduler
        scheduler.set_timesteps(steps)
        latents = torch.randn(1, 4, image.shape[-2] // 4, image.shape[-1] // 4, generator=generator)
        torch.manual_seed(seed)  # accelerate's set_seed
        z = pipe.vae.encode(image * 2 - 1).latent_dist.sample() * pipe.vae.config.scaling_factor
        latents = scheduler.add_noise(z, latents, torch.tensor([999]))
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            out = seesr_noise_pred(
                pipe.unet, pipe.controlnet, pipe.unet_image_attentions, pipe.controlnet_image_attentions,
                x, t, embeds, torch.cat([image] * 2), soft, 1.0,
            )  # fmt: skip
            uncond, cond = out.chunk(2)
            latents = scheduler.step(uncond + 5.5 * (cond - uncond), t, latents, generator=generator).prev_sample
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    saved = torch.round((decoded / 2 + 0.5).clamp(0, 1) * 255) / 255  # diffusers' postprocess to PIL
    fixed = torch.floor(reference_adain_fix(saved, image).clamp(0, 1) * 255) / 255  # adain_color_fix, ToPILImage
    expected = from_pil(to_pil(fixed).resize((40, 32), Image.BICUBIC))  # back to ori * rscale
    # float order in the networks: at most a level before the last resize,
    # which averages neighbours (its weights sum to 1): at most a level after it, plus PIL's rounding of that
    assert (got - expected).abs().max() <= 2 * LEVEL + 1e-6
    assert ((got - expected).abs() > 1e-6).float().mean() < 0.05


def test_pasd_match_original_is_the_scripts_flow_end_to_end():
    pipe = make("pasd", prompt_extractor=FixedExtractor(["a dog on the grass"]))
    lr, seed, steps, size = lr8(8, (8, 10)), 4, 3, 48
    got = run(pipe, image=lr, seed=seed, num_inference_steps=steps, match_original=True, process_size=size)

    # test_pasd.py for the tiny VAE (factor 4), process_size 48: x4, Resize(48) bilinear, floor to 4
    img = to_pil(lr).resize((40, 32), Image.BICUBIC)
    img = transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR)(img)
    img = img.resize((img.width // 4 * 4, img.height // 4 * 4), Image.BICUBIC)
    image = from_pil(img)
    ids = [
        pipe.tokenizer(
            text, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids  # fmt: skip
        for text in (
            "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed",  # --negative_prompt
            "a dog on the grass" + ADDED,
        )
    ]
    with torch.no_grad():
        embeds = torch.cat([pipe.text_encoder(i)[0] for i in ids])  # [negative, prompt]
        generator = torch.Generator().manual_seed(seed)
        scheduler = pipe.scheduler
        scheduler.set_timesteps(steps)
        abar = scheduler.alphas_cumprod
        # prepare_latents: posterior sample, then noise to the first timestep, then to --added_noise_level 900, all from
        # the generator (add_noise at abar_t: the diffusers of the script's time)
        z = pipe.vae.encode(image * 2 - 1).latent_dist.sample(generator) * pipe.vae.config.scaling_factor
        for t in (int(scheduler.timesteps[0]), 900):
            noise = torch.randn(z.shape, generator=generator)
            z = abar[t].sqrt() * z + (1 - abar[t]).sqrt() * noise
        latents = z
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            out = pasd_noise_pred(
                pipe.unet,
                controlnet=pipe.controlnet,
                pixel_attentions=pipe.pixel_attentions,
                sample=x,
                timestep=t,
                encoder_hidden_states=embeds,
                cond_image=torch.cat([image] * 2),
                conditioning_scale=1.0,
            )[0]
            uncond, cond = out.chunk(2)
            latents = scheduler.step(uncond + 9.0 * (cond - uncond), t, latents).prev_sample
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    saved = torch.round((decoded / 2 + 0.5).clamp(0, 1) * 255) / 255  # diffusers' postprocess to PIL
    fixed = torch.floor(reference_wavelet_fix(saved, image).clamp(0, 1) * 255) / 255  # wavelet_color_fix, ToPILImage
    expected = from_pil(to_pil(fixed).resize((40, 32), Image.BICUBIC))  # back to ori * rscale
    # float order (the pipeline computes the start in float64, this in float32): a level at most before the last
    # resize, which averages neighbours: at most a level after it, plus PIL's rounding of that
    assert (got - expected).abs().max() <= 2 * LEVEL + 1e-6
    assert ((got - expected).abs() > 1e-6).float().mean() < 0.05
