"""The held-out evaluation: the x4 grid score, the most detailed crop, the held-out sets and the evaluator."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from heldout_data import heldout_crops

from sr_diffusion.heldout import CROP_SIZE, bicubic_lr, bundled_images, corpus_images, evaluate, most_detailed_crop
from sr_diffusion.metrics import gradient_magnitude, grid_score
from sr_diffusion.resize import imresize


def quantize(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round() / 255


def smooth_image(size: int = 128) -> torch.Tensor:
    """A smooth RGB ramp with a faint sensor-like noise (sigma 1 level), float64 (1, 3, size, size)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    base = 0.3 + 0.4 * xx / size + 0.1 * yy / size + 0.05 * torch.sin(yy / 20)
    noise = torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / 255
    return base.double()[None, None].repeat(1, 3, 1, 1) * torch.tensor([1.0, 0.9, 0.8]).view(1, 3, 1, 1) + noise


def four_periodic(size: int = 128, amplitude: float = 1.0) -> torch.Tensor:
    """A 4x4-periodic pattern with RMS ``amplitude`` levels (of 255), the same on the three channels."""
    phases = torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    phases = (phases - phases.mean()) / phases.std()
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return amplitude / 255 * phases[yy % 4, xx % 4][None, None]


# ----------------------------------------------------------------------------------------------------------
# grid_score
# ----------------------------------------------------------------------------------------------------------


def test_grid_score_is_low_on_a_clean_smooth_image_and_high_with_a_faint_4_periodic_pattern():
    clean = grid_score(quantize(smooth_image()))
    assert set(clean) == {"period4", "period2"}
    assert max(clean.values()) < 10, clean
    meshed = grid_score(quantize(smooth_image() + four_periodic(amplitude=1.0)))
    assert meshed["period4"] > 300 and meshed["period2"] > 100, meshed


def test_grid_score_grows_with_the_pattern_amplitude():
    scores = [grid_score(smooth_image() + four_periodic(amplitude=a))["period4"] for a in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(scores, scores[1:])), scores
    assert scores[-1] / scores[-2] == pytest.approx(4, rel=0.5)  # power: amplitude squared, once it dominates


def test_grid_score_ignores_a_brightness_offset():
    img = smooth_image() + four_periodic(amplitude=0.5)
    for offset in (-0.2, 0.1):
        for key, value in grid_score(img + offset).items():
            assert value == pytest.approx(grid_score(img)[key], rel=1e-9)


def test_grid_score_accepts_rgb_and_luminance_with_or_without_batch():
    img = smooth_image() + four_periodic()
    y = (16 + 65.481 * img[:, :1] + 128.553 * img[:, 1:2] + 24.966 * img[:, 2:]) / 255
    expected = grid_score(img)
    for variant in (img[0], y, y[0]):
        assert grid_score(variant) == pytest.approx(expected)


def test_grid_score_of_a_real_crop_and_its_bicubic_upsampling_is_single_digit():
    for image in heldout_crops():
        bicubic = quantize(imresize(image.lr.double(), scale=4))
        for name, img in (("HR", image.hr), ("bicubic", bicubic)):
            assert max(grid_score(img).values()) < 10, (image.name, name, grid_score(img))


