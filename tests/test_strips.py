"""Upscaling in strips (sr_diffusion.strips) and the CLI's use of it for outputs too large to hold in float."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from sr_diffusion import cli
from sr_diffusion.strips import strip_rows, upscale_in_strips


@pytest.mark.parametrize("height, strip, overlap", [(100, 30, 8), (30, 30, 8), (10, 30, 8), (61, 20, 0), (97, 34, 17)])
def test_strip_rows_cover_the_image_with_the_overlap(height, strip, overlap):
    rows = strip_rows(height, strip, overlap)
    assert rows[0][0] == 0 and rows[-1][1] == height
    for (top, bottom), (next_top, _) in zip(rows, rows[1:]):
        assert bottom - top == strip and bottom - next_top == overlap  # every strip but the last is whole
    assert rows[-1][1] - rows[-1][0] > overlap or len(rows) == 1
    for y in range(height):
        assert 1 <= sum(top <= y < bottom for top, bottom in rows) <= 2
    with pytest.raises(ValueError, match="strip overlap"):
        strip_rows(height, 8, 5)  # rows in three strips


def nearest(scale: int):
    def upscale(image: PIL.Image.Image) -> np.ndarray:
        return np.asarray(image, np.float32).repeat(scale, 0).repeat(scale, 1) / 255.0

    return upscale


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_strips_reassemble_a_local_upscale_exactly(mode):
    """A function of each pixel alone gives the same image in strips as whole: the overlaps blend equal values."""
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (53, 21, len(mode)), np.uint8), mode=mode)
    seen = []
    out = upscale_in_strips(
        nearest(3), image, scale=3, strip=16, overlap=5, progress=lambda done, total: seen.append((done, total))
    )
    assert out.mode == mode and out.size == (63, 159)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(image).repeat(3, 0).repeat(3, 1))
    assert seen == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]


def test_strip_overlaps_blend_linearly():
    """Strip k upscales to the constant k/8: the output is k/8 inside strip k, and ramps from one strip's value to
    the next over the s·o overlap rows with the weights (i + ½) / (s·o)."""
    image = PIL.Image.new("RGB", (4, 40))
    count = iter(range(10))

    def constant(part: PIL.Image.Image) -> np.ndarray:
        return np.full((part.height * 2, part.width * 2, 3), next(count) / 8, np.float32)

    out = np.asarray(upscale_in_strips(constant, image, scale=2, strip=16, overlap=4))[:, 0, 0].astype(float)
    rows = strip_rows(40, 16, 4)  # (0, 16), (12, 28), (24, 40)
    ramp = (np.arange(8) + 0.5) / 8
    for k, (top, bottom) in enumerate(rows):
        inner = slice(2 * top + (8 if k else 0), 2 * bottom - (8 if k + 1 < len(rows) else 0))
        np.testing.assert_array_equal(out[inner], round(255 * k / 8))
    for k in (1, 2):
        overlap = out[2 * rows[k][0] : 2 * rows[k][0] + 8]
        np.testing.assert_array_equal(overlap, np.round(255 * ((k - 1) * (1 - ramp) + k * ramp) / 8))


def test_strips_refuse_a_wrong_output_shape():
    with pytest.raises(ValueError, match="strip 0: upscaled to"):
        upscale_in_strips(nearest(2), PIL.Image.new("RGB", (8, 8)), scale=3, strip=4, overlap=1)


class _Pipe:
    upscale = 4


def test_plan_strips_fits_a_12_megapixel_photo_in_the_default_budget():
    """3000x4000 at x4: the whole-image plan needs ~10 GB (regression) and ~23 GB (generative) for the output's float
    buffers; strips keep the estimate under the default --max-memory, the 8-bit output included."""
    budget = cli.DEFAULT_MAX_MEMORY_GIB * 2**30
    for name in ("RegressionSRPipeline", "ResShiftPipeline"):
        pipe = type(name, (_Pipe,), {})()
        assert cli.plan_tile(pipe, 3000, 4000, budget)[1] > 5 * budget
        rows, tile, needed = cli.plan_strips(pipe, 3000, 4000, budget)
        assert needed <= budget and cli.MIN_AUTO_TILE <= rows < 4000 and tile is not None
        assert needed > cli.IMAGE_BYTES_PER_OUTPUT_PIXEL * 3000 * 4000 * 16  # the 8-bit output is counted
    assert cli.plan_strips(pipe, 3000, 100, budget) is None  # one strip would be the whole image


def test_cli_upscales_in_strips_when_the_output_does_not_fit(photo, tmp_path, monkeypatch, capsys):
    """A budget the whole output's float buffers exceed: three strips of 40 rows (overlap 8), each whole; the image
    is the whole-image run's exactly away from the overlaps (the model sees 4 px around a pixel), and within a few
    levels inside them."""
    import torch

    from sr_diffusion.models import SRVGGNetCompact
    from sr_diffusion.pipelines import RegressionSRPipeline

    torch.manual_seed(0)
    RegressionSRPipeline(model=SRVGGNetCompact(num_feat=8, num_conv=2, upscale=4)).save_pretrained(tmp_path / "m")
    PIL.Image.fromarray(photo).save(tmp_path / "photo.png")  # 128x96
    monkeypatch.setattr(cli, "WORK_OVERHEAD", 0)
    monkeypatch.setattr(cli, "MIN_AUTO_TILE", 16)
    monkeypatch.setitem(cli.MEMORY_PER_PIXEL, "RegressionSRPipeline", (1000, 1))
    out_row = (1000 + cli.STRIP_BYTES_PER_OUTPUT_PIXEL) * 128 * 16
    budget = cli.IMAGE_BYTES_PER_OUTPUT_PIXEL * 128 * 96 * 16 + 2 * 40 * out_row + 1
    base = ["upscale", str(tmp_path / "photo.png"), "--model", str(tmp_path / "m"), "-q", "--tile-overlap", "8"]
    calls = []
    original = RegressionSRPipeline.__call__

    def spy(self, image, **kwargs):
        calls.append((image.size, kwargs.get("tile_size"), kwargs.get("output_type", "pil")))
        return original(self, image, **kwargs)

    monkeypatch.setattr(RegressionSRPipeline, "__call__", spy)
    assert cli.main([*base, "-o", str(tmp_path / "strips.png"), "--max-memory", f"{budget / 2**30!r}"]) == 0
    assert calls == [((128, 40), None, "np"), ((128, 40), None, "np"), ((128, 32), None, "np")]
    assert cli.main([*base, "-o", str(tmp_path / "whole.png"), "--max-memory", "100"]) == 0
    assert calls[-1] == ((128, 96), None, "pil") and capsys.readouterr().err == ""
    strips, whole = (np.asarray(PIL.Image.open(tmp_path / f"{n}.png"), np.int16) for n in ("strips", "whole"))
    assert strips.shape == whole.shape == (384, 512, 3)
    blended = np.zeros(384, bool)
    blended[4 * 32 : 4 * 40] = blended[4 * 64 : 4 * 72] = True
    np.testing.assert_array_equal(strips[~blended], whole[~blended])
    assert np.abs(strips - whole)[blended].max() <= 8
