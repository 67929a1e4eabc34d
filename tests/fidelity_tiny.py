"""Trained tiny components for the fidelity-control tests (tests/test_fidelity_controls.py).

A fidelity knob (CFW's weight, a ControlNet's scale, how much of the LR latent the start keeps) only trades
faithfulness for something when the models behind it have learned something: on random weights nothing is monotone
for a reason. So the tests sample with small models trained briefly on real photo crops, on one CPU thread:

- the VAE: ``tests/data/tiny_vae_kl``, a trained tiny ``AutoencoderKL`` (the tests' ``tiny_vae`` architecture, widths
  32/32/64, ``f = 4``; 22.5 dB reconstruction on held-out photos), its ``scaling_factor`` set to ``1 / std`` of its
  latents on the training crops (the rule SD's 0.18215 comes from; 0.296 here);
- the SD base (:func:`train_sd_base`): the tests' tiny UNet (``tests/stablesr_tiny.py``) trained as an unconditional
  denoiser (the empty prompt) of those latents, on SD's schedule, with **v-prediction** (SD 2.x-768's objective). An
  under-trained epsilon model's ``x_0`` estimate, ``(z_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)``, multiplies
  its error by up to ``1 / sqrt(abar_999) ≈ 15`` at the first steps and a few-step sampler ends far off the data;
  v's, ``sqrt(abar_t) z_t - sqrt(1 - abar_t) v_hat``, passes it through at most once;
- each method's add-ons: trained by the package's own task (``StableSRTask``, ``StableSRCFWTask``, ``PASDTask``,
  ``SeeSRTask``): :func:`fit` runs Adam on the task's ``compute_loss`` for random crops of the training photos.

Photos: random 32x32 crops of ``astronaut`` and ``china`` (from the package's training split) with their x4 MATLAB-
bicubic 8-bit LR (:func:`~sr_diffusion.training.data.bicubic_downsample`); the held-out crops
(:func:`held_out_pairs`) come from the validation split (``chelsea``, ``coffee``, ``rocket``, ``flower``), which
neither the VAE nor anything here trains on.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from stablesr_tiny import tiny_components

from sr_diffusion.metrics import lr_consistency
from sr_diffusion.pipelines.stablesr import stablesr_scheduler
from sr_diffusion.resize import imresize
from sr_diffusion.training.data import bicubic_downsample, load_skimage_sklearn

__all__ = [
    "CROP",
    "TRAIN_PHOTOS",
    "fit",
    "held_out_pairs",
    "lr_psnr",
    "photo_batch",
    "train_photos",
    "train_sd_base",
    "trained_vae",
]

TRAINED_VAE = Path(__file__).resolve().parent / "data" / "tiny_vae_kl"
#: the photos of the package's training split that the base and the add-ons learn from
TRAIN_PHOTOS = ("skimage/astronaut", "sklearn/china")
#: the HR crop side (LR 8x8 at x4; latents 8x8 with the tiny VAE's f = 4)
CROP = 32


# ----------------------------------------------------------------------------------------------------------------------
# Photos
# ----------------------------------------------------------------------------------------------------------------------


def train_photos() -> list[torch.Tensor]:
    """The :data:`TRAIN_PHOTOS` as float ``(3, H, W)`` tensors in [0, 1]."""
    photos = dict(load_skimage_sklearn("train"))
    return [photos[name].float() / 255.0 for name in TRAIN_PHOTOS]


def photo_batch(photos: list[torch.Tensor], n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``{"lr": (n, 3, 8, 8), "hr": (n, 3, 32, 32)}``: random crops of random ``photos`` (every draw from
    ``generator``) and their x4 MATLAB-bicubic LR, quantised to 8 bits as a saved image."""
    crops = []
    for _ in range(n):
        photo = photos[int(torch.randint(len(photos), (1,), generator=generator))]
        y = int(torch.randint(photo.shape[1] - CROP + 1, (1,), generator=generator))
        x = int(torch.randint(photo.shape[2] - CROP + 1, (1,), generator=generator))
        crops.append(photo[:, y : y + CROP, x : x + CROP])
    hr = torch.stack(crops)
    return {"lr": bicubic_downsample(hr, 4), "hr": hr}


