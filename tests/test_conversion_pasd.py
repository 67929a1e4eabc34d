"""Converting PASD's released model folder: random weights under the original names and shapes (tests/pasd_tiny.py
writes them from the original architectures), in the released layout (``unet/`` as a ``.bin`` of the SD UNet plus
``pixel_attentions``, ``controlnet/`` with the original config keys), convert into a PASDPipeline with no missing or
unexpected key, each weight in its place; the CLI does the same; other folders are refused with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, PNDMScheduler, UniPCMultistepScheduler
from pasd_tiny import (
    original_condition_embedding_shapes,
    original_controlnet_config,
    original_pixel_attention_shapes,
)
from safetensors.torch import save_file
from stablesr_tiny import lr_image, random_state_dict, tiny_text_encoder, tiny_tokenizer, tiny_unet, tiny_vae

from sr_diffusion.checkpoints import CheckpointError
from sr_diffusion.cli import main
from sr_diffusion.conversion.pasd import convert_pasd, convert_pasd_unet
from sr_diffusion.pipelines import AutoSRPipeline, PASDPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def write_base(folder: Path, text_dim: int = 32) -> Path:
    """A tiny SD 1.5-like diffusers folder (no unet/: PASD's own UNet folder holds it), with SD 1.5's PNDM config."""
    tiny_vae().save_pretrained(folder / "vae")
    tiny_text_encoder(text_dim).save_pretrained(folder / "text_encoder")
    tiny_tokenizer().save_pretrained(folder / "tokenizer")
    PNDMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True, steps_offset=1
    ).save_pretrained(folder / "scheduler")
    return folder


def released_unet_weights() -> dict[str, torch.Tensor]:
    """PASD's ``UNet2DConditionModel.state_dict()``: the diffusers SD UNet's keys and the pixel attentions'."""
    base = {k: tuple(v.shape) for k, v in tiny_unet().state_dict().items()}
    return random_state_dict(base, seed=1) | random_state_dict(original_pixel_attention_shapes(), seed=2)


def released_controlnet_weights(unet, use_rrdb: bool = False) -> dict[str, torch.Tensor]:
    config = original_controlnet_config(unet, use_rrdb)
    stock = ControlNetModel(
        **{k: v for k, v in config.items() if not k.startswith("_") and k not in ("return_rgbs", "use_rrdb")}
    )
    shapes = {k: tuple(v.shape) for k, v in stock.state_dict().items() if not k.startswith("controlnet_cond_embedding")}
    return random_state_dict(shapes | original_condition_embedding_shapes(use_rrdb=use_rrdb), seed=3)


def write_release(folder: Path, unet_sd, controlnet_sd, use_rrdb: bool = False) -> Path:
    unet = tiny_unet()
    (folder / "unet").mkdir(parents=True)
    unet_config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    unet_config |= {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.21.4"}
    (folder / "unet" / "config.json").write_text(json.dumps(unet_config))
    torch.save(unet_sd, folder / "unet" / "diffusion_pytorch_model.bin")  # the original saved .bin files
    (folder / "controlnet").mkdir()
    (folder / "controlnet" / "config.json").write_text(json.dumps(original_controlnet_config(unet, use_rrdb)))
    save_file(controlnet_sd, folder / "controlnet" / "diffusion_pytorch_model.safetensors")
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pasd_files")
    unet_sd, controlnet_sd = released_unet_weights(), released_controlnet_weights(tiny_unet(), use_rrdb=True)
    write_release(root / "checkpoint-100000", unet_sd, controlnet_sd, use_rrdb=True)
    return {
        "root": root,
        "release": root / "checkpoint-100000",
        "base": write_base(root / "base"),
        "unet": unet_sd,
        "controlnet": controlnet_sd,
    }


def test_released_folder_converts_with_every_key_in_place(files):
    pipe = convert_pasd(files["release"], files["base"])
    unet_sd, controlnet_sd = files["unet"], files["controlnet"]
    for name, value in pipe.unet.state_dict().items():
        torch.testing.assert_close(value, unet_sd[name], rtol=0, atol=0)
    for name, value in pipe.pixel_attentions.state_dict().items():
        torch.testing.assert_close(value, unet_sd[name], rtol=0, atol=0)
    assert len(pipe.unet.state_dict()) + len(pipe.pixel_attentions.state_dict()) == len(unet_sd)
    assert set(pipe.controlnet.state_dict()) == set(controlnet_sd)
    assert all(torch.equal(v, controlnet_sd[k]) for k, v in pipe.controlnet.state_dict().items())
    assert pipe.controlnet.config.use_rrdb and pipe.controlnet.config.return_rgbs
    # the original samples with UniPC on the base's schedule
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler) and pipe.scheduler.config.beta_end == 0.012

    pipe.set_progress_bar_config(disable=True)
    out = pipe(lr_image(0), num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (1, 3, 32, 32) and torch.isfinite(out.images).all()


def test_cli_convert_detects_the_folder_and_writes_a_loadable_pipeline(files, tmp_path, capsys):
    out = tmp_path / "pasd"
    assert main(["convert", str(files["release"]), str(out), "--base", str(files["base"])]) == 0
    assert "PASDPipeline" in capsys.readouterr().out
    pipe = AutoSRPipeline.from_pretrained(out)
    assert type(pipe) is PASDPipeline and pipe.controlnet.config.use_rrdb
    assert main(["convert", str(files["release"]), str(tmp_path / "other"), "--arch", "pasd"]) == 2
    assert "pass --base" in capsys.readouterr().err


def test_other_folders_and_bad_keys_are_refused(files, tmp_path):
    plain = {k: v for k, v in files["unet"].items() if ".pixel_attentions." not in k}
    write_release(tmp_path / "plain", plain, files["controlnet"], use_rrdb=True)
    with pytest.raises(CheckpointError, match="not PASD's UNet"):
        convert_pasd_unet(tmp_path / "plain" / "unet")
    light = {**files["unet"], "up_blocks.1.attentions.0.transformer_blocks.0.attn2_plus.to_k.weight": torch.zeros(1)}
    write_release(tmp_path / "light", light, files["controlnet"], use_rrdb=True)
    with pytest.raises(CheckpointError, match="PASD-light"):
        convert_pasd_unet(tmp_path / "light" / "unet")
    broken = {k: v for k, v in files["unet"].items() if k != "up_blocks.0.pixel_attentions.1.proj_out.bias"}
    write_release(tmp_path / "broken", broken, files["controlnet"], use_rrdb=True)
    with pytest.raises(CheckpointError, match=r"missing keys 'up_blocks\.0\.pixel_attentions\.1\.proj_out\.bias'"):
        convert_pasd_unet(tmp_path / "broken" / "unet")
    # a controlnet/ folder without the RRDBs its config asks for
    write_release(tmp_path / "norrdb", files["unet"], released_controlnet_weights(tiny_unet()), use_rrdb=True)
    with pytest.raises(CheckpointError, match="missing keys 'controlnet_cond_embedding.preprocesser"):
        convert_pasd(tmp_path / "norrdb", files["base"])
    with pytest.raises(FileNotFoundError, match="not a PASD model folder"):
        convert_pasd(files["base"], files["base"])
    with pytest.raises(FileNotFoundError, match="not a Stable Diffusion diffusers folder"):
        convert_pasd(files["release"], tmp_path)
    with pytest.raises(CheckpointError, match="48-d embeddings"):
        convert_pasd(files["release"], write_base(tmp_path / "sd2_like", text_dim=48))
