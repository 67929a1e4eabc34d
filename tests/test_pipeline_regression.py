import json

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from pipeline_common import OffloadTracker

from sr_diffusion.models import EDSR, RRDBNet, SRVGGNetCompact, SwinIR
from sr_diffusion.pipelines import AutoSRPipeline, RegressionSRPipeline, SRPipelineOutput
from sr_diffusion.pipelines.regression.pipeline_regression import MAX_UNTILED_SIDE, _dihedral, _dihedral_inverse


def tiny_model(arch: str, scale: int = 4):
    torch.manual_seed(0)
    if arch == "edsr":
        return EDSR(num_feat=8, num_block=1, upscale=scale)
    if arch == "rrdbnet":
        return RRDBNet(num_feat=8, num_block=1, num_grow_ch=4, scale=scale)
    if arch == "swinir":
        return SwinIR(
            upscale=scale,
            embed_dim=12,
            depths=[2],
            num_heads=[2],
            window_size=4,
            mlp_ratio=2.0,
            upsampler="pixelshuffledirect",
        )
    if arch == "srvgg":
        return SRVGGNetCompact(num_feat=8, num_conv=2, upscale=scale)
    raise ValueError(arch)


def make_pipe(arch="rrdbnet", scale=4):
    pipe = RegressionSRPipeline(model=tiny_model(arch, scale).eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


ARCHS = ["edsr", "rrdbnet", "swinir", "srvgg"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", [(1, 1), (13, 7), (16, 16)])
def test_odd_sizes_come_back_at_exactly_scale_times(arch, size):
    pipe = make_pipe(arch)
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
    out = pipe(x, output_type="pt").images
    assert out.shape == (1, 3, size[0] * 4, size[1] * 4)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_with_auto_pipeline(arch, tmp_path, photo_tensor):
    pipe = make_pipe(arch)
    x = photo_tensor[..., :24, :20]
    ref = pipe(x, output_type="pt").images
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "RegressionSRPipeline"
    loaded = AutoSRPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded, RegressionSRPipeline) and type(loaded.model) is type(pipe.model)
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(loaded(x, output_type="pt").images, ref, rtol=0, atol=0)
    again = RegressionSRPipeline.from_pretrained(tmp_path)
    assert type(again.model) is type(pipe.model)


def test_auto_pipeline_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        AutoSRPipeline.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        AutoSRPipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ValueError, match="not an sr_diffusion pipeline"):
        AutoSRPipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        AutoSRPipeline.from_pretrained(tmp_path)


@pytest.mark.parametrize("arch", ["rrdbnet", "edsr"])
def test_tiled_matches_untiled_to_50db(arch, photo_tensor):
    pipe = make_pipe(arch)
    ref = pipe(photo_tensor, output_type="pt").images
    tiled = pipe(photo_tensor, tile_size=48, tile_overlap=32, tile_batch_size=2, output_type="pt").images
    assert tiled.shape == ref.shape
    psnr = 10 * torch.log10(1 / F.mse_loss(tiled, ref))
    assert psnr >= 50, f"tiled vs untiled PSNR {psnr:.1f} dB"


def test_batch_equals_single_and_dict_equals_tuple(photo_tensor):
    pipe = make_pipe("srvgg")
    a, b = photo_tensor[..., :16, :16], photo_tensor[..., 16:32, 16:32]
    batch = pipe(torch.cat([a, b]), output_type="pt").images
    # batched float32 convolutions may round differently from single ones (~1e-5): 1e-4, far below one 8-bit level
    torch.testing.assert_close(batch[0:1], pipe(a, output_type="pt").images, rtol=0, atol=1e-4)
    torch.testing.assert_close(batch[1:2], pipe(b, output_type="pt").images, rtol=0, atol=1e-4)
    out = pipe(a, output_type="pt")
    assert isinstance(out, SRPipelineOutput)
    (tup,) = pipe(a, output_type="pt", return_dict=False)
    torch.testing.assert_close(out.images, tup)


def test_output_types(photo):
    pipe = make_pipe("srvgg")
    pil = pipe(PIL.Image.fromarray(photo[:10, :12])).images
    assert isinstance(pil[0], PIL.Image.Image) and pil[0].size == (48, 40)
    arr = pipe(photo[:10, :12], output_type="np").images
    assert arr.shape == (1, 40, 48, 3) and arr.min() >= 0 and arr.max() <= 1
    with pytest.raises(ValueError, match="output_type"):
        pipe(photo[:10, :12], output_type="latent")


