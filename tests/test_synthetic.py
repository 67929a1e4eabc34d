"""The dead-leaves generator (sr_diffusion.training.synthetic) and its use as training data."""

from __future__ import annotations

import math

import pytest
import torch

from sr_diffusion.training.config import ConfigError, load_config
from sr_diffusion.training.data import (
    SRTrainDataset,
    bicubic_downsample,
    build_train_dataset,
    derive_seed,
)
from sr_diffusion.training.synthetic import DeadLeaves, _first_cover, photo_palette


def _brute_force_first_cover(cy, cx, r, H, W):
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    inside = (ys.flatten()[:, None] - cy) ** 2 + (xs.flatten()[:, None] - cx) ** 2 <= r**2
    return torch.where(inside.any(1), inside.byte().argmax(1), -1)


def test_first_cover_is_the_first_disk_over_each_pixel():
    # small disks (grouped stencils) and large ones (clipped boxes), many partly off the canvas
    g = torch.Generator().manual_seed(0)
    n, H, W = 400, 37, 53
    r = torch.cat(
        [
            torch.rand(n - 8, generator=g, dtype=torch.float64) * 7 + 0.2,
            torch.tensor([9.5, 12, 20, 33.3, 40, 64, 3, 17.9]),
        ]
    )
    r = r[torch.randperm(n, generator=g)]
    cy = torch.rand(n, generator=g, dtype=torch.float64) * (H + 40) - 20
    cx = torch.rand(n, generator=g, dtype=torch.float64) * (W + 40) - 20
    expected = _brute_force_first_cover(cy, cx, r, H, W)
    assert (expected < 0).any() and (expected >= 0).any()
    assert torch.equal(_first_cover(cy, cx, r, H, W), expected)


def test_radii_follow_the_truncated_power_law():
    leaves = DeadLeaves(r_min=1.0, alpha=3.0)
    r = leaves.sample_radii(200_000, 100.0, torch.Generator().manual_seed(0))
    assert r.min() >= 1.0 and r.max() <= 100.0
    # P(r > x) = (x^-2 - 100^-2) / (1 - 100^-2)
    for x in (1.5, 3.0, 10.0, 30.0):
        expected = (x**-2 - 100.0**-2) / (1 - 100.0**-2)
        assert (r > x).double().mean().item() == pytest.approx(expected, rel=0.03, abs=2e-4)
    # E[pi r^2] in closed form, for alpha = 3 and another exponent
    for alpha in (3.0, 2.5):
        leaves = DeadLeaves(alpha=alpha)
        r = leaves.sample_radii(400_000, 20.0, torch.Generator().manual_seed(1))
        assert (math.pi * r**2).mean().item() == pytest.approx(leaves._mean_area(20.0), rel=0.02)


def test_render_is_a_deterministic_8bit_image():
    leaves = DeadLeaves(shading=0.1, blur_sigma=(0.0, 1.0))
    a = leaves.render((24, 40), torch.Generator().manual_seed(3))
    assert a.shape == (3, 24, 40) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, (a * 255).round() / 255)
    assert torch.equal(a, leaves.render((24, 40), torch.Generator().manual_seed(3)))
    assert not torch.equal(a, leaves.render((24, 40), torch.Generator().manual_seed(4)))
    assert leaves.render(1, torch.Generator().manual_seed(0)).shape == (3, 1, 1)
    assert DeadLeaves(r_min=4.0).render(2, torch.Generator().manual_seed(0)).shape == (3, 2, 2)  # r_max >= r_min


def test_flat_leaves_take_their_colours_from_the_palette():
    palette = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.2, 0.4, 0.6]])
    img = DeadLeaves(palette=palette, supersample=1).render(64, torch.Generator().manual_seed(0))
    pixels = img.reshape(3, -1).T
    quantized = (palette * 255).round() / 255
    assert ((pixels[:, None, :] - quantized[None]).abs().amax(-1) == 0).any(1).all()
    assert len({tuple(p.tolist()) for p in pixels}) == 3  # all three colours occur
    # supersampling anti-aliases the edges: mixtures of palette colours appear
    smooth = DeadLeaves(palette=palette, supersample=2).render(64, torch.Generator().manual_seed(0))
    assert len({tuple(p.tolist()) for p in smooth.reshape(3, -1).T}) > 3


def test_photo_palette_draws_pixels_of_the_photos():
    red = torch.zeros(3, 4, 4, dtype=torch.uint8)
    red[0] = 255
    gray = torch.full((1, 5, 5), 0.25)
    colours = photo_palette([red, gray], 200, torch.Generator().manual_seed(0))
    assert colours.shape == (200, 3)
    is_red = (colours == torch.tensor([1.0, 0.0, 0.0])).all(1)
    is_gray = (colours == 0.25).all(1)
    assert (is_red | is_gray).all() and is_red.any() and is_gray.any()


def _spectral_slope(images: torch.Tensor) -> float:
    """Slope of log power against log frequency of the radially pooled spectrum (mid frequencies)."""
    n = images.shape[-1]
    gray = images.mean(1)
    power = (torch.fft.fft2(gray - gray.mean((-2, -1), keepdim=True)).abs() ** 2).mean(0)
    f = (torch.fft.fftfreq(n)[:, None] ** 2 + torch.fft.fftfreq(n)[None] ** 2).sqrt()
    band = (f > 4 / n) & (f < 0.25)
    x, y = f[band].log(), power[band].log()
    design = torch.stack([x, torch.ones_like(x)], 1)
    return torch.linalg.lstsq(design, y[:, None]).solution[0].item()


