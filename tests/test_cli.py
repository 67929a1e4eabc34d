"""The ``sr-diffusion`` command line, run in-process through ``main(argv)``."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from sr_diffusion.cli import main
from sr_diffusion.models import RRDBNet, SRVGGNetCompact
from sr_diffusion.pipelines import RegressionSRPipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    RegressionSRPipeline(model=SRVGGNetCompact(num_feat=8, num_conv=2, upscale=4)).save_pretrained(folder)
    return folder


@pytest.fixture
def inputs(tmp_path, photo):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    PIL.Image.fromarray(photo[:20, :24]).save(folder / "a.png")
    PIL.Image.fromarray(photo[:9, :11]).convert("L").save(folder / "sub" / "b.jpg")
    PIL.Image.fromarray(np.dstack([photo[:8, :8], np.full((8, 8), 200, np.uint8)]), "RGBA").save(folder / "c.png")
    return folder


def test_upscale_folder(model_dir, inputs, tmp_path):
    out = tmp_path / "out"
    assert main(["upscale", str(inputs), "-o", str(out), "--model", str(model_dir), "-q"]) == 0
    assert PIL.Image.open(out / "a.png").size == (96, 80)
    assert PIL.Image.open(out / "sub" / "b.png").size == (44, 36)
    assert PIL.Image.open(out / "c.png").mode == "RGBA"


def test_upscale_scale_tile_and_skip_existing(model_dir, inputs, tmp_path):
    out = tmp_path / "out"
    args = ["upscale", str(inputs / "a.png"), "-o", str(out), "--model", str(model_dir), "-q"]
    assert main(args + ["--scale", "2", "--tile", "16", "--tile-overlap", "4"]) == 0
    assert PIL.Image.open(out / "a.png").size == (48, 40)
    mtime = (out / "a.png").stat().st_mtime_ns
    assert main(args + ["--skip-existing"]) == 0
    assert (out / "a.png").stat().st_mtime_ns == mtime


def test_bad_file_in_folder_is_reported_and_rest_processed(model_dir, inputs, tmp_path, capsys):
    (inputs / "empty.png").touch()
    (inputs / "text.png").write_text("hello")
    whole = (inputs / "a.png").read_bytes()
    (inputs / "truncated.png").write_bytes(whole[: len(whole) // 2])
    PIL.Image.new("L", (16385, 1)).save(inputs / "wide.png")  # a side over 16k pixels, no --tile: tiled automatically
    out = tmp_path / "out"
    assert main(["upscale", str(inputs), "-o", str(out), "--model", str(model_dir), "-q"]) == 1
    err = capsys.readouterr().err
    assert "3 of 7 image(s) failed" in err
    assert PIL.Image.open(out / "wide.png").size == (65540, 4)
    for name, reason in [("empty", "empty"), ("text", "not an image"), ("truncated", "truncated")]:
        (line,) = [line for line in err.splitlines() if f"{name}.png" in line]
        assert reason in line and line.startswith("error: ")
        assert not (out / f"{name}.png").exists()
    assert (out / "a.png").is_file() and (out / "c.png").is_file()
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary files left


def test_never_overwrites_inputs(model_dir, inputs, capsys):
    before = (inputs / "a.png").read_bytes()
    assert main(["upscale", str(inputs / "a.png"), "-o", str(inputs), "--model", str(model_dir), "-q"]) == 1
    assert "would overwrite an input" in capsys.readouterr().err
    assert (inputs / "a.png").read_bytes() == before


def test_an_output_file_for_one_input(model_dir, inputs, tmp_path, capsys):
    """``-o result.jpg`` with one input image writes that file, in the extension's format; anything that needs a
    folder (several inputs, --ext, --suffix) is refused before any work, and an existing folder named like an image
    stays a folder."""
    base = ["--model", str(model_dir), "-q"]
    out = tmp_path / "deep" / "result.jpg"
    assert main(["upscale", str(inputs / "a.png"), "-o", str(out), *base]) == 0
    with PIL.Image.open(out) as image:
        assert image.format == "JPEG" and image.size == (96, 80)
    assert main(["upscale", str(inputs / "a.png"), "-o", str(inputs / "a.png"), *base]) == 1  # never the input
    assert "would overwrite an input" in capsys.readouterr().err
    for extra in (["--ext", "webp"], ["--suffix", "_x4"]):
        assert main(["upscale", str(inputs / "a.png"), "-o", str(tmp_path / "r.png"), *base, *extra]) == 2
    assert main(["upscale", str(inputs), "-o", str(tmp_path / "r.png"), *base]) == 2
    err = capsys.readouterr().err
    assert "--ext and --suffix name files in an output folder" in err and "takes one input image, got 3" in err
    assert not (tmp_path / "r.png").exists()
    (tmp_path / "folder.png").mkdir()
    assert main(["upscale", str(inputs / "a.png"), "-o", str(tmp_path / "folder.png"), *base]) == 0
    assert (tmp_path / "folder.png" / "a.png").is_file()
    (tmp_path / "notes.txt").write_text("x")
    assert main(["upscale", str(inputs / "a.png"), "-o", str(tmp_path / "notes.txt"), *base]) == 2
    assert "neither a folder nor an image file name" in capsys.readouterr().err


def test_one_line_errors(tmp_path, model_dir, capsys):
    assert main(["upscale", str(tmp_path / "nope.png"), "-o", str(tmp_path)]) == 2
    assert main(["upscale", str(tmp_path), "-o", str(tmp_path / "o"), "--model", str(model_dir)]) == 2
    assert main(["upscale", str(tmp_path), "-o", str(tmp_path / "o"), "--model", str(tmp_path)]) == 2
    assert main(["eval", "--hr", str(tmp_path / "missing"), "--sr", str(tmp_path)]) == 2
    assert main(["eval", "--hr", str(tmp_path), "--sr", str(tmp_path), "--model", str(model_dir)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 5 and all(line.startswith("error: ") for line in lines)


def test_convert_original_checkpoint_then_upscale(tmp_path, inputs):
    torch.manual_seed(0)
    model = RRDBNet(num_feat=8, num_block=1, num_grow_ch=4, scale=4)
    torch.save({"params_ema": model.state_dict()}, tmp_path / "net.pth")
    out = tmp_path / "converted"
    assert main(["convert", str(tmp_path / "net.pth"), str(out)]) == 0
    assert (out / "model_index.json").is_file()
    assert main(["upscale", str(inputs / "a.png"), "-o", str(tmp_path / "up"), "--model", str(out), "-q"]) == 0
    assert PIL.Image.open(tmp_path / "up" / "a.png").size == (96, 80)


def test_convert_errors(tmp_path, capsys):
    torch.manual_seed(0)
    torch.save({"params": RRDBNet(num_feat=8, num_block=1, num_grow_ch=4, scale=4).state_dict()}, tmp_path / "n.pth")
    assert main(["convert", str(tmp_path / "n.pth"), str(tmp_path / "o1"), "--scale", "2"]) == 2
    assert main(["convert", str(tmp_path / "n.pth"), str(tmp_path / "o2"), "--arch", "edsr"]) == 2
    (tmp_path / "zero.pth").touch()
    assert main(["convert", str(tmp_path / "zero.pth"), str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))


def test_eval_model_and_folders(model_dir, tmp_path, photo):
    hr = tmp_path / "hr"
    hr.mkdir()
    PIL.Image.fromarray(photo[:64, :64]).save(hr / "p1.png")
    PIL.Image.fromarray(photo[32:90, 40:101]).save(hr / "p2.png")  # not a multiple of 4: mod-cropped
    out = tmp_path / "report"
    assert main(["eval", "--hr", str(hr), "--model", str(model_dir), "-o", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["count"] == 2 and {"psnr_y", "ssim_y", "bicubic_psnr_y", "lr_consistency"} <= set(report["mean"])
    assert (out / "metrics.csv").read_text().splitlines()[-1].startswith("MEAN")
    # identical SR and HR folders: infinite PSNR, SSIM 1
    assert main(["eval", "--hr", str(hr), "--sr", str(hr), "-o", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["mean"]["psnr"] == "inf" and report["mean"]["ssim"] == pytest.approx(1.0)


def test_demo_writes_result_and_comparison(model_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--model", str(model_dir)]) == 0
    sr = PIL.Image.open(out / "sample_sr.png")
    grid = PIL.Image.open(out / "sample_comparison.png")
    assert sr.size == (600, 400)
    assert grid.width == 3 * 600 + 2 * 4 and grid.height > 400
    assert "150x100 -> 600x400" in capsys.readouterr().out


def test_convert_resshift_checkpoint_with_preset_and_vae(tmp_path, capsys):
    """Released ResShift denoiser (original layout) + VQ-f4 autoencoder -> a ResShiftPipeline folder."""
    from test_conversion_resshift import TINY, ldm_vq_state_dict, original_unet_state_dict

    from sr_diffusion.pipelines import AutoSRPipeline, ResShiftPipeline

    torch.save({"state_dict": original_unet_state_dict(TINY)}, tmp_path / "resshift.pth")
    torch.save(ldm_vq_state_dict(ch_mult=(1, 2, 2)), tmp_path / "vq_f4.pth")
    base = ["convert", str(tmp_path / "resshift.pth")]
    assert main([*base, str(tmp_path / "no_preset")]) == 2
    assert main([*base, str(tmp_path / "bad_preset"), "--preset", "v9"]) == 2
    err = capsys.readouterr().err
    assert "--preset" in err and "unknown --preset 'v9'" in err
    assert main([*base, str(tmp_path / "out"), "--preset", "v3", "--vae", str(tmp_path / "vq_f4.pth")]) == 0
    pipe = AutoSRPipeline.from_pretrained(tmp_path / "out")
    assert isinstance(pipe, ResShiftPipeline) and pipe.vae is not None
    assert pipe.scheduler.config.num_train_timesteps == 4
    assert not (tmp_path / "no_preset").exists() and not (tmp_path / "bad_preset").exists()


def test_convert_rejects_resshift_options_for_a_regression_file(tmp_path, capsys):
    torch.manual_seed(0)
    torch.save({"params": RRDBNet(num_feat=8, num_block=1, num_grow_ch=4, scale=4).state_dict()}, tmp_path / "n.pth")
    assert main(["convert", str(tmp_path / "n.pth"), str(tmp_path / "o"), "--preset", "v3"]) == 2
    assert "for ResShift checkpoints" in capsys.readouterr().err


def test_upscale_lr_consistency_with_a_diffusion_pipeline(tmp_path, inputs, model_dir, capsys):
    """--lr-consistency reaches the pipeline's lr_consistency (the file is what the Python call gives) and makes the
    output explain its input; a pipeline without the keyword (regression) refuses it in one line, writing nothing."""
    from test_pipeline_resshift import tiny_resshift_unet, tiny_scheduler

    from sr_diffusion.image_processor import load_image
    from sr_diffusion.metrics import lr_consistency
    from sr_diffusion.pipelines import AutoSRPipeline, ResShiftPipeline

    folder = tmp_path / "resshift"
    ResShiftPipeline(unet=tiny_resshift_unet(), scheduler=tiny_scheduler()).save_pretrained(folder)
    base = ["upscale", str(inputs / "a.png"), "--model", str(folder), "-q"]
    assert main([*base, "-o", str(tmp_path / "plain")]) == 0
    torch.manual_seed(0)  # the command passes no generator: the noise comes from the global RNG
    assert main([*base, "-o", str(tmp_path / "consistent"), "--lr-consistency"]) == 0

    def to_tensor(image):
        return torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1)[None].double() / 255

    torch.manual_seed(0)
    pipe = AutoSRPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(load_image(inputs / "a.png"), lr_consistency=True).images[0]
    consistent = load_image(tmp_path / "consistent" / "a.png")
    np.testing.assert_array_equal(np.asarray(consistent), np.asarray(expected))
    lr, plain = to_tensor(load_image(inputs / "a.png")), to_tensor(load_image(tmp_path / "plain" / "a.png"))
    assert plain.shape == (1, 3, 80, 96)
    assert lr_consistency(lr, to_tensor(consistent), 4).item() > lr_consistency(lr, plain, 4).item() + 15

    out = tmp_path / "refused"
    assert main(["upscale", str(inputs), "-o", str(out), "--model", str(model_dir), "--lr-consistency"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --lr-consistency") and "RegressionSRPipeline" in line
    assert not out.exists()


def test_upscale_prompt_guided_options_reach_the_pipeline(tmp_path, inputs, model_dir, capsys):
    """The prompt-guided options (--prompt, --negative-prompt, --steps, --guidance-scale, --color-fix, --seed) give
    what the Python call with the same keywords gives; a pipeline without them (regression) refuses them."""
    from stablesr_tiny import tiny_components

    from sr_diffusion.image_processor import load_image
    from sr_diffusion.pipelines import AutoSRPipeline, StableSRPipeline

    folder = tmp_path / "stablesr"
    StableSRPipeline(**tiny_components()).save_pretrained(folder)
    small = tmp_path / "small.png"
    load_image(inputs / "a.png").crop((0, 0, 8, 8)).save(small)
    options = ["--prompt", "a dog", "--negative-prompt", "blur", "--steps", "2", "--guidance-scale", "2.5",
               "--color-fix", "wavelet", "--seed", "7"]  # fmt: skip
    for run in ("one", "two"):
        assert main(["upscale", str(small), "-o", str(tmp_path / run), "--model", str(folder), "-q", *options]) == 0
    pipe = AutoSRPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        load_image(small), prompt="a dog", negative_prompt="blur", num_inference_steps=2, guidance_scale=2.5,
        color_fix="wavelet", generator=torch.Generator().manual_seed(7),
    ).images[0]  # fmt: skip
    for run in ("one", "two"):
        np.testing.assert_array_equal(np.asarray(load_image(tmp_path / run / "small.png")), np.asarray(expected))

    capsys.readouterr()
    out = tmp_path / "refused"
    assert main(["upscale", str(inputs), "-o", str(out), "--model", str(model_dir), "--prompt", "a dog"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: --prompt") and "RegressionSRPipeline" in err[0]
    assert not out.exists()


def test_a_pipeline_default_lr_consistency_and_its_override(tmp_path, inputs):
    """A folder saved with lr_consistency=True projects by default; --no-lr-consistency turns it off. Same files as
    the Python calls with the same seed."""
    from test_pipeline_resshift import tiny_scheduler, tiny_unshuffle_unet

    from sr_diffusion.image_processor import load_image
    from sr_diffusion.pipelines import AutoSRPipeline, ResShiftPipeline

    folder = tmp_path / "resshift"
    pipe = ResShiftPipeline(unet=tiny_unshuffle_unet(), scheduler=tiny_scheduler(), lr_consistency=True)
    pipe.save_pretrained(folder)
    base = ["upscale", str(inputs / "a.png"), "--model", str(folder), "-q", "--seed", "0"]
    assert main([*base, "-o", str(tmp_path / "default")]) == 0
    assert main([*base, "-o", str(tmp_path / "off"), "--no-lr-consistency"]) == 0
    pipe = AutoSRPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    image = load_image(inputs / "a.png")
    for out, flag in (("default", True), ("off", False)):
        expected = pipe(image, generator=torch.Generator().manual_seed(0), lr_consistency=flag).images[0]
        np.testing.assert_array_equal(np.asarray(load_image(tmp_path / out / "a.png")), np.asarray(expected))
    assert not np.array_equal(
        np.asarray(load_image(tmp_path / "default" / "a.png")), np.asarray(load_image(tmp_path / "off" / "a.png"))
    )


def test_eval_with_a_diffusion_pipeline_is_seeded(tmp_path, photo):
    """eval runs a sampling pipeline too (no --scale keyword there; a seeded generator per image): two runs agree."""
    from test_pipeline_resshift import tiny_scheduler, tiny_unshuffle_unet

    from sr_diffusion.pipelines import ResShiftPipeline

    hr = tmp_path / "hr"
    hr.mkdir()
    PIL.Image.fromarray(photo[:32, :40]).save(hr / "a.png")
    folder = tmp_path / "resshift"
    ResShiftPipeline(unet=tiny_unshuffle_unet(), scheduler=tiny_scheduler()).save_pretrained(folder)
    reports = []
    for run in ("one", "two"):
        assert main(["eval", "--hr", str(hr), "--model", str(folder), "-o", str(tmp_path / run)]) == 0
        reports.append(json.loads((tmp_path / run / "metrics.json").read_text()))
    assert reports[0] == reports[1] and reports[0]["count"] == 1
    assert {"psnr_y", "grad_ratio", "bicubic_grad_ratio", "lr_consistency"} <= set(reports[0]["mean"])


def test_model_and_regression_are_exclusive(model_dir, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["upscale", str(inputs), "-o", str(out), "--model", str(model_dir), "--regression"]) == 2
    assert "either --model or --regression" in capsys.readouterr().err and not out.exists()


# ---------------------------------------------------------------------------------------------------
# issue 13: nothing lost, nothing crashes


def _tiny_rrdb_checkpoint(path):
    torch.manual_seed(0)
    torch.save({"params_ema": RRDBNet(num_feat=8, num_block=1, num_grow_ch=4, scale=4).state_dict()}, path)


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_convert_overwrite_never_deletes_what_it_did_not_write(tmp_path, capsys):
    """``convert dl/net.pth dl/ --overwrite`` and ``--overwrite`` onto a project folder are refused in one line with
    every file kept; --overwrite replaces only an earlier output of the command (a folder holding only a pipeline)."""
    dl = tmp_path / "dl"
    dl.mkdir()
    _tiny_rrdb_checkpoint(dl / "RealESRGAN_x4.pth")
    (dl / "notes.txt").write_text("mine")
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print(1)")
    before = {folder: _snapshot(folder) for folder in (dl, project)}
    checkpoint = str(dl / "RealESRGAN_x4.pth")
    assert main(["convert", checkpoint, str(dl), "--overwrite"]) == 2
    assert main(["convert", checkpoint, str(dl) + "/", "--overwrite"]) == 2
    assert main(["convert", checkpoint, str(project), "--overwrite"]) == 2
    assert main(["convert", checkpoint, str(tmp_path), "--overwrite"]) == 2  # a folder above the input
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines)
    assert "contains or is inside the input" in lines[0] and "written by sr-diffusion" in lines[2]
    assert {folder: _snapshot(folder) for folder in (dl, project)} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left

    out = tmp_path / "converted"
    assert main(["convert", checkpoint, str(out)]) == 0
    assert main(["convert", checkpoint, str(out)]) == 2  # exists: --overwrite needed
    assert main(["convert", checkpoint, str(out), "--overwrite"]) == 0  # an earlier output: replaced
    assert (out / "model_index.json").is_file()
    (out / "my_notes.txt").write_text("mine")  # no longer only ours
    assert main(["convert", checkpoint, str(out), "--overwrite"]) == 2
    assert (out / "my_notes.txt").read_text() == "mine"
    (tmp_path / "a_file").write_text("x")
    assert main(["convert", checkpoint, str(tmp_path / "a_file"), "--overwrite"]) == 2
    assert (tmp_path / "a_file").read_text() == "x"
    assert "not a folder" in capsys.readouterr().err


def _png(width, height, idat=b""):
    """A PNG (1-bit grayscale) with the given header size and raw IDAT payload (none: a header-only bomb)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + (chunk(b"IDAT", idat) if idat else b"") + chunk(b"IEND", b"")