def held_out_pairs(per_photo: int = 2, min_detail: float = 0.03, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hr (N, 3, 32, 32), lr (N, 3, 8, 8))``: ``per_photo`` random crops of each photo of the validation split
    (seeded), keeping only crops with detail a x4 bicubic round trip loses (the std of ``hr - up(down(hr))`` at least
    ``min_detail``): flat patches of sky say nothing about fidelity."""
    g = torch.Generator().manual_seed(seed)
    crops = []
    for _, photo in sorted(load_skimage_sklearn("val")):
        photo, kept = photo.float() / 255.0, 0
        for _ in range(1000):
            if kept == per_photo:
                break
            y = int(torch.randint(photo.shape[1] - CROP + 1, (1,), generator=g))
            x = int(torch.randint(photo.shape[2] - CROP + 1, (1,), generator=g))
            crop = photo[:, y : y + CROP, x : x + CROP]
            if (crop - imresize(imresize(crop, scale=0.25), scale=4)).std() >= min_detail:
                crops.append(crop)
                kept += 1
        if kept < per_photo:
            raise ValueError(f"fewer than {per_photo} crops with detail >= {min_detail} found in a held-out photo")
    hr = torch.stack(crops)
    return hr, bicubic_downsample(hr, 4)


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


def fit(
    task,
    model: torch.nn.Module,
    photos: list[torch.Tensor],
    steps: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    batch_size: int = 4,
    seed: int = 0,
) -> list[float]:
    """Train ``model`` with Adam on ``task.compute_loss`` for ``steps`` random batches of :func:`photo_batch` (crops
    and the task's draws from one seeded generator); returns the losses. The model is left in eval mode."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, betas=betas)
    g = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(steps):
        loss = task.compute_loss(model, photo_batch(photos, batch_size, g), g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def trained_vae(photos: list[torch.Tensor] | None = None) -> AutoencoderKL:
    """The trained tiny VAE in float32; with ``photos``, its ``scaling_factor`` set to ``1 / std`` of the latents
    (posterior means) of 64 seeded crops of them."""
    vae = AutoencoderKL.from_pretrained(TRAINED_VAE, torch_dtype=torch.float32).eval()
    if photos is not None:
        batch = photo_batch(photos, 64, torch.Generator().manual_seed(1234))
        with torch.no_grad():
            std = vae.encode(batch["hr"] * 2.0 - 1.0).latent_dist.mean.std().item()
        vae.register_to_config(scaling_factor=round(1.0 / std, 4))
    return vae


def train_sd_base(
    folder: Path,
    photos: list[torch.Tensor],
    steps: int,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
) -> list[float]:
    """Write a tiny SD folder (``vae/``, ``text_encoder/``, ``tokenizer/``, ``unet/``, ``scheduler/``) to ``folder``:
    :func:`trained_vae` with its fitted scaling factor, the tests' tiny text encoder and tokenizer, and the tiny UNet
    trained ``steps`` Adam steps on ``||unet(z_t, t, c_"") - v||²`` for the latents ``z_0 = E(hr) · s`` (posterior
    samples) of random crops, ``t ~ U{0..999}``, ``z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps`` on SD's schedule
    (:func:`~sr_diffusion.pipelines.stablesr.stablesr_scheduler` with ``v_prediction``, saved as the base's
    scheduler). Returns the losses."""
    parts = tiny_components(cfw=False)
    vae, unet, scheduler = trained_vae(photos), parts["unet"], stablesr_scheduler("v_prediction")
    with torch.no_grad():
        ids = parts["tokenizer"]([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        text = parts["text_encoder"](ids)[0].expand(batch_size, -1, -1)
    optimizer = torch.optim.Adam(unet.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    unet.train()
    losses = []
    for _ in range(steps):
        hr = photo_batch(photos, batch_size, g)["hr"]
        with torch.no_grad():
            z_0 = vae.encode(hr * 2.0 - 1.0).latent_dist.sample(g) * vae.config.scaling_factor
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=g)
        noise = torch.randn(z_0.shape, generator=g)
        prediction = unet(scheduler.add_noise(z_0, noise, t), t, encoder_hidden_states=text).sample
        loss = F.mse_loss(prediction, scheduler.get_velocity(z_0, noise, t))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    unet.eval().requires_grad_(False)
    for name, part in {**parts, "vae": vae, "unet": unet, "scheduler": scheduler}.items():
        if name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler"):
            part.save_pretrained(folder / name)
    return losses


# ----------------------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------------------


def lr_psnr(pipe, lr: torch.Tensor, seed: int = 0, **call_kwargs) -> torch.Tensor:
    """The LR-consistency PSNR ``(N,)`` (dB, :func:`sr_diffusion.metrics.lr_consistency`, MATLAB bicubic x
    ``pipe.upscale``) of ``pipe``'s output for ``lr`` ``(N, 3, h, w)``, sampled with one generator per image seeded
    ``seed + i``, so every setting of a knob starts from the same draws."""
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(lr.shape[0])]
    images = pipe(lr, generator=generators, output_type="pt", **call_kwargs).images
    return lr_consistency(lr, images, pipe.upscale)