def test_grid_score_errors():
    img = smooth_image(64)
    with pytest.raises(ValueError, match="multiples of 4"):
        grid_score(img[..., :62, :])
    with pytest.raises(ValueError, match="at least 32"):
        grid_score(img[..., :28, :28])
    with pytest.raises(ValueError, match="batch of 2"):
        grid_score(img.repeat(2, 1, 1, 1))
    with pytest.raises(TypeError, match="floating"):
        grid_score((img * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="non-finite"):
        grid_score(img * float("nan"))


# ----------------------------------------------------------------------------------------------------------
# most_detailed_crop
# ----------------------------------------------------------------------------------------------------------


def test_gradient_magnitude_map_averages_to_the_mean(photo_tensor):
    magnitude = gradient_magnitude(photo_tensor, crop_border=2, reduction="none")
    assert magnitude.shape == (1, 96 - 6, 128 - 6)
    assert torch.allclose(magnitude.mean(dim=(-2, -1)), gradient_magnitude(photo_tensor, crop_border=2))
    with pytest.raises(ValueError, match="reduction"):
        gradient_magnitude(photo_tensor, reduction="sum")


@pytest.mark.parametrize("size, stride", [(32, 4), (40, 8), (96, 4)])
def test_most_detailed_crop_matches_brute_force(photo_tensor, size, stride):
    h, w = photo_tensor.shape[-2:]
    candidates = [(t, left) for t in range(0, h - size + 1, stride) for left in range(0, w - size + 1, stride)]
    scores = [float(gradient_magnitude(photo_tensor[..., t : t + size, lf : lf + size])[0]) for t, lf in candidates]
    top, left = most_detailed_crop(photo_tensor, size, stride)
    assert top % 4 == 0 and left % 4 == 0
    assert scores[candidates.index((top, left))] == pytest.approx(max(scores), rel=1e-9)


def test_most_detailed_crop_errors(photo_tensor):
    with pytest.raises(ValueError, match="multiple of 4"):
        most_detailed_crop(photo_tensor, 32, stride=6)
    with pytest.raises(ValueError, match="size must be"):
        most_detailed_crop(photo_tensor, 100)


# ----------------------------------------------------------------------------------------------------------
# the held-out sets
# ----------------------------------------------------------------------------------------------------------


def test_shipped_heldout_crops_have_a_smooth_region_and_detail():
    crops = heldout_crops()
    assert [c.name for c in crops] == [
        "life_by_Aitzol_Berasategi",
        "picosdeeuropa_by_Aitzol_Berasategi",
        "seeding_by_Clements_Engelhardt",
    ]
    for crop in crops:
        assert crop.hr.shape == (1, 3, 192, 192) and crop.lr.shape == (1, 3, 48, 48)
        assert torch.equal(crop.lr, quantize(crop.lr))  # on the 8-bit grid
        blocks = torch.nn.functional.avg_pool2d(gradient_magnitude(crop.hr, reduction="none") * 255, 16)[0]
        assert (blocks < 3).float().mean() > 0.1, crop.name  # smooth: sky, bokeh, still water
        assert (blocks > 8).float().mean() > 0.25, crop.name  # detail


def test_corpus_images_take_the_most_detailed_crop_and_its_bicubic_lr(tmp_path, photo):
    big = np.concatenate([np.full_like(photo, 128), photo], axis=1)  # a flat half, then the photo
    PIL.Image.fromarray(big).save(tmp_path / "b.png")
    PIL.Image.fromarray(photo[:64, :64]).save(tmp_path / "a.png")
    a, b = corpus_images(tmp_path, size=64)
    assert (a.name, a.box) == ("a", (0, 0, 64, 64))
    top, left = most_detailed_crop(torch.from_numpy(big).permute(2, 0, 1)[None] / 255.0, 64)
    assert b.box == (top, left, 64, 64) and left >= 128 - 8
    assert torch.equal(b.hr, torch.from_numpy(big[top : top + 64, left : left + 64]).permute(2, 0, 1)[None] / 255.0)
    assert torch.equal(b.lr, bicubic_lr(b.hr)) and b.lr.shape == (1, 3, 16, 16)
    assert CROP_SIZE == 384
    with pytest.raises(ValueError, match="no PNG"):
        corpus_images(tmp_path / "a.png")


def test_bundled_images_are_the_four_held_out_photos_mod_cropped():
    images = bundled_images()
    assert [i.name.split("/")[-1] for i in images] == ["chelsea", "coffee", "rocket", "flower"]
    for image in images:
        assert image.hr.shape[-2] % 4 == 0 and image.hr.shape[-1] % 4 == 0
        assert image.lr.shape[-2:] == (image.hr.shape[-2] // 4, image.hr.shape[-1] // 4)


# ----------------------------------------------------------------------------------------------------------
# the evaluator
# ----------------------------------------------------------------------------------------------------------


class FakePipeline:
    """Bicubic x4 plus an optional 4-periodic mesh; records the generator seeds it was given."""

    def __init__(self, mesh: float = 0.0):
        self.config = SimpleNamespace(upscale=4)
        self.mesh, self.seeds = mesh, []

    def __call__(self, lr, tile_size=None, output_type="pt", generator=None):
        self.seeds.append(None if generator is None else generator.initial_seed())
        sr = imresize(lr.double(), scale=4)
        return SimpleNamespace(images=(sr + four_periodic(sr.shape[-1], self.mesh)).float())


def test_evaluate_scores_each_pipeline_against_bicubic_and_the_hr():
    crops = heldout_crops()
    meshed = FakePipeline(mesh=2.0)
    result = evaluate({"meshed": meshed, "plain": FakePipeline()}, crops)
    assert result.methods == ["bicubic", "meshed", "plain", "HR"]
    assert meshed.seeds == [0, 1, 2]  # seed = the image's index
    for crop in crops:
        bicubic, plain, hr = (result.rows[m][crop.name] for m in ("bicubic", "plain", "HR"))
        assert set(bicubic) == {"psnr_y", "psnr_y_gain", "ssim_y", "lr_consistency", "grad_ratio", "period4", "period2"}
        assert bicubic["psnr_y_gain"] == 0 and plain == pytest.approx(bicubic)  # the same 8-bit image
        assert set(hr) == {"period4", "period2"} and hr == grid_score(crop.hr)
        assert torch.equal(result.outputs["HR"][crop.name], crop.hr)
        assert result.rows["meshed"][crop.name]["period4"] > 50 * bicubic["period4"]
    median, mean = result.summary("meshed"), result.summary("meshed", "mean")
    assert median["psnr_y_gain"] < 0 and mean["psnr_y_gain"] < 0
    values = sorted(r["period4"] for r in result.rows["meshed"].values())
    assert median["period4"] == values[1] and mean["period4"] == pytest.approx(sum(values) / 3)
    assert result.summary("HR").keys() == {"period4", "period2"}
    assert result.to_dict()["plain"]["images"].keys() == {c.name for c in crops}


def test_evaluate_refuses_the_reference_names():
    with pytest.raises(ValueError, match="reserved"):
        evaluate({"bicubic": FakePipeline()}, heldout_crops())