def test_outscale_any_factor(photo_tensor):
    pipe = make_pipe("srvgg")
    x = photo_tensor[..., :15, :21]
    assert pipe(x, outscale=2, output_type="pt").images.shape == (1, 3, 30, 42)
    assert pipe(x, outscale=3.5, output_type="pt").images.shape == (1, 3, 52, 74)
    with pytest.raises(ValueError, match="outscale"):
        pipe(x, outscale=0)


def test_self_ensemble_is_mean_of_dihedral_transforms(photo_tensor):
    x = photo_tensor[..., :16, :20]  # sides of at least MIN_CONTEXT: the model sees the image itself
    for k in range(8):
        torch.testing.assert_close(_dihedral_inverse(_dihedral(x, k), k), x)
    pipe = make_pipe("srvgg")
    model = pipe.model
    with torch.no_grad():
        expected = sum(_dihedral_inverse(model(_dihedral(x, k)).sample, k) for k in range(8)) / 8
    out = pipe(x, self_ensemble=True, output_type="pt").images
    torch.testing.assert_close(out, expected.clamp(0, 1))


def test_alpha_is_upscaled_separately(photo):
    pipe = make_pipe("srvgg")
    alpha = np.full((10, 12), 128, np.uint8)
    rgba = PIL.Image.fromarray(np.dstack([photo[:10, :12], alpha]), mode="RGBA")
    out = pipe(rgba).images[0]
    assert out.mode == "RGBA" and out.size == (48, 40)
    assert np.all(np.asarray(out)[..., 3] == 128)


def test_huge_input_without_tiling_is_refused():
    pipe = make_pipe("srvgg")
    with pytest.raises(ValueError, match="needs tiling"):
        pipe(torch.zeros(1, 3, 1, MAX_UNTILED_SIDE + 1), output_type="pt")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tile_size=0), "tile_size"),
        (dict(tile_size=16, tile_overlap=16), "tile_overlap"),
        (dict(tile_size=16, tile_overlap=4, tile_batch_size=0), "tile_batch_size"),
        (dict(tile_size=16, tile_overlap=4, tile_blend="cosine"), "tile_blend"),
    ],
)
def test_bad_tiling_arguments(kwargs, match, photo_tensor):
    with pytest.raises(ValueError, match=match):
        make_pipe("srvgg")(photo_tensor, output_type="pt", **kwargs)


def test_swinir_tile_must_fit_window(photo_tensor):
    with pytest.raises(ValueError, match="multiple of 4"):
        make_pipe("swinir")(photo_tensor, tile_size=18, output_type="pt")


def test_bf16_close_to_fp32(photo_tensor):
    pipe = make_pipe("edsr")
    x = photo_tensor[..., :16, :16]
    ref = pipe(x, output_type="pt").images
    out = pipe.to(torch.bfloat16)(x, output_type="pt").images
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05


def test_model_cpu_offload_with_tiling_and_self_ensemble(monkeypatch, photo_tensor):
    """``enable_model_cpu_offload`` (``device="cpu"``: accelerate's hooks run as on a GPU machine): the model runs on
    the device in every tile and ensemble pass, the image is unchanged, and the model is offloaded afterwards."""
    pipe = make_pipe("edsr")
    x = photo_tensor[..., :16, :16]
    kwargs = {"output_type": "pt", "tile_size": 8, "tile_overlap": 2, "self_ensemble": True}
    reference = pipe(x, **kwargs).images
    tracker = OffloadTracker(monkeypatch)
    pipe.enable_model_cpu_offload(device="cpu")
    assert tracker.watch(pipe) == ["model"]
    torch.testing.assert_close(pipe(x, **kwargs).images, reference, rtol=0, atol=0)
    assert tracker.loaded == {"model"} and not tracker.violations
    assert not tracker.on_device[id(pipe.model)]


def test_saved_folder_loads_in_a_fresh_process(tmp_path):
    """diffusers resolves our component classes only from sys.modules; both loaders must import them."""
    import subprocess
    import sys

    make_pipe("edsr").save_pretrained(tmp_path)
    for loader in ("AutoSRPipeline", "RegressionSRPipeline"):
        code = (
            f"from sr_diffusion.pipelines import {loader}; "
            f"print(type({loader}.from_pretrained({str(tmp_path)!r}).model).__name__)"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == "EDSR"