def test_alpha_3_gives_the_power_spectrum_of_natural_images():
    # Natural photos have power ~ 1/f^2; alpha = 3 is the scale-invariant dead-leaves model.
    def slope(alpha):
        leaves = DeadLeaves(alpha=alpha)
        return _spectral_slope(torch.stack([leaves.render(96, torch.Generator().manual_seed(i)) for i in range(6)]))

    natural, large_leaves, small_leaves = slope(3.0), slope(2.0), slope(5.0)
    assert -2.4 < natural < -1.7
    assert large_leaves < natural < small_leaves


def test_blur_softens_edges():
    sharp = DeadLeaves().render(64, torch.Generator().manual_seed(0))
    soft = DeadLeaves(blur_sigma=(1.5, 1.5)).render(64, torch.Generator().manual_seed(0))
    gradient = lambda img: (img[:, 1:] - img[:, :-1]).abs().mean().item()  # noqa: E731
    assert gradient(soft) < 0.6 * gradient(sharp)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r_min": 0}, "r_min"),
        ({"r_min": 2, "r_max": 1}, "r_max"),
        ({"alpha": 1.0}, "alpha"),
        ({"supersample": 0}, "supersample"),
        ({"blur_sigma": (1.0, 0.5)}, "blur_sigma"),
        ({"shading": 2.0}, "shading"),
        ({"palette": torch.zeros(4, 2)}, "palette"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeadLeaves(**kwargs)


# ----------------------------------------------------------------------------------------------------------
# in the training data
# ----------------------------------------------------------------------------------------------------------


def _photo(seed: int) -> torch.Tensor:
    return (torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)


def test_dataset_mixes_synthetic_crops_without_changing_the_photo_samples():
    photos = [_photo(0), _photo(1)]
    leaves = DeadLeaves(supersample=1)
    plain = SRTrainDataset(photos, scale=4, gt_size=16, seed=5)
    mixed = SRTrainDataset(photos, scale=4, gt_size=16, seed=5, synthetic=leaves, synthetic_fraction=0.5)
    only = SRTrainDataset(photos, scale=4, gt_size=16, seed=5, synthetic=leaves, synthetic_fraction=1.0)
    n_synthetic = 0
    for position in range(40):
        sample = mixed[position]
        assert sample["hr"].shape == (3, 16, 16)
        assert torch.equal(sample["lr"], bicubic_downsample(sample["hr"], 4))
        assert torch.equal(mixed[position]["hr"], sample["hr"])  # deterministic per position
        if torch.equal(sample["hr"], plain[position]["hr"]):
            continue
        n_synthetic += 1
        assert torch.equal(sample["hr"], only[position]["hr"])
    assert 10 <= n_synthetic <= 30
    # the synthetic crop at a position is the generator's render from that position's own stream
    draws = torch.Generator().manual_seed(derive_seed(5, 4, 7))
    torch.rand((), generator=draws)
    assert torch.equal(only[7]["hr"], leaves.render(16, draws))


def test_dataset_synthetic_errors():
    with pytest.raises(ValueError, match="needs a synthetic image generator"):
        SRTrainDataset([_photo(0)], scale=4, gt_size=16, synthetic_fraction=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        SRTrainDataset([_photo(0)], scale=4, gt_size=16, synthetic=DeadLeaves(), synthetic_fraction=1.5)
    with pytest.raises(ValueError, match="unpaired"):
        SRTrainDataset(
            [_photo(0)],
            scale=4,
            gt_size=16,
            lr_items=[_photo(0)[:, :12, :12]],
            synthetic=DeadLeaves(),
            synthetic_fraction=0.5,
        )


def test_config_builds_a_photo_palette_generator(tmp_path):
    for i in range(2):
        (tmp_path / "hr").mkdir(exist_ok=True)
        import PIL.Image

        PIL.Image.fromarray(_photo(i).permute(1, 2, 0).numpy()).save(tmp_path / "hr" / f"{i}.png")
    config = load_config(
        None,
        [
            "data.source=folder",
            f"data.hr_dirs=[{tmp_path / 'hr'}]",
            "data.gt_size=16",
            "data.synthetic.fraction=1.0",
            "data.synthetic.supersample=1",
            "validation.source=none",
        ],
    )
    dataset = build_train_dataset(config)
    assert isinstance(dataset.synthetic, DeadLeaves) and dataset.synthetic.palette.shape == (65536, 3)
    photo_colours = {tuple(p.tolist()) for i in range(2) for p in (_photo(i).reshape(3, -1).T.float() / 255)}
    hr = dataset[0]["hr"]
    assert {tuple(p.tolist()) for p in hr.reshape(3, -1).T} <= photo_colours
    with pytest.raises(ConfigError, match="data.synthetic.fraction"):
        load_config(None, ["data.synthetic.fraction=2"])
    bad = load_config(None, ["data.synthetic.fraction=0.5", "data.synthetic.r_min=0", "validation.source=none"])
    with pytest.raises(ConfigError, match="data.synthetic: r_min must be > 0"):
        build_train_dataset(bad)
    with pytest.raises(ConfigError, match="data.synthetic.fraction"):
        load_config(
            None,
            ["data.source=paired", "data.hr_dirs=[a]", "data.lr_dirs=[b]", "data.synthetic.fraction=0.5"],
        )