def test_decompression_bombs_are_one_failed_file(model_dir, inputs, tmp_path, capsys):
    """A 66-byte PNG claiming 100000x100000 and a small all-zero 20000x20000 PNG are refused from their header (an
    ImageLoadError from the API, one line in a folder run, the rest processed); --max-pixels raises the limit."""
    import zlib

    from sr_diffusion.image_processor import ImageLoadError, load_image

    (inputs / "bomb.png").write_bytes(_png(100_000, 100_000, zlib.compress(b"\x00" * 64)))
    assert (inputs / "bomb.png").stat().st_size < 100
    row = b"\x00" * (1 + 20_000 // 8)
    (inputs / "zeros.png").write_bytes(_png(20_000, 20_000, zlib.compress(row * 20_000, 9)))
    with pytest.raises(ImageLoadError, match="over the 100-megapixel limit.*--max-pixels"):
        load_image(inputs / "bomb.png")
    with pytest.raises(ImageLoadError, match="400.0 megapixels"):
        load_image(inputs / "zeros.png")
    with pytest.raises(ImageLoadError, match="over the 0.0001-megapixel limit"):
        load_image(inputs / "a.png", max_pixels=100)

    out = tmp_path / "out"
    assert main(["upscale", str(inputs), "-o", str(out), "--model", str(model_dir), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and err[-1] == "2 of 5 image(s) failed"
    assert all("megapixel limit" in line and line.startswith("error: ") for line in err[:2])
    assert sorted(p.name for p in out.rglob("*.png")) == ["a.png", "b.png", "c.png"]
    # the limit is the option's
    base = ["upscale", str(inputs / "a.png"), "-o", str(tmp_path / "limited"), "--model", str(model_dir), "-q"]
    assert main([*base, "--max-pixels", "400"]) == 1
    assert "over the 0.0004-megapixel limit" in capsys.readouterr().err
    assert main([*base, "--max-pixels", "480"]) == 0
    assert main(["upscale", str(inputs / "a.png"), "-o", str(out), "--model", str(model_dir), "--max-pixels", "0"]) == 2
    assert "--max-pixels" in capsys.readouterr().err


def test_outputs_never_overwrite_each_other(model_dir, inputs, tmp_path, capsys):
    """``a.png`` and ``a.jpg`` in one folder, or ``tree/a/x.png tree/b/x.png`` as two arguments, would write one file:
    refused in one line before any work (nothing written)."""
    PIL.Image.open(inputs / "a.png").convert("RGB").save(inputs / "a.jpg")
    tree = tmp_path / "tree"
    for sub in ("a", "b"):
        (tree / sub).mkdir(parents=True)
        PIL.Image.open(inputs / "c.png").save(tree / sub / "x.png")
    out = tmp_path / "out"
    base = ["-o", str(out), "--model", str(model_dir), "-q"]
    assert main(["upscale", str(inputs), *base]) == 2
    assert main(["upscale", str(tree / "a" / "x.png"), str(tree / "b" / "x.png"), *base]) == 2
    assert main(["upscale", str(tree / "a"), str(tree / "b"), *base]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all("would both be written to" in line for line in lines)
    assert "a.jpg" in lines[0] and "a.png" in lines[0]
    assert not out.exists()
    assert main(["upscale", str(tree), *base]) == 0  # a folder keeps its relative paths: no collision
    assert (out / "a" / "x.png").is_file() and (out / "b" / "x.png").is_file()


def test_runtime_arguments_are_one_line_errors(model_dir, inputs, tmp_path, capsys):
    """--device bogus, --device cuda without a GPU, --scale inf and a seed past 64 bits: one line naming the option,
    exit 2, no traceback, nothing written."""
    out = tmp_path / "out"
    base = ["upscale", str(inputs / "a.png"), "-o", str(out), "--model", str(model_dir), "-q"]
    cases = [(["--device", "bogus"], "not a torch device name"), (["--scale", "inf"], "--scale: 'inf'"),
             (["--seed", "99999999999999999999"], "is not a seed (an integer in [0, 18446744073709551615])"),
             (["--tile", "-3"], "--tile: '-3'"), (["--scale", "nan"], "--scale: 'nan'")]  # fmt: skip
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "no usable CUDA GPU"))
    for extra, reason in cases:
        assert main([*base, *extra]) == 2, extra
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("error: ") and reason in line, line
    assert not out.exists()


def test_unwritable_output_is_refused_before_any_work(model_dir, inputs, tmp_path, capsys, monkeypatch):
    """A read-only output folder (or a file in the output's path) is one line before the model is even loaded."""
    import os

    import sr_diffusion.cli as cli

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(cli, "load_pipeline", no_loading)
    if os.geteuid() == 0:  # root writes through permissions: a read-only file system instead
        readonly = Path("/proc/sr_diffusion_out")
    else:
        readonly = tmp_path / "readonly"
        readonly.mkdir()
        readonly.chmod(0o555)
    (tmp_path / "file").write_text("x")
    for out in (readonly, readonly / "deeper" / "r.png", tmp_path / "file" / "sub"):
        assert main(["upscale", str(inputs / "a.png"), "-o", str(out), "--model", str(model_dir), "-q"]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("error: ") and ("not writable" in line or "is a file" in line), line
    assert (tmp_path / "file").read_text() == "x"


def test_silent_nonsense_is_refused_or_fixed(model_dir, inputs, tmp_path, capsys):
    """--tile 1 --tile-overlap 0 (a grey mush) and -o out.gif / out.xyz (a folder of that name) are refused in one
    line; a 1x1 or 300x1 image keeps its colour through the regression pipeline (its model sees an edge-replicated
    neighbourhood)."""
    from sr_diffusion.image_processor import load_image
    from sr_diffusion.pipelines import AutoSRPipeline

    base = ["upscale", str(inputs / "a.png"), "--model", str(model_dir), "-q"]
    for extra in (["--tile", "1", "--tile-overlap", "0"], ["--tile", "4"], ["--tile", "16", "--tile-overlap", "16"]):
        assert main([*base, "-o", str(tmp_path / "tiled"), *extra]) == 2
    for name in ("out.gif", "out.xyz"):
        assert main([*base, "-o", str(tmp_path / name)]) == 2
        assert not (tmp_path / name).exists()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 5 and all(line.startswith("error: ") for line in lines)
    assert "--tile: '1'" in lines[0] and "smaller than --tile" in lines[2] and ".gif is not an output" in lines[3]
    assert not (tmp_path / "tiled").exists()

    pipe = AutoSRPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    reference = np.asarray(pipe(PIL.Image.new("RGB", (32, 32), (200, 30, 60))).images[0])[48:80, 48:80]
    for size in ((1, 1), (300, 1)):
        PIL.Image.new("RGB", size, (200, 30, 60)).save(tmp_path / "tiny.png")
        assert main(["upscale", str(tmp_path / "tiny.png"), "-o", str(tmp_path / "tiny"), "--model", str(model_dir),
                     "-q"]) == 0  # fmt: skip
        out = np.asarray(load_image(tmp_path / "tiny" / "tiny.png")).astype(float)
        assert out.shape == (size[1] * 4, size[0] * 4, 3)
        assert np.abs(out.mean((0, 1)) - reference.mean((0, 1))).max() < 3


def test_fuzzed_images_fail_alone(model_dir, photo, tmp_path, capsys):
    """200 seeded corruptions (bit flips, truncations, header edits) of PNG, JPEG and WebP files in one folder run:
    each file is written or fails alone in one line, and the run finishes."""
    import io

    rng = np.random.default_rng(13)
    originals = {}
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")):
        buffer = io.BytesIO()
        PIL.Image.fromarray(photo[:16, :16]).save(buffer, format=fmt)
        originals[ext] = buffer.getvalue()
    folder = tmp_path / "fuzz"
    folder.mkdir()
    for i in range(200):
        ext = ("png", "jpg", "webp")[i % 3]
        data = bytearray(originals[ext])
        kind = i % 4
        if kind == 0:  # bit flips anywhere
            for pos in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
                data[pos] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:  # truncation
            data = data[: int(rng.integers(1, len(data)))]
        elif kind == 2:  # header edits: random bytes in the first 40
            for pos in rng.integers(0, min(40, len(data)), size=int(rng.integers(1, 6))):
                data[pos] = int(rng.integers(0, 256))
        else:  # a huge claimed size in the header region (PNG IHDR width/height, elsewhere any 4 bytes)
            pos = 16 if ext == "png" else int(rng.integers(0, min(40, len(data) - 4)))
            data[pos : pos + 4] = int(rng.integers(1, 2**31)).to_bytes(4, "big")
        (folder / f"{i:03d}.{ext}").write_bytes(bytes(data))
    out = tmp_path / "out"
    status = main(["upscale", str(folder), "-o", str(out), "--model", str(model_dir), "-q"])
    lines = capsys.readouterr().err.strip().splitlines()
    failed = [line for line in lines if not line.endswith("image(s) failed")]
    assert status in (0, 1) and (status == 1) == bool(failed)
    assert all(line.startswith("error: ") and "Traceback" not in line for line in failed)
    names = [line.split(": ")[1].rsplit("/", 1)[-1] for line in failed]
    assert len(names) == len(set(names))  # each failure is one line for one file
    written = {p.stem for p in out.glob("*.png")} if out.exists() else set()
    assert written.isdisjoint(Path(n).stem for n in names) and len(written) + len(names) == 200


def _spy_tile_sizes(monkeypatch):
    """Record the ``tile_size`` of every RegressionSRPipeline call (the signature kept: the CLI inspects it)."""
    import functools

    calls = []
    original = RegressionSRPipeline.__call__

    @functools.wraps(original)
    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("tile_size"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RegressionSRPipeline, "__call__", spy)
    return calls


def test_automatic_tiling_from_max_memory(model_dir, photo, tmp_path, monkeypatch, capsys):
    """Without --tile, an image whose work fits in --max-memory runs whole and a larger one in the largest tile that
    fits (the same image as that explicit --tile); --tile overrides; a budget the image alone exceeds is a warning."""
    import math

    from sr_diffusion import cli
    from sr_diffusion.image_processor import load_image
    from sr_diffusion.pipelines import AutoSRPipeline

    monkeypatch.setattr(cli, "MIN_AUTO_TILE", 32)  # tiles of a tiny model on a small photo
    PIL.Image.fromarray(photo).save(tmp_path / "photo.png")  # 128x96
    pipe = AutoSRPipeline.from_pretrained(model_dir)
    per_output_pixel, per_tile_pixel = cli.MEMORY_PER_PIXEL["RegressionSRPipeline"]
    image_bytes = cli.WORK_OVERHEAD + per_output_pixel * 128 * 96 * 16
    whole = image_bytes + per_tile_pixel * 128 * 96
    assert cli.plan_tile(pipe, 128, 96, whole) == (None, whole)  # the threshold: whole fits exactly
    tile, needed = cli.plan_tile(pipe, 128, 96, whole - 1)
    assert tile == 110 == math.isqrt(128 * 96 - 1)  # just below: the largest square tile that fits
    assert needed == image_bytes + per_tile_pixel * 96 * 110  # (a 110x96 tile: the image is 96 high)
    assert cli.plan_tile(pipe, 128, 96, image_bytes + per_tile_pixel * 48**2 + 1)[0] == 48
    assert cli.plan_tile(pipe, 128, 96, 1e12)[0] is None
    assert cli.plan_tile(pipe, 17000, 10, 1e12)[0] <= 16384  # a side over MAX_UNTILED_SIDE is always tiled

    calls = _spy_tile_sizes(monkeypatch)
    capsys.readouterr()
    base = ["upscale", str(tmp_path / "photo.png"), "--model", str(model_dir), "-q", "--tile-overlap", "8"]
    budget = (image_bytes + per_tile_pixel * 48**2 + 1) / 2**30
    assert main([*base, "-o", str(tmp_path / "auto"), "--max-memory", f"{budget!r}"]) == 0
    assert main([*base, "-o", str(tmp_path / "explicit"), "--tile", "48"]) == 0
    assert main([*base, "-o", str(tmp_path / "whole")]) == 0  # the default budget: whole
    assert main([*base, "-o", str(tmp_path / "override"), "--max-memory", f"{budget!r}", "--tile", "32"]) == 0
    assert calls == [48, 48, None, 32]
    auto, explicit = (np.asarray(load_image(tmp_path / name / "photo.png")) for name in ("auto", "explicit"))
    np.testing.assert_array_equal(auto, explicit)
    assert capsys.readouterr().err == ""

    assert main([*base, "-o", str(tmp_path / "tight"), "--max-memory", "0.01"]) == 0  # the output alone is over it
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("warning: ") and "over --max-memory 0.01 GiB" in line and "tiles of 32 px" in line
    assert calls[-1] == 32


def test_per_tile_progress_for_large_images(model_dir, photo, tmp_path, monkeypatch, capsys):
    """A tiled image shows a progress bar per tile (the pipeline's, on stderr); a whole one and -q do not."""
    from sr_diffusion import cli

    monkeypatch.setattr(cli, "MIN_AUTO_TILE", 16)
    PIL.Image.fromarray(photo).save(tmp_path / "photo.png")
    base = ["upscale", str(tmp_path / "photo.png"), "--model", str(model_dir)]
    assert main([*base, "-o", str(tmp_path / "tiled"), "--tile", "48", "--tile-overlap", "8"]) == 0
    assert "photo.png, 48 px tiles" in capsys.readouterr().err
    assert main([*base, "-o", str(tmp_path / "whole")]) == 0
    assert "px tiles" not in capsys.readouterr().err
    assert main([*base, "-o", str(tmp_path / "quiet"), "--tile", "48", "-q"]) == 0
    assert capsys.readouterr().err == ""


def test_summary_of_written_and_skipped(model_dir, inputs, tmp_path, capsys):
    """The end of a run says what was written and what --skip-existing skipped (paths in the output folder)."""
    out = tmp_path / "out"
    base = ["upscale", str(inputs), "-o", str(out), "--model", str(model_dir), "-q"]
    assert main(base) == 0
    assert capsys.readouterr().out.strip() == f"wrote 3 image(s) in {out}: a.png, c.png, sub/b.png"
    (out / "c.png").unlink()
    assert main([*base, "--skip-existing"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"wrote 1 image(s) in {out}: c.png",
                     f"skipped (--skip-existing: the output exists) 2 image(s) in {out}: a.png, sub/b.png"]  # fmt: skip
    assert main(["upscale", str(inputs / "a.png"), "-o", str(tmp_path / "one.png"), "--model", str(model_dir)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 1 image(s): {tmp_path / 'one.png'}"


# The sweep: every subcommand with malformed arguments. {in}: a folder with one photo, {png}: that photo, {bad}: a
# text file named .png, {file}: a plain file (a path under it cannot be created), {ckpt}: a tiny RRDBNet checkpoint,
# {model}: a tiny pipeline folder, {tmp}: the test's folder (with empty/, and other/ holding an image of another name).
# Each case: argv, exit status, words of the one stderr line, and whether a model may be loaded before the error
# (--device is checked first thing in load_pipeline).
SWEEP = [
    ([], 2, "required: command", False),
    (["bogus"], 2, "invalid choice: 'bogus'", False),
    (["upscale", "{png}"], 2, "-o/--output", False),
    (["upscale", "{tmp}/missing.png", "-o", "{tmp}/o"], 2, "no such file or folder", False),
    (["upscale", "{png}", "-o", "{tmp}/o", "--tile", "abc"], 2, "--tile: 'abc' is not a tile size", False),
    (["upscale", "{png}", "-o", "{tmp}/o", "--tile", "15"], 2, "--tile: '15'", False),
    (["upscale", "{png}", "-o", "{tmp}/o", "--tile-overlap", "-1"], 2, "--tile-overlap: '-1'", False),
    (["upscale", "{png}", "-o", "{tmp}/o", "--scale", "0"], 2, "--scale: '0' is not a scale", False),
    (["upscale", "{png}", "-o", "{tmp}/o", "--scale", "1e999"], 2, "--scale: '1e999'", False),
    (["upscale", "{png}", "-o", "{tmp}/o", "--steps", "0"], 2, "--steps: '0'", False),
    (["upscale", "{png}", "-o", "{tmp}/o", "--steps", "2.5"], 2, "--steps: '2.5'", False),
    (["upscale", "{png}", "-o", "{tmp}/o", "--guidance-scale", "nan"], 2, "--guidance-scale: 'nan'", False),
    (["upscale", "{png}", "-o", "{tmp}/o", "--seed", "-1"], 2, "--seed: '-1' is not a seed", False),
    (["upscale", "{png}", "-o", "{tmp}/o", "--max-memory", "0"], 2, "--max-memory: '0' is not a memory budget", False),
    (["upscale", "{png}", "-o", "{tmp}/o", "--max-memory", "lots"], 2, "--max-memory: 'lots'", False),
    (["upscale", "{png}", "-o", "{tmp}/o", "--max-pixels", "-5"], 2, "--max-pixels: '-5'", False),
    (["upscale", "{png}", "-o", "{tmp}/o", "--dtype", "fp64"], 2, "--dtype: invalid choice: 'fp64'", False),
    (["upscale", "{png}", "-o", "{tmp}/o", "--ext", "gif"], 2, "--ext: invalid choice: 'gif'", False),
    (["upscale", "{png}", "-o", "{tmp}/o", "--color-fix", "red"], 2, "--color-fix: invalid choice", False),
    (["upscale", "{png}", "-o", "{tmp}/o", "--bogus"], 2, "unrecognized arguments: --bogus", False),
    (["upscale", "{png}", "-o", "{tmp}/o", "--tile", "32", "--tile-overlap", "40"], 2, "smaller than --tile", False),
    (["upscale", "{png}", "-o", "{file}/sub"], 2, "is a file", False),
    (["upscale", "{png}", "-o", "{tmp}/o.gif"], 2, ".gif is not an output image format", False),
    (["upscale", "{png}", "-o", "{tmp}/o", "--device", "bogus"], 2, "not a torch device name", True),
    (["upscale", "{png}", "-o", "{tmp}/o", "--model", "{tmp}/missing"], 2, "cannot load model from", True),
    (["upscale", "{png}", "-o", "{tmp}/o", "--model", "{model}", "--steps", "2"], 2, "--steps is not an option", True),
    (["upscale", "{bad}", "-o", "{tmp}/o", "--model", "{model}", "-q"], 1, "bad.png: not an image", True),
    (["convert", "{ckpt}"], 2, "required: output", False),
    (["convert", "{tmp}/missing.pth", "{tmp}/out"], 2, "missing.pth", False),
    (["convert", "{bad}", "{tmp}/out"], 2, "bad.png", False),
    (["convert", "{ckpt}", "{tmp}/out", "--arch", "vgg"], 2, "--arch: invalid choice: 'vgg'", False),
    (["convert", "{ckpt}", "{tmp}/out", "--scale", "0"], 2, "--scale: '0'", False),
    (["convert", "{ckpt}", "{tmp}/out", "--scale", "four"], 2, "--scale: 'four'", False),
    (["convert", "{ckpt}", "{tmp}/out", "--norm-groups", "0"], 2, "--norm-groups: '0'", False),
    (["convert", "{ckpt}", "{tmp}/out", "--scale", "2"], 2, "scale", False),
    (["convert", "{ckpt}", "{file}"], 2, "not a folder", False),
    (["convert", "{ckpt}", "{file}/sub"], 2, "", False),
    (["eval", "--sr", "{in}"], 2, "required: --hr", False),
    (["eval", "--hr", "{tmp}/missing", "--sr", "{in}"], 2, "missing", False),
    (["eval", "--hr", "{in}", "--sr", "{in}", "--scale", "0"], 2, "--scale: '0'", False),
    (["eval", "--hr", "{in}", "--sr", "{in}", "--crop-border", "-1"], 2, "--crop-border: '-1'", False),
    (["eval", "--hr", "{in}", "--sr", "{in}", "--degradation", "jpeg"], 2, "--degradation: invalid choice", False),
    (["eval", "--hr", "{in}", "--sr", "{in}", "--seed", "x"], 2, "--seed: 'x'", False),
    (["eval", "--hr", "{in}", "--sr", "{in}", "--model", "{model}"], 2, "either --sr", False),
    (["eval", "--hr", "{in}", "--sr", "{in}", "-o", "{file}/sub"], 2, "is a file", False),
    (["eval", "--hr", "{in}", "--sr", "{tmp}/other"], 1, "1 image(s) failed", False),
    (["eval", "--hr", "{in}", "--sr", "{tmp}/empty"], 2, "no images", False),
    (["demo", "--tile", "3"], 2, "--tile: '3'", False),
    (["demo", "--seed", "1.5"], 2, "--seed: '1.5'", False),
    (["demo", "--dtype", "int8"], 2, "--dtype: invalid choice", False),
    (["demo", "-o", "{file}/sub"], 2, "is a file", False),
    (["demo", "-o", "{tmp}/d", "--device", "bogus"], 2, "not a torch device name", True),
    (["demo", "-o", "{tmp}/d", "--model", "{tmp}/missing"], 2, "cannot load model from", True),
]


@pytest.mark.parametrize("argv, status, words, loads", SWEEP, ids=[" ".join(case[0])[:60] for case in SWEEP])
def test_malformed_arguments_sweep(argv, status, words, loads, model_dir, photo, tmp_path, capsys, monkeypatch):
    """Every subcommand with malformed arguments (wrong types, out-of-range numbers, missing files, unwritable paths):
    one line on stderr naming the cause, exit status 2 for a usage error or 1 for failed work, no traceback, and no
    model loaded when the error can be found before."""
    import sr_diffusion.cli as cli

    folder = tmp_path / "in"
    folder.mkdir()
    PIL.Image.fromarray(photo[:16, :16]).save(folder / "a.png")
    (tmp_path / "bad.png").write_text("not an image")
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    PIL.Image.fromarray(photo[:16, :16]).save(tmp_path / "other" / "zz.png")  # no SR image of a.png
    _tiny_rrdb_checkpoint(tmp_path / "net.pth")
    if not loads:
        monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    paths = {"in": folder, "png": folder / "a.png", "bad": tmp_path / "bad.png", "file": tmp_path / "file",
             "ckpt": tmp_path / "net.pth", "model": model_dir, "tmp": tmp_path}  # fmt: skip
    assert main([arg.format(**paths) for arg in argv]) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") or status == 1, line
    assert words in line, line
    assert (tmp_path / "file").read_text() == "x" and not (tmp_path / "o").exists()


def test_tile_zero_is_the_whole_image_and_the_overlap_is_the_pipelines_unless_given():
    """--tile 0: tile_size=0 for the pipelines that tile automatically as their originals do (0 is their "never"),
    None (whole) for the others; without --tile-overlap the pipeline's own default overlap is used."""
    from types import SimpleNamespace

    from sr_diffusion.cli import build_parser, tile_size_option, upscale_call_kwargs
    from sr_diffusion.pipelines import PASDPipeline, ResShiftPipeline, SeeSRPipeline, StableSRPipeline

    assert all(cls.AUTO_TILING for cls in (ResShiftPipeline, StableSRPipeline, PASDPipeline, SeeSRPipeline))
    auto, plain = SimpleNamespace(AUTO_TILING=True), SimpleNamespace()
    assert (tile_size_option(auto, 0), tile_size_option(plain, 0)) == (0, None)
    assert (tile_size_option(auto, None), tile_size_option(plain, 64)) == (None, 64)
    args = build_parser().parse_args(["upscale", "x.png", "-o", "out", "--tile", "0"])
    assert args.tile == 0 and args.tile_overlap is None

    def call(pipe_args):
        pipe = SimpleNamespace(AUTO_TILING=True, __call__=lambda image, tile_size=None, tile_overlap=32: None)
        return upscale_call_kwargs(pipe, build_parser().parse_args(["upscale", "x.png", "-o", "out", *pipe_args]))

    assert call(["--tile", "0"]) == {"tile_size": 0}
    assert call(["--tile", "64", "--tile-overlap", "8"]) == {"tile_size": 64, "tile_overlap": 8}
